"""The HTTP ingress, driven with requests as in the protocol description."""

import json
import os
import signal
from concurrent.futures import ThreadPoolExecutor

import orjson
import pytest
import requests

from tests.support import (
    audit_log,
    free_port,
    nats_server,
    port_is_free,
    wait_for_port,
    wait_until,
)


@pytest.fixture
def http(launch):
    gateway = launch.start("fanout-http")
    return f"http://127.0.0.1:{gateway.port}/MESSAGES"


def post(url, body, content_type="application/json"):
    data = body if isinstance(body, bytes) else body.encode()
    return requests.post(
        url, data=data, headers={"Content-Type": content_type}, timeout=10
    )


def test_message_text_is_published_byte_identical_and_audited(http, subscriber, rdb):
    """A string "message" reaches its topic as the same bytes and is logged."""
    text = json.dumps({"topic": "internal.updates", "data": {"value": 42}})
    response = requests.post(http, json={"message": text}, timeout=10)

    assert response.status_code == 202
    answer = response.json()
    assert answer["status"] == "accepted"
    assert answer["topic"] == "internal.updates"
    [msg] = subscriber.wait_for(1, "internal.")
    assert msg.subject == "internal.updates"
    assert msg.data == text.encode()
    assert msg.headers["Nats-Msg-Id"] == answer["id"]
    [entry] = [orjson.loads(e) for e in audit_log(rdb)]
    assert entry["id"] == answer["id"]
    assert entry["ingress"] == "http"
    assert entry["topic"] == "internal.updates"
    assert entry["message"] == json.loads(text)
    assert entry["received_at"].endswith("Z")


def test_message_object_is_published_compact(http, subscriber):
    """An object "message" is published as its compact serialization."""
    body = '{"message": {"topic": "internal.obj", "data": [1, 2]}}'
    assert post(http, body).status_code == 202
    [msg] = subscriber.wait_for(1, "internal.")
    assert msg.data == b'{"topic":"internal.obj","data":[1,2]}'


def test_client_id_is_kept(http, subscriber, rdb):
    """An "id" in the envelope becomes the message id and the Nats-Msg-Id."""
    body = {"id": "order-17.retry:1", "message": {"topic": "internal.ids"}}
    response = requests.post(http, json=body, timeout=10)
    assert response.json()["id"] == "order-17.retry:1"
    [msg] = subscriber.wait_for(1, "internal.")
    assert msg.headers["Nats-Msg-Id"] == "order-17.retry:1"


REFUSALS = [
    ("", "request body is empty; send a JSON object"),
    ('{"message": ""}', '"message" is an empty string; it must hold a JSON object'),
    (
        '{"message": "{\\"topic\\":"}',
        '"message" is not valid JSON: unexpected end of data: line 1 column 10 '
        "(char 9)",
    ),
    ('{"msg": "x"}', 'request body has no "message" field'),
    ('{"message": "[1,2]"}', '"message" must hold a JSON object, not an array'),
    ('{"message": "{\\"data\\": 1}"}', 'message has no "topic" field'),
    ('{"message": "{\\"topic\\": 42}"}', '"topic" must be a string, not a number'),
    (
        '"text"',
        'request body must be a JSON object with a "message" field or an array '
        "of them, not a string",
    ),
    (
        '{"message": 7}',
        '"message" must be a JSON object or a string holding one, not a number',
    ),
    (
        "{nope",
        "request body is not valid JSON: unexpected character, expected a string key: "
        "line 1 column 2 (char 1)",
    ),
    (
        '{"message": {"topic": "a..b"}}',
        "\"topic\" 'a..b' has an empty token (leading, trailing or double dot)",
    ),
]


@pytest.mark.parametrize("body,error", REFUSALS)
def test_bad_body_is_refused_with_its_reason(http, subscriber, rdb, body, error):
    """Each malformed body gets 400 with its own reason; nothing is sent on."""
    response = post(http, body)

    assert response.status_code == 400
    assert response.json() == {"status": "error", "error": error}
    # The next valid message goes through, and is the only thing that did.
    assert post(http, '{"message": {"topic": "internal.next"}}').status_code == 202
    messages = subscriber.wait_for(1)
    assert [m.subject for m in messages] == ["internal.next"]
    assert len(audit_log(rdb)) == 1


def test_concurrent_good_and_bad_bodies_each_get_their_own_answer(
    http, subscriber, rdb
):
    """Bodies parsed together in one batch: every good one is accepted with
    its id, published and logged; every bad one gets 400 and its reason."""
    bodies = []
    for n in range(60):
        if n % 3 == 2:
            bodies.append((n, '{"message": "{\\"topic\\": 42}"}'))
        else:
            message = json.dumps({"topic": f"internal.mix.{n}", "n": n})
            bodies.append((n, json.dumps({"message": message, "id": f"mix-{n}"})))

    with ThreadPoolExecutor(max_workers=20) as pool:
        responses = list(pool.map(lambda item: post(http, item[1]), bodies))

    for (n, _), response in zip(bodies, responses, strict=True):
        if n % 3 == 2:
            assert response.status_code == 400
            assert response.json() == {
                "status": "error",
                "error": '"topic" must be a string, not a number',
            }
        else:
            assert response.status_code == 202
            assert response.json() == {
                "status": "accepted",
                "id": f"mix-{n}",
                "topic": f"internal.mix.{n}",
            }
    good = {f"mix-{n}" for n, _ in bodies if n % 3 != 2}
    received = subscriber.wait_for(len(good), "internal.mix.")
    assert {m.headers["Nats-Msg-Id"] for m in received} == good
    assert {orjson.loads(e)["id"] for e in audit_log(rdb)} == good


def test_wrong_content_type_is_415(http):
    """A body that is not declared as JSON is refused with 415."""
    response = post(http, '{"message": {"topic": "a"}}', "text/plain")
    assert response.status_code == 415
    assert response.json() == {
        "status": "error",
        "error": "Content-Type must be application/json or application/x-ndjson, "
        "not text/plain",
    }


def test_content_type_with_charset_is_json(http):
    """application/json; charset=utf-8 counts as JSON."""
    body = '{"message": {"topic": "internal.cs"}}'
    assert post(http, body, "application/json; charset=utf-8").status_code == 202


def test_other_methods_are_405_and_other_paths_404(http):
    """GET on /MESSAGES is 405; any other path is 404; both answer JSON."""
    got = requests.get(http, timeout=10)
    assert got.status_code == 405
    assert got.json()["error"] == "method GET is not allowed on /MESSAGES; use POST"
    missing = requests.post(http.replace("/MESSAGES", "/other"), json={}, timeout=10)
    assert missing.status_code == 404
    assert missing.json()["error"] == (
        "no such resource: /other; messages go to POST /MESSAGES"
    )


DEEP = b"[" * 260 + b"]" * 260


def test_deeply_nested_object_message_is_refused_not_crashed(http, subscriber):
    """An object "message" too deep to write back is a 400, not a 500."""
    body = b'{"message": {"topic": "internal.deep", "v": ' + DEEP + b"}}"
    response = post(http, body)

    assert response.status_code == 400
    assert response.json()["error"] == (
        '"message" is nested deeper than 254 levels, the most an object message '
        "may have; send it as JSON text"
    )
    assert post(http, '{"message": {"topic": "internal.next"}}').status_code == 202
    assert [m.subject for m in subscriber.wait_for(1)] == ["internal.next"]


def test_workers_stop_when_the_master_is_killed(launch):
    """kill -9 of the gunicorn master leaves no worker holding the port."""
    gateway = launch.start("fanout-http")
    children = open(f"/proc/{gateway.proc.pid}/task/{gateway.proc.pid}/children")
    workers = [int(pid) for pid in children.read().split()]
    children.close()
    assert workers

    os.kill(gateway.proc.pid, signal.SIGKILL)
    gateway.proc.wait(5)

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return open(f"/proc/{pid}/stat").read().split()[2] == "Z"

    assert wait_until(lambda: all(gone(pid) for pid in workers), timeout=20)
    assert wait_until(lambda: port_is_free(gateway.port), timeout=10)


def test_compressed_body_is_415(http):
    """A Content-Encoding other than identity is refused by name."""
    response = requests.post(
        http,
        data=b"\x1f\x8b",
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        timeout=10,
    )
    assert response.status_code == 415
    assert response.json()["error"] == (
        "Content-Encoding gzip is not supported; send the body uncompressed"
    )


def test_nats_down_at_startup_is_logged_once_then_used(launch, tmp_path):
    """A NATS server that is not up yet: one warning, 503s, then it is used."""
    port = free_port()
    gateway = launch.start(
        "fanout-http",
        ready=False,
        FANOUT_NATS_URL=f"nats://127.0.0.1:{port}",
        FANOUT_PUBLISH_TIMEOUT="0.5",
    )
    gateway.wait_for_log(f"nats unreachable at nats://127.0.0.1:{port}")
    url = f"http://127.0.0.1:{gateway.port}/MESSAGES"
    wait_for_port(gateway.port)
    refused = requests.post(url, json={"message": {"topic": "internal.a"}}, timeout=10)
    assert refused.status_code == 503

    server = nats_server(tmp_path, port).start()
    try:
        gateway.wait_for_log("nats connected")
        accepted = post(url, '{"message": {"topic": "internal.b"}}')
        assert accepted.status_code == 202
    finally:
        server.stop()
    assert gateway.output().count("nats unreachable") == 1


def test_message_nats_did_not_confirm_has_its_audit_entry_withdrawn(
    launch, brokers, subscriber, rdb
):
    """A batch's audit entries are written while NATS confirms it. With NATS
    frozen the message is refused (503) and its entry is removed again, so
    an entry still means NATS had the message."""
    gateway = launch.start("fanout-http", FANOUT_PUBLISH_TIMEOUT="1")
    url = f"http://127.0.0.1:{gateway.port}/MESSAGES"
    before = post(url, '{"id": "before", "message": {"topic": "internal.w"}}')
    assert before.status_code == 202

    brokers.nats.proc.send_signal(signal.SIGSTOP)
    try:
        frozen = post(url, '{"id": "frozen", "message": {"topic": "internal.w"}}')
    finally:
        brokers.nats.proc.send_signal(signal.SIGCONT)

    assert frozen.status_code == 503
    assert frozen.json()["error"] == "nats did not confirm the message in time"
    assert [orjson.loads(e)["id"] for e in audit_log(rdb)] == ["before"]
    # The server caught up: delivered without an entry, as the README says
    # of a message refused as retryable after it reached NATS.
    ids = [m.headers["Nats-Msg-Id"] for m in subscriber.wait_for(2, "internal.w")]
    assert ids == ["before", "frozen"]
