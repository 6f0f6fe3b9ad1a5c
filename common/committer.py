"""Group commit for the HTTP and WebSocket ingresses.

A client's message is confirmed only after the NATS server has it (a flush
round trip) and its audit entry is written. Paying those two round trips
per message would cap a process at a few thousand messages a second, so the
messages that arrive while one batch is being committed wait together and
are committed as the next batch: one flush and one RPUSH per batch.

A single HTTP request and a WebSocket frame hand over their bytes unparsed
(:meth:`Committer.submit_body`): the bodies that arrive between two batches
are parsed here, one after another, just before the batch is taken, and a
body that is refused gets its reason back through its waiter.

Limits, stated bluntly: at most ``max_pending`` unconfirmed messages are
held per process (then :class:`Overloaded`); a message waits at most
``publish_timeout`` seconds for the brokers (then :class:`BrokerUnavailable`);
a message refused after its batch reached NATS may still be delivered, so a
client that retries with the same id can cause a duplicate with that id.
"""

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence

import redis.asyncio as aioredis

from common.audit import audit_entry
from common.brokers import AuditLog, NatsLink, Written, log_denied
from common.errors import (
    BrokerUnavailable,
    FanoutError,
    Overloaded,
    PublishDenied,
    RetryableError,
    ShuttingDown,
)
from common.message import Message
from common.policy import Pattern
from common.settings import Settings

# message, its waiter (a future, or Together for a bulk request's), deadline
_Item = tuple[Message, "asyncio.Future | Together | None", float]
# parse(body, token patterns, received_at) -> Message, raising why not
Parse = Callable[[bytes, tuple[Pattern, ...], float], Message]
# A body waiting to be parsed: parse, body, token patterns, waiter, deadline.
_Unparsed = tuple[Parse, bytes, tuple[Pattern, ...], asyncio.Future, float]

# A batch stops at this many bytes of messages even below its count, so that
# one NATS write and one audit RPUSH stay a bounded size.
BATCH_BYTES = 8 * 1024 * 1024
EXPIRY_CHECK = 0.2  # seconds between checks of the queue while a commit hangs
RECHECK = 0.05  # seconds between looks at a NATS connection said to be dropping
WITHDRAW_AT_STOP = 0.5  # seconds a stop waits for a given-up batch's withdrawal


def take_batch(queue: deque, most: int, size_of) -> list:
    """Up to ``most`` items from the head of ``queue``, and at most
    :data:`BATCH_BYTES` of them by ``size_of(item)`` (the first whatever
    its size)."""
    if len(queue) <= most:
        # PERF: the usual case, small items; sized once, not one by one.
        if sum(size_of(item) for item in queue) <= BATCH_BYTES:
            batch = list(queue)
            queue.clear()
            return batch
    batch = [queue.popleft()]
    total = size_of(batch[0])
    while queue and len(batch) < most:
        total += size_of(queue[0])
        if total > BATCH_BYTES:
            break
        batch.append(queue.popleft())
    return batch


def _message_size(item: _Item) -> int:
    return len(item[0].payload)


class Together:
    """The one waiter of messages submitted together (a bulk request's).

    ``waiter`` resolves once each message is confirmed or refused, to the
    refusals, keyed by ``id(message)``: the submitter holds the messages
    until then, so their ids stay theirs. A message refused twice (a stop
    giving up on what a timeout refused) counts once.

    PERF: with a future a message (made, resolved, awaited), a bulk message
    cost the worker 4.1 to 4.2 us of CPU; with this and :func:`_resolve`,
    3.7 (one worker, 100 messages a request, 64 connections).
    """

    __slots__ = ("waiter", "refusals", "_left")

    def __init__(self, loop: asyncio.AbstractEventLoop, count: int):
        self.waiter = loop.create_future()
        self.refusals: dict[int, FanoutError] = {}
        self._left = count  # messages neither confirmed nor refused

    def done(self) -> bool:
        """Whether nobody waits any more: all settled, or the submitter
        went away (its waiter cancelled)."""
        return self.waiter.done()

    def refuse(self, message: Message, exc: FanoutError) -> None:
        if id(message) not in self.refusals:
            self.refusals[id(message)] = exc
            self.settled(1)

    def settled(self, count: int) -> None:
        """``count`` more of the messages are confirmed (or, from
        :meth:`refuse`, refused)."""
        self._left -= count
        if not self._left and not self.waiter.done():
            self.waiter.set_result(self.refusals)


def _entries_to(
    topics: set[str], entries: list[bytes], messages: Sequence[Message]
) -> list[bytes]:
    """The audit entries, of ``entries`` written for ``messages``, of the
    messages to ``topics``."""
    return [e for e, m in zip(entries, messages, strict=True) if m.topic in topics]


def _resolve(items: list[_Item]) -> None:
    """Tell the waiters of ``items`` that their messages are confirmed.

    PERF: a bulk request's messages sit next to each other in a batch, and
    their Together is told once for each run of them: 20 against 100 ns a
    message.
    """
    together, run = None, 0
    for message, waiter, _ in items:
        if waiter is None:
            continue  # confirmation off: accepted on receipt
        if waiter is together:
            run += 1
        elif type(waiter) is Together:
            if together is not None:
                together.settled(run)
            together, run = waiter, 1
        elif not waiter.done():
            waiter.set_result(message)
    if together is not None:
        together.settled(run)


class Committer:
    """Publishes, logs and confirms messages in batches."""

    def __init__(
        self,
        settings: Settings,
        nats_link: NatsLink,
        redis: aioredis.Redis,
        logger: logging.Logger,
        clock=time.monotonic,
        wall_clock=time.time,
    ):
        self.settings = settings
        self.nats = nats_link
        self.redis = redis
        # The committer's own connection: audit writes wait for no one.
        self.audit = AuditLog(redis, settings.log_list)
        self.logger = logger
        self.clock = clock
        self.wall_clock = wall_clock  # for a parsed body's received_at
        self.confirm = settings.confirm
        self._queue: deque[_Item] = deque()
        self._unparsed: deque[_Unparsed] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup = asyncio.Event()
        self._closing = False
        self._redis_ok = True
        self._nats_failing = False  # a NATS failure was logged, no success since
        self._late = False  # messages timed out in the queue, no success since
        self._in_hand: list[_Item] = []  # the batch being committed
        self._watch: asyncio.TimerHandle | None = None
        self._give_up_timer: asyncio.TimerHandle | None = None
        self._commit_task: asyncio.Task | None = None
        self._given_up = False  # _give_up ran
        # Entries of messages NATS refused, which a failed audit write may
        # still add: removed once Redis answers again.
        self._in_doubt: list[bytes] = []
        self.committed = 0
        self.batches = 0
        self.failed = 0

    def start(self) -> None:
        # PERF: kept, because asyncio.get_running_loop() makes a getpid()
        # system call each time on CPython 3.11.
        self._loop = asyncio.get_running_loop()
        self._commit_task = asyncio.create_task(self._run(), name="commit")

    def _waiting(self) -> int:
        return len(self._queue) + len(self._unparsed) + len(self._in_hand)

    def submit_all(self, messages: list[Message]) -> "Together | None":
        """Queue ``messages`` in order, all or none; one waiter for them all
        (None with confirmation off: accepted on receipt).

        The messages sit next to each other in the queue, so they are
        committed in as few batches as ``batch_size`` allows.
        """
        self._check_room(len(messages))
        deadline = self.clock() + self.settings.publish_timeout
        together = Together(self._loop, len(messages)) if self.confirm else None
        self._queue.extend([(message, together, deadline) for message in messages])
        self._wakeup.set()
        return together

    def submit_body(
        self, parse: Parse, body: bytes, token_patterns: tuple[Pattern, ...]
    ) -> asyncio.Future:
        """Queue ``body`` to be parsed by ``parse`` with the next batch.

        The returned waiter resolves to the message once it is confirmed (on
        receipt, with confirmation off), or raises what ``parse`` raised for
        a body it refuses, or why the brokers did not confirm the message.
        Bodies keep their order among themselves.
        """
        self._check_room()
        waiter = self._loop.create_future()
        deadline = self.clock() + self.settings.publish_timeout
        self._unparsed.append((parse, body, token_patterns, waiter, deadline))
        self._wakeup.set()
        return waiter

    def _check_room(self, more: int = 1) -> None:
        """Refuse ``more`` messages, as retryable, while stopping or full."""
        if self._closing:
            raise ShuttingDown("the gateway is shutting down; send it again later")
        waiting = self._waiting()
        if waiting + more <= self.settings.max_pending:
            return
        if more == 1:
            raise Overloaded(
                f"{waiting} messages are waiting for the brokers; send it again later"
            )
        raise Overloaded(
            f"{waiting} messages are waiting for the brokers; {more} more would "
            f"exceed FANOUT_MAX_PENDING ({self.settings.max_pending}); send them "
            "again later"
        )

    def _parse_waiting(self) -> None:
        """Parse the bodies handed to :meth:`submit_body`, in order, into the
        queue; a refused body's waiter gets the reason.

        PERF: parsed here one after another, not each in its own request
        handler between the web framework's steps: the parser's code and
        data stay in the CPU's caches. In a worker, one orjson.loads of a
        150-byte body cost about 4 us, against 0.2 us in a loop. Measured on
        one HTTP worker, 64 connections: 5 us less CPU a request (67 -> 62);
        on the WebSocket about 1 us less a frame. The bodies parsed together
        share one ``received_at``.
        """
        unparsed, queue = self._unparsed, self._queue
        received_at = self.wall_clock()
        while unparsed:
            parse, body, patterns, waiter, deadline = unparsed.popleft()
            try:
                message = parse(body, patterns, received_at)
            except Exception as exc:  # noqa: BLE001 - the request's handler answers it
                # A refusal (400, 403, 413) or a bug (500): either way the
                # handler that awaits the waiter raises it.
                if not waiter.done():
                    waiter.set_exception(exc)
                continue
            if self.confirm:
                queue.append((message, waiter, deadline))
            else:
                if not waiter.done():
                    waiter.set_result(message)
                queue.append((message, None, deadline))

    async def _run(self) -> None:
        batch_size = self.settings.batch_size
        queue = self._queue
        loop = asyncio.get_running_loop()
        while True:
            if self._unparsed:
                self._parse_waiting()
            if not queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                # PERF: one more turn of the event loop lets every request
                # already readable join this batch, instead of a batch (and
                # its NATS and Redis round trips) for each of them.
                await asyncio.sleep(0)
                continue
            batch = take_batch(queue, batch_size, _message_size)
            self._in_hand = batch
            self._watch = loop.call_later(EXPIRY_CHECK, self._expire_queued)
            try:
                await self._commit(batch)
            except Exception:  # noqa: BLE001 - the committer must outlive a bug
                # A commit task that died would leave every later message
                # waiting for ever.
                self.logger.exception("commit of %d messages failed", len(batch))
                self._fail(
                    batch,
                    BrokerUnavailable("internal error; send it again with the same id"),
                )
            finally:
                self._in_hand = []
                self._watch.cancel()

    def _expire_queued(self) -> None:
        """While a commit hangs, refuse the queued messages past their time.

        A broker that stalls without refusing (a frozen Redis) holds the
        batch in hand until redis-py gives up; the messages queued behind it
        are answered when their own timeout passes, not after the stall.
        """
        # Bodies still waiting are parsed first: a bad one is refused for
        # what it is, not as late.
        self._parse_waiting()
        now, queue = self.clock(), self._queue
        expired = []
        # Queued in deadline order, but for a parsed body queued behind a
        # bulk request that came a moment later: it waits that moment more.
        while queue and queue[0][2] <= now:
            expired.append(queue.popleft())
        if expired:
            self._refuse_late(expired)
        self._watch = self._loop.call_later(EXPIRY_CHECK, self._expire_queued)

    def _refuse_late(self, expired: list[_Item]) -> None:
        """Refuse messages past their publish timeout; say so once."""
        self._fail(expired, BrokerUnavailable("timed out waiting for the brokers"))
        if not self._late:
            # A stalled broker (frozen, not refusing) raises nothing while
            # messages wait behind it: this is its log line.
            self._late = True
            self.logger.warning(
                "%d messages waited longer than FANOUT_PUBLISH_TIMEOUT (%g s) "
                "for the brokers; refused as retryable while they are this slow",
                len(expired),
                self.settings.publish_timeout,
            )

    async def _commit(self, batch: list[_Item]) -> None:
        now = self.clock()
        live = [item for item in batch if item[2] > now]
        late = len(live) < len(batch)
        if late:
            self._refuse_late([item for item in batch if item[2] <= now])
            self._in_hand = live  # what a stop may still refuse
        if not live:
            return

        try:
            live = await self._publish_and_log(live)
        except RetryableError as exc:
            self._fail(live, exc)
            return

        if self._late and not late:
            self._late = False
            self.logger.info("the brokers answer in time again")
        self.committed += len(live)
        self.batches += 1
        _resolve(live)

    async def _publish_and_log(self, live: list[_Item]) -> list[_Item]:
        """Publish ``live`` and log it; the items NATS confirmed and Redis
        logged, or raise why none of them can be confirmed.

        PERF: the audit entries are written while NATS confirms the batch,
        so a batch waits out one round trip, not two in a row; the worker
        was idle 5% of the time between them. Measured on one HTTP worker,
        64 connections, alternating with the Falcon ceiling: 0.73 of its
        rate before, 0.77 with the overlap, 0.81 with :class:`AuditLog` too.
        The entry of a message that NATS then refuses or does not confirm
        is withdrawn: an entry still means that NATS had the message.
        """
        deadline = min(item[2] for item in live)
        await self._wait_until_usable(deadline)
        messages = [item[0] for item in live]
        written = await self.nats.send(messages)
        entries = []
        try:
            if written.error is None:
                entries = [audit_entry(m) for m in messages]
                try:
                    await self._append_audit(entries)
                except BrokerUnavailable:
                    await self._note_refused_meanwhile(written, entries)
                    raise
            denied = await self._confirm(written, deadline, entries)
        except asyncio.CancelledError:
            # A stop gave up on this batch (_give_up); its senders are told
            # it may have reached NATS, and they send it again.
            if entries:
                await self._withdraw(
                    entries, "the gateway stopped before nats confirmed them"
                )
            raise
        if denied:
            refused = _entries_to(denied, entries, messages)
            await self._withdraw(refused, "nats refused their topics")
            live = self._fail_denied(live, denied)
        return live

    async def _confirm(
        self, written: Written, deadline: float, entries: list[bytes]
    ) -> set[str]:
        """Wait for NATS to confirm ``written``; the topics it refused.

        Not confirmed: the batch's audit ``entries`` are withdrawn, and
        BrokerUnavailable says why.
        """
        try:
            remaining = max(0.05, deadline - self.clock())
            denied = await self.nats.confirm(written, timeout=remaining)
        except BrokerUnavailable as exc:
            if not self._nats_failing:
                self._nats_failing = True
                self.logger.warning(
                    "%s; %s",
                    exc,
                    "messages are refused as retryable until it does"
                    if self.confirm
                    else "messages accepted meanwhile are lost (FANOUT_CONFIRM=false)",
                )
            if entries:
                await self._withdraw(entries, "nats did not confirm them")
            raise
        if self._nats_failing:
            self._nats_failing = False
            self.logger.info("nats confirms messages again")
        return denied

    async def _note_refused_meanwhile(
        self, written: Written, entries: list[bytes]
    ) -> None:
        """After an audit write that failed, which a stalled Redis may
        still run when it resumes: keep the entries of the messages whose
        topics NATS refused meanwhile, to be removed once Redis answers
        again. Their senders' retries are refused for the topic, so the
        entries would otherwise stay."""
        if written.pong is None or not written.pong.done():
            return  # NATS has not answered: nothing is known yet
        try:
            denied = await self.nats.confirm(written, timeout=0)
        except BrokerUnavailable:
            return
        refused = _entries_to(denied, entries, written.messages)
        if refused:
            self.logger.warning(
                "%d audit entries of messages nats refused may still be written "
                "by the stalled redis; they are removed once it answers again",
                len(refused),
            )
            self._in_doubt += refused

    async def _wait_until_usable(self, deadline: float) -> None:
        # Wait for NATS rather than publish into nats-py's reconnect buffer:
        # a message buffered there could be refused to the client and still
        # be delivered later.
        while not (self.nats.connected.is_set() and self.nats.nc.is_connected):
            left = deadline - self.clock()
            if left <= 0:
                raise BrokerUnavailable("nats is unreachable")
            if self.nats.connected.is_set():
                # nats-py has seen the connection drop and not yet called
                # back: a moment's wait, not a refusal.
                await asyncio.sleep(min(RECHECK, left))
                continue
            try:
                await asyncio.wait_for(self.nats.connected.wait(), left)
            except TimeoutError:
                raise BrokerUnavailable("nats is unreachable") from None

        # After a failed audit write, make sure Redis is back before anything
        # more is published: otherwise every message would reach NATS and
        # still be refused.
        if not self._redis_ok:
            try:
                await self.redis.ping()
            except (aioredis.RedisError, OSError) as exc:
                raise BrokerUnavailable("redis is unreachable") from exc
            self._redis_ok = True
            self.logger.info("redis audit writes resumed")
            if self._in_doubt:
                # The stalled write ran before this answer, if at all.
                entries, self._in_doubt = self._in_doubt, []
                await self._withdraw(
                    entries, "nats refused their topics while redis stalled"
                )

    async def _append_audit(self, entries: list[bytes]) -> None:
        try:
            await self.audit.append(entries)
        except (aioredis.RedisError, OSError) as exc:
            if self._redis_ok:
                self.logger.warning("redis audit write failed: %r", exc)
            self._redis_ok = False
            raise BrokerUnavailable(
                "redis did not take the audit entry; the message may have "
                "reached NATS, send it again with the same id"
            ) from exc

    async def _withdraw(self, entries: list[bytes], why: str) -> None:
        """Remove the audit entries of messages refused after they were
        written; a failure leaves them, and says so."""
        try:
            await self.audit.withdraw(entries)
        except (aioredis.RedisError, OSError) as exc:
            self.logger.error(
                "%d audit entries of refused messages (%s) could not be "
                "removed from %s: %r",
                len(entries),
                why,
                self.settings.log_list,
                exc,
            )

    def _fail_denied(self, items: list[_Item], denied: set[str]) -> list[_Item]:
        """Refuse the messages to topics NATS refused; the others remain."""
        for topic in denied:
            log_denied(self.logger, topic)
            refused = [item for item in items if item[0].topic == topic]
            self._fail(refused, PublishDenied(topic))
        return [item for item in items if item[0].topic not in denied]

    def _fail(self, items: list[_Item], exc: FanoutError) -> None:
        self.failed += len(items)
        unconfirmed = 0
        for message, waiter, _ in items:
            if waiter is None:
                unconfirmed += 1
            elif waiter.done():
                continue
            elif type(waiter) is Together:
                waiter.refuse(message, exc)
            else:
                waiter.set_exception(exc)
        if unconfirmed:
            # Fire-and-forget mode: nobody is waiting to be told.
            self.logger.error(
                "%d messages accepted without confirmation were not delivered: %s",
                unconfirmed,
                exc,
            )

    def stop_by(self, seconds: float) -> None:
        """Give up, ``seconds`` from now, on what is still held then.

        Called when a stop begins, so that every sender is answered before
        the server stops waiting for the answers: what the brokers have not
        confirmed by then is refused as retryable, and nothing more is taken.
        """
        if self._give_up_timer is None:
            self._give_up_timer = self._loop.call_later(seconds, self._give_up)

    def _give_up(self) -> None:
        """Stop committing; refuse, as retryable, what is still held.

        The batch in hand may already be on NATS: its senders are told so.
        Once only: a second cancel would cut short the withdrawal of the
        batch's audit entries (see :meth:`_publish_and_log`).
        """
        self._closing = True
        task = self._commit_task
        if task is None or task.done() or self._given_up:
            return
        self._given_up = True
        task.cancel()
        self._parse_waiting()
        in_hand = [
            item for item in self._in_hand if item[1] is None or not item[1].done()
        ]
        queued = list(self._queue)
        self._queue.clear()
        self.logger.error(
            "shutdown: %d messages still unconfirmed when the stop's time for "
            "them ran out; refused as retryable",
            len(in_hand) + len(queued),
        )
        self._fail(
            in_hand,
            ShuttingDown(
                "the gateway stopped before the brokers confirmed the message; "
                "it may have reached NATS, send it again with the same id"
            ),
        )
        self._fail(queued, ShuttingDown("the gateway stopped"))

    async def close(self, timeout: float) -> None:
        """Take no more messages, commit what is queued, flush and close."""
        self._closing = True
        self._wakeup.set()
        task = self._commit_task
        if task is not None and not task.done():
            # asyncio.wait, not wait_for: a task that stop_by gave up on
            # meanwhile ends cancelled, and that is not this call's error.
            await asyncio.wait({task}, timeout=timeout)
            self._give_up()
        if task is not None and not task.done():
            # A batch given up on withdraws its audit entries before the
            # connection closes (see _publish_and_log).
            await asyncio.wait({task}, timeout=min(timeout, WITHDRAW_AT_STOP))
        if self._give_up_timer is not None:
            self._give_up_timer.cancel()
        await self.audit.close()
        self.logger.info(
            "committer closed: %d committed in %d batches, %d refused",
            self.committed,
            self.batches,
            self.failed,
        )
