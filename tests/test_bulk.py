"""Bulk HTTP requests: a JSON array or NDJSON of envelopes in one POST."""

import concurrent.futures
import json
import signal
import time

import orjson
import pytest
import requests

from tests.support import audit_log

ALPHA = "alpha-token-value-0123456789"
NDJSON = "application/x-ndjson"


@pytest.fixture
def http(launch):
    gateway = launch.start("fanout-http")
    return f"http://127.0.0.1:{gateway.port}/MESSAGES"


def post(url, body, content_type="application/json", **headers):
    data = body if isinstance(body, bytes) else body.encode()
    headers["Content-Type"] = content_type
    return requests.post(url, data=data, headers=headers, timeout=20)


def texts(count: int, prefix: str = "internal.bulk") -> list[str]:
    return [json.dumps({"topic": f"{prefix}.{i}", "n": i}) for i in range(count)]


def assert_all_accepted(response, topics: list[str]) -> list[str]:
    """The 200 answer accepts every message, in order; returns their ids."""
    assert response.status_code == 200
    results = response.json()["results"]
    assert [(r["status"], r["topic"]) for r in results] == [
        ("accepted", topic) for topic in topics
    ]
    return [r["id"] for r in results]


def test_json_array_is_delivered_in_order_and_audited(http, subscriber, rdb):
    """Each envelope of an array reaches its topic as sent, in order, and is logged."""
    sent = texts(3)
    envelopes = [{"message": sent[0]}, {"message": sent[1]}, {"message": sent[2]}]
    envelopes[1]["id"] = "order-17.retry:1"
    envelopes.append({"message": {"topic": "internal.bulk.obj", "data": [1, 2]}})
    response = requests.post(http, json=envelopes, timeout=20)

    topics = [f"internal.bulk.{i}" for i in range(3)] + ["internal.bulk.obj"]
    ids = assert_all_accepted(response, topics)
    assert ids[1] == "order-17.retry:1"
    got = subscriber.wait_for(4, "internal.")
    assert [m.subject for m in got] == topics
    assert [m.data for m in got] == [
        *(text.encode() for text in sent),
        b'{"topic":"internal.bulk.obj","data":[1,2]}',
    ]
    assert [m.headers["Nats-Msg-Id"] for m in got] == ids
    entries = [orjson.loads(e) for e in audit_log(rdb)]
    assert [(e["id"], e["topic"], e["ingress"]) for e in entries] == [
        (i, t, "http") for i, t in zip(ids, topics, strict=True)
    ]
    assert entries[0]["message"] == json.loads(sent[0])


def test_ndjson_is_delivered_in_order_with_crlf_and_blank_lines(http, subscriber, rdb):
    """NDJSON: LF or CRLF line ends, blank lines skipped, one result per line."""
    sent = texts(3, "internal.nd")
    lines = [orjson.dumps({"message": text}) for text in sent]
    body = b"\n" + lines[0] + b"\r\n  \r\n" + lines[1] + b"\n\n" + lines[2] + b"\r\n"
    response = post(http, body, NDJSON)

    topics = [f"internal.nd.{i}" for i in range(3)]
    ids = assert_all_accepted(response, topics)
    got = subscriber.wait_for(3, "internal.")
    assert [m.data for m in got] == [text.encode() for text in sent]
    assert [orjson.loads(e)["id"] for e in audit_log(rdb)] == ids


def test_mixed_envelopes_get_their_own_results(launch, subscriber, rdb):
    """Good and bad envelopes in one array: exact reasons; only good ones go on."""
    gateway = launch.start("fanout-http", FANOUT_MAX_MESSAGE_BYTES="1024")
    url = f"http://127.0.0.1:{gateway.port}/MESSAGES"
    big = json.dumps({"topic": "internal.big", "pad": "x" * 2000})
    envelopes = [
        {"message": {"topic": "internal.first"}, "id": "first-1"},
        {"msg": "x"},
        7,
        {"message": {"topic": "a..b"}},
        {"message": {"topic": "_INBOX.abc"}},
        {"message": {"topic": "internal.x"}, "id": "no spaces"},
        {"message": big},
        {"message": '{"topic":'},
        {"message": {"topic": "internal.last"}},
    ]
    response = requests.post(url, json=envelopes, timeout=20)

    assert response.status_code == 200
    results = response.json()["results"]
    assert results[0] == {
        "status": "accepted",
        "id": "first-1",
        "topic": "internal.first",
    }
    assert results[8]["status"] == "accepted"
    assert [r["error"] for r in results[1:8]] == [
        'envelope has no "message" field',
        'envelope must be a JSON object with a "message" field, not a number',
        "\"topic\" 'a..b' has an empty token (leading, trailing or double dot)",
        "\"topic\" '_INBOX.abc' is reserved: _INBOX. subjects carry replies "
        "addressed to other clients",
        '"id" must be 1 to 128 characters of letters, digits and . _ : -',
        f"message is {len(big)} bytes; the limit is 1024 bytes",
        '"message" is not valid JSON: unexpected end of data: line 1 column 10 '
        "(char 9)",
    ]
    assert all(r["status"] == "error" and "retryable" not in r for r in results[1:8])
    got = subscriber.wait_for(2)
    assert [m.subject for m in got] == ["internal.first", "internal.last"]
    assert [orjson.loads(e)["topic"] for e in audit_log(rdb)] == [
        "internal.first",
        "internal.last",
    ]


def test_bad_ndjson_line_is_that_lines_error_only(http, subscriber):
    """A line that is not JSON, or not an object, fails alone; its neighbours pass."""
    body = (
        b'{"message": {"topic": "internal.a"}}\n'
        b"{nope\n"
        b"\n"
        b"[1]\n"
        b'{"message": {"topic": "internal.b"}}\n'
    )
    response = post(http, body, NDJSON)

    assert response.status_code == 200
    assert [r.get("error", r["status"]) for r in response.json()["results"]] == [
        "accepted",
        "line 2 is not valid JSON: unexpected character, expected a string key: "
        "line 1 column 2 (char 1)",
        'envelope must be a JSON object with a "message" field, not an array',
        "accepted",
    ]
    got = subscriber.wait_for(2, "internal.")
    assert [m.subject for m in got] == ["internal.a", "internal.b"]


ONE = b'{"message": {"topic": "internal.one"}}'
PAD = b'{"message": {"topic": "internal.pad", "pad": "' + b"x" * 6000 + b'"}}'
# (content type, body, status, error) for requests refused whole.
WHOLE_REFUSALS = [
    (
        "application/json",
        b"[]",
        400,
        "request body is an empty array; send at least one envelope",
    ),
    (
        "application/json",
        b" 42",
        400,
        'request body must be a JSON object with a "message" field or an array '
        "of them, not a number",
    ),
    (
        "application/json",
        b"[" + ONE + b",",
        400,
        "request body is not valid JSON: unexpected end of data: line 1 column 41 "
        "(char 40)",
    ),
    (NDJSON, b"", 400, "request body has no envelope; send one JSON envelope per line"),
    (
        NDJSON,
        b"\r\n \n",
        400,
        "request body has no envelope; send one JSON envelope per line",
    ),
    (
        "application/json",
        b"[" + b",".join([ONE] * 6) + b"]",
        413,
        "request holds 6 envelopes; the limit is 5 (FANOUT_MAX_BULK_MESSAGES)",
    ),
    (
        NDJSON,
        b"\n".join([ONE] * 6),
        413,
        "request holds 6 envelopes; the limit is 5 (FANOUT_MAX_BULK_MESSAGES)",
    ),
    (
        NDJSON,
        PAD,
        413,
        f"request body is {len(PAD)} bytes; the limit for a bulk request is 5000 "
        "bytes (FANOUT_MAX_BULK_BYTES)",
    ),
]


def test_whole_request_refusals(launch, subscriber, rdb):
    """Empty, not an array, not JSON, too many or too big: refused whole."""
    limits = {"FANOUT_MAX_BULK_MESSAGES": "5", "FANOUT_MAX_BULK_BYTES": "5000"}
    url = f"http://127.0.0.1:{launch.start('fanout-http', **limits).port}/MESSAGES"
    for content_type, body, status, error in WHOLE_REFUSALS:
        response = post(url, body, content_type)
        assert (response.status_code, response.json()) == (
            status,
            {"status": "error", "error": error},
        )

    # Without a length, the body is read to one byte past the limit, no further.
    chunked = requests.post(
        url,
        data=iter([b"[", PAD, b"]"]),
        headers={"Content-Type": "application/json"},
        timeout=20,
    )
    assert (chunked.status_code, chunked.json()["error"]) == (
        413,
        "request body is 5001 bytes; the limit for a bulk request is 5000 bytes "
        "(FANOUT_MAX_BULK_BYTES)",
    )
    assert post(url, b"[" + b",".join([ONE] * 5) + b"]").status_code == 200
    got = subscriber.wait_for(5)
    assert [m.subject for m in got] == ["internal.one"] * 5
    assert len(audit_log(rdb)) == 5


def test_token_and_its_patterns_apply_to_each_envelope(launch, subscriber):
    """No token: 401 for the whole request; a token's patterns judge each item."""
    gateway = launch.start("fanout-http", FANOUT_TOKENS=f"alpha {ALPHA} alpha.>")
    url = f"http://127.0.0.1:{gateway.port}/MESSAGES"
    body = b'[{"message": {"topic": "alpha.x"}}, {"message": {"topic": "beta.x"}}]'
    assert post(url, body).status_code == 401

    response = post(url, body, Authorization=f"Bearer {ALPHA}")
    assert response.status_code == 200
    first, second = response.json()["results"]
    assert first["status"] == "accepted"
    assert second == {
        "status": "error",
        "error": "\"topic\" 'beta.x' is not among the topics this client's token "
        "may publish to",
    }
    got = subscriber.wait_for(1)
    assert [m.subject for m in got] == ["alpha.x"]


def test_broker_trouble_is_retryable_per_message(launch, brokers):
    """With NATS gone, each accepted-looking envelope is a retryable error."""
    gateway = launch.start("fanout-http", FANOUT_PUBLISH_TIMEOUT="1")
    url = f"http://127.0.0.1:{gateway.port}/MESSAGES"
    brokers.nats.stop()
    gateway.wait_for_log("nats disconnected")

    body = b'{"message": {"topic": "internal.a"}}\n{"message": {"topic": "a..b"}}'
    response = post(url, body, NDJSON)
    assert response.status_code == 200
    unreachable, bad = response.json()["results"]
    assert unreachable == {
        "status": "error",
        "error": "nats is unreachable",
        "retryable": True,
    }
    assert "retryable" not in bad


def test_no_room_for_the_whole_request_queues_none(launch, brokers, subscriber):
    """Past FANOUT_MAX_PENDING (the batch in flight counted) no message of the
    request is queued, and each is refused as retryable."""
    gateway = launch.start(
        "fanout-http",
        FANOUT_MAX_PENDING="8",
        FANOUT_MAX_BULK_MESSAGES="5",
        FANOUT_PUBLISH_TIMEOUT="2",
    )
    url = f"http://127.0.0.1:{gateway.port}/MESSAGES"
    brokers.nats.proc.send_signal(signal.SIGSTOP)
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            held = pool.submit(post, url, b"\n".join([ONE] * 5), NDJSON)
            time.sleep(0.5)  # taken as a batch, waiting on the frozen NATS
            second = post(url, b"\n".join([ONE] * 5), NDJSON)
            brokers.nats.proc.send_signal(signal.SIGCONT)
            held.result()
    finally:
        brokers.nats.proc.send_signal(signal.SIGCONT)

    assert (
        second.json()["results"]
        == [
            {
                "status": "error",
                "error": "5 messages are waiting for the brokers; 5 more would exceed "
                "FANOUT_MAX_PENDING (8); send them again later",
                "retryable": True,
            }
        ]
        * 5
    )
    assert [r["status"] for r in held.result().json()["results"]] == ["accepted"] * 5
    assert len(subscriber.wait_for(5)) == 5
    time.sleep(0.5)
    assert len(subscriber.received()) == 5  # none of the refused request's


def test_hundred_messages_per_request_all_delivered(http, subscriber, rdb):
    """100 envelopes per request, as JSON and as NDJSON: all delivered, in order."""
    sent = texts(200, "internal.many")
    envelopes = [orjson.dumps({"message": text}) for text in sent]
    as_json = post(http, b"[" + b",".join(envelopes[:100]) + b"]")
    as_ndjson = post(http, b"\n".join(envelopes[100:]) + b"\n", NDJSON)

    topics = [f"internal.many.{i}" for i in range(200)]
    ids = assert_all_accepted(as_json, topics[:100])
    ids += assert_all_accepted(as_ndjson, topics[100:])
    got = subscriber.wait_for(200, "internal.")
    assert [m.data for m in got] == [text.encode() for text in sent]
    assert [orjson.loads(e)["id"] for e in audit_log(rdb)] == ids


def test_array_after_4_kib_of_spaces_is_one_body_however_it_is_sent(http):
    """Bulk or not is decided on the first 4 KiB, with or without a length."""
    body = b" " * 5000 + b"[" + ONE + b"]"

    def chunks():
        yield body[:3000]
        yield body[3000:]

    sized = post(http, body)
    chunked = requests.post(
        http, data=chunks(), headers={"Content-Type": "application/json"}, timeout=20
    )

    assert sized.status_code == chunked.status_code == 400
    assert sized.json() == chunked.json()
    assert sized.json()["error"] == (
        "request body is an array whose [ comes after its first 4096 bytes; a "
        "bulk request's must come within them"
    )
