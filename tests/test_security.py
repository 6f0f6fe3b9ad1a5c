"""Hostile input and access control on every ingress, against real servers."""

import json
import socket
import time

import orjson
import pytest
import requests
import schemathesis
import websocket
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings

from tests.support import ROOT, audit_log, publish, wait_until

WS_ONLY = "contains whitespace or a control character"
EMPTY_TOKEN = "has an empty token (leading, trailing or double dot)"
WILDCARD = "contains a wildcard (* or >)"
DOLLAR = (
    "is reserved: subjects starting with $ belong to the NATS server (system, "
    "JetStream, key-value and object store APIs)"
)

# (topic value, status, error); each must leave the connection usable.
HOSTILE = [
    ("a b", 400, f"\"topic\" 'a b' {WS_ONLY}"),
    ("a..b", 400, f"\"topic\" 'a..b' {EMPTY_TOKEN}"),
    (".x", 400, f"\"topic\" '.x' {EMPTY_TOKEN}"),
    ("x.", 400, f"\"topic\" 'x.' {EMPTY_TOKEN}"),
    ("", 400, "\"topic\" '' is empty"),
    ("a.*", 400, f"\"topic\" 'a.*' {WILDCARD}"),
    ("a.>", 400, f"\"topic\" 'a.>' {WILDCARD}"),
    ("a\r\nPUB x 2\r\nhi", 400, f"\"topic\" 'a\\r\\nPUB x 2\\r\\nhi' {WS_ONLY}"),
    ("a\tb", 400, f"\"topic\" 'a\\tb' {WS_ONLY}"),
    (42, 400, '"topic" must be a string, not a number'),
    (None, 400, '"topic" must be a string, not null'),
    (["a"], 400, '"topic" must be a string, not an array'),
    (
        "$JS.API.STREAM.DELETE.orders",
        403,
        f"\"topic\" '$JS.API.STREAM.DELETE.orders' {DOLLAR}",
    ),
    ("$KV.config.key", 403, f"\"topic\" '$KV.config.key' {DOLLAR}"),
    ("$SYS.REQ.SERVER.PING", 403, f"\"topic\" '$SYS.REQ.SERVER.PING' {DOLLAR}"),
    (
        "_INBOX.x1",
        403,
        "\"topic\" '_INBOX.x1' is reserved: _INBOX. subjects carry replies "
        "addressed to other clients",
    ),
    (
        "MESSAGES",
        403,
        "\"topic\" 'MESSAGES' is the gateway's own ingress subject; publishing "
        "to it would loop back into the gateway",
    ),
]
ERRORS = [error for _, _, error in HOSTILE]


def close_frame(client: websocket.WebSocket) -> tuple[int, str]:
    """The code and reason of the close frame the server sends next."""
    opcode, data = client.recv_data(control_frame=True)
    assert opcode == websocket.ABNF.OPCODE_CLOSE, (opcode, data)
    client.close()
    return int.from_bytes(data[:2], "big"), data[2:].decode()


def published(subscriber, ingress_subject: str = "MESSAGES") -> list[str]:
    """Subjects the subscriber on > saw, leaving out the NATS ingress itself."""
    return [m.subject for m in subscriber.received() if m.subject != ingress_subject]


def post(url, body: bytes, **headers):
    headers.setdefault("Content-Type", "application/json")
    return requests.post(url, data=body, headers=headers, timeout=10)


def test_http_refuses_every_hostile_topic(launch, subscriber, rdb):
    """Each hostile topic: its status and reason; then a valid message passes."""
    url = f"http://127.0.0.1:{launch.start('fanout-http').port}/MESSAGES"
    for topic, status, error in HOSTILE:
        response = post(url, orjson.dumps({"message": {"topic": topic}}))
        assert (response.status_code, response.json()["error"]) == (status, error)

    assert post(url, b'{"message": {"topic": "internal.next"}}').status_code == 202
    subscriber.wait_for(1, "internal.")
    time.sleep(0.2)
    assert published(subscriber) == ["internal.next"]
    assert len(audit_log(rdb)) == 1


def test_ws_refuses_every_hostile_topic_on_one_connection(launch, subscriber, rdb):
    """All hostile frames on one connection are answered; the next one passes."""
    client = websocket.create_connection(
        f"ws://127.0.0.1:{launch.start('fanout-ws').port}/MESSAGES", timeout=10
    )
    for topic, _, _ in HOSTILE:
        client.send(orjson.dumps({"topic": topic}).decode())
    answers = [json.loads(client.recv())["error"] for _ in HOSTILE]
    assert answers == ERRORS

    client.send('{"topic": "internal.next"}')
    assert json.loads(client.recv())["status"] == "accepted"
    client.close()
    subscriber.wait_for(1, "internal.")
    assert published(subscriber) == ["internal.next"]
    assert len(audit_log(rdb)) == 1


def dead_reasons(rdb, count: int) -> list[str]:
    got = wait_until(lambda: len(rdb.lrange("MESSAGES:dead", 0, -1)) >= count)
    assert got, f"dead-letter list has {rdb.llen('MESSAGES:dead')} entries"
    return [orjson.loads(e)["reason"] for e in rdb.lrange("MESSAGES:dead", 0, -1)]


def test_redis_dead_letters_every_hostile_topic(launch, subscriber, rdb):
    """Hostile list items go to the dead-letter list with their reasons."""
    launch.start("fanout-redis")
    items = [orjson.dumps({"topic": topic}) for topic, _, _ in HOSTILE]
    rdb.rpush("MESSAGES", *items, b'{"topic": "internal.next"}')

    assert dead_reasons(rdb, len(HOSTILE)) == ERRORS
    subscriber.wait_for(1, "internal.")
    assert published(subscriber) == ["internal.next"]
    assert len(audit_log(rdb)) == 1


def test_nats_dead_letters_every_hostile_topic(launch, brokers, subscriber, rdb):
    """Hostile NATS ingress messages are dead-lettered; the connection stays up."""
    gateway = launch.start("fanout-nats")
    items = [orjson.dumps({"topic": topic}) for topic, _, _ in HOSTILE]
    publish(brokers.nats_url, [*items, b'{"topic": "internal.n"}'])

    assert dead_reasons(rdb, len(HOSTILE)) == ERRORS
    subscriber.wait_for(1, "internal.")
    assert published(subscriber) == ["internal.n"]
    assert "nats disconnected" not in gateway.output()


HOSTILE_JSON = [
    (b'{"topic": "a", "v": NaN}', "unexpected character, expected a JSON value"),
    (b'{"topic": "a", "v": Infinity}', "unexpected character, expected a JSON value"),
    (b'{"topic": "a", "v": "\\ud83d"}', "no low surrogate in string"),
    (b"[" * 5000 + b"]" * 5000, "nested deeper than 1024 levels"),
]


@pytest.mark.parametrize("raw,reason", HOSTILE_JSON)
def test_http_refuses_hostile_json(launch, subscriber, raw, reason):
    """NaN, Infinity, lone surrogates and deep nesting get 400, not a crash."""
    url = f"http://127.0.0.1:{launch.start('fanout-http').port}/MESSAGES"
    body = b'{"message": ' + raw + b"}"
    response = post(url, body)
    assert response.status_code == 400
    assert response.json()["error"].startswith("request body is not valid JSON: ")
    assert reason in response.json()["error"]

    invalid_utf8 = post(url, b'{"message": {"topic": "a\xff"}}')
    assert invalid_utf8.status_code == 400
    assert invalid_utf8.json()["error"] == "request body is not valid UTF-8"
    pair = post(url, b'{"message": {"topic": "internal.p", "v": "\\ud83d\\ude00"}}')
    assert pair.status_code == 202
    subscriber.wait_for(1, "internal.")
    assert published(subscriber) == ["internal.p"]


def test_ws_refuses_hostile_json_and_closes_1007_on_bad_utf8(launch, subscriber):
    """Bad JSON is answered; bytes that are not UTF-8 close with 1007, in order."""
    url = f"ws://127.0.0.1:{launch.start('fanout-ws').port}/MESSAGES"
    client = websocket.create_connection(url, timeout=10)
    for raw, _ in HOSTILE_JSON:
        client.send(raw.decode())
    for _, reason in HOSTILE_JSON:
        answer = json.loads(client.recv())
        assert answer["error"].startswith("message is not valid JSON: ")
        assert reason in answer["error"]
    client.send('{"topic": "internal.pair", "v": "\\ud83d\\ude00"}')
    client.send_binary(b'{"topic": "internal.bad\xff"}')
    client.send('{"topic": "internal.behind"}')  # not taken: the close comes first
    assert json.loads(client.recv())["status"] == "accepted"
    assert close_frame(client) == (1007, "message is not valid UTF-8")
    subscriber.wait_for(1, "internal.")
    time.sleep(0.5)  # for a wrongly taken frame behind the bad one to arrive
    assert published(subscriber) == ["internal.pair"]


def test_allow_and_deny_patterns_on_http_and_ws(launch, subscriber):
    """Only internal.> passes, internal.secret.> never; refusals name the rule."""
    rules = {
        "FANOUT_ALLOWED_TOPICS": "internal.>",
        "FANOUT_DENIED_TOPICS": "internal.secret.>",
    }
    url = f"http://127.0.0.1:{launch.start('fanout-http', **rules).port}/MESSAGES"
    denied = post(url, b'{"message": {"topic": "internal.secret.keys"}}')
    assert (denied.status_code, denied.json()["error"]) == (
        403,
        "\"topic\" 'internal.secret.keys' matches 'internal.secret.>' in "
        "FANOUT_DENIED_TOPICS",
    )
    other = post(url, b'{"message": {"topic": "billing.x"}}')
    assert (other.status_code, other.json()["error"]) == (
        403,
        "\"topic\" 'billing.x' matches no pattern in FANOUT_ALLOWED_TOPICS",
    )
    ws_port = launch.start("fanout-ws", **rules).port
    client = websocket.create_connection(
        f"ws://127.0.0.1:{ws_port}/MESSAGES", timeout=10
    )
    client.send('{"topic": "billing.x"}')
    client.send('{"topic": "internal.ok"}')
    assert json.loads(client.recv())["error"].endswith("FANOUT_ALLOWED_TOPICS")
    assert json.loads(client.recv())["status"] == "accepted"
    client.close()
    assert post(url, b'{"message": {"topic": "internal.ok"}}').status_code == 202
    subscriber.wait_for(2, "internal.")
    assert published(subscriber) == ["internal.ok", "internal.ok"]


ALPHA = "alpha-token-value-0123456789"
BETA = "beta-token-value-9876543210"


def test_http_tokens_and_their_topics(launch, subscriber, tmp_path):
    """No or a wrong token: 401 without detail; a token's patterns are enforced."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# producers\nalpha {ALPHA} alpha.>\nbeta {BETA} beta.>\n")
    gateway = launch.start("fanout-http", FANOUT_TOKENS_FILE=str(tokens))
    url = f"http://127.0.0.1:{gateway.port}/MESSAGES"
    body = b'{"message": {"topic": "alpha.x"}}'
    unauthorized = {
        "status": "error",
        "error": "a valid token is required: Authorization: Bearer <token>",
    }
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": ALPHA}):
        response = post(url, body, **headers)
        assert (response.status_code, response.json()) == (401, unauthorized)
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="fanout"'

    crossed = post(url, body, Authorization=f"Bearer {BETA}")
    assert (crossed.status_code, crossed.json()["error"]) == (
        403,
        "\"topic\" 'alpha.x' is not among the topics this client's token may "
        "publish to",
    )
    assert post(url, body, Authorization=f"Bearer {ALPHA}").status_code == 202
    subscriber.wait_for(1, "alpha.")
    assert published(subscriber) == ["alpha.x"]
    assert ALPHA not in gateway.output() and BETA not in gateway.output()


def test_ws_tokens_at_the_handshake(launch, subscriber):
    """WebSocket: 401 at the handshake; header or ?token= both work."""
    gateway = launch.start("fanout-ws", FANOUT_TOKENS=f"alpha {ALPHA} alpha.>")
    url = f"ws://127.0.0.1:{gateway.port}/MESSAGES"
    for suffix in ("", "?token=wrong"):
        assert handshake_status(url + suffix) == 401
    refused = requests.get(
        url.replace("ws://", "http://"),
        timeout=5,
        headers={
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        },
    )
    assert refused.status_code == 401
    assert refused.headers["Content-Type"] == "application/json"
    assert refused.json() == {
        "status": "error",
        "error": "a valid token is required: Authorization: Bearer <token> "
        "or ?token=<token>",
    }

    by_header = websocket.create_connection(
        url, timeout=10, header=[f"Authorization: Bearer {ALPHA}"]
    )
    by_header.send('{"topic": "beta.x"}')
    assert json.loads(by_header.recv())["error"] == (
        "\"topic\" 'beta.x' is not among the topics this client's token may publish to"
    )
    by_header.close()
    by_query = websocket.create_connection(f"{url}?token={ALPHA}", timeout=10)
    by_query.send('{"topic": "alpha.q"}')
    assert json.loads(by_query.recv())["status"] == "accepted"
    by_query.close()
    subscriber.wait_for(1, "alpha.")
    assert published(subscriber) == ["alpha.q"]
    assert ALPHA not in gateway.output()


def test_slow_request_head_is_cut_off(launch):
    """A client that never finishes its headers gets 408 after the timeout."""
    port = launch.start("fanout-http", FANOUT_HTTP_HEADER_TIMEOUT="1").port
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"POST /MESSAGES HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        answer = sock.recv(1024)
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
        assert sock.recv(1024) == b""
        assert 0.5 < time.monotonic() - started < 3
    with socket.create_connection(("127.0.0.1", port), timeout=5) as idle:
        assert idle.recv(1024).startswith(b"HTTP/1.1 408")


@pytest.mark.parametrize("sent", [b"{", b""], ids=["one byte", "no byte"])
def test_slow_body_is_408(launch, sent):
    """A body that trickles in past FANOUT_HTTP_BODY_TIMEOUT is refused with 408."""
    port = launch.start("fanout-http", FANOUT_HTTP_BODY_TIMEOUT="1").port
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            b"POST /MESSAGES HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nContent-Length: 100\r\n\r\n" + sent
        )
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b"did not arrive within 1 s (FANOUT_HTTP_BODY_TIMEOUT)" in answer


def test_slow_chunked_body_is_408_and_nothing_is_published(launch, subscriber, rdb):
    """A chunked body without its last chunk is timed the same; nothing goes out.

    The chunk sent holds a whole envelope: it is still not accepted, since
    the client was told 408.
    """
    port = launch.start("fanout-http", FANOUT_HTTP_BODY_TIMEOUT="1").port
    envelope = b'{"message": {"topic": "internal.chunked"}}'
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            b"POST /MESSAGES HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"%x\r\n%s\r\n" % (len(envelope), envelope)
        )
        started = time.monotonic()
        answer = sock.recv(4096)
    assert 0.9 < time.monotonic() - started < 3
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b"FANOUT_HTTP_BODY_TIMEOUT" in answer
    time.sleep(0.5)
    assert subscriber.received() == []
    assert rdb.llen("MESSAGES:log") == 0


def test_ws_connection_limit_and_idle_timeout(launch):
    """Past FANOUT_WS_MAX_CONNECTIONS the handshake is 503; idle ones are closed."""
    port = launch.start(
        "fanout-ws", FANOUT_WS_MAX_CONNECTIONS="1", FANOUT_WS_IDLE_TIMEOUT="1"
    ).port
    url = f"ws://127.0.0.1:{port}/MESSAGES"
    first = websocket.create_connection(url, timeout=10)
    assert handshake_status(url) == 503
    assert close_frame(first) == (1001, "idle for 1 s")
    assert wait_until(lambda: _connects(url), timeout=15)


def _connects(url: str) -> bool:
    return handshake_status(url) == 101


def handshake_status(url: str, **options) -> int:
    """The handshake's HTTP status; the socket is closed either way."""
    client = websocket.WebSocket()
    try:
        client.connect(url, timeout=5, **options)
    except websocket.WebSocketBadStatusException as exc:
        return exc.status_code
    finally:
        client.close()
    return 101


OPENAPI = schemathesis.openapi.from_path(str(ROOT / "docs" / "openapi.json"))


@schemathesis.serializer("application/x-ndjson")
def _ndjson(ctx, value) -> bytes:
    """A generated bulk body as NDJSON: each array element on its own line."""
    if isinstance(value, bytes):
        return value
    items = value if isinstance(value, list) else [value]
    return b"\n".join(json.dumps(item).encode() for item in items)


def test_http_api_fuzz_finds_no_server_error(launch):
    """Generated requests from the OpenAPI description never get a 5xx."""
    port = launch.start("fanout-http", FANOUT_TOKENS=f"alpha {ALPHA}").port
    base_url = f"http://127.0.0.1:{port}"
    session = requests.Session()

    @hsettings(
        max_examples=150,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(case=OPENAPI["/MESSAGES"]["POST"].as_strategy())
    def fuzz(case):
        if (
            case.headers
            and "Authorization" in case.headers
            and case.headers["Authorization"].startswith("B")
        ):
            case.headers["Authorization"] = f"Bearer {ALPHA}"
        response = case.call(base_url=base_url, session=session, timeout=10)
        assert response.status_code < 500, response.text

    try:
        fuzz()
    finally:
        session.close()
