"""Delivery promises: the Redis consumer, the shared Redis pool, the NATS flush."""

import concurrent.futures
import json
import signal
import socket
import threading
import time

import orjson
import requests

from tests.support import wait_until


def items(count: int, topic: str = "internal.batch") -> list[bytes]:
    return [orjson.dumps({"topic": topic, "n": n}) for n in range(count)]


def numbers_with_ids(messages) -> dict[int, set[str]]:
    seen: dict[int, set[str]] = {}
    for msg in messages:
        n = orjson.loads(msg.data)["n"]
        seen.setdefault(n, set()).add(msg.headers["Nats-Msg-Id"])
    return seen


def kill_while_holding(brokers, rdb, consumer, name: str, count: int) -> None:
    """Freeze NATS so a batch is taken but cannot be confirmed, then kill -9."""
    brokers.nats.proc.send_signal(signal.SIGSTOP)
    rdb.rpush("MESSAGES", *items(count))
    assert wait_until(lambda: rdb.llen(f"MESSAGES:processing:{name}") == count)
    consumer.signal(signal.SIGKILL)
    consumer.proc.wait(5)
    brokers.nats.proc.send_signal(signal.SIGCONT)


def test_killed_consumer_redelivers_its_batch_on_restart(
    launch, brokers, subscriber, rdb
):
    """kill -9 while holding 1,000 items; started again, all 1,000 arrive."""
    env = {"FANOUT_CONSUMER_NAME": "c1", "FANOUT_BATCH_SIZE": "1000"}
    consumer = launch.start("fanout-redis", **env)
    kill_while_holding(brokers, rdb, consumer, "c1", 1000)

    restarted = launch.start("fanout-redis", **env)
    subscriber.wait_for(1000, "internal.batch", timeout=30)
    seen = numbers_with_ids(subscriber.received("internal.batch"))
    assert sorted(seen) == list(range(1000))
    # A redelivered item keeps its id, so a subscriber can drop the copy.
    assert all(len(ids) == 1 for ids in seen.values())
    assert wait_until(lambda: rdb.llen("MESSAGES:processing:c1") == 0)
    assert rdb.llen("MESSAGES:log") == 1000
    assert restarted.proc.poll() is None


def test_dead_consumer_list_is_taken_over(launch, brokers, subscriber, rdb):
    """A consumer that never comes back has its items delivered by another."""
    short = {"FANOUT_CONSUMER_TTL": "2"}
    doomed = launch.start("fanout-redis", FANOUT_CONSUMER_NAME="doomed", **short)
    kill_while_holding(brokers, rdb, doomed, "doomed", 300)

    heir = launch.start("fanout-redis", FANOUT_CONSUMER_NAME="heir", **short)
    subscriber.wait_for(300, "internal.batch", timeout=30)
    assert sorted(numbers_with_ids(subscriber.received("internal.batch"))) == list(
        range(300)
    )
    assert wait_until(
        lambda: not rdb.exists("MESSAGES:processing:doomed", "MESSAGES:batches:doomed")
    )
    heir.wait_for_log("took over 300 unfinished items from consumer doomed")


def test_items_put_on_a_processing_list_by_hand_are_delivered(launch, subscriber, rdb):
    """Items with no batch entry (moved there by an operator) are not stuck."""
    rdb.rpush("MESSAGES:processing:byhand", *items(30))
    launch.start("fanout-redis", FANOUT_CONSUMER_NAME="byhand")
    seen = numbers_with_ids(subscriber.wait_for(30, "internal.batch", timeout=15))
    assert sorted(seen) == list(range(30))
    assert wait_until(lambda: not rdb.exists("MESSAGES:processing:byhand"))
    assert wait_until(lambda: not rdb.exists("MESSAGES:batches:byhand"))
    assert rdb.llen("MESSAGES:log") == 30


def test_hand_edited_batch_entry_gives_its_items_new_ids(launch, subscriber, rdb):
    """A batch entry no consumer wrote (its id prefix holds a quote): its
    items are delivered with new ids, and their audit entries stay JSON."""
    rdb.rpush("MESSAGES:processing:edited", *items(30))
    rdb.rpush("MESSAGES:batches:edited", b'say "hi" 30')
    consumer = launch.start("fanout-redis", FANOUT_CONSUMER_NAME="edited")
    seen = numbers_with_ids(subscriber.wait_for(30, "internal.batch", timeout=15))

    assert sorted(seen) == list(range(30))
    assert wait_until(lambda: rdb.llen("MESSAGES:log") == 30)
    entries = [orjson.loads(e) for e in rdb.lrange("MESSAGES:log", 0, -1)]
    assert {e["id"] for e in entries} == {i for ids in seen.values() for i in ids}
    assert all('"' not in e["id"] for e in entries)
    consumer.wait_for_log("does not record an id prefix; its items get new ids")


def test_two_consumers_share_a_list_without_duplicates(launch, subscriber, rdb):
    """Two consumers on one list: 2,000 items, each delivered exactly once."""
    launch.start("fanout-redis", FANOUT_CONSUMER_NAME="a", FANOUT_BATCH_SIZE="50")
    launch.start("fanout-redis", FANOUT_CONSUMER_NAME="b", FANOUT_BATCH_SIZE="50")
    for chunk in range(20):
        rdb.rpush("MESSAGES", *items(2000)[chunk * 100 : (chunk + 1) * 100])
        time.sleep(0.01)

    messages = subscriber.wait_for(2000, "internal.batch", timeout=30)
    time.sleep(0.5)
    messages = subscriber.received("internal.batch")
    assert sorted(orjson.loads(m.data)["n"] for m in messages) == list(range(2000))
    assert rdb.llen("MESSAGES:log") == 2000


def test_second_consumer_under_one_name_waits_for_the_first(launch, subscriber, rdb):
    """A consumer started under a name a live one holds waits, and says so,
    instead of taking batches off the same processing list: each item is
    delivered once, by the first, then by the second once the first stops.
    (Both used to consume, and every item arrived twice.)"""
    first = launch.start("fanout-redis", FANOUT_CONSUMER_NAME="twin")
    second = launch.start("fanout-redis", ready=False, FANOUT_CONSUMER_NAME="twin")
    second.wait_for_log("consumer name twin is held by a live consumer")
    rdb.rpush("MESSAGES", *items(500))
    subscriber.wait_for(500, "internal.batch")

    first.stop()
    second.wait_for_log("redis consumer twin taking from")
    rdb.rpush("MESSAGES", *items(500)[:100])
    subscriber.wait_for(600, "internal.batch")
    time.sleep(0.5)  # room for a second copy
    numbers = [orjson.loads(m.data)["n"] for m in subscriber.received("internal.batch")]
    assert sorted(numbers) == sorted(list(range(500)) + list(range(100)))
    assert "consumer name twin is free again" in second.output()


def test_idle_consumer_stays_quiet_and_wakes_at_once(launch, subscriber, rdb):
    """60 s idle with a 1 s block timeout: no warnings, then prompt delivery."""
    consumer = launch.start("fanout-redis", FANOUT_REDIS_BLOCK_TIMEOUT="1")
    before = consumer.output()
    time.sleep(60)

    started = time.monotonic()
    rdb.rpush("MESSAGES", json.dumps({"topic": "internal.wake"}))
    subscriber.wait_for(1, "internal.wake", timeout=5)
    assert time.monotonic() - started < 1.0
    idle_lines = consumer.output()[len(before) :]
    assert "WARNING" not in idle_lines and "ERROR" not in idle_lines


def test_burst_waits_for_a_small_redis_pool(launch, subscriber, rdb):
    """200 concurrent requests with 2 Redis connections: all 202, none lost."""
    http = launch.start("fanout-http", FANOUT_REDIS_POOL_SIZE="2")
    url = f"http://127.0.0.1:{http.port}/MESSAGES"

    def post(n: int) -> int:
        body = {"message": {"topic": "internal.burst", "n": n}}
        return requests.post(url, json=body, timeout=30).status_code

    with concurrent.futures.ThreadPoolExecutor(max_workers=200) as pool:
        statuses = list(pool.map(post, range(200)))

    assert statuses == [202] * 200
    messages = subscriber.wait_for(200, "internal.burst")
    assert sorted(orjson.loads(m.data)["n"] for m in messages) == list(range(200))
    assert rdb.llen("MESSAGES:log") == 200


class RecordingProxy:
    """A loopback TCP relay to ``port`` that keeps what the client sent."""

    def __init__(self, port: int):
        self.upstream = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sent = bytearray()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # the listener was closed
            server = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(
                target=self._pump, args=(client, server, True), daemon=True
            ).start()
            threading.Thread(
                target=self._pump, args=(server, client, False), daemon=True
            ).start()

    def _pump(self, source, target, record: bool) -> None:
        try:
            while data := source.recv(65536):
                if record:
                    with self._lock:
                        self.sent += data
                target.sendall(data)
        except OSError:
            pass  # either side went away: the relay ends
        finally:
            for sock in (source, target):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already shut

    def close(self) -> None:
        self.listener.close()


def test_a_confirmed_message_went_out_before_the_ping_that_confirmed_it(
    launch, brokers
):
    """The flush's PING follows the message on the wire, never precedes it.

    NATS answers a PING after everything sent before it, so a PONG proves
    receipt only of what went out first. (nats-py's own flush writes its PING
    ahead of the publishes it still buffers.)
    """
    proxy = RecordingProxy(brokers.nats.port)
    try:
        gateway = launch.start(
            "fanout-http", FANOUT_NATS_URL=f"nats://127.0.0.1:{proxy.port}"
        )
        url = f"http://127.0.0.1:{gateway.port}/MESSAGES"
        for n in range(5):
            body = {"message": {"topic": "internal.order", "n": n}}
            assert requests.post(url, json=body, timeout=10).status_code == 202
            with proxy._lock:
                sent = bytes(proxy.sent)
            frame = sent.rindex(b"HPUB internal.order ")
            assert b'"n":%d' % n in sent[frame:]
            assert b"PING\r\n" in sent[frame:], sent[-200:]
    finally:
        proxy.close()


def test_after_a_confirmation_timed_out_the_next_is_still_a_round_trip(
    launch, brokers, subscriber
):
    """NATS frozen past the publish timeout, thawed, frozen again: 503 again.

    A late PONG for a confirmation that timed out must not leave the
    connection confirming without asking the server.
    """
    gateway = launch.start("fanout-http", FANOUT_PUBLISH_TIMEOUT="1")
    url = f"http://127.0.0.1:{gateway.port}/MESSAGES"

    def post(n: int) -> requests.Response:
        body = {"message": {"topic": "internal.thaw", "n": n}}
        return requests.post(url, json=body, timeout=10)

    nats_proc = brokers.nats.proc
    assert post(0).status_code == 202
    for n in (1, 3):
        nats_proc.send_signal(signal.SIGSTOP)
        try:
            frozen = post(n)
        finally:
            nats_proc.send_signal(signal.SIGCONT)
        assert frozen.status_code == 503, frozen.text
        time.sleep(0.5)  # the late PONG arrives
        thawed = post(n + 1)
        assert thawed.status_code == 202, thawed.text
    delivered = {orjson.loads(m.data)["n"] for m in subscriber.wait_for(3, "internal.")}
    assert {0, 2, 4} <= delivered
