"""Size limits on every ingress, with a NATS server that takes 2 MB payloads."""

import json
import socket

import pytest
import requests
import websocket

from tests.conftest import Brokers
from tests.support import nats_server, publish, redis_server, wait_until
from tests.test_security import close_frame, dead_reasons

BIG = b'{"topic": "internal.big", "pad": "' + b"x" * 1_500_000 + b'"}'
SMALL = [b'{"topic": "internal.small.%d"}' % i for i in range(10)]
TOO_LARGE = f"message is {len(BIG)} bytes; the limit is 1048576 bytes"


@pytest.fixture
def brokers(tmp_path):
    """Brokers whose nats-server max_payload (2 MB) is above Fanout's 1 MiB."""
    config = tmp_path / "nats.conf"
    config.write_text("max_payload: 2097152\n")
    servers = Brokers(
        nats_server(tmp_path, extra=["-c", str(config)]).start(),
        redis_server(tmp_path).start(),
    )
    yield servers
    servers.nats.stop()
    servers.redis.stop()


def test_http_413_with_length_and_chunked(launch, subscriber):
    """Over the limit: 413 naming it, with or without Content-Length."""
    url = f"http://127.0.0.1:{launch.start('fanout-http').port}/MESSAGES"
    body = b'{"message": ' + BIG + b"}"
    headers = {"Content-Type": "application/json"}
    sized = requests.post(url, data=body, headers=headers, timeout=10)
    chunked = requests.post(
        url,
        data=iter([body[i : i + 65536] for i in range(0, len(body), 65536)]),
        headers=headers,
        timeout=10,
    )
    for response in (sized, chunked):
        assert response.status_code == 413
    assert (
        sized.json()["error"]
        == f"request body is {len(body)} bytes; the limit for one message, its "
        "envelope included, is 1048576 bytes"
    )
    assert chunked.json()["error"] == (
        "request body is more than 1048576 bytes, the limit; it was not read further"
    )
    for raw in SMALL:
        requests.post(
            url, data=b'{"message": ' + raw + b"}", headers=headers, timeout=10
        )
    got = subscriber.wait_for(10, "internal.")
    assert [m.subject for m in got] == [f"internal.small.{i}" for i in range(10)]


def test_ws_closes_1009_after_answering_earlier_frames(launch, subscriber):
    """Frames before the oversized one are all answered, then close 1009."""
    port = launch.start("fanout-ws").port
    client = websocket.create_connection(f"ws://127.0.0.1:{port}/MESSAGES", timeout=10)
    for raw in SMALL:
        client.send(raw.decode())
    client.send(BIG.decode())
    answers = [json.loads(client.recv())["status"] for _ in SMALL]
    assert answers == ["accepted"] * 10
    assert close_frame(client) == (1009, TOO_LARGE)
    subscriber.wait_for(10, "internal.")
    assert not subscriber.received("internal.big")


def test_redis_oversized_item_is_dead_lettered(launch, subscriber, rdb):
    """A 1.5 MB list item goes to the dead-letter list; the ten after it pass."""
    launch.start("fanout-redis")
    rdb.rpush("MESSAGES", BIG, *SMALL)
    assert dead_reasons(rdb, 1) == [TOO_LARGE]
    got = subscriber.wait_for(10, "internal.")
    assert [m.subject for m in got] == [f"internal.small.{i}" for i in range(10)]


def test_nats_oversized_message_is_dead_lettered(launch, brokers, subscriber, rdb):
    """A 1.5 MB ingress message is dead-lettered, not retried; the ten pass."""
    launch.start("fanout-nats")
    publish(brokers.nats_url, [BIG, *SMALL])
    assert dead_reasons(rdb, 1) == [TOO_LARGE]
    assert wait_until(lambda: len(subscriber.received("internal.")) >= 10)
    assert not subscriber.received("internal.big")


def test_limit_follows_a_smaller_server_max_payload(launch, tmp_path):
    """The gateway never accepts more than the server's max_payload allows."""
    gateway = launch.start("fanout-ws", FANOUT_MAX_MESSAGE_BYTES=str(4 * 1024 * 1024))
    client = websocket.create_connection(
        f"ws://127.0.0.1:{gateway.port}/MESSAGES", timeout=10
    )
    huge = b'{"topic": "internal.huge", "pad": "' + b"x" * 2_100_000 + b'"}'
    client.send(huge.decode())
    assert close_frame(client) == (
        1009,
        f"message is {len(huge)} bytes; the limit is {2097152 - 256} bytes",
    )
    assert "max_payload 2097152 bytes" in gateway.output()


def test_http_413_before_reading_a_body_over_every_limit(launch):
    """A Content-Length above both limits is refused at once, nothing read."""
    port = launch.start("fanout-http").port
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            b"POST /MESSAGES HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nContent-Length: 99999999999\r\n\r\n"
        )
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"request body is 99999999999 bytes; no request may be larger" in answer
