"""The subscriber that counts what arrived: ``python -m benchmarks.probe URL``.

It runs in a process of its own so that counting never shares an event
loop with a load generator. It subscribes to ``bench.>`` and keeps, per
topic, the number of messages, the first and last arrival times and the
end-to-end latency of each (arrival time minus the sender's ``t`` field,
both wall-clock seconds on this host).

The harness talks to it over standard input and output, one line each:
``count TOPIC`` answers a number, ``stats TOPIC`` a JSON object,
``forget TOPIC`` frees a topic's samples, ``quit`` ends it.
"""

import asyncio
import sys
import time
from array import array

import nats
import nats.errors
import orjson
import uvloop

from common.brokers import DirectClient

SUBJECT = "bench.>"


class Topic:
    __slots__ = ("count", "first", "last", "latencies", "malformed")

    def __init__(self, now: float):
        self.count = 0
        self.first = now
        self.last = now
        self.latencies = array("d")
        self.malformed = 0

    def stats(self) -> dict:
        ordered = sorted(self.latencies)
        return {
            "count": self.count,
            "first": self.first,
            "last": self.last,
            "malformed": self.malformed,
            "latency_ms": percentiles(ordered),
        }


def percentiles(ordered: list[float]) -> dict:
    """p50, p99 and max in milliseconds of sorted latencies in seconds."""
    if not ordered:
        return {"p50": None, "p99": None, "max": None}

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3, 3)

    return {"p50": at(0.50), "p99": at(0.99), "max": round(ordered[-1] * 1e3, 3)}


class Probe:
    def __init__(self):
        self.topics: dict[str, Topic] = {}
        self.slow_consumer = 0

    def on_messages(self, messages: list[tuple[bytes, bytes]]) -> None:
        # One chunk read from the socket: one arrival time for all of it.
        now = time.time()
        topics = self.topics
        name = topic = None
        for subject, data in messages:
            if subject != name:
                name, topic = subject, topics.get(subject)
                if topic is None:
                    topic = topics[subject] = Topic(now)
            topic.count += 1
            topic.last = now
            try:
                topic.latencies.append(now - orjson.loads(data)["t"])
            except (orjson.JSONDecodeError, KeyError, TypeError):
                topic.malformed += 1

    async def on_error(self, exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            self.slow_consumer += 1

    def answer(self, line: str) -> bytes | None:
        verb, _, text = line.strip().partition(" ")
        name = text.encode()
        if verb == "stats":
            topic = self.topics.get(name)
            stats = topic.stats() if topic else {"count": 0, "latency_ms": {}}
            stats["slow_consumer_errors"] = self.slow_consumer
            return orjson.dumps(stats) + b"\n"
        if verb == "count":
            topic = self.topics.get(name)
            return b"%d\n" % (topic.count if topic else 0)
        if verb == "forget":
            self.topics.pop(name, None)
            return b"{}\n"
        return None


async def main(url: str) -> None:
    probe = Probe()
    # The gateway's own fast receive path: nats-py's callback per message
    # costs the probe most of a core at the consumers' rates, taken from the
    # processes it measures.
    nc = DirectClient()
    await nc.connect(url, name="bench-probe", error_cb=probe.on_error)
    await nc.subscribe_direct(SUBJECT, probe.on_messages)
    await nc.flush()

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
    )
    out = sys.stdout.buffer
    out.write(b"ready\n")
    out.flush()

    # End on "quit" or when the harness goes away (standard input closes).
    while line := await reader.readline():
        answer = probe.answer(line.decode())
        if answer is None:
            break
        out.write(answer)
        out.flush()
    await nc.close()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1]))
