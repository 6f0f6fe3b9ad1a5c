"""The NATS ingress: a consumer of the subject ``MESSAGES``.

Consumers subscribe in the queue group :data:`QUEUE_GROUP`, so however many
run, the server hands each ingress message to one of them. Core NATS is
at-most-once on the way in: a message published while no consumer is
subscribed, or dropped by the server because a consumer fell behind, is
gone before Fanout sees it. Once received, a message is not lost by the
gateway: the consumer publishes and logs every message it holds before it
stops. If the brokers do not let it within the shutdown timeout (Redis
down, say), the messages it still holds are written to its own log, one
``undelivered at shutdown`` line each (with its id, if NATS already has
it), and it exits 1.
"""

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from itertools import repeat

import nats.errors
import orjson

from common import cli, logs, runtime
from common.audit import audit_entry, dead_entry, utc_iso
from common.brokers import (
    AuditLog,
    NatsLink,
    Written,
    redis_client,
    wait_for_redis,
)
from common.committer import take_batch
from common.consumer import confirm, retry, sort_batch, split_denied
from common.message import Message, Parser
from common.settings import Settings

logger = logging.getLogger("fanout.nats")

QUEUE_GROUP = "fanout"
PENDING_MESSAGES = 200_000  # held at most; more are dropped (slow consumer)
PENDING_BYTES = 256 * 1024 * 1024


@dataclass(slots=True, eq=False)
class Taken:
    """One batch, from off the inbox (parsed at once) until it is logged.

    Its messages (with their ids) and dead-letter entries; once NATS
    confirmed them (``published``), the messages NATS took and the
    dead-letter entries of the rest.
    """

    messages: list[Message]
    dead: list[bytes]
    written: Written | None = None  # sent to NATS, not yet confirmed
    published: bool = False


class NatsConsumer:
    def __init__(self, settings: Settings, stopping: asyncio.Event):
        self.settings = settings
        self.stopping = stopping
        self.parser = Parser.for_ingress("nats", settings)
        self.refusals = logs.RateLimited(logger)
        self.drops = logs.RateLimited(logger)
        self.nats = NatsLink(settings, f"fanout-nats-{logs.process_label()}", logger)
        self.redis = redis_client(settings)
        # The audit and dead-letter writes' own connection (see AuditLog).
        self.audit = AuditLog(self.redis, settings.log_list, settings.dead_list)
        self.inbox: deque[bytes] = deque()  # payloads as received
        self.taken: deque[Taken] = deque()  # batches not yet logged, in order
        self.held_bytes = 0
        self.arrived = asyncio.Event()
        self.received = 0
        self.delivered = 0
        self.dead_lettered = 0
        self.dropped = 0
        self.undelivered = 0  # written to the log at shutdown
        self.failed = False

    def _on_data(self, messages: list[tuple[bytes, bytes]]) -> None:
        # Runs in nats-py's protocol reader, once per chunk read: kept short.
        room = PENDING_MESSAGES - len(self.inbox)
        if self.held_bytes > PENDING_BYTES:
            room = 0
        if room < len(messages):
            # Core NATS would drop them too (the server, for a consumer
            # that stops reading); here it is at least counted and said.
            self.dropped += len(messages) - max(room, 0)
            self.drops.warning(
                "dropped messages: %d messages (%d bytes) are waiting for the "
                "brokers; run more consumers or find what slows them",
                len(self.inbox),
                self.held_bytes,
            )
            messages = messages[: max(room, 0)]
        if not messages:
            return
        payloads = [data for _, data in messages]
        self.inbox.extend(payloads)
        self.held_bytes += sum(map(len, payloads))
        self.received += len(payloads)
        self.arrived.set()

    async def run(self) -> int:
        if not await self.nats.connect(self.stopping):
            return 0
        self.parser.limit_to(self.nats.nc.max_payload)
        if not await wait_for_redis(
            self.redis, self.settings.redis_url, logger, self.stopping
        ):
            await self.nats.close()
            return 0
        subscription = await self.nats.nc.subscribe_direct(
            self.settings.ingress_subject, self._on_data, queue=QUEUE_GROUP
        )
        logger.info(
            "nats consumer subscribed to %s in queue group %s",
            self.settings.ingress_subject,
            QUEUE_GROUP,
        )
        worker_task = asyncio.create_task(self._work(), name="nats-worker")
        worker_task.add_done_callback(self._worker_ended)
        await self.stopping.wait()
        await self._shutdown(subscription, worker_task)
        return 1 if self.failed or self.undelivered else 0

    def _worker_ended(self, task: asyncio.Task) -> None:
        # The worker only ends by cancellation; anything else is a bug, and
        # a consumer that no longer delivers must not look alive: stop, exit
        # non-zero, and let the supervisor start a fresh one.
        if not task.cancelled() and task.exception() is not None:
            logger.critical("nats worker died", exc_info=task.exception())
            self.failed = True
            self.stopping.set()

    async def _work(self) -> None:
        flight = None  # the batch written to NATS last, not yet confirmed
        logged = None  # the batch NATS confirmed last, until its audit is written
        while True:
            if not self.inbox and flight is None:
                if logged is not None:
                    await self._log(logged)
                    logged = None
                    continue
                self.arrived.clear()
                await self.arrived.wait()
                continue
            taken = None
            if self.inbox:
                batch = take_batch(self.inbox, self.settings.batch_size, len)
                self.held_bytes -= sum(map(len, batch))
                taken = Taken(
                    *sort_batch(
                        self.parser, zip(repeat(None), batch), self.refusals, time.time
                    )
                )
                self.taken.append(taken)
            # PERF: three batches move at once: the one confirmed last is
            # logged while the one written last is confirmed and this one is
            # written (parsed while NATS read the one before).
            steps = [self._advance(flight, taken)]
            if logged is not None:
                steps.append(self._log(logged))
            await asyncio.gather(*steps)
            logged, flight = flight, taken

    async def _advance(self, flight: Taken | None, taken: Taken | None) -> None:
        """Confirm the batch written last, then write ``taken``.

        One batch unconfirmed at a time: a batch that failed is published
        again before anything behind it is written.
        """
        if flight is not None:
            await self._confirm(flight)
        if taken is not None and taken.messages:
            taken.written = await self.nats.send(taken.messages)

    async def _confirm(self, taken: Taken) -> None:
        """Wait for NATS; ``taken`` then holds what it took and the dead letters."""
        messages, denied = taken.messages, set()
        if messages:
            denied = await confirm(
                self.nats,
                taken.written,
                messages,
                self.settings.publish_timeout,
                logger,
                lambda: False,
            )
        # Recorded at once: the log of the batch before may still be waiting.
        kept, refused = split_denied(messages, denied, "nats", logger)
        taken.messages, taken.dead = kept, taken.dead + refused
        taken.written, taken.published = None, True

    async def _log(self, taken: Taken) -> None:
        messages, dead = taken.messages, taken.dead
        entries = [audit_entry(m) for m in messages]
        await retry(
            lambda: self.audit.append(entries),
            "writing the audit log",
            logger,
            lambda: False,
        )
        if dead:
            # A write of its own: should Redis refuse one list (a key of
            # the wrong type), the retry does not append the other again.
            await retry(
                lambda: self.audit.append_dead(dead),
                "writing the dead-letter list",
                logger,
                lambda: False,
            )
        self.delivered += len(messages)
        self.dead_lettered += len(dead)
        self.taken.remove(taken)

    async def _shutdown(self, subscription, worker_task: asyncio.Task) -> None:
        # Drain: unsubscribe and let nats-py hand over what it already
        # received, then deliver everything held before closing.
        logger.info("nats consumer stopping")
        timeout = self.settings.shutdown_timeout
        try:
            await asyncio.wait_for(subscription.drain(), timeout / 3)
        except (nats.errors.Error, TimeoutError) as exc:
            logger.warning("nats subscription drain: %r", exc)

        async def held_delivered():
            while self.inbox or self.arrived.is_set():
                await asyncio.sleep(0.01)

        try:
            await asyncio.wait_for(held_delivered(), timeout / 2)
        except TimeoutError:
            unlogged = self.received - self.delivered - self.dead_lettered
            unconfirmed = sum(len(t.messages) for t in self.taken if not t.published)
            logger.error(
                "shutdown: %d received messages not delivered and logged in time "
                "(%d not confirmed by nats)",
                unlogged,
                len(self.inbox) + unconfirmed,
            )
        worker_task.cancel()
        self._write_undelivered()
        await self.nats.close()
        await self.audit.close()
        await self.redis.aclose()
        logger.info(
            "nats consumer stopped: %d received, %d delivered, %d dead-lettered, "
            "%d dropped",
            self.received,
            self.delivered,
            self.dead_lettered,
            self.dropped,
        )

    def _write_undelivered(self) -> None:
        """The last resort for what the brokers did not take in time.

        Each message still held goes to this process's log, so that an
        operator can replay it and nothing received is dropped silently. A
        message already parsed is written with the id it was given and its
        payload (replayed as the envelope ``{"id": ..., "message": ...}``,
        its copy keeps that id, so a copy NATS already had can be told
        apart), and with what became of it: confirmed by NATS, sent and not
        confirmed, or not sent. One not yet parsed is written as a
        dead-letter entry with its exact bytes; a refused one as the dead
        letter it was to become.
        """
        entries: list[bytes] = []
        for taken in self.taken:
            if taken.published:
                reason = PUBLISHED
            elif taken.written is not None:
                reason = SENT
            else:
                reason = NOT_SENT
            entries += [_held_entry(m, reason) for m in taken.messages]
            entries += taken.dead
        now = time.time()
        entries += [dead_entry(raw, NOT_SENT, "nats", now) for raw in self.inbox]
        for entry in entries:
            logger.error("undelivered at shutdown: %s", entry.decode())
        self.undelivered += len(entries)
        self.taken.clear()
        self.inbox.clear()
        if entries:
            logger.error(
                "wrote %d undelivered messages to this log ('undelivered at "
                "shutdown' lines); replay them once the brokers are back",
                len(entries),
            )


PUBLISHED = "published to nats with this id; its audit entry was not confirmed written"
SENT = "sent to nats with this id and not confirmed: nats may have it; not audited"
NOT_SENT = "not published: the brokers did not take it before shutdown"


def _held_entry(message: Message, reason: str) -> bytes:
    """A parsed message the audit log may not have: its id and payload."""
    return orjson.dumps(
        {
            "received_at": utc_iso(message.received_at),
            "ingress": "nats",
            "reason": reason,
            "id": message.id,
            "message": message.payload.decode(),
        }
    )


def main() -> None:
    """``fanout-nats``."""
    cli.parse_command_line(
        "fanout-nats", "The NATS ingress: takes messages from a NATS subject."
    )
    runtime.process_main(
        lambda settings, stopping: NatsConsumer(settings, stopping).run()
    )


if __name__ == "__main__":
    main()
