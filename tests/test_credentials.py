"""Broker credentials: the gateway authenticates and never shows the secrets."""

import os
import signal
import time
from dataclasses import dataclass

import nkeys
import orjson
import pytest
import redis
import requests

from tests.conftest import Brokers, Launcher
from tests.nats_jwt import Operator, new_key
from tests.support import (
    Gateway,
    Server,
    Subscriber,
    audit_log,
    free_port,
    nats_server,
    post_one,
    redis_command,
    wait_for_port,
    wait_until,
)

NATS_PASSWORD = "nats-secret-pw-31415"
NATS_TOKEN = "nats-secret-token-27182"
REDIS_PASSWORD = "redis-secret-pw-16180"
SECRETS = (NATS_PASSWORD, NATS_TOKEN, REDIS_PASSWORD)


def guarded_redis(tmp_path) -> Server:
    port = free_port()
    data = tmp_path / f"redis-{port}"
    data.mkdir()
    command = redis_command(port, data) + ["--requirepass", REDIS_PASSWORD]
    return Server(command, port, tmp_path / f"redis-{port}.log").start()


def deliver_one(tmp_path, nats_extra: list[str], **env: str) -> Launcher:
    """Start brokers with auth and an HTTP gateway; post one message through."""
    brokers = Brokers(
        nats_server(tmp_path, extra=nats_extra).start(), guarded_redis(tmp_path)
    )
    launcher = Launcher(brokers, tmp_path)
    try:
        gateway = launcher.start(
            "fanout-http", FANOUT_REDIS_PASSWORD=REDIS_PASSWORD, **env
        )
        response = requests.post(
            f"http://127.0.0.1:{gateway.port}/MESSAGES",
            json={"message": {"topic": "internal.auth"}},
            timeout=10,
        )
        assert response.status_code == 202
        client = redis.Redis(port=brokers.redis.port, password=REDIS_PASSWORD)
        assert len(client.lrange("MESSAGES:log", 0, -1)) == 1
        client.close()
    finally:
        launcher.stop_all()
        brokers.nats.stop()
        brokers.redis.stop()
    return launcher


def assert_no_secret_logged(tmp_path, *secrets: str) -> None:
    """No gateway log holds one of SECRETS or of ``secrets``."""
    for log in tmp_path.glob("fanout-*.log"):
        text = log.read_text(errors="replace")
        for secret in SECRETS + secrets:
            assert secret not in text, f"{secret[:12]}... in {log.name}"


def test_nats_user_password_and_redis_password(tmp_path):
    """NATS user/password and a Redis requirepass both work; neither is logged."""
    deliver_one(
        tmp_path,
        ["--user", "fanout", "--pass", NATS_PASSWORD],
        FANOUT_NATS_USER="fanout",
        FANOUT_NATS_PASSWORD=NATS_PASSWORD,
    )
    assert_no_secret_logged(tmp_path)


def test_nats_token(tmp_path):
    """NATS token auth works and the token is not logged."""
    deliver_one(tmp_path, ["--auth", NATS_TOKEN], FANOUT_NATS_TOKEN=NATS_TOKEN)
    assert_no_secret_logged(tmp_path)


def test_wrong_password_is_logged_without_it(tmp_path):
    """A refused NATS login leaves the gateway unconnected and the password unlogged."""
    brokers = Brokers(
        nats_server(
            tmp_path, extra=["--user", "fanout", "--pass", "other-pw-000"]
        ).start(),
        guarded_redis(tmp_path),
    )
    launcher = Launcher(brokers, tmp_path)
    try:
        gateway = launcher.start(
            "fanout-http",
            ready=False,
            FANOUT_NATS_USER="fanout",
            FANOUT_NATS_PASSWORD=NATS_PASSWORD,
            FANOUT_REDIS_PASSWORD=REDIS_PASSWORD,
        )
        gateway.wait_for_log("redis connected")
        time.sleep(2)  # nats-py retries the refused login meanwhile
        assert "nats connected" not in gateway.output()
    finally:
        launcher.stop_all()
        brokers.nats.stop()
        brokers.redis.stop()
    assert_no_secret_logged(tmp_path)


def test_nats_nkey_seed_file(tmp_path):
    """An NKey user authenticates with FANOUT_NATS_NKEY_SEED_FILE; seed unlogged."""
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    seed_file = tmp_path / "fanout.nk"
    seed_file.write_bytes(seed)
    config = tmp_path / "nkey.conf"
    config.write_text(f'authorization {{ users = [ {{ nkey: "{public}" }} ] }}\n')

    deliver_one(
        tmp_path, ["-c", str(config)], FANOUT_NATS_NKEY_SEED_FILE=str(seed_file)
    )
    for log in tmp_path.glob("fanout-*.log"):
        assert seed.decode() not in log.read_text(errors="replace")


@dataclass
class OperatorMode:
    """A nats-server in operator mode, a guarded Redis, and a NATS subscriber."""

    operator: Operator
    launcher: Launcher
    subscriber: Subscriber

    def redis(self) -> redis.Redis:
        port = self.launcher.brokers.redis.port
        return redis.Redis(port=port, password=REDIS_PASSWORD, socket_timeout=5)

    def audited(self) -> list[bytes]:
        client = self.redis()
        try:
            return audit_log(client)
        finally:
            client.close()


@pytest.fixture
def operator_mode(tmp_path):
    """Operator-mode NATS and a guarded Redis; the subscriber is another user."""
    operator = Operator(tmp_path)
    nats = nats_server(tmp_path, extra=["-c", str(operator.server_config())])
    brokers = Brokers(nats.start(), guarded_redis(tmp_path))
    launcher = Launcher(brokers, tmp_path)
    watcher, _, _ = operator.user("watcher")
    subscriber = None
    try:
        subscriber = Subscriber(brokers.nats_url, credentials=watcher).start()
        yield OperatorMode(operator, launcher, subscriber)
    finally:
        launcher.stop_all()
        if subscriber:
            subscriber.close()
        brokers.nats.stop()
        brokers.redis.stop()


def test_nats_creds_file(operator_mode, tmp_path):
    """A .creds user of an operator's account publishes; JWT and seed unlogged."""
    creds, jwt, seed = operator_mode.operator.user("fanout")
    gateway = operator_mode.launcher.start(
        "fanout-http",
        FANOUT_NATS_CREDS_FILE=str(creds),
        FANOUT_REDIS_PASSWORD=REDIS_PASSWORD,
    )
    response, text = post_one(gateway, "internal.creds")

    assert response.status_code == 202
    [msg] = operator_mode.subscriber.wait_for(1, "internal.")
    assert msg.subject == "internal.creds"
    assert msg.data == text.encode()
    assert msg.headers["Nats-Msg-Id"] == response.json()["id"]
    assert len(operator_mode.audited()) == 1
    operator_mode.launcher.stop_all()
    assert_no_secret_logged(tmp_path, jwt, seed)


def start_stranger(operator_mode: OperatorMode) -> tuple[Gateway, str, str]:
    """A gateway whose user JWT a key unknown to the server signed."""
    stranger = new_key(nkeys.PREFIX_BYTE_ACCOUNT)
    creds, jwt, seed = operator_mode.operator.user("fanout", signer=stranger)
    gateway = operator_mode.launcher.start(
        "fanout-http",
        ready=False,
        FANOUT_NATS_CREDS_FILE=str(creds),
        FANOUT_REDIS_PASSWORD=REDIS_PASSWORD,
        FANOUT_PUBLISH_TIMEOUT="1",
    )
    gateway.wait_for_log("redis connected")
    wait_for_port(gateway.port)
    return gateway, jwt, seed


def test_nats_creds_of_a_stranger_are_refused(operator_mode, tmp_path):
    """A user JWT the account did not sign gets no connection: 503, no commit."""
    gateway, jwt, seed = start_stranger(operator_mode)
    response, _ = post_one(gateway, "internal.stranger")

    assert response.status_code == 503
    assert response.json() == {"status": "error", "error": "nats is unreachable"}
    nats_log = operator_mode.launcher.brokers.nats.log
    assert wait_until(lambda: "authentication error" in nats_log.read_text())
    time.sleep(2)  # nats-py retries the refused login meanwhile
    assert "nats connected" not in gateway.output()
    assert operator_mode.audited() == []
    assert operator_mode.subscriber.received("internal.") == []
    operator_mode.launcher.stop_all()
    assert_no_secret_logged(tmp_path, jwt, seed)


def test_refused_creds_are_logged_as_refused(operator_mode):
    """The gateway says, once, that NATS refused its credentials."""
    gateway, _, _ = start_stranger(operator_mode)
    gateway.wait_for_log("refused the gateway's credentials", timeout=5)
    time.sleep(1.5)  # nats-py retries the refused login meanwhile
    assert gateway.output().count("refused the gateway's credentials") == 1


def test_topic_outside_the_nats_allow_list_is_refused_not_confirmed(
    operator_mode,
):
    """A topic the gateway's NATS user may not publish to: 403, nothing logged.

    The server drops such a message with an -ERR 'Permissions Violation'
    and keeps the connection; the gateway reads that before the flush's
    PONG and refuses the message instead of confirming it. The same
    connection's next message goes through.
    """
    creds, _, _ = operator_mode.operator.user("fanout", publish=["internal.>"])
    env = {
        "FANOUT_NATS_CREDS_FILE": str(creds),
        "FANOUT_REDIS_PASSWORD": REDIS_PASSWORD,
    }
    gateway = operator_mode.launcher.start("fanout-http", **env)
    denied, _ = post_one(gateway, "outside.denied")
    # nats-py lowercases the server's error, which escapes quotes and
    # backslashes: these must be matched all the same.
    for awkward in ("Internal.x", 'outside.q"', "outside\\b", "'outside.q"):
        refused, _ = post_one(gateway, awkward)
        assert refused.status_code == 403, (awkward, refused.text)
    allowed, text = post_one(gateway, "internal.allowed")

    assert denied.status_code == 403
    assert denied.json()["error"] == (
        "\"topic\" 'outside.denied' was refused by the nats server: the "
        "gateway may not publish there"
    )
    assert allowed.status_code == 202
    [msg] = operator_mode.subscriber.wait_for(1, "internal.")
    assert msg.data == text.encode()
    assert operator_mode.subscriber.received("outside.") == []
    [entry] = operator_mode.audited()
    assert orjson.loads(entry)["topic"] == "internal.allowed"
    assert "nats refused publishing to 'outside.denied'" in gateway.output()

    # A Redis-list item to such a topic is kept as a dead letter.
    consumer = operator_mode.launcher.start("fanout-redis", **env)
    client = operator_mode.redis()
    client.rpush("MESSAGES", orjson.dumps({"topic": "outside.queued", "n": 1}))
    client.rpush("MESSAGES", orjson.dumps({"topic": "internal.queued", "n": 2}))
    operator_mode.subscriber.wait_for(1, "internal.queued")
    assert wait_until(lambda: client.llen("MESSAGES:dead") == 1)
    dead = orjson.loads(client.lindex("MESSAGES:dead", 0))
    assert dead["reason"].startswith("\"topic\" 'outside.queued' was refused")
    assert orjson.loads(dead["raw"]) == {"topic": "outside.queued", "n": 1}
    assert len(operator_mode.audited()) == 2
    assert operator_mode.subscriber.received("outside.") == []
    client.close()
    consumer.stop()


def start_internal_only(operator_mode: OperatorMode, **settings: str) -> Gateway:
    """fanout-http with one worker, as a NATS user that may publish to
    ``internal.>`` only."""
    creds, _, _ = operator_mode.operator.user("fanout", publish=["internal.>"])
    return operator_mode.launcher.start(
        "fanout-http",
        FANOUT_NATS_CREDS_FILE=str(creds),
        FANOUT_REDIS_PASSWORD=REDIS_PASSWORD,
        FANOUT_HTTP_WORKERS="1",
        **settings,
    )


def test_nats_refusals_are_logged_ten_times_at_most_in_ten_seconds(operator_mode):
    """A client that keeps sending to a topic NATS refuses cannot flood the
    log with the refusal: ten lines, then the rest are counted."""
    gateway = start_internal_only(operator_mode)
    answers = [post_one(gateway, "outside.denied")[0].status_code for _ in range(15)]

    assert answers == [403] * 15
    line = "nats refused publishing to 'outside.denied'"
    assert gateway.output().count(line) == 10


def test_stalled_redis_leaves_no_entry_for_a_topic_nats_refused(operator_mode):
    """Redis frozen past the audit write's limit while NATS refuses a topic
    of the batch: both messages are retryable; the late write that the
    resumed Redis runs adds both entries, and the refused topic's is removed
    once Redis answers again, so the retry (refused for its topic) leaves
    none for it."""
    gateway = start_internal_only(operator_mode, FANOUT_PUBLISH_TIMEOUT="1")
    url = f"http://127.0.0.1:{gateway.port}/MESSAGES"
    body = [
        {"message": {"topic": "internal.ok", "n": 1}, "id": "ok-1"},
        {"message": {"topic": "outside.no", "n": 2}, "id": "no-2"},
    ]
    # A first message opens the audit write's connection: the late write
    # needs one that the frozen Redis had accepted.
    assert post_one(gateway, "internal.first")[0].status_code == 202
    valkey = operator_mode.launcher.brokers.redis.proc
    valkey.send_signal(signal.SIGSTOP)
    try:
        first = requests.post(url, json=body, timeout=30)
    finally:
        valkey.send_signal(signal.SIGCONT)
    second = requests.post(url, json=body, timeout=30)

    assert [r.get("retryable") for r in first.json()["results"]] == [True, True]
    assert [r["status"] for r in second.json()["results"]] == ["accepted", "error"]
    assert second.json()["results"][1]["error"] == (
        "\"topic\" 'outside.no' was refused by the nats server: the gateway may "
        "not publish there"
    )
    # ok-1 twice: the stalled write and the retry's (see Known gaps).
    ids = [orjson.loads(entry)["id"] for entry in operator_mode.audited()[1:]]
    assert ids == ["ok-1", "ok-1"]


def test_refused_topic_spares_a_topic_differing_only_in_case(operator_mode):
    """Subjects are case-sensitive: a refusal names one, with its case.

    nats-py lowercases the server's error text; in one bulk request (one
    batch) a refused topic must not take an allowed case variant with it,
    which the server delivered: that would be refused to the sender yet
    delivered, with no audit entry.
    """
    creds, _, _ = operator_mode.operator.user(
        "fanout", publish=["internal.>", "Outside.ok"]
    )
    gateway = operator_mode.launcher.start(
        "fanout-http",
        FANOUT_NATS_CREDS_FILE=str(creds),
        FANOUT_REDIS_PASSWORD=REDIS_PASSWORD,
    )
    body = [
        {"message": {"topic": "outside.ok", "n": 1}},
        {"message": {"topic": "Outside.ok", "n": 2}},
        {"message": {"topic": "OUTSIDE.ok", "n": 3}},
    ]
    response = requests.post(
        f"http://127.0.0.1:{gateway.port}/MESSAGES", json=body, timeout=10
    )

    assert response.status_code == 200, response.text
    statuses = [result["status"] for result in response.json()["results"]]
    assert statuses == ["error", "accepted", "error"]
    [msg] = operator_mode.subscriber.wait_for(1, "Outside.")
    assert orjson.loads(msg.data) == {"topic": "Outside.ok", "n": 2}
    [entry] = operator_mode.audited()
    assert orjson.loads(entry)["topic"] == "Outside.ok"
    assert operator_mode.subscriber.received("outside.") == []
    assert operator_mode.subscriber.received("OUTSIDE.") == []


def test_redis_acl_without_the_audit_log_holds_items_until_fixed(
    tmp_path, spare_servers, launchers
):
    """An ACL user who may not write the audit log: said once, nothing lost.

    The Redis consumer's step is refused whole (NOPERM), so the item stays on
    the list; once the ACL allows the audit log, it is delivered.
    """
    port = free_port()
    data = tmp_path / f"redis-{port}"
    data.mkdir()
    command = redis_command(port, data) + [
        *("--user", "fanout", "on", ">acl-pw-2718", "+@all"),
        *("~MESSAGES", "~MESSAGES:processing:*", "~MESSAGES:batches:*"),
        "~MESSAGES:consumer:*",
    ]
    redis_acl = Server(command, port, tmp_path / f"redis-{port}.log").start()
    spare_servers.append(redis_acl)
    nats = nats_server(tmp_path).start()
    spare_servers.append(nats)
    launcher = launchers(Brokers(nats, redis_acl))
    subscriber = Subscriber(f"nats://127.0.0.1:{nats.port}").start()
    admin = redis.Redis(port=port, socket_timeout=5)  # the default user
    try:
        consumer = launcher.start(
            "fanout-redis",
            FANOUT_REDIS_USERNAME="fanout",
            FANOUT_REDIS_PASSWORD="acl-pw-2718",
        )
        admin.rpush("MESSAGES", orjson.dumps({"topic": "internal.acl", "n": 1}))
        consumer.wait_for_log("committing and taking a batch failed (NoPermissionError")
        time.sleep(1)
        assert admin.llen("MESSAGES") == 1
        assert subscriber.received() == []

        admin.execute_command("ACL", "SETUSER", "fanout", "~MESSAGES:*")
        [msg] = subscriber.wait_for(1, "internal.acl", timeout=15)
        assert orjson.loads(msg.data) == {"topic": "internal.acl", "n": 1}
        assert wait_until(lambda: admin.llen("MESSAGES:log") == 1)
        assert consumer.output().count("NoPermissionError") == 1
    finally:
        admin.close()
        subscriber.close()
