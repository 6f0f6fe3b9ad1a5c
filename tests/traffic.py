"""Bounded producers for the fault tests, each on its own thread.

Every message carries a key ``k`` in its data; each producer records which
keys were acknowledged (HTTP 202, an "accepted" frame, a successful RPUSH)
and which were refused, so a test can compare with what a subscriber saw.
Loops stop at a deadline or a count, whichever comes first.
"""

import json
import threading
import time

import orjson
import redis
import requests
import websocket
from redis.backoff import NoBackoff
from redis.retry import Retry


class Traffic:
    def __init__(
        self,
        http_url: str | None = None,
        ws_url: str | None = None,
        redis_port: int | None = None,
        seconds: float = 8.0,
        most: int = 3000,  # messages per producer at the most
        http_threads: int = 2,
    ):
        self.http_url = http_url
        self.ws_url = ws_url
        self.redis_port = redis_port
        self.seconds = seconds
        self.most = most
        self.acked: dict[str, set[str]] = {"http": set(), "ws": set(), "redis": set()}
        self.refused: dict[str, list] = {"http": [], "ws": [], "redis": []}
        self.unexpected: list = []
        self.acked_at: dict[str, float] = {}  # key: time.monotonic() of the answer
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        if http_url:
            for n in range(http_threads):
                self._add(self._http, n)
        if ws_url:
            self._add(self._ws)
        if redis_port:
            self._add(self._redis)

    def _add(self, target, *args) -> None:
        self._threads.append(threading.Thread(target=target, args=args, daemon=True))

    def mark(self, event: str) -> None:
        """Note when something happened, for failure messages."""
        self.events.append((event, round(time.monotonic() - self.started_at, 3)))

    def start(self) -> "Traffic":
        self.started_at = time.monotonic()
        self.events: list[tuple[str, float]] = []
        self._deadline = time.monotonic() + self.seconds
        for thread in self._threads:
            thread.start()
        return self

    def join(self) -> "Traffic":
        for thread in self._threads:
            thread.join(self.seconds + 60)
        return self

    def stop(self) -> "Traffic":
        self._stop.set()
        return self.join()

    def _running(self, count: int) -> bool:
        return (
            not self._stop.is_set()
            and count < self.most
            and time.monotonic() < self._deadline
        )

    def _record(self, ingress: str, key: str, ok: bool, detail=None) -> None:
        with self._lock:
            if ok:
                self.acked[ingress].add(key)
                self.acked_at[key] = time.monotonic()
            else:
                self.refused[ingress].append((key, detail))

    def _http(self, worker: int) -> None:
        session = requests.Session()
        count = 0
        while self._running(count):
            key = f"h{worker}-{count}"
            count += 1
            body = {"id": key, "message": {"topic": "internal.load", "k": key}}
            try:
                response = session.post(self.http_url, json=body, timeout=30)
            except requests.RequestException as exc:
                self._record("http", key, False, repr(exc))
                session = requests.Session()
                time.sleep(0.05)
                continue
            if response.status_code == 202:
                self._record("http", key, True)
            elif response.status_code == 503:
                assert response.headers["Retry-After"]
                self._record("http", key, False, response.json()["error"])
            else:
                self.unexpected.append((key, response.status_code, response.text))

    def _ws(self) -> None:
        client = None
        count = 0
        while self._running(count):
            key = f"w-{count}"
            count += 1
            try:
                if client is None:
                    client = websocket.WebSocket()
                    client.connect(self.ws_url, timeout=30)
                frame = {"id": key, "message": {"topic": "internal.load", "k": key}}
                client.send(json.dumps(frame))
                answer = json.loads(client.recv())
            except (OSError, websocket.WebSocketException) as exc:
                self._record("ws", key, False, repr(exc))
                client = None
                time.sleep(0.05)
                continue
            if answer["status"] == "accepted":
                self._record("ws", key, True)
            elif answer.get("retryable"):
                self._record("ws", key, False, answer["error"])
            else:
                self.unexpected.append((key, answer))
        if client is not None:
            client.close()

    def _redis(self) -> None:
        # No automatic retry: redis-py would resend an RPUSH whose reply was
        # lost in an outage, and the item would then really be on the list
        # twice, a duplicate of the producer's making, not the gateway's.
        client = redis.Redis(
            port=self.redis_port, socket_timeout=2, retry=Retry(NoBackoff(), 0)
        )
        count = 0
        while self._running(count):
            key = f"r-{count}"
            count += 1
            item = orjson.dumps({"topic": "internal.load", "k": key})
            try:
                client.rpush("MESSAGES", item)
            except redis.RedisError as exc:
                self._record("redis", key, False, repr(exc))
                time.sleep(0.05)
                continue
            self._record("redis", key, True)
            time.sleep(0.003)
        client.close()


def keys_with_ids(messages) -> dict[str, set[str]]:
    """For each key seen by a subscriber, the message ids it arrived with."""
    seen: dict[str, set[str]] = {}
    for msg in messages:
        key = orjson.loads(msg.data)["k"]
        seen.setdefault(key, set()).add(msg.headers["Nats-Msg-Id"])
    return seen
