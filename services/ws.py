"""The WebSocket ingress: ``ws://host:port/MESSAGES``.

Every frame is one message and gets one answer frame, in the order the
frames came, so a client can keep many frames in flight and match answers
by position. A connection reads ahead at most :data:`WINDOW` unanswered
frames; past that it stops reading until answers go out (backpressure).
"""

import asyncio
import logging
import os
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

import orjson
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request

from common import cli, logs, runtime
from common.brokers import NatsLink, redis_client, wait_for_redis
from common.committer import Committer
from common.errors import (
    FanoutError,
    MessageTooLarge,
    RejectedError,
    RetryableError,
    error_body,
)
from common.message import Parser
from common.policy import Pattern
from common.settings import Settings
from common.tokens import Tokens, bearer

logger = logging.getLogger("fanout.ws")

WINDOW = 1000  # unanswered frames one connection may have in flight
PATH = "/MESSAGES"
_END = object()  # tells a connection's writer that no more answers come
# The library's own cap on a frame, a multiple of FANOUT_MAX_MESSAGE_BYTES:
# frames between the two are refused by the session, in order, after the
# earlier frames were answered; beyond it the library closes at once.
HARD_CAP_FACTOR = 2
OPEN_TIMEOUT = 10  # seconds for a client to complete the handshake
CLOSE_TIMEOUT = 2  # seconds a client has to answer our close frame
# Seconds before the end of a stop at which connections still open are cut.
ABORT_MARGIN = 0.2


def _error_frame(exc: FanoutError) -> bytes:
    answer: dict[str, object] = {"status": "error", "error": str(exc)}
    if isinstance(exc, RetryableError):
        answer["retryable"] = True
    return orjson.dumps(answer)


class _Close:
    """Tells a connection's writer to close, once the answers before it left."""

    def __init__(self, code: int, reason: str):
        self.code = code
        self.reason = reason


class Session:
    """One client connection: a reader that submits, a writer that answers."""

    def __init__(
        self,
        ws: ServerConnection,
        ingress: "WsIngress",
        patterns: tuple[Pattern, ...] = (),
    ):
        self.ws = ws
        self.ingress = ingress
        self.patterns = patterns  # of the client's token
        self.answers: asyncio.Queue = asyncio.Queue(maxsize=WINDOW)
        self.read_task: asyncio.Task | None = None
        self._receiving = False  # the reader waits in recv()
        self._last_frame = 0.0  # loop time of the last frame read
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_out = False

    async def run(self) -> None:
        writer_task = asyncio.create_task(self._write(), name="ws-writer")
        self.read_task = asyncio.create_task(self._read(), name="ws-reader")
        try:
            await self.read_task
        except asyncio.CancelledError:
            # Cancelled by shutdown: recv() is safe to cancel, no frame is lost.
            if not self.ingress.stopping.is_set():
                raise
        finally:
            await self.answers.put(_END)
            await writer_task

    def _watch_idle(self) -> None:
        """Cancel the reader once it has waited ``ws_idle_timeout`` for a frame.

        PERF: one timer a connection, re-armed as frames come, rather than a
        timeout around every recv(). Only a reader waiting in recv() is
        cancelled, which loses no frame; one busy handing over answers is
        not idle.
        """
        loop = asyncio.get_running_loop()
        idle = self.ingress.settings.ws_idle_timeout
        quiet = loop.time() - self._last_frame
        if self._receiving and quiet >= idle:
            self._idle_timer = None
            self._idle_out = True
            self.read_task.cancel()
            return
        self._idle_timer = loop.call_later(max(idle - quiet, 0.05), self._watch_idle)

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        self._last_frame = loop.time()
        self._watch_idle()
        try:
            await self._read_frames(loop)
        except asyncio.CancelledError:
            if not self._idle_out:
                raise
            idle = self.ingress.settings.ws_idle_timeout
            await self.answers.put(_Close(1001, f"idle for {idle:g} s"))
        finally:
            if self._idle_timer is not None:
                self._idle_timer.cancel()

    async def _read_frames(self, loop: asyncio.AbstractEventLoop) -> None:
        parser = self.ingress.parser
        parse = parser.frame
        submit = self.ingress.committer.submit_body
        patterns = self.patterns
        put = self.answers.put
        stopping = self.ingress.stopping
        recv = self.ws.recv
        try:
            while True:
                # Bytes, undecoded: only a frame that is not ASCII is
                # checked for UTF-8 here (orjson checks it again).
                self._receiving = True
                try:
                    data = await recv(decode=False)
                finally:
                    self._receiving = False
                self._last_frame = loop.time()
                if stopping.is_set():
                    return  # read after shutdown began: not taken, not answered
                if len(data) > parser.max_bytes:
                    exc = MessageTooLarge(
                        f"message is {len(data)} bytes; the limit is "
                        f"{parser.max_bytes} bytes"
                    )
                    self._log_refusal(exc)
                    await put(_Close(1009, str(exc)))
                    return
                # Checked here, not when the frame is parsed with its batch:
                # the frames behind a bad one are not taken.
                if not data.isascii() and _not_utf8(data):
                    self._log_refusal(RejectedError("message is not valid UTF-8"))
                    await put(_Close(1007, "message is not valid UTF-8"))
                    return
                try:
                    waiter = submit(parse, data, patterns)
                except FanoutError as exc:  # overloaded, or shutting down
                    await put(_error_frame(exc))
                    continue
                await put(waiter)
        except ConnectionClosed:
            pass

    def _log_refusal(self, exc: FanoutError) -> None:
        if isinstance(exc, RejectedError):
            self.ingress.refusals.warning(
                "refused frame from %s: %s", self.ws.remote_address, exc
            )

    async def _write(self) -> None:
        # Answers leave in frame order: each waits for its own confirmation.
        send = self.ws.send
        get = self.answers.get
        while (item := await get()) is not _END:
            if isinstance(item, _Close):
                await self.ws.close(item.code, item.reason)
                continue
            if isinstance(item, bytes):
                answer = item
            else:
                answer = await self._confirm(item)
            try:
                await send(answer, text=True)
            except ConnectionClosed:
                pass  # the client left; its messages were still committed

    async def _confirm(self, waiter: asyncio.Future) -> bytes:
        """The answer to one frame, once the committer parsed and committed it."""
        try:
            message = await waiter
        except FanoutError as exc:  # refused, a broker outage, or NATS refused it
            self._log_refusal(exc)
            return _error_frame(exc)
        except Exception:  # noqa: BLE001 - a bug in parsing must not end the writer
            logger.exception("could not parse a frame from %s", self.ws.remote_address)
            return error_body("internal error; the message was not accepted")
        return orjson.dumps(
            {"status": "accepted", "id": message.id, "topic": message.topic}
        )


def _refusal(connection: ServerConnection, status: HTTPStatus, text: str):
    """A refused handshake's answer, JSON like every answer Fanout writes."""
    response = connection.respond(status, text)
    response.body = error_body(text)
    for name in ("Content-Type", "Content-Length"):
        del response.headers[name]
    response.headers["Content-Type"] = "application/json"
    response.headers["Content-Length"] = str(len(response.body))
    return response


def _not_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return True
    return False


class WsIngress:
    """The process: brokers, committer, server and its sessions."""

    def __init__(self, settings: Settings, stopping: asyncio.Event):
        self.settings = settings
        self.stopping = stopping
        self.parser = Parser.for_ingress("ws", settings)
        self.tokens = Tokens(settings.tokens_file + settings.tokens)
        self.refusals = logs.RateLimited(logger)
        self.nats = NatsLink(settings, f"fanout-ws-{logs.process_label()}", logger)
        self.redis = redis_client(settings)
        self.committer = Committer(settings, self.nats, self.redis, logger)
        self.sessions: set[Session] = set()
        self._patterns: dict[ServerConnection, tuple[Pattern, ...]] = {}

    def process_request(self, connection: ServerConnection, request: Request):
        path = urlsplit(request.path).path
        if path != PATH:
            return _refusal(
                connection,
                HTTPStatus.NOT_FOUND,
                f"no such resource: {path}; connect to {PATH}",
            )
        if self.stopping.is_set():
            return _refusal(
                connection,
                HTTPStatus.SERVICE_UNAVAILABLE,
                "the gateway is shutting down",
            )
        if len(self.sessions) >= self.settings.ws_max_connections:
            return _refusal(
                connection,
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"{len(self.sessions)} connections are open, the most this "
                "process serves (FANOUT_WS_MAX_CONNECTIONS); try again later",
            )
        return self._authorize(connection, request)

    def _authorize(self, connection: ServerConnection, request: Request):
        # Browsers cannot set headers on a WebSocket handshake, so the token
        # may also come as ?token=; the answer never says which tokens exist.
        if not self.tokens.required:
            return None
        presented = bearer(request.headers.get("Authorization"))
        if presented is None:
            query = parse_qs(urlsplit(request.path).query)
            presented = (query.get("token") or [None])[0]
        token = self.tokens.identify(presented)
        if token is None:
            self.refusals.warning(
                "refused handshake from %s: no valid token", connection.remote_address
            )
            response = _refusal(
                connection,
                HTTPStatus.UNAUTHORIZED,
                "a valid token is required: Authorization: Bearer <token> "
                "or ?token=<token>",
            )
            response.headers["WWW-Authenticate"] = 'Bearer realm="fanout"'
            return response
        self._patterns[connection] = token.patterns
        return None

    async def handle(self, ws: ServerConnection) -> None:
        session = Session(ws, self, self._patterns.pop(ws, ()))
        self.sessions.add(session)
        try:
            await session.run()
            if self.stopping.is_set():
                await ws.close(1001, "server shutting down")
        finally:
            self.sessions.discard(session)

    async def serve(self) -> int:
        host, port = self.settings.ws_bind
        # Listen first: a busy port is one clear line and exit 1, before
        # anything else was started.
        try:
            server = await serve(
                self.handle,
                host,
                port,
                process_request=self.process_request,
                max_size=self.settings.max_message_bytes * HARD_CAP_FACTOR,
                compression="deflate" if self.settings.ws_compression else None,
                ping_interval=self.settings.ws_ping_interval,
                ping_timeout=self.settings.ws_ping_interval,
                close_timeout=CLOSE_TIMEOUT,
                open_timeout=OPEN_TIMEOUT,
                server_header=None,
            )
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            logger.error("cannot listen on %s:%d: %s", host, port, reason.lower())
            await self.redis.aclose()
            return 1
        self.committer.start()
        connect_tasks = [
            asyncio.create_task(self._connect_nats()),
            asyncio.create_task(
                wait_for_redis(
                    self.redis, self.settings.redis_url, logger, self.stopping
                )
            ),
        ]
        logger.info("ws ingress listening on %s:%d%s", host, port, PATH)
        await self.stopping.wait()
        await self._shutdown(server, connect_tasks)
        return 0

    async def _connect_nats(self) -> None:
        if await self.nats.connect(self.stopping):
            self.parser.limit_to(self.nats.nc.max_payload)

    async def _shutdown(self, server, connect_tasks: list[asyncio.Task]) -> None:
        timeout = self.settings.shutdown_timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        logger.info("ws stopping: %d connections open", len(self.sessions))

        # Stop listening first, then stop each reader; writers still answer
        # every frame already read before the connection closes with 1001.
        server.close(close_connections=False)
        for session in list(self.sessions):
            if session.read_task is not None:
                session.read_task.cancel()
        closed_task = asyncio.ensure_future(server.wait_closed())
        await asyncio.wait({closed_task}, timeout=timeout / 2)

        # Answers still due wait for a broker that is slow or frozen: the
        # committer gets a quarter more, then refuses what it holds as
        # retryable, so that every frame read gets its answer and every
        # connection its 1001 within the timeout.
        await self.committer.close(timeout / 4)
        await asyncio.wait({closed_task}, timeout=deadline - ABORT_MARGIN - loop.time())

        # A client that keeps sending instead of answering our close frame
        # would hold its connection for the library's close timeout.
        if not closed_task.done():
            logger.warning(
                "ws shutdown: %d connections still open after %.1f s; aborted",
                len(self.sessions),
                timeout,
            )
            for session in list(self.sessions):
                session.ws.transport.abort()
            await asyncio.wait({closed_task}, timeout=ABORT_MARGIN)
        for task in connect_tasks:
            task.cancel()
        await self.nats.close(flush_timeout=max(deadline - loop.time(), 0.05))
        await self.redis.aclose()
        logger.info("ws stopped")


def main() -> None:
    """``fanout-ws``."""
    cli.parse_command_line("fanout-ws", "The WebSocket ingress: /MESSAGES.")
    runtime.process_main(
        lambda settings, stopping: WsIngress(settings, stopping).serve()
    )


if __name__ == "__main__":
    main()
