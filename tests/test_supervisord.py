"""The whole stack under supervisord, with the embedded brokers."""

import asyncio
import json
import subprocess

import nats
import redis
import requests
import websocket

from tests.support import (
    BIN,
    Subscriber,
    port_is_free,
    wait_until,
)


def ctl(env, *args) -> str:
    result = subprocess.run(
        [str(BIN / "fanout"), "ctl", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.stdout


def nats_publish(url: str, payload: bytes) -> None:
    async def send():
        nc = await nats.connect(url)
        await nc.publish("MESSAGES", payload)
        await nc.flush()
        await nc.close()

    asyncio.run(send())


def test_one_message_through_each_front_end(stack):
    """Under supervisord, HTTP, WebSocket, Redis and NATS each deliver."""
    proc, env, ports, tmp_path = stack
    sub = Subscriber(f"nats://127.0.0.1:{ports['nats']}", "internal.>").start()
    try:
        http = f"http://127.0.0.1:{ports['http']}/MESSAGES"
        body = {"message": json.dumps({"topic": "internal.http"})}
        assert wait_until(lambda: _accepted(http, body), timeout=20)

        ws = websocket.WebSocket()
        ws.connect(f"ws://127.0.0.1:{ports['ws']}/MESSAGES", timeout=10)
        ws.send(json.dumps({"topic": "internal.ws"}))
        assert json.loads(ws.recv())["status"] == "accepted"
        ws.close()

        client = redis.Redis(port=ports["redis"])
        client.rpush("MESSAGES", json.dumps({"topic": "internal.redis"}))
        # Core NATS keeps nothing for a subscriber that is not there yet.
        nats_log = tmp_path / "log" / "fanout-nats_00.log"
        assert wait_until(
            lambda: nats_log.exists() and "subscribed to" in nats_log.read_text(),
            timeout=20,
        )
        nats_publish(
            f"nats://127.0.0.1:{ports['nats']}",
            json.dumps({"topic": "internal.nats"}).encode(),
        )

        messages = sub.wait_for(4, timeout=30)
        subjects = sorted(m.subject for m in messages)
        assert subjects == sorted(
            ["internal.http", "internal.ws", "internal.redis", "internal.nats"]
        )
        assert wait_until(lambda: client.llen("MESSAGES:log") == 4)
        client.close()
    finally:
        sub.close()

    # Each process logs to its own file, which supervisorctl tails.
    assert "http worker ready" in ctl(env, "tail", "fanout-http")
    assert (tmp_path / "log" / "fanout-ws.log").exists()


def _accepted(url, body) -> bool:
    try:
        return requests.post(url, json=body, timeout=5).status_code == 202
    except requests.ConnectionError:
        return False


def test_stop_all_leaves_no_process_and_frees_the_ports(stack):
    """supervisorctl stop all ends every Fanout process and frees its ports."""
    proc, env, ports, _ = stack
    assert wait_until(lambda: ctl(env, "status").count("RUNNING") == 6, timeout=20)
    pids = [int(p) for p in ctl(env, "pid", "all").split()]
    assert len(pids) == 6

    ctl(env, "stop", "all")

    assert wait_until(lambda: all(not _alive(pid) for pid in pids), timeout=40)
    for port in ports.values():
        assert wait_until(lambda port=port: port_is_free(port), timeout=10)
    leftover = subprocess.run(
        ["pgrep", "-f", str(ports["http"])], capture_output=True, text=True
    ).stdout
    assert leftover == ""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_bad_setting_stops_before_anything_starts(tmp_path):
    """fanout run with a bad value prints one line and exits 78."""
    result = subprocess.run(
        [str(BIN / "fanout"), "run"],
        env={"PATH": "/usr/bin:/bin", "FANOUT_HTTP_WORKERS": "zero"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 78
    assert result.stderr == (
        "fanout: bad setting FANOUT_HTTP_WORKERS='zero': not a whole number\n"
    )
