"""The Redis ingress: a consumer of the list ``MESSAGES``.

Delivery is at-least-once. Items are never popped into memory only: a Lua
script moves a batch from the head of the ingress list onto this consumer's
own *processing list*, giving each item an id on the way. Only after the
batch is published to NATS are its items removed from the processing list,
by the same script run that appends their audit entries and dead letters
and takes the batch after next: one Redis round trip and one NATS flush a
batch, and each batch's flush overlaps the script run for its neighbours.
A consumer killed at any point leaves its batch on its processing list; on
start it delivers that list first, and a consumer that died for good has
its list taken over by a live one once its heartbeat key expires. A
redelivered item keeps its id, which travels in the ``Nats-Msg-Id`` header.

Producers ``RPUSH``; the consumer takes from the head, so a backlog is
delivered in the order it was pushed.

Limits: the ingress list, processing lists and audit log must live on one
Redis server (no Redis Cluster slot routing); a batch is at most
:data:`MAX_BATCH` items.
"""

import asyncio
import logging
import os
import socket
from dataclasses import dataclass

import redis.asyncio as aioredis

from common import logs, runtime
from common.audit import audit_entry
from common.brokers import NatsLink, redis_client, wait_for_redis
from common.committer import BATCH_BYTES
from common.consumer import retry, sort_batch, split_denied
from common.message import MessageIds, Parser
from common.settings import Settings

logger = logging.getLogger("fanout.redis")

MAX_BATCH = 5000  # items per take; Lua's unpack() has a stack limit near 8000

# One round trip per batch: commit a published batch, then take another.
# KEYS: ingress list, processing list, audit log, dead-letter list.
# ARGV: take count, id prefix for new items, how many items at the head of
# the processing list are being published meanwhile (skipped, not taken
# again), the id line ("<id>\n") the committed batch starts with ("" when
# there is nothing to commit), its length, the number of audit entries,
# then the audit entries and the dead letters. The commit applies only
# while the processing list still starts with that batch, so a retry after
# a lost reply cannot trim or log twice. What the processing list holds
# past the skipped items is taken first: a batch an earlier run of this
# consumer took and did not finish, or one taken over from a dead consumer.
STEP = """
local first, done, audits = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
if done > 0 then
  local head = redis.call('LINDEX', KEYS[2], 0)
  if head and string.sub(head, 1, #first) == first then
    if audits > 0 then
      redis.call('RPUSH', KEYS[3], unpack(ARGV, 7, 6 + audits))
    end
    if #ARGV > 6 + audits then
      redis.call('RPUSH', KEYS[4], unpack(ARGV, 7 + audits, #ARGV))
    end
    redis.call('LTRIM', KEYS[2], done, -1)
  end
end
local count, skip = tonumber(ARGV[1]), tonumber(ARGV[3])
if count == 0 then return {} end
local held = redis.call('LRANGE', KEYS[2], skip, skip + count - 1)
if #held > 0 then return held end
local items = redis.call('LPOP', KEYS[1], count)
if not items then return {} end
for i, item in ipairs(items) do
  items[i] = ARGV[2] .. i .. '\\n' .. item
end
redis.call('RPUSH', KEYS[2], unpack(items))
return items
"""

# KEYS[1] the dead consumer's processing list, KEYS[2] its heartbeat key,
# KEYS[3] our processing list. Appends to our tail: our batch in flight sits
# at the head and is trimmed from there by count.
TAKEOVER = """
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
local total = 0
while true do
  local items = redis.call('LRANGE', KEYS[1], 0, 999)
  if #items == 0 then break end
  redis.call('RPUSH', KEYS[3], unpack(items))
  redis.call('LTRIM', KEYS[1], #items, -1)
  total = total + #items
end
return total
"""

# KEYS[1] processing list, KEYS[2] ingress list. Puts unfinished items back
# at the head of the ingress list in their order, without their ids.
GIVE_BACK = """
local items = redis.call('LRANGE', KEYS[1], 0, -1)
for i = #items, 1, -1 do
  local cut = string.find(items[i], '\\n', 1, true)
  redis.call('LPUSH', KEYS[2], string.sub(items[i], cut + 1))
end
redis.call('DEL', KEYS[1])
return #items
"""


@dataclass(slots=True)
class Commit:
    """A published batch, to be logged and removed from the processing list."""

    first_line: bytes  # b"<id>\n" of the batch's first entry
    count: int
    audits: list[bytes]
    dead: list[bytes]

    def args(self) -> list:
        return [self.first_line, self.count, len(self.audits), *self.audits, *self.dead]


def consumer_name(settings: Settings) -> str:
    """Stable across restarts, so a restarted consumer finds its own list."""
    if settings.consumer_name:
        return settings.consumer_name
    process = os.environ.get("SUPERVISOR_PROCESS_NAME") or f"pid{os.getpid()}"
    return f"{socket.gethostname()}:{process}"


class RedisConsumer:
    def __init__(self, settings: Settings, stopping: asyncio.Event):
        self.settings = settings
        self.stopping = stopping
        self.name = consumer_name(settings)
        prefix = settings.ingress_list
        self.processing = f"{prefix}:processing:{self.name}"
        self.heartbeat = f"{prefix}:consumer:{self.name}"
        self.batch_size = min(settings.batch_size, MAX_BATCH)
        # How many items a take asks for: as many as fit BATCH_BYTES at the
        # size of the items seen last, so that large items come in small
        # batches. At first, sized for the largest message allowed.
        self.take_count = self._fitting(settings.max_message_bytes)
        self.parser = Parser.for_ingress("redis", settings)
        self.ids = MessageIds()
        self.refusals = logs.RateLimited(logger)
        self.nats = NatsLink(settings, f"fanout-redis-{self.name}", logger)
        self.redis = redis_client(settings)
        self.waiter = redis_client(settings, blocking_pop=True)
        self.step_script = self.redis.register_script(STEP)
        self.takeover_script = self.redis.register_script(TAKEOVER)
        self.give_back_script = self.redis.register_script(GIVE_BACK)
        self.batches = 0
        self.delivered = 0
        self.dead_lettered = 0
        self._stop_deadline: float | None = None

    async def run(self) -> int:
        if not await self.nats.connect(self.stopping):
            return 0
        self.parser.limit_to(self.nats.nc.max_payload)
        if not await wait_for_redis(
            self.redis, self.settings.redis_url, logger, self.stopping
        ):
            await self.nats.close()
            return 0
        logger.info(
            "redis consumer %s taking from %s (processing list %s)",
            self.name,
            self.settings.ingress_list,
            self.processing,
        )
        background = [
            asyncio.create_task(self._beat(), name="heartbeat"),
            asyncio.create_task(self._take_over_dead(), name="takeover"),
        ]
        try:
            await self._consume()
        finally:
            for task in background:
                task.cancel()
            await self._shutdown()
        return 0

    async def _consume(self) -> None:
        entries = await self._step(None, 0)
        commit = None  # the batch published last, until Redis took its commit
        while entries is not None:
            if not entries:
                if commit is not None:
                    entries, commit = await self._step(commit, 0), None
                    continue
                if self.stopping.is_set():
                    return
                await self._wait_for_items()
                entries = await self._step(None, 0)
                continue
            # PERF: publish this batch while Redis commits the one before and
            # hands over the next; done one after the other, each process
            # would wait idle for the other server about half the time. The
            # step goes first: its script is on its way to Redis before the
            # parse of this batch takes the CPU; it asks for as many items
            # as fit at the size of these.
            self.take_count = self._fitting(sum(len(e) for e in entries) / len(entries))
            entries, published = await asyncio.gather(
                self._step(commit, len(entries)), self._publish(entries)
            )
            if published is None:
                return  # stopping: left on the processing list, given back
            commit = published

    async def _step(self, commit: "Commit | None", skip: int) -> list[bytes] | None:
        """Commit a published batch (if any) and take a batch.

        ``skip`` items at the head of the processing list are being
        published meanwhile and are not taken again. Takes nothing while
        NATS is away, or once stopping: taken items would only sit in
        memory. None when stopping cut the retries short.
        """
        while not self.nats.connected.is_set() and not self.stopping.is_set():
            await _first(self.nats.connected.wait(), self.stopping.wait())
        self.batches += 1
        count = 0 if self.stopping.is_set() else self.take_count
        args = [count, f"{self.ids.prefix}-{self.batches:x}.", skip]
        args += commit.args() if commit else ["", 0, 0]
        keys = [
            self.settings.ingress_list,
            self.processing,
            self.settings.log_list,
            self.settings.dead_list,
        ]
        entries = await retry(
            lambda: self.step_script(keys=keys, args=args),
            "committing and taking a batch",
            logger,
            self._past_stop_deadline,
        )
        if entries is not None and commit is not None:
            self.delivered += len(commit.audits)
            self.dead_lettered += len(commit.dead)
        return entries

    async def _wait_for_items(self) -> None:
        # BLMOVE from the list onto itself, head to head, waits for an item
        # without taking it; the next step moves it atomically.
        block = self.settings.redis_block_timeout
        try:
            await _first(
                self.waiter.blmove(
                    self.settings.ingress_list,
                    self.settings.ingress_list,
                    block,
                    "LEFT",
                    "LEFT",
                ),
                self.stopping.wait(),
            )
        except (aioredis.RedisError, OSError) as exc:
            logger.warning("redis blocking wait failed (%r); reconnecting", exc)
            await asyncio.sleep(1)

    async def _publish(self, entries: list[bytes]) -> "Commit | None":
        """Publish a batch to NATS; what committing it will take, or None."""
        items = []
        for entry in entries:
            message_id, _, raw = entry.partition(b"\n")
            items.append((message_id.decode(), raw))
        messages, dead = sort_batch(self.parser, items, self.refusals)

        if messages:
            denied = await retry(
                lambda: self.nats.publish(messages, self.settings.publish_timeout),
                f"publishing {len(messages)} messages to nats",
                logger,
                self._past_stop_deadline,
            )
            if denied is None and self._past_stop_deadline():
                return None
            messages, refused = split_denied(messages, denied or set(), "redis", logger)
            dead += refused
        first_line = entries[0][: entries[0].index(b"\n") + 1]
        return Commit(
            first_line, len(entries), [audit_entry(m) for m in messages], dead
        )

    def _fitting(self, item_bytes: float) -> int:
        return max(1, min(self.batch_size, int(BATCH_BYTES // max(item_bytes, 1))))

    def _past_stop_deadline(self) -> bool:
        if not self.stopping.is_set():
            return False
        loop = asyncio.get_running_loop()
        if self._stop_deadline is None:
            self._stop_deadline = loop.time() + self.settings.shutdown_timeout / 2
        return loop.time() >= self._stop_deadline

    async def _beat(self) -> None:
        while True:
            try:
                await self.redis.set(
                    self.heartbeat,
                    os.getpid(),
                    px=int(self.settings.consumer_ttl * 1000),
                )
            except (aioredis.RedisError, OSError):
                pass  # the main loop reports Redis outages
            await asyncio.sleep(self.settings.consumer_ttl / 3)

    async def _take_over_dead(self) -> None:
        prefix = f"{self.settings.ingress_list}:processing:"
        while True:
            try:
                await self._scan_dead(prefix)
            except (aioredis.RedisError, OSError):
                pass  # the main loop reports Redis outages
            await asyncio.sleep(self.settings.consumer_ttl / 2)

    async def _scan_dead(self, prefix: str) -> None:
        async for key in self.redis.scan_iter(match=f"{prefix}*", count=100):
            key = key.decode()
            if key == self.processing:
                continue
            name = key[len(prefix) :]
            heartbeat = f"{self.settings.ingress_list}:consumer:{name}"
            moved = await self.takeover_script(keys=[key, heartbeat, self.processing])
            if moved > 0:
                logger.warning(
                    "took over %d unfinished items from consumer %s, whose "
                    "heartbeat expired",
                    moved,
                    name,
                )

    async def _shutdown(self) -> None:
        logger.info("redis consumer stopping")
        try:
            returned = await self.give_back_script(
                keys=[self.processing, self.settings.ingress_list]
            )
            if returned:
                logger.warning("gave %d unfinished items back to the list", returned)
            await self.redis.delete(self.heartbeat)
        except (aioredis.RedisError, OSError) as exc:
            logger.error(
                "could not give unfinished items back (%r); they stay on %s "
                "and are delivered when a consumer takes that list over",
                exc,
                self.processing,
            )
        await self.nats.close()
        await self.redis.aclose()
        await self.waiter.aclose()
        logger.info(
            "redis consumer stopped: %d delivered, %d dead-lettered",
            self.delivered,
            self.dead_lettered,
        )


async def _first(*aws) -> None:
    """Wait for the first of ``aws`` to finish and cancel the rest."""
    tasks = [asyncio.ensure_future(aw) for aw in aws]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
    for task in done:
        task.result()


def main() -> None:
    """``fanout-redis``."""
    runtime.process_main(
        lambda settings, stopping: RedisConsumer(settings, stopping).run()
    )


if __name__ == "__main__":
    main()
