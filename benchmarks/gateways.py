"""Starting the gateway processes and the ceilings, and knowing when they are up.

The gateway runs with the commands supervisord runs (``fanout-http``,
``fanout-ws``, ``fanout-redis``, ``fanout-nats``), configured only by
FANOUT_* environment variables. A process counts as ready once its log says
both brokers are connected (and, for a consumer, that it is consuming); the
HTTP ingress must also confirm one real message (a full round trip).
"""

import http.client
import sys
import time

from benchmarks.servers import (
    BIN,
    LOOPBACK,
    Brokers,
    Fleet,
    Proc,
    base_env,
    free_port,
    log_count,
    port_open,
    wait_until,
)

START_TIMEOUT = 30.0  # seconds a process may take to become ready
READY_MESSAGE = b'{"message": "{\\"topic\\": \\"bench.ready\\", \\"t\\": 0}"}'


def post_accepted(port: int) -> bool:
    """True if one POST /MESSAGES was answered 202 (never through a proxy)."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=5)
    try:
        conn.request(
            "POST",
            "/MESSAGES",
            READY_MESSAGE,
            {"Content-Type": "application/json"},
        )
        return conn.getresponse().status == 202
    finally:
        conn.close()


def _wait_for_brokers(proc: Proc, processes: int) -> None:
    def connected() -> bool:
        return (
            log_count(proc, "nats connected") >= processes
            and log_count(proc, "redis connected") >= processes
        )

    wait_until(connected, f"{proc.name} broker connections", START_TIMEOUT, proc)


def _wait_for_workers(proc: Proc, workers: int) -> None:
    # uvicorn logs the line once per worker; should a worker class log
    # otherwise, the count of gunicorn's children stands in for it (the
    # 202 round trip that follows proves that a worker serves).
    started = time.monotonic()

    def booted() -> bool:
        if log_count(proc, "Application startup complete") >= workers:
            return True
        late = time.monotonic() - started > START_TIMEOUT / 3
        return late and len(proc.process.children()) >= workers

    wait_until(booted, f"{proc.name} workers", START_TIMEOUT, proc)


def start_http(
    fleet: Fleet, brokers: Brokers, workers: int, ceiling: bool = False
) -> tuple[Proc, int]:
    """``fanout-http`` (or the Falcon ceiling) with ``workers`` workers."""
    port = free_port()
    env = brokers.gateway_env(
        FANOUT_HTTP_BIND=f"{LOOPBACK}:{port}",
        FANOUT_HTTP_WORKERS=str(workers),
    )
    if ceiling:
        command = [sys.executable, "-m", "benchmarks.ceiling_http"]
        proc = fleet.start(f"ceiling-http-w{workers}", command, env)
    else:
        proc = fleet.start(f"fanout-http-w{workers}", [str(BIN / "fanout-http")], env)
    _wait_for_workers(proc, workers)
    if not ceiling:
        _wait_for_brokers(proc, workers)
    wait_until(lambda: post_accepted(port), f"{proc.name} 202", START_TIMEOUT, proc)
    return proc, port


def start_ws(fleet: Fleet, brokers: Brokers, ceiling: bool = False) -> tuple[Proc, int]:
    """``fanout-ws`` (or the websockets ceiling) on a free port."""
    port = free_port()
    if ceiling:
        command = [sys.executable, "-m", "benchmarks.ceiling_ws", str(port)]
        proc = fleet.start("ceiling-ws", command, base_env())
    else:
        env = brokers.gateway_env(FANOUT_WS_BIND=f"{LOOPBACK}:{port}")
        proc = fleet.start("fanout-ws", [str(BIN / "fanout-ws")], env)
        _wait_for_brokers(proc, 1)
    wait_until(lambda: port_open(port), f"{proc.name} port", START_TIMEOUT, proc)
    return proc, port


def start_consumers(
    fleet: Fleet, brokers: Brokers, kind: str, count: int
) -> dict[str, Proc]:
    """``count`` processes of ``fanout-redis`` or ``fanout-nats``, ready."""
    ready_line = {
        "redis": "redis consumer bench-",
        "nats": "nats consumer subscribed",
    }[kind]
    procs = {}
    for index in range(1, count + 1):
        name = f"fanout-{kind}-{index}"
        # Each Redis consumer needs a processing list of its own.
        env = brokers.gateway_env(FANOUT_CONSUMER_NAME=f"bench-{kind}-{index}")
        procs[name] = fleet.start(name, [str(BIN / f"fanout-{kind}")], env)
    for proc in procs.values():
        _wait_for_brokers(proc, 1)
        wait_until(
            lambda p=proc: log_count(p, ready_line) >= 1,
            f"{proc.name} consuming",
            START_TIMEOUT,
            proc,
        )
    return procs
