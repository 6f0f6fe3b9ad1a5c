"""The WebSocket ingress, driven with websocket-client as in the description."""

import json

import orjson
import pytest
import websocket

from tests.support import audit_log


@pytest.fixture
def ws_url(launch):
    gateway = launch.start("fanout-ws")
    return f"ws://127.0.0.1:{gateway.port}/MESSAGES"


@pytest.fixture
def ws(ws_url):
    client = websocket.WebSocket()
    client.connect(ws_url, timeout=10)
    yield client
    client.close()


def test_frame_is_published_byte_identical_and_audited(ws, subscriber, rdb):
    """A frame's bytes reach its topic unchanged; the answer names the id."""
    text = json.dumps({"topic": "internal.alerts", "data": {"alert": "high"}})
    ws.send(text)
    answer = json.loads(ws.recv())

    assert answer["status"] == "accepted"
    assert answer["topic"] == "internal.alerts"
    [msg] = subscriber.wait_for(1, "internal.")
    assert msg.data == text.encode()
    assert msg.headers["Nats-Msg-Id"] == answer["id"]
    [entry] = [orjson.loads(e) for e in audit_log(rdb)]
    assert entry["id"] == answer["id"]
    assert entry["ingress"] == "ws"
    assert entry["topic"] == "internal.alerts"
    assert entry["message"] == json.loads(text)


def test_envelope_frame_is_accepted(ws, subscriber):
    """The HTTP envelope form works on the WebSocket too."""
    inner = json.dumps({"topic": "internal.env", "n": 1})
    ws.send(json.dumps({"message": inner}))
    assert json.loads(ws.recv())["status"] == "accepted"
    [msg] = subscriber.wait_for(1, "internal.")
    assert msg.data == inner.encode()


def test_answers_come_in_frame_order(ws, subscriber):
    """Many frames in flight, good and bad mixed: one answer each, in order."""
    frames = []
    for i in range(200):
        if i % 10 == 3:
            frames.append("not json")
        else:
            frames.append(json.dumps({"topic": f"internal.order.{i}", "i": i}))
    for frame in frames:
        ws.send(frame)
    answers = [json.loads(ws.recv()) for _ in frames]

    for i, answer in enumerate(answers):
        if i % 10 == 3:
            assert answer["status"] == "error"
        else:
            assert answer == {
                "status": "accepted",
                "id": answer["id"],
                "topic": f"internal.order.{i}",
            }
    delivered = subscriber.wait_for(180, "internal.order.")
    assert [m.subject for m in delivered] == [
        f"internal.order.{i}" for i in range(200) if i % 10 != 3
    ]


REFUSALS = [
    (
        "nope",
        "message is not valid JSON: invalid literal, expected 'null': line 1 "
        "column 1 (char 0)",
    ),
    ("[1, 2]", "message must be a JSON object, not an array"),
    ('{"data": 1}', 'message has no "topic" field'),
    ('{"topic": null}', '"topic" must be a string, not null'),
    ('{"topic": "a b"}', "\"topic\" 'a b' contains whitespace or a control character"),
    ('{"topic": "a.*"}', "\"topic\" 'a.*' contains a wildcard (* or >)"),
]


@pytest.mark.parametrize("frame,error", REFUSALS)
def test_bad_frame_gets_an_error_and_the_connection_stays(
    ws, subscriber, rdb, frame, error
):
    """A bad frame is answered with its reason; the next frame still works."""
    ws.send(frame)
    assert json.loads(ws.recv()) == {"status": "error", "error": error}

    ws.send('{"topic": "internal.after"}')
    assert json.loads(ws.recv())["status"] == "accepted"
    messages = subscriber.wait_for(1)
    assert [m.subject for m in messages] == ["internal.after"]
    assert len(audit_log(rdb)) == 1


def test_handshake_on_other_path_is_404(ws_url):
    """Only /MESSAGES upgrades; any other path is refused with 404."""
    client = websocket.WebSocket()
    with pytest.raises(websocket.WebSocketBadStatusException) as caught:
        client.connect(ws_url.replace("/MESSAGES", "/other"), timeout=10)
    assert caught.value.status_code == 404


def test_busy_port_is_one_line_and_exit_1(launch):
    """A WebSocket port already taken ends the process with one clear line."""
    first = launch.start("fanout-ws")
    second = launch.start(
        "fanout-ws", ready=False, FANOUT_WS_BIND=f"127.0.0.1:{first.port}"
    )
    assert second.proc.wait(15) == 1
    assert f"cannot listen on 127.0.0.1:{first.port}: address already in use" in (
        second.output().lower()
    )
    assert "Traceback" not in second.output()
