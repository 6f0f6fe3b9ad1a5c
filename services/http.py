"""The HTTP ingress: ``POST /MESSAGES``, Falcon's ASGI app under gunicorn.

A POST carries one envelope, or many (a bulk request: a JSON array, or
NDJSON with one envelope a line). A bulk request gets 200 and one result
per envelope, in order; its accepted messages are committed together.

Each gunicorn worker is its own process with its own NATS connection, Redis
pool and committer, set up at ASGI lifespan startup. Startup does not wait
for the brokers: until they answer, messages wait up to the publish timeout
and are then refused with 503.
"""

import asyncio
import logging
import signal
import threading

import falcon
import falcon.asgi
import orjson

from common import cli, logs, runtime
from common import settings as settings_module
from common.brokers import NatsLink, redis_client, wait_for_redis
from common.committer import Committer
from common.errors import (
    BulkTooLarge,
    FanoutError,
    MessageTooLarge,
    RejectedError,
    RetryableError,
    error_body,
)
from common.message import BULK_PEEK, Message, Parser
from common.settings import Settings
from common.tokens import Tokens, bearer
from services.http_protocol import GuardedHttpTools

logger = logging.getLogger("fanout.http")

JSON = "application/json"
NDJSON = "application/x-ndjson"
# How long before uvicorn stops waiting for in-flight requests (half of
# FANOUT_SHUTDOWN_TIMEOUT) the committer refuses what it still holds, so
# that those requests are answered 503 rather than cut off.
ANSWER_MARGIN = 0.5  # seconds


def _result(outcome: Message | FanoutError) -> dict:
    """What a client is told about one message, as the WebSocket answers it."""
    if isinstance(outcome, Message):
        return {"status": "accepted", "id": outcome.id, "topic": outcome.topic}
    result: dict[str, object] = {"status": "error", "error": str(outcome)}
    if isinstance(outcome, RetryableError):
        result["retryable"] = True
    return result


def _starts_array(head: bytes) -> bool:
    """Whether a body's first :data:`BULK_PEEK` bytes make it a bulk JSON array.

    The one rule for a body read whole and one read in parts.
    """
    return head.lstrip(b" \t\r\n").startswith(b"[")


def _media_type(req: falcon.asgi.Request) -> str:
    media_type = (req.content_type or "").split(";", 1)[0].strip().lower()
    if media_type not in (JSON, NDJSON):
        given = media_type or "missing"
        raise falcon.HTTPUnsupportedMediaType(
            description=f"Content-Type must be {JSON} or {NDJSON}, not {given}"
        )
    return media_type


class MessagesResource:
    """``/MESSAGES``: one message per POST, or many in a bulk request."""

    def __init__(self, settings: Settings, gateway: "Gateway"):
        self.settings = settings
        self.gateway = gateway
        self.parser = Parser.for_ingress("http", settings)
        self.tokens = Tokens(settings.tokens_file + settings.tokens)

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response):
        patterns = self._authorize(req)
        media_type = _media_type(req)
        encoding = req.get_header("Content-Encoding")
        if encoding and encoding.strip().lower() != "identity":
            raise falcon.HTTPUnsupportedMediaType(
                description=f"Content-Encoding {encoding} is not supported; "
                "send the body uncompressed"
            )
        body, bulk = await self._read_body(req, media_type)
        resp.content_type = JSON
        if not bulk:
            # Parsed by the committer with the other bodies of its batch; a
            # refusal is raised here all the same.
            message = await self.gateway.committer.submit_body(
                self.parser.envelope, body, patterns
            )
            resp.status = falcon.HTTP_202
            resp.data = orjson.dumps(_result(message))
            return

        max_count = self.settings.max_bulk_messages
        if media_type == NDJSON:
            outcomes = self.parser.ndjson(body, max_count, patterns)
        else:
            outcomes = self.parser.array(body, max_count, patterns)
        self._log_refusals(req, outcomes)
        outcomes = await self._commit_all(outcomes)
        resp.status = falcon.HTTP_200
        resp.data = orjson.dumps({"results": [_result(o) for o in outcomes]})

    async def _commit_all(
        self, outcomes: list[Message | RejectedError]
    ) -> list[Message | FanoutError]:
        """Submit the accepted messages together and wait for all of them.

        A message that the brokers did not confirm is replaced by the reason.
        """
        messages = [o for o in outcomes if isinstance(o, Message)]
        if not messages:
            return list(outcomes)
        try:
            together = self.gateway.committer.submit_all(messages)
        except RetryableError as exc:
            refused: dict[int, FanoutError] = {id(m): exc for m in messages}
        else:
            refused = {} if together is None else await together.waiter
        if not refused:
            return list(outcomes)

        # Put each refusal in the place of its message.
        return [
            refused.get(id(outcome), outcome)
            if isinstance(outcome, Message)
            else outcome
            for outcome in outcomes
        ]

    def _log_refusals(self, req, outcomes: list[Message | RejectedError]) -> None:
        refused = [o for o in outcomes if isinstance(o, RejectedError)]
        if refused:
            _refusals.warning(
                "refused %d of %d messages in a bulk request from %s; first: %s",
                len(refused),
                len(outcomes),
                req.remote_addr,
                refused[0],
            )

    def _authorize(self, req: falcon.asgi.Request) -> tuple:
        """The token's topic patterns; 401 when a token is needed and not given.

        The answer is the same for a missing and a wrong token, and says
        nothing about which tokens exist.
        """
        if not self.tokens.required:
            return ()
        token = self.tokens.identify(bearer(req.get_header("Authorization")))
        if token is None:
            _refusals.warning(
                "refused request from %s: no valid token", req.remote_addr
            )
            raise falcon.HTTPUnauthorized(
                description="a valid token is required: Authorization: Bearer <token>",
                headers={"WWW-Authenticate": 'Bearer realm="fanout"'},
            )
        return token.patterns

    async def _read_body(
        self, req: falcon.asgi.Request, media_type: str
    ) -> tuple[bytes, bool]:
        """The body, and whether it is a bulk request; 413 past its limit.

        A client that trickles its body is answered 408 by the protocol
        (services.http_protocol), which times every body still arriving.
        """
        length = req.content_length
        if length is not None and length <= self._whole_limit:
            # PERF: small enough for either limit; one read.
            body = await req.stream.read()
            bulk = media_type == NDJSON or _starts_array(body[:BULK_PEEK])
        else:
            body, bulk = await self._read_limited(req, media_type)
        if length is not None and len(body) < length:
            raise RejectedError(
                f"request body ended after {len(body)} of its {length} bytes"
            )
        if req.scope.get(GuardedHttpTools.INCOMPLETE):
            raise RejectedError("request body did not arrive whole; nothing accepted")
        return body, bulk

    @property
    def _whole_limit(self) -> int:
        # The parser's limit may have been lowered to the NATS server's
        # max_payload since startup.
        return min(self.parser.max_bytes, self.settings.max_bulk_bytes)

    async def _read_limited(
        self, req: falcon.asgi.Request, media_type: str
    ) -> tuple[bytes, bool]:
        head = b""
        bulk = media_type == NDJSON
        if not bulk:
            head = await req.stream.read(BULK_PEEK)
            bulk = _starts_array(head)

        limit = self.settings.max_bulk_bytes if bulk else self.parser.max_bytes
        check = self._check_bulk_size if bulk else self.parser.check_body_size
        if req.content_length is not None:
            check(req.content_length)

        # Read one byte past the limit so a chunked body without a length is
        # cut off there instead of being read whole.
        body = head + await req.stream.read(limit + 1 - len(head))
        if len(body) > limit and req.content_length is None and not bulk:
            raise MessageTooLarge(
                f"request body is more than {limit} bytes, the limit; it was "
                "not read further"
            )
        check(len(body))
        return body, bulk

    def _check_bulk_size(self, size: int) -> None:
        limit = self.settings.max_bulk_bytes
        if size > limit:
            raise BulkTooLarge(
                f"request body is {size} bytes; the limit for a bulk request is "
                f"{limit} bytes (FANOUT_MAX_BULK_BYTES)"
            )


class Gateway:
    """What one worker process holds: brokers, committer, lifecycle."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.parser: Parser | None = None  # set by create_app
        self.stopping = asyncio.Event()
        self.nats: NatsLink | None = None
        self.committer: Committer | None = None
        self._connect_tasks: list[asyncio.Task] = []

    async def process_startup(self, scope, event) -> None:
        runtime.tune_gc()
        settings = self.settings
        self.nats = NatsLink(settings, f"fanout-http-{logs.process_label()}", logger)
        self.redis = redis_client(settings)
        self.committer = Committer(settings, self.nats, self.redis, logger)
        self.committer.start()
        self._watch_stop_signals()
        self._connect_tasks = [
            asyncio.create_task(self._connect_nats(), name="nats-connect"),
            asyncio.create_task(
                wait_for_redis(self.redis, settings.redis_url, logger, self.stopping),
                name="redis-connect",
            ),
        ]
        logger.info("http worker ready")

    def _watch_stop_signals(self) -> None:
        """Learn of TERM and INT as uvicorn does, and tell the committer.

        uvicorn installs its signal handlers before the app starts; each is
        kept and called after ours. Ours only schedules :meth:`_stop_begun`
        on the loop.
        """
        if threading.current_thread() is not threading.main_thread():
            return  # pragma: no cover - signals reach the main thread only
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(signum)

            def on_signal(sig, frame, previous=previous):
                loop.call_soon_threadsafe(self._stop_begun)
                if callable(previous):
                    previous(sig, frame)

            signal.signal(signum, on_signal)

    def _stop_begun(self) -> None:
        # uvicorn answers in-flight requests for half the shutdown timeout,
        # then cancels them: a request whose message waits on a stalled
        # broker would get uvicorn's plain 500. The committer refuses what
        # it holds a moment before, as retryable: 503 with Retry-After.
        grace = self.settings.shutdown_timeout / 2
        self.committer.stop_by(max(grace - ANSWER_MARGIN, grace / 2))

    async def _connect_nats(self) -> None:
        if await self.nats.connect(self.stopping):
            self.parser.limit_to(self.nats.nc.max_payload)

    async def process_shutdown(self, scope, event) -> None:
        # uvicorn has had the first half of FANOUT_SHUTDOWN_TIMEOUT for the
        # requests in flight; committing and flushing share the second.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.shutdown_timeout / 2
        logger.info("http worker stopping")
        self.stopping.set()
        await self.committer.close(self.settings.shutdown_timeout / 2)
        for task in self._connect_tasks:
            task.cancel()
        await self.nats.close(flush_timeout=max(deadline - loop.time(), 0.05))
        await self.redis.aclose()
        logger.info("http worker stopped")


_refusals = logs.RateLimited(logger)


async def _rejected(req, resp, exc: RejectedError, params) -> None:
    _refusals.warning("refused message from %s: %s", req.remote_addr, exc)
    resp.status = exc.http_status
    resp.content_type = JSON
    resp.data = error_body(str(exc))


async def _retryable(req, resp, exc: RetryableError, params) -> None:
    resp.status = falcon.HTTP_503
    resp.content_type = JSON
    resp.set_header("Retry-After", str(exc.retry_after))
    resp.data = error_body(str(exc))


async def _unexpected(req, resp, exc: Exception, params) -> None:
    if isinstance(exc, falcon.HTTPError):
        _serialize_http_error(req, resp, exc)
        return
    logger.exception("unexpected error handling %s %s", req.method, req.path)
    resp.status = falcon.HTTP_500
    resp.content_type = JSON
    resp.data = error_body("internal error; the message was not accepted")


def _serialize_http_error(req, resp, exc: falcon.HTTPError) -> None:
    resp.status = exc.status
    resp.content_type = JSON
    text = exc.description or exc.title
    if exc.status == falcon.HTTP_404:
        text = f"no such resource: {req.path}; messages go to POST /MESSAGES"
    elif exc.status == falcon.HTTP_405:
        text = f"method {req.method} is not allowed on {req.path}; use POST"
    resp.data = error_body(text)
    for name, value in (exc.headers or {}).items():
        resp.set_header(name, value)


def create_app(settings: Settings | None = None) -> falcon.asgi.App:
    """The ASGI app; gunicorn's workers each build one."""
    settings = settings or settings_module.load_or_exit()
    gateway = Gateway(settings)
    resource = MessagesResource(settings, gateway)
    gateway.parser = resource.parser
    app = falcon.asgi.App(middleware=[gateway])
    app.req_options.strip_url_path_trailing_slash = False
    app.add_route("/MESSAGES", resource)
    app.add_error_handler(Exception, _unexpected)
    app.add_error_handler(RejectedError, _rejected)
    app.add_error_handler(RetryableError, _retryable)
    app.set_error_serializer(_serialize_http_error)
    return app


def app_factory() -> falcon.asgi.App:
    logs.setup(settings_module.load_or_exit().log_level)
    return create_app()


def main() -> None:
    """``fanout-http``: gunicorn with uvicorn workers, configured from settings."""
    from services.gunicorn_app import run_gunicorn

    cli.parse_command_line(
        "fanout-http", "The HTTP ingress: POST /MESSAGES, under gunicorn."
    )

    run_gunicorn()


if __name__ == "__main__":
    main()
