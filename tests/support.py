"""Real brokers and real gateway processes for the tests.

Everything listens on free loopback ports; nothing here talks to a default
port or to another host.
"""

import asyncio
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import nats
import redis
import requests

from services.broker import nats_command, redis_command

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def port_is_free(port: int) -> bool:
    """True when a new server could listen on ``port`` (as servers do, with
    SO_REUSEADDR, so connections left in TIME_WAIT do not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def wait_until(check, timeout: float = 10.0, interval: float = 0.05):
    """Poll ``check()`` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() >= deadline:
            return result
        time.sleep(interval)


class Server:
    """A broker process on a loopback port that a test can stop and restart."""

    def __init__(self, command: list[str], port: int, log: Path):
        self.command = command
        self.port = port
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Server":
        out = open(self.log, "ab")
        self.proc = subprocess.Popen(
            self.command, stdout=out, stderr=subprocess.STDOUT, cwd=self.log.parent
        )
        out.close()
        wait_for_port(self.port)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


def nats_server(tmp: Path, port: int | None = None, extra=()) -> Server:
    port = port or free_port()
    command = nats_command(port, tmp) + list(extra)
    return Server(command, port, tmp / f"nats-{port}.log")


def redis_server(tmp: Path, port: int | None = None) -> Server:
    port = port or free_port()
    data = tmp / f"redis-{port}"
    data.mkdir(exist_ok=True)
    return Server(redis_command(port, data), port, tmp / f"redis-{port}.log")


class Gateway:
    """One Fanout process (``fanout-http``, ``fanout-ws``...) as a subprocess."""

    def __init__(self, program: str, env: dict[str, str], log: Path):
        self.program = program
        self.env = env
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Gateway":
        out = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [str(BIN / self.program)],
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=self.log.parent,
            start_new_session=True,
        )
        out.close()
        return self

    def signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 20.0) -> int | None:
        """TERM and wait; KILL if it overstays. Returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(5)
        return self.proc.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 15.0) -> None:
        if not wait_until(lambda: text in self.output(), timeout):
            raise TimeoutError(
                f"{self.program} never logged {text!r}:\n{self.output()}"
            )


class Subscriber:
    """A real NATS subscriber on its own thread, collecting what arrives."""

    def __init__(
        self,
        url: str,
        subject: str = ">",
        tls: ssl.SSLContext | None = None,
        credentials: Path | None = None,
    ):
        self.url = url
        self.subject = subject
        self.tls = tls
        self.credentials = str(credentials) if credentials else None  # .creds file
        self.messages: list = []  # nats.aio.msg.Msg
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "Subscriber":
        self._thread.start()
        if not self._ready.wait(10):
            raise TimeoutError("subscriber did not connect")
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._subscribe())
        self._loop.run_forever()

    async def _subscribe(self) -> None:
        self.nc = await nats.connect(
            self.url,
            max_reconnect_attempts=-1,
            tls=self.tls,
            user_credentials=self.credentials,
        )

        async def on_message(msg):
            with self._lock:
                self.messages.append(msg)

        await self.nc.subscribe(self.subject, cb=on_message)
        await self.nc.flush()
        self._ready.set()

    def received(self, subject_prefix: str = "") -> list:
        with self._lock:
            return [m for m in self.messages if m.subject.startswith(subject_prefix)]

    def wait_for(self, count: int, subject_prefix: str = "", timeout: float = 30.0):
        got = wait_until(
            lambda: len(self.received(subject_prefix)) >= count, timeout=timeout
        )
        messages = self.received(subject_prefix)
        assert got, f"expected {count} messages, got {len(messages)}"
        return messages

    def close(self) -> None:
        async def shutdown():
            await self.nc.close()

        if self._ready.is_set():
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


def publish(url: str, payloads: list[bytes], subject: str = "MESSAGES") -> None:
    """Publish ``payloads`` to ``subject`` (the NATS ingress) and flush."""

    async def send():
        nc = await nats.connect(url)
        for payload in payloads:
            await nc.publish(subject, payload)
        await nc.flush()
        await nc.close()

    asyncio.run(send())


def audit_log(client: redis.Redis, key: str = "MESSAGES:log") -> list[bytes]:
    return client.lrange(key, 0, -1)


def post_one(gateway: "Gateway", topic: str) -> tuple[requests.Response, str]:
    """POST one message as JSON text; the answer and the text sent."""
    text = json.dumps({"topic": topic, "data": {"n": 1}})
    response = requests.post(
        f"http://127.0.0.1:{gateway.port}/MESSAGES",
        json={"message": text},
        timeout=10,
    )
    return response, text
