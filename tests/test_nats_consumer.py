"""The NATS ingress, driven with nats-py as in the description."""

import json
import signal

import orjson
import pytest

from services.nats_consumer import PENDING_MESSAGES
from tests.support import audit_log, publish, wait_until


def test_message_is_published_byte_identical_and_audited(
    launch, brokers, subscriber, rdb
):
    """A message on MESSAGES reaches its topic unchanged, with an audit entry."""
    launch.start("fanout-nats")
    text = json.dumps({"topic": "internal.status", "data": {"status": "ok"}})
    publish(brokers.nats_url, [text.encode()])

    [msg] = subscriber.wait_for(1, "internal.")
    assert msg.data == text.encode()
    assert wait_until(lambda: len(audit_log(rdb)) == 1)
    [entry] = [orjson.loads(e) for e in audit_log(rdb)]
    assert entry["id"] == msg.headers["Nats-Msg-Id"]
    assert entry["ingress"] == "nats"
    assert entry["topic"] == "internal.status"
    assert entry["message"] == json.loads(text)


@pytest.mark.parametrize(
    "raw,reason",
    [
        (
            b"{",
            "message is not valid JSON: unexpected end of data: line 1 column 2 "
            "(char 1)",
        ),
        (b'{"topic": ["a"]}', '"topic" must be a string, not an array'),
        (b'{"topic": "x.>"}', "\"topic\" 'x.>' contains a wildcard (* or >)"),
    ],
)
def test_bad_message_goes_to_the_dead_letter_list(
    launch, brokers, subscriber, rdb, raw, reason
):
    """A bad message is kept with its reason; nothing is published for it."""
    launch.start("fanout-nats")
    publish(brokers.nats_url, [raw, b'{"topic": "internal.after"}'])

    messages = subscriber.wait_for(1, "internal.")
    assert [m.subject for m in messages] == ["internal.after"]
    assert wait_until(lambda: rdb.llen("MESSAGES:dead") == 1)
    [dead] = [orjson.loads(e) for e in rdb.lrange("MESSAGES:dead", 0, -1)]
    assert dead == {
        "received_at": dead["received_at"],
        "ingress": "nats",
        "reason": reason,
        "raw": raw.decode(),
    }
    assert len(audit_log(rdb)) == 1


def test_two_consumers_deliver_each_message_once(launch, brokers, subscriber, rdb):
    """Two consumer processes in one queue group: 1,000 messages, each once."""
    first = launch.start("fanout-nats")
    second = launch.start("fanout-nats")
    payloads = [
        json.dumps({"topic": "internal.shared", "n": n}).encode() for n in range(1000)
    ]
    publish(brokers.nats_url, payloads)

    messages = subscriber.wait_for(1000, "internal.shared")
    assert wait_until(lambda: len(audit_log(rdb)) >= 1000)
    numbers = sorted(orjson.loads(m.data)["n"] for m in messages)
    assert numbers == list(range(1000))
    assert len(audit_log(rdb)) == 1000
    # Both processes took part.
    first.stop()
    second.stop()
    for gateway in (first, second):
        assert "nats consumer stopped: 0 received" not in gateway.output()


def test_smallest_redis_pool_still_writes_the_audit_log(
    launch, brokers, subscriber, rdb
):
    """With FANOUT_REDIS_POOL_SIZE=1 (allowed), every message is still audited."""
    launch.start("fanout-nats", FANOUT_REDIS_POOL_SIZE="1")
    payloads = [
        json.dumps({"topic": "internal.pool", "n": n}).encode() for n in range(20)
    ]
    publish(brokers.nats_url, payloads)

    subscriber.wait_for(20, "internal.pool")
    assert wait_until(lambda: len(audit_log(rdb)) == 20, timeout=10), (
        f"{len(audit_log(rdb))} of 20 messages audited"
    )


def test_messages_past_the_consumers_limit_are_dropped_and_counted(
    launch, brokers, rdb
):
    """While Redis is frozen the consumer holds what arrives, up to 200,000
    messages; what comes beyond is dropped, logged and counted, and the
    rest is delivered and audited once Redis is back."""
    consumer = launch.start("fanout-nats", FANOUT_PUBLISH_TIMEOUT="30")
    sent = PENDING_MESSAGES + 20_000
    brokers.redis.proc.send_signal(signal.SIGSTOP)
    try:
        publish(
            brokers.nats_url,
            [b'{"topic": "held.n", "n": %d}' % n for n in range(sent)],
        )
        consumer.wait_for_log("dropped messages: ", timeout=30)
    finally:
        brokers.redis.proc.send_signal(signal.SIGCONT)

    assert wait_until(lambda: len(audit_log(rdb)) >= PENDING_MESSAGES, timeout=60)
    consumer.signal(signal.SIGTERM)
    assert consumer.proc.wait(30) == 0
    line = next(
        x for x in consumer.output().splitlines() if "nats consumer stopped" in x
    )
    received, delivered, dead, dropped = (
        int(part.split()[0]) for part in line.split("stopped: ")[1].split(", ")
    )
    assert dropped > 0 and dead == 0
    assert received + dropped == sent
    assert delivered == received == len(audit_log(rdb))
