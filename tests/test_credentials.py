"""Broker credentials: the gateway authenticates and never shows the secrets."""

import os
import time

import nkeys
import redis
import requests

from tests.conftest import Brokers, Launcher
from tests.support import Server, free_port, nats_server, redis_command

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


def assert_no_secret_logged(tmp_path) -> None:
    for log in tmp_path.glob("fanout-*.log"):
        text = log.read_text(errors="replace")
        for secret in SECRETS:
            assert secret not in text, f"{secret} in {log.name}"


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
