"""Settings: declared once, validated at startup, documented in the README."""

import os
import subprocess
from types import SimpleNamespace

import nkeys
import pytest

from common import brokers, settings
from common.errors import ConfigError
from services import redis_consumer
from tests.support import BIN, ROOT

README = str(ROOT / "README.md")  # a file that exists, for the file settings
SUPERVISORD_CONF = ROOT / "supervisord.conf"


def test_readme_table_matches_the_declarations():
    """The README's settings table is the one generated from SETTINGS."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split(settings.BEGIN_MARK)[1].split(settings.END_MARK)[0]
    assert block.strip() == settings.markdown_table()


def test_defaults_load_and_embed_both_brokers():
    """With nothing set, both brokers are embedded on their default ports."""
    loaded = settings.load({})
    assert loaded.embedded == frozenset({"nats", "redis"})
    assert loaded.nats_urls == ("nats://127.0.0.1:4222",)
    assert loaded.redis_url == "redis://127.0.0.1:6379/0"
    assert loaded.http_bind == ("127.0.0.1", 8080)


def test_cluster_url_list_is_split():
    """A comma-separated FANOUT_NATS_URL is a list of servers, none embedded."""
    loaded = settings.load({"FANOUT_NATS_URL": "nats://a:1, nats://b:2"})
    assert loaded.nats_urls == ("nats://a:1", "nats://b:2")
    assert "nats" not in loaded.embedded


@pytest.mark.parametrize(
    "env,error",
    [
        (
            {"FANOUT_HTTP_WORKERS": "0"},
            "FANOUT_HTTP_WORKERS='0': must be between 1 and 64",
        ),
        ({"FANOUT_HTTP_BIND": "8080"}, "FANOUT_HTTP_BIND='8080': must be HOST:PORT"),
        (
            {"FANOUT_NATS_URL": "http://x:1"},
            "FANOUT_NATS_URL='http://x:1': http://x:1 does not start with nats:// "
            "or tls://",
        ),
        (
            {"FANOUT_PUBLISH_TIMEOUT": "soon"},
            "FANOUT_PUBLISH_TIMEOUT='soon': not a number of seconds",
        ),
        ({"FANOUT_CONFIRM": "maybe"}, "FANOUT_CONFIRM='maybe': must be true or false"),
        (
            {"FANOUT_REDIS_URL": "rediss://h:6380/0?x=1"},
            "FANOUT_REDIS_URL='rediss://h:6380/0?x=1': redis-py cannot use its "
            "query: AbstractConnection.__init__() got an unexpected keyword "
            "argument 'x'",
        ),
        (
            {"FANOUT_REDIS_URL": "redis://h:6379/0?decode_responses=true"},
            "FANOUT_REDIS_URL='redis://h:6379/0?decode_responses=true': redis-py "
            "cannot use its query: decode_responses: the gateway reads replies as "
            "bytes",
        ),
        (
            {"FANOUT_MAX_PENDING": "600"},
            "FANOUT_MAX_BULK_MESSAGES=1000 is above FANOUT_MAX_PENDING=600: a bulk "
            "request that large could never be taken; lower the first or raise the "
            "second",
        ),
        (
            {"FANOUT_DEAD_LIST": "MESSAGES:log"},
            "FANOUT_LOG_LIST and FANOUT_DEAD_LIST are both 'MESSAGES:log'; the "
            "ingress list, the audit log and the dead-letter list must be different "
            "lists, or audit entries and dead letters would be mixed in one list",
        ),
        (
            {"FANOUT_INGRESS_LIST": "MESSAGES:log"},
            "FANOUT_INGRESS_LIST and FANOUT_LOG_LIST are both 'MESSAGES:log'; the "
            "ingress list, the audit log and the dead-letter list must be different "
            "lists, or the gateway would consume its own output",
        ),
        (
            {"FANOUT_INGRESS_SUBJECT": "MESS*"},
            "FANOUT_INGRESS_SUBJECT='MESS*': not a NATS subject the ingress can "
            "subscribe to: it contains a wildcard (* or >)",
        ),
        (
            {"FANOUT_HTTP_BIND": "127.0.0.1:9000", "FANOUT_WS_BIND": "127.0.0.1:9000"},
            "FANOUT_HTTP_BIND and FANOUT_WS_BIND both use port 9000; each process "
            "of the gateway needs a port of its own",
        ),
        (
            {"FANOUT_EMBEDDED_NATS_PORT": "7000", "FANOUT_EMBEDDED_REDIS_PORT": "7000"},
            "FANOUT_EMBEDDED_NATS_PORT and FANOUT_EMBEDDED_REDIS_PORT both use port "
            "7000; each process of the gateway needs a port of its own",
        ),
        (
            {"FANOUT_ALLOWED_TOPICS": ","},
            "FANOUT_ALLOWED_TOPICS=',': holds no pattern, only separators",
        ),
        (
            {"FANOUT_NATS_CREDS_FILE": "/"},
            "FANOUT_NATS_CREDS_FILE='/': a folder, not a file: /",
        ),
        (
            {"FANOUT_NATS_TLS_CA": "/nonexistent/ca.pem"},
            "FANOUT_NATS_TLS_CA='/nonexistent/ca.pem': no such file: "
            "/nonexistent/ca.pem",
        ),
        (
            {"FANOUT_NATS_TLS_CA": README},
            f"FANOUT_NATS_TLS_CA={README!r}: OpenSSL finds no CA certificate in "
            "it ([X509: NO_CERTIFICATE_OR_CRL_FOUND] no certificate or crl found)",
        ),
        (
            {"FANOUT_REDIS_URL": "rediss://h:6380/0", "FANOUT_REDIS_TLS_CA": README},
            f"FANOUT_REDIS_TLS_CA={README!r}: OpenSSL finds no CA certificate in "
            "it ([X509: NO_CERTIFICATE_OR_CRL_FOUND] no certificate or crl found)",
        ),
        (
            {"FANOUT_NATS_TLS_CERT": README, "FANOUT_NATS_TLS_KEY": README},
            f"FANOUT_NATS_TLS_CERT={README!r} and FANOUT_NATS_TLS_KEY={README!r}: "
            "OpenSSL cannot load them as a certificate and its private key "
            "([SSL] PEM lib)",
        ),
        (
            {"FANOUT_NATS_URL": "nats://fanout:pw@h:4222", "FANOUT_NATS_TOKEN": "t"},
            "credentials in FANOUT_NATS_URL and FANOUT_NATS_TOKEN are set "
            "together; the gateway authenticates to NATS in one way",
        ),
        (
            {
                "FANOUT_NATS_URL": "nats://h:4222, nats://secret@h2:4222",
                "FANOUT_NATS_USER": "fanout",
                "FANOUT_NATS_PASSWORD": "pw",
            },
            "credentials in FANOUT_NATS_URL and FANOUT_NATS_USER are set "
            "together; the gateway authenticates to NATS in one way",
        ),
        (
            {"FANOUT_NATS_USER": "fanout"},
            "FANOUT_NATS_USER is set without FANOUT_NATS_PASSWORD",
        ),
        (
            {"FANOUT_REDIS_URL": "redis://h:6379/0", "FANOUT_REDIS_TLS_CA": README},
            "FANOUT_REDIS_TLS_CA is set, but FANOUT_REDIS_URL is not a rediss:// "
            "URL; the TLS files would go unused",
        ),
        (
            {"FANOUT_REDIS_TLS_CERT": README, "FANOUT_REDIS_TLS_KEY": README},
            "FANOUT_REDIS_TLS_CERT is set, but FANOUT_REDIS_URL is unset (the "
            "embedded Redis takes plain redis://); the TLS files would go unused",
        ),
        (
            {"FANOUT_LOG_LIST": "MESSAGES:processing:c1"},
            "FANOUT_LOG_LIST='MESSAGES:processing:c1': starts with "
            "'MESSAGES:processing:', where the Redis consumers keep their own "
            "keys; a consumer would take it for one of its own",
        ),
        (
            {"FANOUT_INGRESS_LIST": "IN", "FANOUT_DEAD_LIST": "IN:batches:c1"},
            "FANOUT_DEAD_LIST='IN:batches:c1': starts with 'IN:batches:', where "
            "the Redis consumers keep their own keys; a consumer would take it for "
            "one of its own",
        ),
        (
            {"FANOUT_DEAD_LIST": "MESSAGES:consumer:c1"},
            "FANOUT_DEAD_LIST='MESSAGES:consumer:c1': starts with "
            "'MESSAGES:consumer:', where the Redis consumers keep their own keys; "
            "a consumer would take it for one of its own",
        ),
        (
            {
                "FANOUT_TOKENS": f"billing {'a' * 16};shipping {'b' * 16};"
                f"billing {'c' * 16}"
            },
            "FANOUT_TOKENS='***': two tokens are named billing; the logs tell "
            "tokens apart by name",
        ),
        (
            {"FANOUT_INGRESS_SUBJECT": "$SYS.x"},
            "FANOUT_INGRESS_SUBJECT='$SYS.x': not a NATS subject for the ingress: it "
            "is reserved: subjects starting with $ belong to the NATS server "
            "(system, JetStream, key-value and object store APIs)",
        ),
        (
            {"FANOUT_INGRESS_SUBJECT": "_INBOX.x"},
            "FANOUT_INGRESS_SUBJECT='_INBOX.x': not a NATS subject for the ingress: "
            "it is reserved: _INBOX. subjects carry replies addressed to other "
            "clients",
        ),
        (
            {"FANOUT_CONSUMER_NAME": "*"},
            "FANOUT_CONSUMER_NAME='*': must be 1 to 64 ASCII letters, digits, '.', "
            "'_', ':' or '-' (or empty, for the default name)",
        ),
        (
            {"FANOUT_CONSUMER_NAME": "c" * 65},
            f"FANOUT_CONSUMER_NAME={'c' * 65!r}: must be 1 to 64 ASCII letters, "
            "digits, '.', '_', ':' or '-' (or empty, for the default name)",
        ),
        (
            {"FANOUT_CONSUMER_NAME": "café"},
            "FANOUT_CONSUMER_NAME='café': must be 1 to 64 ASCII letters, digits, "
            "'.', '_', ':' or '-' (or empty, for the default name)",
        ),
    ],
)
def test_bad_value_names_variable_and_value(env, error):
    """Each bad value is refused with the variable, the value and the rule."""
    with pytest.raises(ConfigError) as caught:
        settings.load(env)
    assert str(caught.value) == error


def test_longest_consumer_name_is_taken():
    """A consumer name of 64 letters, digits, '.', '_', ':' and '-' is
    accepted, the default name's form (host:process) among them."""
    name = "host.example:fanout-redis_1" + "x" * 37
    assert settings.load({"FANOUT_CONSUMER_NAME": name}).consumer_name == name


def test_consumer_key_prefixes_are_the_consumers_own():
    """The prefixes refused for the audit log and the dead-letter list are
    those of every key a Redis consumer keeps."""
    loaded = settings.load({"FANOUT_INGRESS_LIST": "IN"})
    consumer = SimpleNamespace(settings=loaded)
    keys = redis_consumer.RedisConsumer._keys(consumer, "c1")
    prefixes = tuple(f"IN:{kind}:" for kind in settings.CONSUMER_KEY_KINDS)
    assert [key.removesuffix("c1") for key in keys] == list(prefixes)


def test_token_name_in_the_file_and_the_list_is_refused(tmp_path):
    """A token name given in FANOUT_TOKENS_FILE and again in FANOUT_TOKENS is
    refused, as is a value given in both (each process takes the two
    together)."""
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(f"# producers\nbilling {'a' * 16} billing.>\n")
    env = {"FANOUT_TOKENS_FILE": str(tokens_file)}

    with pytest.raises(ConfigError) as caught:
        settings.load({**env, "FANOUT_TOKENS": f"billing {'b' * 16}"})
    assert str(caught.value) == (
        "FANOUT_TOKENS_FILE and FANOUT_TOKENS: two tokens are named billing; the "
        "logs tell tokens apart by name"
    )

    with pytest.raises(ConfigError) as caught:
        settings.load({**env, "FANOUT_TOKENS": f"shipping {'a' * 16}"})
    assert str(caught.value) == (
        "FANOUT_TOKENS_FILE and FANOUT_TOKENS: token shipping has the value of another"
    )


def test_token_name_repeated_in_the_file_is_refused(tmp_path):
    """A token name that repeats within the tokens file is refused, naming it."""
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(f"billing {'a' * 16}\nbilling {'b' * 16} billing.>\n")

    with pytest.raises(ConfigError) as caught:
        settings.load({"FANOUT_TOKENS_FILE": str(tokens_file)})
    assert str(caught.value) == (
        f"FANOUT_TOKENS_FILE={str(tokens_file)!r}: two tokens are named billing; "
        "the logs tell tokens apart by name"
    )


def test_redis_url_scheme_in_capitals_still_means_tls(pki):
    """REDISS:// is rediss://: its TLS files are taken, not refused as unused."""
    loaded = settings.load(
        {"FANOUT_REDIS_URL": "REDISS://h:6380/0", "FANOUT_REDIS_TLS_CA": str(pki.ca)}
    )
    assert loaded.redis_url == "rediss://h:6380/0"
    assert brokers.redis_credentials(loaded)["ssl_ca_certs"] == str(pki.ca)


def _user_seed() -> str:
    return nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode()


def test_nkey_files_nats_py_can_read_are_taken(tmp_path):
    """A seed file, and a creds file with its JWT and seed blocks, load."""
    seed_file, creds_file = tmp_path / "user.nk", tmp_path / "user.creds"
    seed_file.write_text(_user_seed() + "\n")
    creds_file.write_text(
        "-----BEGIN NATS USER JWT-----\neyJ0eXAiOiJKV1QifQ.e30.c2ln\n"
        "------END NATS USER JWT------\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{_user_seed()}\n"
        "------END USER NKEY SEED------\n"
    )

    assert settings.load({"FANOUT_NATS_NKEY_SEED_FILE": str(seed_file)})
    assert settings.load({"FANOUT_NATS_CREDS_FILE": str(creds_file)})


@pytest.mark.parametrize(
    "variable, content, problem",
    [
        (
            "FANOUT_NATS_NKEY_SEED_FILE",
            "not a seed\n",
            "holds no NKey seed (one line, starting with S)",
        ),
        (
            "FANOUT_NATS_CREDS_FILE",
            "-----BEGIN USER NKEY SEED-----\nSUA\n",
            "holds no user JWT (-----BEGIN NATS USER JWT----- block)",
        ),
        (
            "FANOUT_NATS_CREDS_FILE",
            "-----BEGIN NATS USER JWT-----\neyJ0eXAiOiJKV1QifQ.e30.c2ln\n",
            "holds no user NKey seed (-----BEGIN USER NKEY SEED----- block)",
        ),
    ],
)
def test_nkey_file_nats_py_cannot_read_is_refused(tmp_path, variable, content, problem):
    """nats-py reads these only when connecting (a bad seed killed the process
    there): they are checked at startup, and the problem named."""
    bad = tmp_path / "bad"
    bad.write_text(content)

    with pytest.raises(ConfigError) as caught:
        settings.load({variable: str(bad)})
    assert str(caught.value) == f"{variable}={str(bad)!r}: {problem}"


def test_tls_files_openssl_can_load_are_taken(pki):
    """A CA bundle, and a certificate with its own key, load for both brokers."""
    files = {"CA": pki.ca, "CERT": pki.client_cert, "KEY": pki.client_key}
    environ = {"FANOUT_REDIS_URL": "rediss://h:6380/0"}
    for broker in ("NATS", "REDIS"):
        environ.update({f"FANOUT_{broker}_TLS_{k}": str(v) for k, v in files.items()})

    loaded = settings.load(environ)

    assert (loaded.nats_tls_cert, loaded.redis_tls_key) == (
        str(pki.client_cert),
        str(pki.client_key),
    )


def test_certificate_with_another_certificates_key_is_refused(pki):
    """The client certificate with the server's key is a bad setting, named."""
    with pytest.raises(ConfigError) as caught:
        settings.load(
            {
                "FANOUT_NATS_TLS_CERT": str(pki.client_cert),
                "FANOUT_NATS_TLS_KEY": str(pki.server_key),
            }
        )
    assert str(caught.value).startswith(
        f"FANOUT_NATS_TLS_CERT={str(pki.client_cert)!r} and "
        f"FANOUT_NATS_TLS_KEY={str(pki.server_key)!r}: OpenSSL cannot load them as "
        "a certificate and its private key ("
    )
    assert "KEY_VALUES_MISMATCH" in str(caught.value)


@pytest.mark.parametrize(
    "name,url",
    [
        ("FANOUT_NATS_URL", "nats://u:hunter2@127.0.0.1:99999"),
        ("FANOUT_NATS_URL", "nats://h:4222,nats://u:hunter2@h:x"),
        ("FANOUT_REDIS_URL", "redis://:hunter2@127.0.0.1:99999/0"),
    ],
)
def test_bad_port_beside_a_password_is_reported_masked(name, url):
    """A bad port in a URL with credentials is a bad setting like any other
    (it used to end in a traceback and exit 1), and the password stays
    hidden."""
    with pytest.raises(ConfigError) as caught:
        settings.load({name: url})
    assert "has a bad port" in str(caught.value)
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize("path", ["/abc", "/0/1", "/-1"])
def test_redis_url_path_must_be_a_database_number(path):
    """redis-py would use database 0 for a path it cannot read."""
    with pytest.raises(ConfigError) as caught:
        settings.load({"FANOUT_REDIS_URL": f"redis://h:6379{path}"})
    assert str(caught.value) == (
        f"FANOUT_REDIS_URL='redis://h:6379{path}': redis://h:6379{path}: its path "
        f"must be a database number, as in /0, not {path!r}"
    )


def test_password_in_a_bad_url_is_not_echoed():
    """A refused URL is shown with its password masked."""
    with pytest.raises(ConfigError) as caught:
        settings.load({"FANOUT_REDIS_URL": "http://user:hunter2@db:6379"})
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    "program", ["fanout-http", "fanout-ws", "fanout-redis", "fanout-nats"]
)
def test_every_process_exits_78_on_a_bad_setting(program):
    """Each process prints one line and exits 78, which is not respawned."""
    result = subprocess.run(
        [str(BIN / program)],
        env={"PATH": "/usr/bin:/bin", "FANOUT_BATCH_SIZE": "-1"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == settings.EXIT_CONFIG
    assert result.stderr == (
        "fanout: bad setting FANOUT_BATCH_SIZE='-1': must be between 1 and 100000\n"
    )


def _run_fanout(command: str, tmp_path, **values: str) -> subprocess.CompletedProcess:
    """``fanout COMMAND`` with only the settings ``values``, its folders under
    ``tmp_path`` and a copy of supervisord.conf in ``tmp_path / "conf"``."""
    conf = tmp_path / "conf" / "supervisord.conf"
    conf.parent.mkdir(exist_ok=True)
    conf.write_text(SUPERVISORD_CONF.read_text())
    env = {
        "PATH": str(BIN),
        "FANOUT_LOG_DIR": str(tmp_path / "log"),
        "FANOUT_RUN_DIR": str(tmp_path / "run"),
        "FANOUT_SUPERVISORD_CONF": str(conf),
        **values,
    }
    return subprocess.run(
        [str(BIN / "fanout"), *command.split()], env=env, capture_output=True,
        text=True, timeout=20,
    )  # fmt: skip


def _fanout_refusal(command: str, tmp_path, **values: str) -> str:
    """What ``fanout COMMAND`` (see :func:`_run_fanout`) printed; it must
    refuse with exit 78 before starting anything."""
    done = _run_fanout(command, tmp_path, **values)
    assert done.returncode == settings.EXIT_CONFIG, done.stderr
    return done.stderr


def test_fanout_refuses_a_supervisord_conf_that_is_not_there(tmp_path):
    """A FANOUT_SUPERVISORD_CONF naming no file is one line and exit 78, for
    ctl as for run."""
    missing = tmp_path / "elsewhere" / "supervisord.conf"
    for command in ("run", "ctl status"):
        error = _fanout_refusal(command, tmp_path, FANOUT_SUPERVISORD_CONF=str(missing))

        assert error == (
            f"fanout: bad setting FANOUT_SUPERVISORD_CONF: {missing} is not a file\n"
        )
        assert not (tmp_path / "log").exists() and not (tmp_path / "elsewhere").exists()


def test_fanout_ctl_creates_no_folders(tmp_path):
    """fanout ctl talks to a running supervisord; with none running it fails
    without making the log, run or supervisord folders."""
    done = _run_fanout("ctl status", tmp_path)

    assert done.returncode != 0  # no supervisord to talk to
    assert sorted(path.name for path in tmp_path.rglob("*")) == [
        "conf",
        "supervisord.conf",
    ]


def test_fanout_refuses_one_consumer_name_for_several_consumers(tmp_path):
    """Under supervisord every consumer gets the same environment: a
    consumer name with more than one Redis consumer is refused (exit 78)."""
    error = _fanout_refusal(
        "start", tmp_path, FANOUT_CONSUMER_NAME="c", FANOUT_REDIS_CONSUMERS="2"
    )

    assert error == (
        "fanout: bad setting FANOUT_CONSUMER_NAME='c' is set with "
        "FANOUT_REDIS_CONSUMERS=2: the consumers would share one processing "
        "list and deliver its items twice; leave the name unset (each takes its "
        "process name) or run one\n"
    )


def test_fanout_refuses_a_log_dir_it_cannot_create(tmp_path):
    """An unusable FANOUT_LOG_DIR is one line and exit 78, before anything
    starts."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    error = _fanout_refusal("run", tmp_path, FANOUT_LOG_DIR=str(blocker / "logs"))

    assert error.startswith(
        f"fanout: bad setting FANOUT_LOG_DIR: cannot create {blocker / 'logs'} ("
    )
    assert "Traceback" not in error
