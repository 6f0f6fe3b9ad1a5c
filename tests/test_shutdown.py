"""Graceful shutdown: finish what was taken, answer it, flush, exit 0."""

import concurrent.futures
import json
import signal
import subprocess
import threading
import time

import orjson
import pytest
import requests
import websocket

from tests.support import (
    BIN,
    Subscriber,
    audit_log,
    free_port,
    port_is_free,
    publish,
    wait_until,
)


def ws_burst(url: str, count: int, result: dict) -> None:
    """Send ``count`` frames at once, then read answers until the close."""
    client = websocket.WebSocket()
    client.connect(url, timeout=30)
    for n in range(count):
        client.send(json.dumps({"topic": "internal.stop", "k": f"w{n}"}))
    answers = []
    try:
        while len(answers) < count:
            opcode, data = client.recv_data()
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                result["close_code"] = int.from_bytes(data[:2], "big")
                client.send_close()  # complete the closing handshake
                break
            answers.append(json.loads(data))
    except (OSError, websocket.WebSocketException) as exc:
        result["error"] = repr(exc)
    result["answers"] = answers
    client.shutdown()


def http_post(url: str, n: int):
    body = {"message": {"topic": "internal.stop", "k": f"h{n}"}}
    try:
        response = requests.post(url, json=body, timeout=30)
    except requests.RequestException:
        return n, None
    return n, response.status_code


def test_supervisorctl_stop_under_load_loses_nothing_answered(stack):
    """stop all during 100 frames and 50 posts: every accepted one arrives."""
    proc, env, ports, _ = stack
    sub = Subscriber(f"nats://127.0.0.1:{ports['nats']}", "internal.>").start()
    http = f"http://127.0.0.1:{ports['http']}/MESSAGES"
    assert wait_until(lambda: http_post(http, -1)[1] == 202, timeout=20)
    ws_result: dict = {}
    ws_thread = threading.Thread(
        target=ws_burst,
        args=(f"ws://127.0.0.1:{ports['ws']}/MESSAGES", 100, ws_result),
    )
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
            posts = [pool.submit(http_post, http, n) for n in range(50)]
            ws_thread.start()
            time.sleep(0.05)
            subprocess.run(
                [str(BIN / "fanout"), "ctl", "stop", "all"],
                env=env,
                capture_output=True,
                timeout=60,
            )
            statuses = dict(p.result() for p in posts)
        ws_thread.join(30)
        delivered = {orjson.loads(m.data)["k"] for m in sub.received("internal.stop")}
    finally:
        sub.close()

    accepted_http = {f"h{n}" for n, status in statuses.items() if status == 202}
    accepted_ws = {
        f"w{i}" for i, a in enumerate(ws_result["answers"]) if a["status"] == "accepted"
    }
    assert accepted_http <= delivered
    assert accepted_ws <= delivered
    # Whatever was not answered was refused in a way the sender can see.
    assert set(statuses.values()) <= {202, 503, None}
    if len(ws_result["answers"]) < 100:
        assert ws_result.get("close_code") == 1001 or "error" in ws_result
    for port in ports.values():
        assert wait_until(lambda port=port: port_is_free(port), timeout=10)


def test_ws_answers_read_frames_then_closes_1001(launch):
    """On TERM the WebSocket ingress answers what it read, then closes 1001."""
    ws = launch.start("fanout-ws")
    client = websocket.WebSocket()
    client.connect(f"ws://127.0.0.1:{ws.port}/MESSAGES", timeout=10)
    for n in range(20):
        client.send(json.dumps({"topic": "internal.stop", "n": n}))
    first = json.loads(client.recv())

    ws.signal(signal.SIGTERM)
    answers = [first]
    close_code = None
    while True:
        opcode, data = client.recv_data()
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            close_code = int.from_bytes(data[:2], "big")
            client.send_close()  # complete the closing handshake
            break
        answers.append(json.loads(data))
    client.shutdown()

    assert close_code == 1001, ws.output()
    assert [a["status"] for a in answers] == ["accepted"] * 20
    assert ws.proc.wait(15) == 0
    assert "ws stopped" in ws.output()


def test_ws_stop_with_redis_frozen_answers_every_frame_in_time(launch, brokers):
    """With Redis frozen at TERM, every frame read is still answered (as
    retryable), the connection closes 1001 and the process exits 0, all
    within FANOUT_SHUTDOWN_TIMEOUT."""
    ws = launch.start(
        "fanout-ws", FANOUT_PUBLISH_TIMEOUT="2", FANOUT_SHUTDOWN_TIMEOUT="4"
    )
    client = websocket.WebSocket()
    client.connect(f"ws://127.0.0.1:{ws.port}/MESSAGES", timeout=30)
    client.send(json.dumps({"topic": "internal.stop", "n": -1}))
    assert json.loads(client.recv())["status"] == "accepted"

    brokers.redis.proc.send_signal(signal.SIGSTOP)
    try:
        for n in range(20):
            frame = {"message": {"topic": "internal.stop"}, "id": f"f{n}"}
            client.send(json.dumps(frame))
        time.sleep(0.5)
        stopped = time.monotonic()
        ws.signal(signal.SIGTERM)
        answers, close_code = [], None
        while True:
            opcode, data = client.recv_data()
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                close_code = int.from_bytes(data[:2], "big")
                client.send_close()  # complete the closing handshake
                client.shutdown()
                break
            answers.append(json.loads(data))
        closed = time.monotonic() - stopped
        exit_code = ws.proc.wait(15)
        exited = time.monotonic() - stopped
    finally:
        brokers.redis.proc.send_signal(signal.SIGCONT)

    assert close_code == 1001, ws.output()
    assert len(answers) == 20, answers
    assert all(a["status"] == "error" and a["retryable"] for a in answers), answers
    assert closed < 4.5, closed
    assert exit_code == 0
    assert exited < 5, exited
    assert "exception was never retrieved" not in ws.output()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_http_stop_with_redis_frozen_answers_503_in_time(launch, brokers, signum):
    """With Redis frozen when gunicorn's master gets TERM (or INT), every
    request in flight gets a JSON 503 with Retry-After (not uvicorn's
    cut-off 500), and the worker exits 0 within FANOUT_SHUTDOWN_TIMEOUT."""
    http = launch.start(
        "fanout-http", FANOUT_PUBLISH_TIMEOUT="2", FANOUT_SHUTDOWN_TIMEOUT="4"
    )
    url = f"http://127.0.0.1:{http.port}/MESSAGES"
    assert http_post(url, -1)[1] == 202

    def post(n: int) -> requests.Response:
        body = {"message": {"topic": "internal.stop"}, "id": f"h{n}"}
        return requests.post(url, json=body, timeout=30)

    brokers.redis.proc.send_signal(signal.SIGSTOP)
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
            posts = [pool.submit(post, n) for n in range(10)]
            time.sleep(0.5)
            stopped = time.monotonic()
            http.proc.send_signal(signum)  # the master only, as `kill` does
            answers = [p.result() for p in posts]
            exit_code = http.proc.wait(15)
            exited = time.monotonic() - stopped
    finally:
        brokers.redis.proc.send_signal(signal.SIGCONT)

    assert [a.status_code for a in answers] == [503] * 10, [a.text for a in answers]
    assert all(a.json()["status"] == "error" for a in answers)
    assert all(a.headers["Retry-After"] for a in answers)
    assert exit_code == 0
    assert exited < 5, exited
    assert "Exception in ASGI application" not in http.output()
    assert "http worker stopped" in http.output()
    # The stop refuses what is held once, and says so once.
    assert "shutdown: 0 messages still unconfirmed" not in http.output()


def test_http_stop_with_nats_frozen_keeps_a_short_timeout(launch, brokers, rdb):
    """A 1 s FANOUT_SHUTDOWN_TIMEOUT holds with NATS frozen: the final NATS
    flush gets only what is left of it. The batch the stop gave up on has
    its audit entries withdrawn: NATS never confirmed it."""
    http = launch.start(
        "fanout-http", FANOUT_PUBLISH_TIMEOUT="10", FANOUT_SHUTDOWN_TIMEOUT="1"
    )
    url = f"http://127.0.0.1:{http.port}/MESSAGES"
    assert http_post(url, -1)[1] == 202

    brokers.nats.proc.send_signal(signal.SIGSTOP)
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=5) as pool:
            posts = [pool.submit(http_post, url, n) for n in range(5)]
            time.sleep(0.5)
            stopped = time.monotonic()
            http.signal(signal.SIGTERM)
            statuses = [p.result()[1] for p in posts]
            exit_code = http.proc.wait(15)
            exited = time.monotonic() - stopped
    finally:
        brokers.nats.proc.send_signal(signal.SIGCONT)

    assert statuses == [503] * 5
    assert exit_code == 0
    assert exited < 1.8, exited
    assert [orjson.loads(e)["message"]["k"] for e in audit_log(rdb)] == ["h-1"]


def test_ws_stop_cuts_a_client_that_keeps_sending(launch, brokers):
    """A client that keeps sending and never answers the 1001 close is cut
    off, so the stop still ends within FANOUT_SHUTDOWN_TIMEOUT."""
    ws = launch.start(
        "fanout-ws", FANOUT_PUBLISH_TIMEOUT="10", FANOUT_SHUTDOWN_TIMEOUT="4"
    )
    client = websocket.WebSocket()
    client.connect(f"ws://127.0.0.1:{ws.port}/MESSAGES", timeout=30)
    brokers.nats.proc.send_signal(signal.SIGSTOP)
    stopped = None
    try:
        for n in range(400):  # 20 ms apart: 8 s at most
            if n == 15:
                stopped = time.monotonic()
                ws.signal(signal.SIGTERM)
            try:
                client.send(json.dumps({"topic": "internal.stop", "n": n}))
            except (OSError, websocket.WebSocketException):
                break
            if ws.proc.poll() is not None:
                break
            time.sleep(0.02)
        exit_code = ws.proc.wait(15)
        exited = time.monotonic() - stopped
    finally:
        brokers.nats.proc.send_signal(signal.SIGCONT)
        client.shutdown()

    assert exit_code == 0
    assert exited < 4.5, exited
    assert "connections still open after 4.0 s; aborted" in ws.output()


def test_http_answers_in_flight_then_exits_0(launch, brokers, subscriber):
    """On TERM, requests already waiting on a frozen NATS get their real status."""
    http = launch.start("fanout-http", FANOUT_PUBLISH_TIMEOUT="3")
    url = f"http://127.0.0.1:{http.port}/MESSAGES"
    brokers.nats.proc.send_signal(signal.SIGSTOP)
    with concurrent.futures.ThreadPoolExecutor(max_workers=5) as pool:
        posts = [pool.submit(http_post, url, n) for n in range(5)]
        time.sleep(0.5)
        http.signal(signal.SIGTERM)
        time.sleep(0.5)
        brokers.nats.proc.send_signal(signal.SIGCONT)
        statuses = [p.result()[1] for p in posts]

    assert statuses == [202] * 5
    assert len(subscriber.wait_for(5, "internal.stop")) == 5
    assert http.proc.wait(20) == 0


def test_redis_consumer_gives_back_what_it_could_not_finish(launch, brokers, rdb):
    """Stopped while NATS is frozen, the consumer puts its batch back in order."""
    consumer = launch.start(
        "fanout-redis", FANOUT_CONSUMER_NAME="g", FANOUT_PUBLISH_TIMEOUT="1"
    )
    brokers.nats.proc.send_signal(signal.SIGSTOP)
    batch = [orjson.dumps({"topic": "internal.back", "n": n}) for n in range(50)]
    rdb.rpush("MESSAGES", *batch)
    assert wait_until(lambda: rdb.llen("MESSAGES:processing:g") == 50)

    consumer.signal(signal.SIGTERM)
    assert consumer.proc.wait(20) == 0
    brokers.nats.proc.send_signal(signal.SIGCONT)

    assert rdb.lrange("MESSAGES", 0, -1) == batch
    assert not rdb.exists("MESSAGES:processing:g", "MESSAGES:batches:g")
    assert "gave 50 unfinished items back to the list" in consumer.output()


def test_redis_consumer_stops_in_time_while_nats_is_frozen(launch, brokers, rdb):
    """A publish timeout longer than the shutdown timeout does not hold a stop.

    TERM with batches waiting on a frozen NATS: exit 0 within
    FANOUT_SHUTDOWN_TIMEOUT (3 s, with 1.5 s for starting and stopping the
    interpreter), every item back on the list in order.
    """
    consumer = launch.start(
        "fanout-redis",
        FANOUT_CONSUMER_NAME="t",
        FANOUT_PUBLISH_TIMEOUT="15",
        FANOUT_SHUTDOWN_TIMEOUT="3",
        FANOUT_BATCH_SIZE="500",
    )
    brokers.nats.proc.send_signal(signal.SIGSTOP)
    try:
        batch = [orjson.dumps({"topic": "internal.t", "n": n}) for n in range(3000)]
        rdb.rpush("MESSAGES", *batch)
        assert wait_until(lambda: rdb.llen("MESSAGES:processing:t") >= 500)
        started = time.monotonic()
        consumer.signal(signal.SIGTERM)
        status = consumer.proc.wait(30)
        took = time.monotonic() - started
    finally:
        brokers.nats.proc.send_signal(signal.SIGCONT)

    assert status == 0
    assert took < 4.5, f"stopped after {took:.1f} s"
    assert rdb.lrange("MESSAGES", 0, -1) == batch
    assert not rdb.exists("MESSAGES:processing:t", "MESSAGES:batches:t")


def test_nats_consumer_delivers_what_it_received_before_exit(
    launch, brokers, subscriber
):
    """TERM during a burst: every message it had received is delivered.

    Core NATS is at-most-once on the way in, so what the server had not yet
    handed over when the subscription drained is not the consumer's; what it
    counted as received must all arrive.
    """
    consumer = launch.start("fanout-nats")

    publish(
        brokers.nats_url,
        [orjson.dumps({"topic": "internal.nb", "n": n}) for n in range(2000)],
    )
    time.sleep(0.2)
    consumer.signal(signal.SIGTERM)
    assert consumer.proc.wait(20) == 0

    line = next(
        x for x in consumer.output().splitlines() if "nats consumer stopped" in x
    )
    counts = line.split("stopped: ")[1].split(", ")
    received, delivered = (int(part.split()[0]) for part in counts[:2])
    assert received > 0
    assert delivered == received
    assert wait_until(lambda: len(subscriber.received("internal.nb")) >= delivered)
    time.sleep(0.2)
    assert len(subscriber.received("internal.nb")) == delivered


def test_nats_consumer_writes_what_it_could_not_deliver_to_its_log(
    launch, brokers, subscriber, rdb
):
    """Stopped while Redis is frozen: what it holds goes to its log, exit 1.

    The consumer cannot finish messages it received (no audit log), and
    core NATS cannot take them back: each is written to the process log as
    a dead-letter entry, with whether NATS already has it, so none is lost.
    Small batches: one is confirmed, one sent and not confirmed, others
    not sent, when the audit write hangs.
    """
    consumer = launch.start(
        "fanout-nats", FANOUT_SHUTDOWN_TIMEOUT="2", FANOUT_BATCH_SIZE="50"
    )
    sent = [orjson.dumps({"topic": "internal.held", "n": n}) for n in range(300)]

    brokers.redis.proc.send_signal(signal.SIGSTOP)
    try:
        publish(brokers.nats_url, sent)
        time.sleep(0.5)
        consumer.signal(signal.SIGTERM)
        status = consumer.proc.wait(20)
    finally:
        brokers.redis.proc.send_signal(signal.SIGCONT)

    assert status == 1
    entries = [
        orjson.loads(line.split("undelivered at shutdown: ", 1)[1])
        for line in consumer.output().splitlines()
        if "undelivered at shutdown: " in line
    ]
    audited = [orjson.loads(e)["message"] for e in audit_log(rdb)]
    # NATS has the published ones: their lines keep the id they went with,
    # for a replay whose copy carries the same id.
    published = [e for e in entries if "id" in e]
    unpublished = [e for e in entries if "id" not in e]
    assert published, "the first batch reaches NATS before the audit write hangs"
    kept = [orjson.loads(e["message"]) for e in published]
    kept += [orjson.loads(e["raw"]) for e in unpublished]
    assert sorted(m["n"] for m in kept + audited) == list(range(300))
    assert all(e["ingress"] == "nats" for e in entries)
    assert all(e["reason"].startswith("not published") for e in unpublished)
    seen = {
        m.headers["Nats-Msg-Id"]: orjson.loads(m.data)
        for m in subscriber.received("internal.held")
    }
    confirmed = [e for e in published if e["reason"].startswith("published")]
    assert {e["id"]: orjson.loads(e["message"]) for e in confirmed}.items() <= (
        seen.items()
    )
    # A message subscribers got is never a line without its id (a replay
    # would give the copy a new one).
    assert not {orjson.loads(e["raw"])["n"] for e in unpublished} & {
        m["n"] for m in seen.values()
    }
    assert {e["reason"].split(" ", 1)[0] for e in published} >= {"published", "sent"}
    assert f"wrote {len(entries)} undelivered messages" in consumer.output()


@pytest.mark.parametrize("program", ["fanout-redis", "fanout-nats"])
def test_consumer_stops_while_nats_is_unreachable(launch, program):
    """A consumer still trying to reach NATS exits 0 on TERM, within its
    FANOUT_SHUTDOWN_TIMEOUT (nats-py retries inside its connect call)."""
    consumer = launch.start(
        program,
        ready=False,
        FANOUT_NATS_URL=f"nats://127.0.0.1:{free_port()}",  # nothing listens
        FANOUT_SHUTDOWN_TIMEOUT="2",
    )
    consumer.wait_for_log("nats unreachable at")

    stopped = time.monotonic()
    consumer.signal(signal.SIGTERM)
    exit_code = consumer.proc.wait(15)

    assert exit_code == 0
    assert time.monotonic() - stopped < 2.5
    assert "Traceback" not in consumer.output()


@pytest.mark.parametrize("program", ["fanout-ws", "fanout-redis", "fanout-nats"])
def test_hup_stops_gracefully_and_starts_again(
    launch, brokers, subscriber, rdb, program
):
    """HUP is a graceful stop followed by a fresh start in the same process
    (as HUP reloads gunicorn's workers); it used to end these programs at
    once, holding messages unfinished. Messages sent after it are delivered."""
    gateway = launch.start(program)
    pid = gateway.proc.pid
    gateway.proc.send_signal(signal.SIGHUP)
    gateway.wait_for_log("stopped on HUP; starting again")
    assert wait_until(lambda: gateway.output().count("nats connected") == 2)
    assert gateway.proc.poll() is None and gateway.proc.pid == pid

    message = json.dumps({"topic": "internal.after-hup"})
    if program == "fanout-ws":
        assert wait_until(lambda: not port_is_free(gateway.port))
        client = websocket.create_connection(
            f"ws://127.0.0.1:{gateway.port}/MESSAGES", timeout=10
        )
        client.send(message)
        assert json.loads(client.recv())["status"] == "accepted"
        client.close()
    elif program == "fanout-redis":
        assert wait_until(lambda: gateway.output().count("taking from") == 2)
        rdb.rpush("MESSAGES", message)
    else:
        assert wait_until(lambda: gateway.output().count("subscribed to") == 2)
        publish(brokers.nats_url, [message.encode()])
    subscriber.wait_for(1, "internal.after-hup")
    assert "Traceback" not in gateway.output()
