"""Connections to the two brokers: NATS for topics, Redis for lists.

Both are reached through well-kept clients (nats-py, redis-py with hiredis);
this module only adds what a gateway needs on top: startup that retries with
backoff instead of crashing, one log line per outage rather than per attempt,
and an event that says whether NATS is usable right now.
"""

import asyncio
import logging
import random
import re
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import hiredis
import nats
import nats.errors
import redis.asyncio as aioredis
from nats.aio.client import Client as NatsClient
from nats.errors import ProtocolError
from nats.protocol.parser import AWAITING_CONTROL_LINE
from nats.protocol.parser import Parser as NatsParser
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.connection import HiredisRespSerializer

from common.errors import BrokerUnavailable
from common.logs import RateLimited
from common.message import Message
from common.settings import Settings, redact_url

NATS_PENDING_BYTES = 8 * 1024 * 1024  # the reconnect buffer's cap
BACKOFF_START = 0.2  # seconds
BACKOFF_MAX = 5.0  # seconds
PUBLISH_DENIED = "permissions violation for publish to "  # server's -ERR, lowered


def backoff_delays(start: float = BACKOFF_START, most: float = BACKOFF_MAX):
    """Doubling delays with jitter, capped at ``most`` seconds."""
    delay = start
    while True:
        yield delay * random.uniform(0.8, 1.2)
        delay = min(delay * 2, most)


KNOWN_FRAMES = 4096  # control lines FrameReader keeps split

PING = b"PING\r\n"

# What a direct subscription is handed: (subject, payload) pairs, in order.
Deliver = Callable[[list[tuple[bytes, bytes]]], None]


def message_frame(control: bytes) -> tuple[bytes, int, bytes, int, int] | None:
    """A ``MSG``/``HMSG`` control line (no CRLF) split into subject, sid,
    reply subject, header bytes and total bytes; None for any other line."""
    if control.startswith(b"MSG "):
        parts = control[4:].split()
        headers = 0
    elif control.startswith(b"HMSG "):
        parts = control[5:].split()
        try:
            headers = int(parts.pop(-2))
        except (IndexError, ValueError):
            raise ProtocolError("nats: malformed HMSG") from None
    else:
        return None
    if len(parts) not in (3, 4):
        raise ProtocolError("nats: malformed MSG")
    try:
        sid, total = int(parts[1]), int(parts[-1])
    except ValueError:
        raise ProtocolError("nats: malformed MSG") from None
    if not 0 <= headers <= total:
        raise ProtocolError("nats: malformed HMSG")
    reply = parts[2] if len(parts) == 4 else b""
    return parts[0], sid, reply, headers, total


class FrameReader(NatsParser):
    """nats-py's protocol parser with a quick path for message frames.

    nats-py tries a regular expression per operation, deletes each frame
    from the front of its buffer and awaits a coroutine per message; at the
    NATS consumer's rates that was most of its time. Here ``MSG`` and
    ``HMSG`` frames are split where they lie in the chunk just read, and a
    subscription's deliver function (see :meth:`DirectClient.subscribe_direct`)
    is called with no await, once with all its messages in the chunk. Every
    other operation (PING, PONG, INFO, +OK, -ERR) is one line, handed whole
    to nats-py's own parser, as is a message for a subscription that has no
    deliver function; messages read before such a line are delivered first.
    """

    def __init__(self, nc: "DirectClient"):
        super().__init__(nc)
        # PERF: a stream of messages repeats a few control lines (same
        # subject, same sizes); each is split and checked once, then looked
        # up (splitting was 0.6 of the 1.0 us a frame took).
        self._known: dict[bytes, tuple[bytes, int, bytes, int, int]] = {}

    async def parse(self, data: bytes = b"") -> None:
        if self.buf:
            # A frame that did not fit the last chunk; ``needed`` is its size.
            self.buf += data
            if len(self.buf) < self.needed:
                return
            data = bytes(self.buf)
            self.buf = bytearray()
        self.needed = 0
        direct = self.nc._direct
        known = self._known
        read: dict[int, list[tuple[bytes, bytes]]] = {}  # per direct sid
        last_sid, last = None, []
        pos, size = 0, len(data)
        while pos < size:
            eol = data.find(b"\r\n", pos)
            if eol < 0:
                break
            control = data[pos:eol]
            frame = known.get(control)
            if frame is None:
                frame = message_frame(control)
                if frame is None:
                    self._deliver(read)
                    last_sid = None
                    line = data[pos : eol + 2]
                    if line.startswith(b"-ERR"):
                        self._note_denied(line)
                    await self._one_line(line)
                    pos = eol + 2
                    continue
                if len(known) >= KNOWN_FRAMES:
                    known.clear()
                known[control] = frame
            subject, sid, reply, headers, total = frame
            start = eol + 2
            end = start + total
            if end + 2 > size:
                self.needed = end + 2 - pos
                break
            if sid != last_sid:
                if sid in direct:
                    last_sid, last = sid, read.setdefault(sid, [])
                else:
                    self._deliver(read)
                    last_sid = None
                    await self.nc._process_msg(
                        sid,
                        subject,
                        reply,
                        data[start + headers : end],
                        data[start : start + headers] if headers else None,
                    )
                    pos = end + 2
                    continue
            last.append((subject, data[start + headers : end]))
            pos = end + 2
        self._deliver(read)
        if pos < size:
            self.buf = bytearray(data[pos:])

    def _deliver(self, read: dict[int, list[tuple[bytes, bytes]]]) -> None:
        """Hand each direct subscription what was read for it (the lists are
        theirs to keep), and forget it."""
        subs = self.nc._subs
        for sid, messages in read.items():
            if messages and sid in subs:  # not after the subscription was drained
                self.nc._direct[sid](messages)
        read.clear()

    def _note_denied(self, line: bytes) -> None:
        """Record the subject of a publish permissions error, case intact.

        nats-py lowercases the server's error text before its error callback
        sees it, and subjects are case-sensitive: the subject is read here,
        from the line as the server sent it (``-ERR '<text>'``).
        """
        text = line[4:].decode(errors="replace").strip()
        if len(text) >= 2 and text[0] == text[-1] == "'":
            text = text[1:-1]
        if text.lower().startswith(PUBLISH_DENIED):
            self.nc.denied_subjects.add(denied_subject(text))

    async def _one_line(self, line: bytes) -> None:
        """One whole control line, read by nats-py's parser."""
        self.buf = bytearray(line)
        self.state = AWAITING_CONTROL_LINE
        try:
            await super().parse()
        finally:
            self.buf = bytearray()


class DirectClient(NatsClient):
    """nats-py's client, able to hand a subscription's payloads straight on.

    nats-py builds a ``Msg`` for every message, queues it and wakes a task
    to await a callback for it: several times the cost of everything else
    the NATS consumer does per message. A subscription given to
    :meth:`subscribe_direct` skips that: its subjects and payloads (bytes)
    go to a plain function from the protocol reader (:class:`FrameReader`),
    a list of them for each chunk read. Headers and reply subjects are not
    passed on.
    """

    def __init__(self):
        super().__init__()
        self._direct: dict[int, Deliver] = {}
        # Subjects the server refused to take from us, as FrameReader read
        # them; NatsLink.send empties it before each batch.
        self.denied_subjects: set[str] = set()
        self._ps = FrameReader(self)

    async def subscribe_direct(self, subject: str, deliver: "Deliver", queue: str = ""):
        """Subscribe; ``(subject, payload)`` pairs go to ``deliver`` as read.

        ``deliver`` runs inside nats-py's protocol reader: it must be quick
        and must not block. nats-py's own pending limits do not apply (its
        queue is bypassed); the caller bounds what it holds.
        """
        subscription = await self.subscribe(subject, queue=queue)
        self._direct[subscription._id] = deliver
        return subscription


def _unconfirmed(exc: BaseException) -> BrokerUnavailable:
    return BrokerUnavailable(
        f"nats did not confirm the message ({exc.__class__.__name__})"
    )


@dataclass(slots=True)
class Written:
    """A batch written to NATS with a PING behind it (:meth:`NatsLink.send`)."""

    messages: Sequence[Message]
    reconnects: int  # the connection's reconnect count when written
    pong: asyncio.Future | None = None
    dropped: asyncio.Future | None = None  # done when that connection drops
    error: BrokerUnavailable | None = None


class NatsLink:
    """One nats-py connection with a ``connected`` event and batch publish.

    nats-py reconnects by itself; the callbacks below only keep the event
    true to the connection's state and log each change once.
    """

    def __init__(self, settings: Settings, name: str, logger: logging.Logger):
        self.settings = settings
        self.name = name
        self.logger = logger
        self.nc = DirectClient()
        self.connected = asyncio.Event()
        # Done when the current connection drops: a batch written to it
        # then waits no longer for a PONG that cannot come.
        self._dropped: asyncio.Future | None = None
        self._closing = False
        self._ever_connected = False
        self._said: set[str] = set()  # messages _say_once already logged
        self._servers = ", ".join(redact_url(u) for u in settings.nats_urls)

    async def connect(self, stopping: asyncio.Event) -> bool:
        """Connect, retrying with backoff; False if ``stopping`` was set first.

        nats-py, allowed to reconnect, keeps retrying an unreachable server
        inside connect() without returning: each attempt is raced against
        ``stopping``, so that a stop is not held up by it.
        """
        delays = backoff_delays()
        while not stopping.is_set():
            attempt = asyncio.ensure_future(self._attempt())
            try:
                await first_of(attempt, stopping.wait())
            except (TimeoutError, OSError, ssl.SSLError, nats.errors.Error) as exc:
                # Only the class name is logged: a server's error text may
                # quote what the client sent.
                delay = next(delays)
                self.logger.warning(
                    "nats unreachable at %s (%s); retrying in %.1f s",
                    self._servers,
                    exc.__class__.__name__,
                    delay,
                )
                await sleep_unless(stopping, delay)
                continue
            if attempt.cancelled() or not attempt.done():
                return False  # the stop came first
            self._dropped = asyncio.get_running_loop().create_future()
            self.connected.set()
            self._ever_connected = True
            self.logger.info(
                "nats connected to %s (max_payload %d bytes)",
                self._current(),
                self.nc.max_payload,
            )
            return True
        return False

    async def _attempt(self) -> None:
        await self.nc.connect(
            servers=list(self.settings.nats_urls),
            name=self.name,
            allow_reconnect=True,
            max_reconnect_attempts=-1,  # forever
            reconnect_time_wait=0.5,  # seconds
            connect_timeout=2,  # seconds
            ping_interval=10,  # seconds
            max_outstanding_pings=2,
            pending_size=NATS_PENDING_BYTES,
            skip_subject_validation=True,  # common.message checks
            disconnected_cb=self._disconnected,
            reconnected_cb=self._reconnected,
            error_cb=self._error,
            closed_cb=self._closed,
            **nats_credentials(self.settings),
        )

    def _current(self) -> str:
        url = self.nc.connected_url
        return redact_url(url.geturl()) if url else "?"

    async def _disconnected(self) -> None:
        if self._dropped is not None and not self._dropped.done():
            self._dropped.set_result(None)
        if self._closing:
            self.connected.clear()
            return
        if self.connected.is_set():
            self.connected.clear()
            self.logger.warning("nats disconnected; reconnecting")

    async def _reconnected(self) -> None:
        self._dropped = asyncio.get_running_loop().create_future()
        self.connected.set()
        self.logger.info("nats reconnected to %s", self._current())

    async def _error(self, exc: Exception) -> None:
        # nats-py keeps retrying a refused login, a failed TLS handshake or
        # (before the first connect) an unreachable server on its own,
        # without connect() ever raising: say each once. The server's text is
        # left out; OpenSSL's reason code is the client's own.
        text = str(exc).lower()
        if PUBLISH_DENIED in text:
            # The server refused one subject and kept the connection; the
            # error comes before the PONG that ends the same publish, and
            # FrameReader has recorded its subject.
            pass
        elif (
            isinstance(exc, nats.errors.AuthorizationError)
            # how nats-py reports it during its first connect
            or "authorization violation" in text
        ):
            self._say_once(
                logging.ERROR, "nats at %s refused the gateway's credentials"
            )
        elif isinstance(exc, ssl.SSLError):
            self._say_once(
                logging.ERROR,
                "nats at %s: tls handshake failed (%s %s)",
                exc.__class__.__name__,
                exc.reason,
            )
        elif isinstance(exc, OSError) and not self.connected.is_set():
            self._say_once(
                logging.WARNING,
                "nats unreachable at %s (%s); retrying",
                exc.__class__.__name__,
            )
        else:
            self.logger.debug("nats client error: %s", exc.__class__.__name__)

    def _say_once(self, level: int, msg: str, *args: object) -> None:
        """Log ``msg`` (servers first, then ``args``) the first time only."""
        if msg not in self._said:
            self._said.add(msg)
            self.logger.log(level, msg, self._servers, *args)

    async def _closed(self) -> None:
        self.connected.clear()

    async def publish(self, messages: Sequence[Message], timeout: float) -> set[str]:
        """Publish ``messages`` and wait until the server has them all.

        Returns the topics the server refused; see :meth:`confirm`.
        """
        return await self.confirm(await self.send(messages), timeout)

    async def send(self, messages: Sequence[Message]) -> "Written":
        """Write ``messages`` and a PING; :meth:`confirm` waits for its PONG.

        Never raises: a failed write is kept for :meth:`confirm` to raise.
        One batch at a time: the refusals :meth:`confirm` reports are those
        since the last send.
        """
        nc = self.nc
        written = Written(messages, nc.stats["reconnects"])
        if not nc.is_connected:
            written.error = BrokerUnavailable("nats is not connected")
            return written
        nc.denied_subjects.clear()
        try:
            written.dropped = self._dropped
            written.pong = await self._write_with_ping(messages)
        except (nats.errors.Error, OSError) as exc:
            written.error = _unconfirmed(exc)
        except BrokerUnavailable as exc:
            written.error = exc
        return written

    async def confirm(self, written: "Written", timeout: float) -> set[str]:
        """Wait up to ``timeout`` seconds until the server has a batch.

        The server answers a PING only after everything sent before it on
        the connection, so when the PONG arrives it has every message.
        Returns the topics the server refused (a publish permission the
        gateway's NATS user lacks): it dropped the messages to those, and
        said so before its PONG (read with its case by
        :class:`FrameReader`: a topic differing only in case from a refused
        one is another subject, and was delivered). Raises
        :class:`BrokerUnavailable` if the rest is not confirmed in time, or
        at once if the connection it was written to drops (nats-py forgets
        that connection's PONG futures on reconnect); some of the messages
        may still reach the server later.
        """
        if written.error is not None:
            raise written.error
        pong = written.pong
        if not pong.done():
            # Neither waiting cancels the other, nor the PONG's future:
            # nats-py's reader resolves it even when it comes late.
            waiting = {pong} if written.dropped is None else {pong, written.dropped}
            await asyncio.wait(
                waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if not pong.done():
                if written.dropped is not None and written.dropped.done():
                    raise BrokerUnavailable(
                        "nats connection dropped before the message was confirmed"
                    )
                raise BrokerUnavailable("nats did not confirm the message in time")
        try:
            pong.result()
        except (nats.errors.Error, OSError) as exc:
            raise _unconfirmed(exc) from exc
        # nats-py's flush() returns without a PONG when its read loop has
        # just died with the connection; only a PONG on the same, still
        # live connection confirms anything.
        if not self._on_its_connection(written):
            raise BrokerUnavailable(
                "nats connection dropped before the message was confirmed"
            )
        denied = self.nc.denied_subjects
        if not denied:
            return set()
        return {m.topic for m in written.messages if m.topic in denied}

    def may_confirm(self, written: "Written") -> bool:
        """Whether NATS may still confirm ``written``: it was written whole
        to the connection that is still up, and its PONG has not failed.

        Waiting for it again is then enough; a batch written again would
        reach subscribers twice.
        """
        pong = written.pong
        if written.error is not None or pong is None:
            return False
        if pong.done() and (pong.cancelled() or pong.exception() is not None):
            return False
        if written.dropped is not None and written.dropped.done():
            return False
        return self._on_its_connection(written)

    def _on_its_connection(self, written: "Written") -> bool:
        """Whether the connection ``written`` went out on is still up."""
        nc = self.nc
        return nc.is_connected and nc.stats["reconnects"] == written.reconnects

    async def _write_with_ping(self, messages: Sequence[Message]) -> asyncio.Future:
        """Write ``messages`` and a PING; the future its PONG resolves.

        Not nats-py's flush(): on a timeout it cancels the future its PONG
        would resolve, and when that PONG comes late nats-py's reader dies
        on the cancelled future while the connection still looks up, after
        which every flush returns at once without a round trip. This future
        is left for a late PONG to resolve harmlessly.
        """
        nc = self.nc
        reader = nc._reading_task
        if reader is None or reader.done():
            # A reader that died leaves a connection that confirms nothing:
            # only a new connection helps.
            self.logger.warning("nats connection stopped reading; reconnecting")
            await nc.force_reconnect()
            raise BrokerUnavailable("nats connection broke; reconnecting")
        pong = asyncio.get_running_loop().create_future()
        # nats-py's flush() writes its PING straight to the socket while
        # publish() leaves messages in a buffer for a flusher task to write
        # later: the PONG could then come back before the server read them.
        # The batch and the PING go in one write, the PING last. (This also
        # spares nats-py's per-message publish, the largest cost of a
        # consumer, and its flusher task's wake-up per batch.) nats-py's
        # reader resolves the futures on _pongs in order, one a PONG.
        nc._pongs.append(pong)
        nc._transport.write(hpub_frames(messages, PING))
        return pong

    async def close(self, flush_timeout: float = 2.0) -> None:
        """Send what is buffered (waiting up to ``flush_timeout`` seconds for
        the server), then close; never raises.

        At shutdown the server may already be gone (an embedded broker is
        stopped by the same supervisor); that is logged, not crashed on.
        """
        self._closing = True
        if self.nc.is_connected:
            try:
                await self.nc.flush(timeout=flush_timeout)
            except (TimeoutError, nats.errors.Error):
                self.logger.warning("nats flush at close timed out")
        # A client whose first connect never finished has nothing to close
        # (nats-py asserts so).
        if self._ever_connected and not self.nc.is_closed:
            try:
                await self.nc.close()
            except Exception as exc:  # noqa: BLE001 - closing: nothing left to save
                self.logger.warning("nats close: %r", exc)


def denied_subject(text: str) -> str:
    """The subject of a "Permissions Violation for Publish to ..." error.

    The server quotes it in double quotes, escaping ``"`` and ``\\`` inside;
    the quotes are stripped once and the escapes undone, since the subject
    itself may hold or end with any quote character.
    """
    subject = text.rpartition(" to ")[2].strip()
    if len(subject) >= 2 and subject[0] == subject[-1] == '"':
        subject = _ESCAPED.sub(r"\1", subject[1:-1])
    return subject


_ESCAPED = re.compile(r"\\(.)")


def log_denied(logger: logging.Logger, topic: str) -> None:
    """Say that NATS refused to take messages to ``topic``: at most ten
    lines in ten seconds for each logger, since a client may send to such a
    topic as often as it likes."""
    limited = _denials.get(logger.name)
    if limited is None:
        limited = _denials[logger.name] = RateLimited(logger)
    limited.warning(
        "nats refused publishing to %r: the gateway's nats user lacks the "
        "permission; messages to it are refused, not confirmed",
        topic,
    )


_denials: dict[str, RateLimited] = {}  # logger name -> its limit


def hpub_frames(messages: Sequence[Message], end: bytes = b"") -> bytes:
    """The NATS protocol frames publishing ``messages``, each with its id,
    and ``end`` after them.

    ``HPUB <subject> <header bytes> <total bytes>``, the header block with
    ``Nats-Msg-Id`` (JetStream's de-duplication key), then the payload.
    Subjects and ids were checked when the messages were parsed: no
    whitespace or line breaks can reach the frame.
    """
    frames = []
    for message in messages:
        # PERF: one formatting a message, the header's length counted, not
        # built apart: 0.48 against 0.60 us a message in a loop.
        message_id = message.id.encode()
        header = _HEADER_BYTES + len(message_id)
        frames.append(
            b"HPUB %s %d %d\r\nNATS/1.0\r\nNats-Msg-Id: %s\r\n\r\n%s\r\n"
            % (
                message.topic.encode(),
                header,
                header + len(message.payload),
                message_id,
                message.payload,
            )
        )
    frames.append(end)
    return b"".join(frames)


# The header block of hpub_frames without its id.
_HEADER_BYTES = len(b"NATS/1.0\r\nNats-Msg-Id: \r\n\r\n")


def nats_credentials(settings: Settings) -> dict[str, Any]:
    """The nats-py ``connect()`` arguments for authentication and TLS."""
    options: dict[str, Any] = {}
    if settings.nats_user:
        options["user"] = settings.nats_user
        options["password"] = settings.nats_password
    if settings.nats_token:
        options["token"] = settings.nats_token
    if settings.nats_nkey_seed_file:
        options["nkeys_seed"] = settings.nats_nkey_seed_file
    if settings.nats_creds_file:
        options["user_credentials"] = settings.nats_creds_file
    if settings.nats_tls_ca or settings.nats_tls_cert:
        context = ssl.create_default_context(cafile=settings.nats_tls_ca or None)
        if settings.nats_tls_cert:
            context.load_cert_chain(settings.nats_tls_cert, settings.nats_tls_key)
        options["tls"] = context
    return options


def redis_credentials(settings: Settings) -> dict[str, Any]:
    """The redis-py arguments for authentication and TLS (``rediss://``)."""
    options: dict[str, Any] = {}
    if settings.redis_username:
        options["username"] = settings.redis_username
    if settings.redis_password:
        options["password"] = settings.redis_password
    if settings.redis_url.startswith("rediss://"):
        if settings.redis_tls_ca:
            options["ssl_ca_certs"] = settings.redis_tls_ca
        if settings.redis_tls_cert:
            options["ssl_certfile"] = settings.redis_tls_cert
            options["ssl_keyfile"] = settings.redis_tls_key
    return options


def redis_client(settings: Settings, *, blocking_pop: bool = False) -> aioredis.Redis:
    """A Redis client for ``settings.redis_url``.

    Commands go over one connection held by the client (a pipeline takes
    another from its blocking pool, waiting up to the publish timeout for
    a free one): redis-py's pool checks a connection's socket each time it
    hands it out, a system call that cost more than the rest of an audit
    write. The held connection comes from the same pool, so the pool has
    room for it on top of ``redis_pool_size`` for pipelines; without that,
    a pool of one would leave every pipeline waiting for ever. The client
    for the consumer's blocking wait has a connection of its own, whose
    socket timeout stays above the block timeout so that a dead server is
    noticed within a bounded time.
    """
    block = settings.redis_block_timeout
    socket_timeout = block + 5 if blocking_pop else settings.publish_timeout + 1
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=1 if blocking_pop else settings.redis_pool_size + 1,
        timeout=settings.publish_timeout,  # seconds waited for a free one
        socket_timeout=socket_timeout,  # seconds
        socket_connect_timeout=2,  # seconds
        socket_keepalive=True,
        health_check_interval=30,  # seconds
        retry=Retry(ExponentialBackoff(cap=1, base=0.05), retries=2),
        **redis_credentials(settings),
    )
    pool.connection_class = _hiredis_packing(pool.connection_class)
    return aioredis.Redis(connection_pool=pool, single_connection_client=True)


class AuditLog:
    """Appends audit entries to a Redis list over a connection of its own.

    PERF: redis-py's client wraps each command in a lock, a pool, a timer
    task for the write and its telemetry hooks; one RPUSH a batch needs
    none of that. The connection's own send, read and retry (reconnect on
    a connection error) remain redis-py's. It has no socket timeout: the
    whole write, retries included, gets the client's socket timeout, and a
    write that timed out is not sent again (a stalled server may still run
    it).
    Any failure drops the connection, so a late reply is never read as
    the next one's.
    """

    def __init__(self, client: aioredis.Redis, key: str, dead_key: str = ""):
        pool = client.connection_pool
        kwargs = {**pool.connection_kwargs, "socket_timeout": None}
        self.connection = pool.connection_class(**kwargs)
        self.key = key
        self.dead_key = dead_key  # the dead-letter list, for a consumer
        self.timeout = pool.connection_kwargs["socket_timeout"]  # seconds

    async def append(self, entries: Sequence[bytes]) -> None:
        """RPUSH ``entries`` to the audit log; raises redis-py's errors or
        TimeoutError."""
        if entries:
            await self._run([("RPUSH", self.key, *entries)])

    async def append_dead(self, dead: Sequence[bytes]) -> None:
        """RPUSH ``dead`` letters to the dead-letter list, as :meth:`append`."""
        if dead:
            await self._run([("RPUSH", self.dead_key, *dead)])

    async def withdraw(self, entries: list[bytes]) -> None:
        """Remove ``entries``, each its last copy, counted from the tail,
        where they were just appended."""
        await self._run([("LREM", self.key, -1, entry) for entry in entries])

    async def _run(self, commands: list[tuple]) -> None:
        connection = self.connection
        packed = connection.pack_commands(commands)

        async def attempt() -> None:
            await connection.send_packed_command(packed)
            for _ in commands:
                await connection.read_response()

        async def dropped(error: Exception) -> None:
            await connection.disconnect()

        try:
            async with asyncio.timeout(self.timeout):
                await connection.retry.call_with_retry(attempt, dropped)
        except BaseException:
            await connection.disconnect(nowait=True)
            raise

    async def close(self) -> None:
        await self.connection.disconnect()


class _HiredisPacking:
    """Commands packed by hiredis in C, as redis-py's own synchronous client
    does; its asyncio client packs in Python, about a microsecond an
    argument, and an audit RPUSH carries a whole batch of them."""

    _serializer = HiredisRespSerializer()

    def pack_command(self, *args):
        # PERF: redis-py's serializer first copies every argument through a
        # generator (for bytearray and memoryview, which the gateway never
        # sends); a plain command goes to hiredis as it is.
        if not isinstance(args[0], str) or " " in args[0]:
            return self._serializer.pack(*args)
        try:
            return [hiredis.pack_command(args)]
        except TypeError:
            return self._serializer.pack(*args)  # raises redis-py's DataError


def _hiredis_packing(base: type) -> type:
    """``base`` (plain, TLS or Unix socket connection) packing with hiredis."""
    return type(base.__name__, (_HiredisPacking, base), {})


async def wait_for_redis(
    client: aioredis.Redis,
    url: str,
    logger: logging.Logger,
    stopping: asyncio.Event,
) -> bool:
    """PING until Redis answers, with backoff; False if stopping first.

    The first failure is logged as a warning, the retries after it at debug
    level: one line for the outage, one when Redis answers.
    """
    delays = backoff_delays()
    failures = 0
    while not stopping.is_set():
        try:
            await client.ping()
        except (aioredis.RedisError, OSError) as exc:
            delay = next(delays)
            failures += 1
            logger.log(
                logging.WARNING if failures == 1 else logging.DEBUG,
                "redis unreachable at %s (%s); retrying in %.1f s",
                redact_url(url),
                exc.__class__.__name__,
                delay,
            )
            await sleep_unless(stopping, delay)
            continue
        logger.info("redis connected to %s", redact_url(url))
        return True
    return False


async def first_of(*aws) -> None:
    """Wait for the first of ``aws`` to finish and cancel the rest (all of
    them when the caller is cancelled); raise what the first raised."""
    tasks = [asyncio.ensure_future(aw) for aw in aws]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
    for task in done:
        task.result()


async def sleep_unless(event: asyncio.Event, delay: float) -> None:
    """Sleep ``delay`` seconds, or less if ``event`` is set meanwhile."""
    try:
        await asyncio.wait_for(event.wait(), delay)
    except TimeoutError:
        pass
