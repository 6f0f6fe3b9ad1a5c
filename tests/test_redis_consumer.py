"""The Redis ingress, driven with redis-py RPUSH as in the description."""

import json

import orjson
import pytest

from tests.support import audit_log, wait_until


def test_item_is_published_byte_identical_and_audited(launch, subscriber, rdb):
    """An RPUSHed item reaches its topic unchanged, with an audit entry."""
    launch.start("fanout-redis")
    text = json.dumps({"topic": "internal.logs", "data": {"level": "info"}})
    rdb.rpush("MESSAGES", text)

    [msg] = subscriber.wait_for(1, "internal.")
    assert msg.subject == "internal.logs"
    assert msg.data == text.encode()
    [entry] = [orjson.loads(e) for e in audit_log(rdb)]
    assert entry["id"] == msg.headers["Nats-Msg-Id"]
    assert entry["ingress"] == "redis"
    assert entry["message"] == json.loads(text)
    assert wait_until(lambda: rdb.llen("MESSAGES") == 0)


DEAD = [
    (
        b"nope",
        "message is not valid JSON: invalid literal, expected 'null': line 1 "
        "column 1 (char 0)",
    ),
    (b'{"data": 1}', 'message has no "topic" field'),
    (b'{"topic": ""}', "\"topic\" '' is empty"),
    (
        b'{"topic": "a."}',
        "\"topic\" 'a.' has an empty token (leading, trailing or double dot)",
    ),
    (
        b"\xff\xfe",
        "message is not valid UTF-8",
    ),
    (
        b'{"message": {"topic": "internal.deep", "v": '
        + b"[" * 260
        + b"]" * 260
        + b"}}",
        '"message" is nested deeper than 254 levels, the most an object message '
        "may have; send it as JSON text",
    ),
]


@pytest.mark.parametrize("raw,reason", DEAD)
def test_bad_item_goes_to_the_dead_letter_list(launch, subscriber, rdb, raw, reason):
    """A bad item is kept with its reason and exact bytes; nothing published."""
    launch.start("fanout-redis")
    rdb.rpush("MESSAGES", raw, b'{"topic": "internal.after"}')

    messages = subscriber.wait_for(1)
    assert [m.subject for m in messages] == ["internal.after"]
    assert len(audit_log(rdb)) == 1
    [dead] = [orjson.loads(e) for e in rdb.lrange("MESSAGES:dead", 0, -1)]
    assert dead["reason"] == reason
    assert dead["ingress"] == "redis"
    kept = dead["raw"].encode() if "raw" in dead else bytes.fromhex(dead["raw_hex"])
    assert kept == raw


def test_backlog_is_delivered_in_push_order(launch, subscriber, rdb):
    """1,000 items pushed before the consumer starts arrive in push order."""
    items = [json.dumps({"topic": "internal.backlog", "n": n}) for n in range(1000)]
    rdb.rpush("MESSAGES", *items)
    launch.start("fanout-redis")

    messages = subscriber.wait_for(1000, "internal.backlog")
    assert [orjson.loads(m.data)["n"] for m in messages] == list(range(1000))
    assert len(audit_log(rdb)) == 1000


def test_ingress_list_equal_to_log_list_is_refused(launch):
    """Configuring the audit log onto the ingress list stops the process."""
    gateway = launch.start("fanout-redis", ready=False, FANOUT_LOG_LIST="MESSAGES")
    assert gateway.proc.wait(10) == 78
    assert gateway.output().strip() == (
        "fanout: bad setting FANOUT_INGRESS_LIST and FANOUT_LOG_LIST are both "
        "'MESSAGES'; the ingress list, the audit log and the dead-letter list must "
        "be different lists, or the gateway would consume its own output"
    )
