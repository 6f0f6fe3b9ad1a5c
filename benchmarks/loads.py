"""Load generators, each run as a process of its own.

``python -m benchmarks.loads ws|redis|nats ...`` sends messages until it has
sent ``--count`` of them or ``--seconds`` have passed, whichever comes
first, then prints one JSON line: what it sent, what was answered, errors,
how long it took and the CPU seconds its sending took (``cpu_s``: the
interpreter's start and imports, which run before the load, are not in
it). ``--rate 0`` sends as fast as it can; a positive rate
paces sending to that many messages a second (over all connections).

Each message carries ``t``, the wall-clock time it was made, which the
probe subtracts from its arrival time. An unpaced NATS burst is made whole
before the first publish, so that making it does not take CPU from the
consumers draining it; its ``t`` is then earlier than its send, which the
burst rows' latency (time queued included) does not show anyway.
"""

import argparse
import asyncio
import sys
import time

import nats
import nats.errors
import orjson
import redis
import uvloop
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

PAD = "x" * 64  # brings a message to about 130 bytes
DRAIN_TIMEOUT = 15.0  # seconds to wait for answers after the last frame
TICK = 0.002  # seconds between paced sends of the Redis and NATS generators


def message(topic: str, n: int) -> bytes:
    return orjson.dumps({"topic": topic, "t": time.time(), "n": n, "pad": PAD})


def due(start: float, rate: float, count: int) -> int:
    """How many messages a paced sender should have sent by now."""
    return min(count, int((time.monotonic() - start) * rate) + 1)


class WsConnection:
    """One client connection keeping up to ``window`` frames unanswered."""

    def __init__(self, ws, window: int):
        self.ws = ws
        self.room = asyncio.Semaphore(window)
        self.sent = 0
        self.answered = 0
        self.errors = 0
        self.sending = True
        self.all_answered = asyncio.Event()

    async def send(self, topic: str, quota: int, deadline: float, rate: float):
        start = time.monotonic()
        for n in range(quota):
            if time.monotonic() > deadline:
                break
            if rate:
                delay = start + n / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await self.room.acquire()
            await self.ws.send(message(topic, n))
            self.sent += 1
        self.sending = False
        self._check_done()

    async def receive(self) -> None:
        async for answer in self.ws:
            self.room.release()
            self.answered += 1
            if '"accepted"' not in answer:
                self.errors += 1
            self._check_done()

    def _check_done(self) -> None:
        if not self.sending and self.answered >= self.sent:
            self.all_answered.set()


async def ws_one(args, quota: int, deadline: float, rate: float) -> WsConnection:
    async with connect(
        args.url, compression=None, proxy=None, max_queue=None, ping_interval=None
    ) as ws:
        conn = WsConnection(ws, args.window)
        receive_task = asyncio.create_task(conn.receive())
        try:
            await conn.send(args.topic, quota, deadline, rate)
            await asyncio.wait_for(conn.all_answered.wait(), DRAIN_TIMEOUT)
        except (ConnectionClosed, TimeoutError):
            pass  # counted below as unanswered
        finally:
            receive_task.cancel()
        return conn


async def ws_load(args) -> dict:
    cpu = time.process_time()
    deadline = time.monotonic() + args.seconds
    quota = -(-args.count // args.conns)  # ceiling division
    rate = args.rate / args.conns
    start = time.monotonic()
    results = await asyncio.gather(
        *(ws_one(args, quota, deadline, rate) for _ in range(args.conns)),
        return_exceptions=True,
    )
    elapsed = time.monotonic() - start
    conns = [r for r in results if isinstance(r, WsConnection)]
    failed = [repr(r) for r in results if not isinstance(r, WsConnection)]
    sent = sum(c.sent for c in conns)
    answered = sum(c.answered for c in conns)
    return {
        "sent": sent,
        "answered": answered,
        "errors": sum(c.errors for c in conns) + (sent - answered),
        "failed_connections": failed,
        "elapsed": elapsed,
        "cpu_s": time.process_time() - cpu,
    }


def redis_load(args) -> dict:
    """Pipelined RPUSH, ``--pipeline`` commands per round trip."""
    client = redis.Redis.from_url(args.url, socket_timeout=30)
    fixed = message(args.topic, 0) if args.prebuilt else None
    cpu = time.process_time()
    deadline = time.monotonic() + args.seconds
    start = time.monotonic()
    sent = 0
    while sent < args.count and time.monotonic() < deadline:
        target = due(start, args.rate, args.count) if args.rate else args.count
        batch = min(target - sent, args.pipeline)
        if batch <= 0:
            time.sleep(TICK)
            continue
        pipe = client.pipeline(transaction=False)
        for n in range(sent, sent + batch):
            pipe.rpush(args.key, fixed or message(args.topic, n))
        pipe.execute()
        sent += batch
    return {
        "sent": sent,
        "answered": sent,
        "errors": 0,
        "elapsed": time.monotonic() - start,
        "cpu_s": time.process_time() - cpu,
    }


async def nats_load(args) -> dict:
    """Publishes to ``--subject``; flushes at the end, so the server has all."""
    nc = await nats.connect(args.url, name="bench-publisher")
    fixed = message(args.topic, 0) if args.prebuilt else None
    burst = not (fixed or args.rate)
    made = [message(args.topic, n) for n in range(args.count)] if burst else None
    cpu = time.process_time()
    deadline = time.monotonic() + args.seconds
    start = time.monotonic()
    sent = 0
    while sent < args.count and time.monotonic() < deadline:
        target = due(start, args.rate, args.count) if args.rate else args.count
        batch = min(target - sent, 1000)
        if batch <= 0:
            await asyncio.sleep(TICK)
            continue
        for n in range(sent, sent + batch):
            payload = fixed or (made[n] if made else message(args.topic, n))
            await nc.publish(args.subject, payload)
        sent += batch
    await nc.flush(timeout=30)
    elapsed = time.monotonic() - start
    cpu = time.process_time() - cpu
    await nc.close()
    return {
        "sent": sent,
        "answered": sent,
        "errors": 0,
        "elapsed": elapsed,
        "cpu_s": cpu,
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loads")
    parser.add_argument("kind", choices=("ws", "redis", "nats"))
    parser.add_argument("url")
    parser.add_argument("--topic", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--rate", type=float, default=0.0, help="messages/s; 0: max")
    parser.add_argument("--conns", type=int, default=8, help="ws connections")
    parser.add_argument("--window", type=int, default=100, help="ws frames in flight")
    parser.add_argument("--key", default="MESSAGES", help="redis list")
    parser.add_argument("--pipeline", type=int, default=500, help="redis commands")
    parser.add_argument("--subject", default="MESSAGES", help="nats subject")
    parser.add_argument(
        "--prebuilt",
        action="store_true",
        help="send one message built once (for the ceilings)",
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.kind == "redis":
        result = redis_load(args)
    else:
        load = ws_load if args.kind == "ws" else nats_load
        try:
            result = uvloop.run(load(args))
        except (OSError, InvalidHandshake, nats.errors.Error) as exc:
            raise SystemExit(f"{args.kind} load failed: {exc!r}") from exc
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
