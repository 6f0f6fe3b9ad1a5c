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
redelivered item keeps its id (its batch's recorded id prefix and its place
in the batch), which travels in the ``Nats-Msg-Id`` header.

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

from common import cli, logs, runtime
from common.audit import audit_entry
from common.brokers import (
    NatsLink,
    Written,
    first_of,
    redis_client,
    sleep_unless,
    wait_for_redis,
)
from common.committer import BATCH_BYTES
from common.consumer import confirm, retry, sort_batch, split_denied
from common.message import VALID_ID, Message, MessageIds, Parser
from common.settings import Settings

logger = logging.getLogger("fanout.redis")

MAX_BATCH = 5000  # items per take; Lua's unpack() has a stack limit near 8000

# One round trip per batch: commit a published batch, then take another.
# The processing list holds the items as they were pushed; beside it a
# batch list holds one "<id prefix> <count>" entry per batch on it, in the
# same order, and item i (from 1) of a batch has the id "<id prefix><i>".
# Ids cost nothing per item in Lua this way (a string concat per item was
# about 40% of this script's time).
# KEYS: ingress list, processing list, batch list, audit log, dead-letter
# list. ARGV: take count, id prefix for a new batch, how many items and how
# many batches at the head of the processing list are being published
# meanwhile (skipped, not taken again), the batch entry of the committed
# batch ("" when there is nothing to commit), its item count, the number of
# audit entries, then the audit entries and the dead letters. The commit applies
# only while the batch list still starts with that batch, so a retry after
# a lost reply cannot trim or log twice. A batch the processing list holds
# past the skipped one is taken first: one an earlier run of this consumer
# took and did not finish, or one taken over from a dead consumer. Answers
# {batch entry, items}, or {} when there is nothing to take. A key that is
# not a list stops the script before it writes anything: Redis would not
# undo the writes made before the failing command, and the retry would
# then log the batch twice.
STEP = """
for i = 1, 5 do
  local kind = redis.call('TYPE', KEYS[i]).ok
  if kind ~= 'list' and kind ~= 'none' then
    return redis.error_reply('WRONGTYPE ' .. KEYS[i] .. ' holds a ' .. kind ..
      ', not a list; nothing was taken or committed')
  end
end
local first, done, audits = ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])
if done > 0 and redis.call('LINDEX', KEYS[3], 0) == first then
  if audits > 0 then
    redis.call('RPUSH', KEYS[4], unpack(ARGV, 8, 7 + audits))
  end
  if #ARGV > 7 + audits then
    redis.call('RPUSH', KEYS[5], unpack(ARGV, 8 + audits, #ARGV))
  end
  redis.call('LTRIM', KEYS[2], done, -1)
  redis.call('LPOP', KEYS[3])
end
local count, skip = tonumber(ARGV[1]), tonumber(ARGV[3])
if count == 0 then return {} end
local held = redis.call('LINDEX', KEYS[3], tonumber(ARGV[4]))
if held then
  local size = tonumber(string.match(held, ' (%d+)$'))
  local items = redis.call('LRANGE', KEYS[2], skip, skip + size - 1)
  if #items > 0 then return {held, items} end
  redis.call('LREM', KEYS[3], 1, held)  -- its items are gone: nothing to do
end
-- Items with no batch entry (not written by this version): a batch of
-- their own, with new ids.
local items = redis.call('LRANGE', KEYS[2], skip, skip + count - 1)
if #items == 0 then
  items = redis.call('LPOP', KEYS[1], count)
  if not items then return {} end
  redis.call('RPUSH', KEYS[2], unpack(items))
end
local entry = ARGV[2] .. ' ' .. #items
redis.call('RPUSH', KEYS[3], entry)
return {entry, items}
"""

# KEYS: the dead consumer's processing list, its batch list and its
# heartbeat key, then ours. Appends to our tails: our batch in flight sits
# at the head and is trimmed from there by count.
TAKEOVER = """
if redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
local total = 0
while true do
  local items = redis.call('LRANGE', KEYS[1], 0, 999)
  if #items == 0 then break end
  redis.call('RPUSH', KEYS[4], unpack(items))
  redis.call('LTRIM', KEYS[1], #items, -1)
  total = total + #items
end
while true do
  local entries = redis.call('LRANGE', KEYS[2], 0, 999)
  if #entries == 0 then break end
  redis.call('RPUSH', KEYS[5], unpack(entries))
  redis.call('LTRIM', KEYS[2], #entries, -1)
end
return total
"""

# KEYS: processing list, batch list, ingress list. Puts unfinished items
# back at the head of the ingress list in their order.
GIVE_BACK = """
local items = redis.call('LRANGE', KEYS[1], 0, -1)
for i = #items, 1, -1 do
  redis.call('LPUSH', KEYS[3], items[i])
end
redis.call('DEL', KEYS[1], KEYS[2])
return #items
"""


@dataclass(slots=True)
class Commit:
    """A published batch, to be logged and removed from the processing list."""

    entry: bytes  # the batch's entry on the batch list
    count: int
    audits: list[bytes]
    dead: list[bytes]

    def args(self) -> list:
        return [self.entry, self.count, len(self.audits), *self.audits, *self.dead]


@dataclass(slots=True)
class Flight:
    """A taken batch, parsed and written to NATS, not yet confirmed."""

    entry: bytes
    count: int
    messages: list[Message]
    dead: list[bytes]
    written: Written | None  # None when no item was a message


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
        # The heartbeat's value: which process holds the name.
        self.holder = f"{socket.gethostname()} {os.getpid()}"
        self.processing, self.batch_list, self.heartbeat = self._keys(self.name)
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
        if not await self._claim_name():
            await self._close_connections()
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
            await self._consume_until_stopped()
        finally:
            for task in background:
                task.cancel()
            await self._shutdown()
        return 0

    async def _consume_until_stopped(self) -> None:
        """Consume; once stopping, for half the shutdown timeout at most.

        A step still waiting then (on a frozen broker, say) is cancelled:
        its batches are on the processing list, which the shutdown gives
        back, and the other half is left for that.
        """
        consume = asyncio.create_task(self._consume(), name="consume")
        stop = asyncio.create_task(self.stopping.wait(), name="stop")
        try:
            await asyncio.wait({consume, stop}, return_when=asyncio.FIRST_COMPLETED)
            grace = self.settings.shutdown_timeout / 2
            if not consume.done():
                self._stop_deadline = asyncio.get_running_loop().time() + grace
                await asyncio.wait({consume}, timeout=grace)
            if consume.done():
                consume.result()  # a bug in it is raised here
                return
            logger.warning(
                "stopping: the brokers did not finish the batches in hand "
                "within %.1f s; giving them back",
                grace,
            )
        finally:
            for task in (consume, stop):
                task.cancel()
            await asyncio.gather(consume, stop, return_exceptions=True)

    async def _consume(self) -> None:
        commit = None  # confirmed by NATS, until Redis took its commit
        flight = None  # written to NATS, its confirmation not yet awaited
        taken = await self._step(None, None, [])
        while taken is not None:
            if not taken and flight is None:
                if commit is not None:
                    taken, commit = await self._step(commit, None, []), None
                    continue
                if self.stopping.is_set():
                    return
                await self._wait_for_items()
                taken = await self._step(None, None, [])
                continue
            # PERF: up to three batches move at once: Redis logs the batch
            # NATS confirmed last and hands over the next, while this process
            # awaits the confirmation of the batch it wrote last, then parses
            # and writes the one taken. Each step leaves the others' servers
            # work to do: done one after the other, each process would wait
            # idle for the others most of the time. The step goes first: its
            # script is on its way to Redis before the parse takes the CPU;
            # it asks for as many items as fit at the size of these.
            if taken:
                items = taken[1]
                self.take_count = self._fitting(sum(map(len, items)) / len(items))
            taken, moved = await asyncio.gather(
                self._step(commit, flight, taken), self._advance(flight, taken)
            )
            if moved is None:
                return  # stopping: left on the processing list, given back
            commit, flight = moved

    async def _step(
        self, commit: "Commit | None", flight: "Flight | None", taken: list
    ) -> list | None:
        """Commit a confirmed batch (if any) and take a batch.

        ``flight`` and ``taken`` are being published meanwhile: their items,
        at the head of the processing list, are not taken again. The batch
        comes as ``[entry, items]`` (its batch-list entry and its items), or
        ``[]`` when there is none. Takes nothing while NATS is away, or once
        stopping: taken items would only sit in memory. None when stopping
        cut the retries short.
        """
        while not self.nats.connected.is_set() and not self.stopping.is_set():
            await first_of(self.nats.connected.wait(), self.stopping.wait())
        self.batches += 1
        count = 0 if self.stopping.is_set() else self.take_count
        skip_items = skip_batches = 0
        if flight is not None:
            skip_items, skip_batches = flight.count, 1
        if taken:
            skip_items, skip_batches = skip_items + len(taken[1]), skip_batches + 1
        args = [count, f"{self.ids.prefix}-{self.batches:x}.", skip_items, skip_batches]
        args += commit.args() if commit else ["", 0, 0]
        keys = [
            self.settings.ingress_list,
            self.processing,
            self.batch_list,
            self.settings.log_list,
            self.settings.dead_list,
        ]
        taken = await retry(
            lambda: self.step_script(keys=keys, args=args),
            "committing and taking a batch",
            logger,
            self._past_stop_deadline,
        )
        if taken is not None and commit is not None:
            self.delivered += len(commit.audits)
            self.dead_lettered += len(commit.dead)
        return taken

    async def _wait_for_items(self) -> None:
        # BLMOVE from the list onto itself, head to head, waits for an item
        # without taking it; the next step moves it atomically.
        block = self.settings.redis_block_timeout
        try:
            await first_of(
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

    async def _advance(
        self, flight: "Flight | None", taken: list
    ) -> "tuple[Commit | None, Flight | None] | None":
        """Confirm the batch written last, then write the one taken.

        One batch unconfirmed at a time: a batch that failed is written
        again before anything behind it. None when stopping cut the retries
        short.
        """
        commit = None
        if flight is not None:
            commit = await self._confirm(flight)
            if commit is None:
                return None
        if not taken:
            return commit, None
        entry, items = taken
        prefix = self._id_prefix(entry)
        ids = [f"{prefix}{n}" for n in range(1, len(items) + 1)]
        pairs = zip(ids, items, strict=True)
        messages, dead = sort_batch(self.parser, pairs, self.refusals)
        written = await self.nats.send(messages) if messages else None
        return commit, Flight(entry, len(items), messages, dead, written)

    def _id_prefix(self, entry: bytes) -> str:
        """The id prefix a batch-list entry records (``<prefix> <count>``).

        Ids go unescaped into NATS headers and audit entries. An entry that
        this consumer could not have written (the list edited by hand)
        gives its items new ids instead, and says so.
        """
        prefix = entry.rpartition(b" ")[0].decode(errors="replace")
        if VALID_ID.fullmatch(prefix):
            return prefix
        logger.error(
            "batch entry %r on %s does not record an id prefix; its items get new ids",
            entry,
            self.batch_list,
        )
        return f"{self.ids.prefix}-{self.batches:x}r."

    async def _confirm(self, flight: "Flight") -> "Commit | None":
        """What committing a written batch takes, once NATS has it all.

        None when stopping cut short the publishing of a batch NATS did
        not confirm.
        """
        messages, dead = flight.messages, flight.dead
        if messages:
            denied = await confirm(
                self.nats,
                flight.written,
                messages,
                self.settings.publish_timeout,
                logger,
                self._past_stop_deadline,
            )
            if denied is None and self._past_stop_deadline():
                return None
            messages, refused = split_denied(messages, denied or set(), "redis", logger)
            dead = dead + refused
        audits = [audit_entry(m) for m in messages]
        return Commit(flight.entry, flight.count, audits, dead)

    def _fitting(self, item_bytes: float) -> int:
        return max(1, min(self.batch_size, int(BATCH_BYTES // max(item_bytes, 1))))

    def _keys(self, name: str) -> tuple[str, str, str]:
        """Consumer ``name``'s processing list, batch list and heartbeat key."""
        prefix = self.settings.ingress_list
        return (
            f"{prefix}:processing:{name}",
            f"{prefix}:batches:{name}",
            f"{prefix}:consumer:{name}",
        )

    def _past_stop_deadline(self) -> bool:
        # Set by _consume_until_stopped once the stop began.
        deadline = self._stop_deadline
        return deadline is not None and asyncio.get_running_loop().time() >= deadline

    async def _claim_name(self) -> bool:
        """Hold this consumer's name (its heartbeat key) before taking
        anything; False if stopping came first.

        Two processes under one name would take batches off one processing
        list and publish them twice. While a live process holds the name,
        this one waits for it to stop or for its heartbeat to expire. The
        holder is not waited for if it was this host's process and is gone:
        this consumer's own run before a crash.
        """
        ttl = self.settings.consumer_ttl
        said = False
        while not self.stopping.is_set():
            try:
                ms = int(ttl * 1000)
                claimed = await self.redis.set(
                    self.heartbeat, self.holder, nx=True, px=ms
                )
                holder = "" if claimed else await self._holder()
                if claimed or not holder or self._gone(holder):
                    await self.redis.set(self.heartbeat, self.holder, px=ms)
                    if said:
                        logger.info("consumer name %s is free again", self.name)
                    return True
                if not said:
                    said = True
                    logger.error(
                        "consumer name %s is held by a live consumer (%s, "
                        "heartbeat key %s); waiting until it stops or its "
                        "heartbeat expires: give each consumer a name of its own",
                        self.name,
                        holder,
                        self.heartbeat,
                    )
            except (aioredis.RedisError, OSError):
                pass  # wait_for_redis has seen it answer; try again
            await sleep_unless(self.stopping, ttl / 3)
        return False

    async def _holder(self) -> str:
        value = await self.redis.get(self.heartbeat)
        return "" if value is None else value.decode(errors="replace")

    def _gone(self, holder: str) -> bool:
        """Whether the heartbeat's ``holder`` is a process that is gone."""
        if holder == self.holder:
            return True  # this host and pid: a run before this one
        host, _, pid = holder.rpartition(" ")
        if host != socket.gethostname() or not pid.isdigit():
            return False
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # alive, another user's
        return False

    async def _beat(self) -> None:
        while True:
            try:
                await self.redis.set(
                    self.heartbeat,
                    self.holder,
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
            moved = await self.takeover_script(
                keys=[*self._keys(name), self.processing, self.batch_list]
            )
            if moved > 0:
                logger.warning(
                    "took over %d unfinished items from consumer %s, whose "
                    "heartbeat expired",
                    moved,
                    name,
                )

    async def _close_connections(self) -> None:
        await self.nats.close()
        await self.redis.aclose()
        await self.waiter.aclose()

    async def _shutdown(self) -> None:
        logger.info("redis consumer stopping")
        try:
            async with asyncio.timeout(self.settings.shutdown_timeout / 4):
                returned = await self.give_back_script(
                    keys=[self.processing, self.batch_list, self.settings.ingress_list]
                )
                if returned:
                    logger.warning(
                        "gave %d unfinished items back to the list", returned
                    )
                await self.redis.delete(self.heartbeat)
        except (aioredis.RedisError, OSError, TimeoutError) as exc:
            logger.error(
                "could not give unfinished items back (%r); they stay on %s "
                "and are delivered when a consumer takes that list over",
                exc,
                self.processing,
            )
        await self._close_connections()
        logger.info(
            "redis consumer stopped: %d delivered, %d dead-lettered",
            self.delivered,
            self.dead_lettered,
        )


def main() -> None:
    """``fanout-redis``."""
    cli.parse_command_line(
        "fanout-redis", "The Redis ingress: takes messages off a Redis list."
    )
    runtime.process_main(
        lambda settings, stopping: RedisConsumer(settings, stopping).run()
    )


if __name__ == "__main__":
    main()
