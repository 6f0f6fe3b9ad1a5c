"""Fixtures: real nats-server and valkey per test, real gateway processes."""

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass

import pytest
import redis

from tests.pki import Pki, make_pki
from tests.support import (
    BIN,
    ROOT,
    Gateway,
    Server,
    Subscriber,
    free_port,
    nats_server,
    redis_server,
    wait_for_port,
)

READY_LINES = ("nats connected", "redis connected")


@dataclass
class Brokers:
    nats: Server
    redis: Server

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.nats.port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.redis.port, socket_timeout=5)


@pytest.fixture
def brokers(tmp_path):
    servers = Brokers(nats_server(tmp_path).start(), redis_server(tmp_path).start())
    yield servers
    servers.nats.stop()
    servers.redis.stop()


@pytest.fixture
def spare_servers():
    """Extra brokers a test starts itself; stopped at teardown."""
    started: list[Server] = []
    yield started
    for server in started:
        server.stop()


@pytest.fixture
def rdb(brokers):
    client = brokers.client()
    yield client
    client.close()


@pytest.fixture
def subscriber(brokers):
    sub = Subscriber(brokers.nats_url).start()
    yield sub
    sub.close()


class Launcher:
    """Starts gateway processes against the test's brokers; stops them all."""

    def __init__(self, brokers: Brokers, tmp_path):
        self.brokers = brokers
        self.tmp_path = tmp_path
        self.started: list[Gateway] = []

    def env(self, **overrides: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FANOUT_")}
        env.update(
            FANOUT_NATS_URL=self.brokers.nats_url,
            FANOUT_REDIS_URL=self.brokers.redis_url,
            FANOUT_LOG_LEVEL="info",
            FANOUT_HTTP_WORKERS="1",
            FANOUT_REDIS_BLOCK_TIMEOUT="1",
            FANOUT_SHUTDOWN_TIMEOUT="5",
        )
        env.update(overrides)
        return env

    def start(self, program: str, ready: bool = True, **env: str) -> Gateway:
        """Start ``program``; with ``ready``, wait until it reaches both brokers."""
        if program == "fanout-http" and "FANOUT_HTTP_BIND" not in env:
            env["FANOUT_HTTP_BIND"] = f"127.0.0.1:{free_port()}"
        if program == "fanout-ws" and "FANOUT_WS_BIND" not in env:
            env["FANOUT_WS_BIND"] = f"127.0.0.1:{free_port()}"
        log = self.tmp_path / f"{program}-{len(self.started)}.log"
        gateway = Gateway(program, self.env(**env), log).start()
        self.started.append(gateway)
        gateway.port = _port_of(gateway.env, program)
        if ready:
            workers = int(gateway.env.get("FANOUT_HTTP_WORKERS", "1"))
            count = workers if program == "fanout-http" else 1
            for line in READY_LINES:
                _wait_for_count(gateway, line, count)
            if gateway.port:
                wait_for_port(gateway.port)
            if program == "fanout-nats":
                gateway.wait_for_log("subscribed to")
            if program == "fanout-redis":
                gateway.wait_for_log("taking from")
        return gateway

    def stop_all(self) -> None:
        for gateway in reversed(self.started):
            gateway.stop()


def _port_of(env: dict[str, str], program: str) -> int | None:
    key = {"fanout-http": "FANOUT_HTTP_BIND", "fanout-ws": "FANOUT_WS_BIND"}.get(
        program
    )
    return int(env[key].rpartition(":")[2]) if key else None


def _wait_for_count(gateway: Gateway, text: str, count: int) -> None:
    from tests.support import wait_until

    if not wait_until(lambda: gateway.output().count(text) >= count, timeout=20):
        raise TimeoutError(
            f"{gateway.program} never logged {text!r}:\n{gateway.output()}"
        )


@pytest.fixture
def launchers(tmp_path):
    """``launchers(brokers)``: a Launcher for brokers a test started itself.

    Their gateways are stopped at teardown, before ``spare_servers`` stops
    the brokers (request this fixture after that one).
    """
    made: list[Launcher] = []

    def make(brokers: Brokers) -> Launcher:
        made.append(Launcher(brokers, tmp_path))
        return made[-1]

    yield make
    for launcher in made:
        launcher.stop_all()


@pytest.fixture
def launch(brokers, tmp_path):
    launcher = Launcher(brokers, tmp_path)
    yield launcher
    launcher.stop_all()


@pytest.fixture
def stack(tmp_path):
    """``fanout run`` in embedded mode, every port a free one."""
    conf = tmp_path / "supervisord.conf"
    shutil.copy(ROOT / "supervisord.conf", conf)
    ports = {name: free_port() for name in ("nats", "redis", "http", "ws")}
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "FANOUT_SUPERVISORD_CONF": str(conf),
        "FANOUT_EMBEDDED_NATS_PORT": str(ports["nats"]),
        "FANOUT_EMBEDDED_REDIS_PORT": str(ports["redis"]),
        "FANOUT_HTTP_BIND": f"127.0.0.1:{ports['http']}",
        "FANOUT_WS_BIND": f"127.0.0.1:{ports['ws']}",
        "FANOUT_HTTP_WORKERS": "1",
        "FANOUT_LOG_DIR": str(tmp_path / "log"),
        "FANOUT_RUN_DIR": str(tmp_path / "run"),
    }
    with open(tmp_path / "fanout-run.out", "wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "fanout"), "run"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    for port in ports.values():
        wait_for_port(port, timeout=30)
    yield proc, env, ports, tmp_path
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(40)


@pytest.fixture
def pki(tmp_path) -> Pki:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client
    certificate, in the test's tmp_path."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    return make_pki(tmp_path)
