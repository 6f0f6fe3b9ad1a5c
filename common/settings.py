"""Every Fanout setting, declared once.

Each :class:`Setting` names its environment variable, its type, its default
(with the unit in the text) and a one-line description. :func:`load` reads
them from an environment mapping and validates every value; the README's
settings table is checked against :data:`SETTINGS` by the test suite, and
``python -m common.settings`` prints that table.

A process that cannot start with its settings exits with
:data:`EXIT_CONFIG`; supervisord and systemd are configured not to respawn
on that code.
"""

import os
import re
import ssl
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import urlsplit

from common import tokens
from common.errors import ConfigError
from common.message import subject_problem
from common.policy import RESERVED_PREFIXES, parse_patterns

EXIT_CONFIG = 78  # EX_CONFIG from sysexits.h
MAX_CONSUMER_NAME = 64  # characters
_CONSUMER_NAME = re.compile(r"[A-Za-z0-9._:-]+", re.ASCII)
# What a Redis consumer keeps beside the ingress list, each key named
# <ingress list>:<kind>:<consumer name>: its processing list, its batch list
# and its heartbeat (services/redis_consumer.py, RedisConsumer._keys).
CONSUMER_KEY_KINDS = ("processing", "batches", "consumer")


@dataclass(frozen=True)
class Setting:
    """One environment variable: how to read it and what it means."""

    name: str  # attribute name on Settings
    env: str
    kind: str  # the type as the README states it
    default: str
    parse: Callable[[str], Any]
    help: str
    secret: bool = False  # never shown, not even in an error message


def _integer(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError("not a whole number") from None
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}")
        return value

    return parse


def _seconds(low: float, high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError("not a number of seconds") from None
        if not low <= value <= high:
            raise ValueError(f"must be between {low:g} and {high:g} seconds")
        return value

    return parse


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _urls(schemes: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        urls = tuple(part.strip() for part in text.split(",") if part.strip())
        if not urls:
            raise ValueError("no URL given")
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme not in schemes:
                wanted = " or ".join(f"{s}://" for s in schemes)
                raise ValueError(f"{_redact(url)} does not start with {wanted}")
            if not parts.hostname:
                raise ValueError(f"{_redact(url)} names no host")
            try:
                _ = parts.port  # urlsplit checks the port only when asked
            except ValueError:
                raise ValueError(f"{_redact(url)} has a bad port") from None
        return urls

    return parse


def _single_url(schemes: tuple[str, ...]) -> Callable[[str], str]:
    many = _urls(schemes)

    def parse(text: str) -> str:
        urls = many(text)
        if len(urls) != 1:
            raise ValueError("takes one URL, not a list")
        return urls[0]

    return parse


def _redis_url(text: str) -> str:
    """One redis:// or rediss:// URL whose query redis-py understands, its
    scheme in lower case (the rest of the gateway tells TLS by it)."""
    scheme, sep, rest = _single_url(("redis", "rediss"))(text).partition("://")
    url = scheme.lower() + sep + rest
    path = urlsplit(url).path
    if path not in ("", "/") and not re.fullmatch(r"/[0-9]+", path):
        # redis-py would quietly use database 0.
        raise ValueError(
            f"{_redact(url)}: its path must be a database number, as in /0, "
            f"not {path!r}"
        )
    from redis.asyncio.connection import Connection, SSLConnection, parse_url

    try:
        options = parse_url(url)
        options.pop("connection_class", None)
        if options.get("decode_responses"):
            raise ValueError("decode_responses: the gateway reads replies as bytes")
        (SSLConnection if url.startswith("rediss://") else Connection)(**options)
    except (TypeError, ValueError) as exc:
        # redis-py passes an unknown query parameter on as an argument,
        # which fails only when the first connection is made.
        raise ValueError(f"redis-py cannot use its query: {exc}") from None
    return url


def _bind(text: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host:
        raise ValueError("must be HOST:PORT")
    host = host.strip("[]")
    port_number = _integer(0, 65535)(port)
    return host, port_number


def _key(text: str) -> str:
    if not text or any(ch.isspace() for ch in text):
        raise ValueError("must be a non-empty name without whitespace")
    return text


def _path(text: str) -> str:
    if not text:
        raise ValueError("must not be empty")
    return os.path.abspath(text)


def _optional_file(text: str) -> str:
    # Checked at startup: a missing file would otherwise surface as a
    # connection error retried for ever.
    if not text:
        return ""
    path = os.path.abspath(text)
    if not os.path.isfile(path):
        what = "a folder, not a file" if os.path.isdir(path) else "no such file"
        raise ValueError(f"{what}: {path}")
    return path


def _nkey_seed_file(text: str) -> str:
    # nats-py reads the seed only when it connects, and a bad one raised out
    # of its connect: the process died with a traceback, and was restarted.
    path = _optional_file(text)
    if path and not _is_seed(_read(path).strip()):
        raise ValueError("holds no NKey seed (one line, starting with S)")
    return path


def _creds_file(text: str) -> str:
    # Read by nats-py only when it connects; one without its JWT line made
    # nats-py's reader loop for ever.
    path = _optional_file(text)
    if not path:
        return ""
    lines = _read(path).splitlines()
    if not _line_after(lines, b"-----BEGIN NATS USER JWT-----"):
        raise ValueError("holds no user JWT (-----BEGIN NATS USER JWT----- block)")
    if not _is_seed(_line_after(lines, b"-----BEGIN USER NKEY SEED-----")):
        raise ValueError(
            "holds no user NKey seed (-----BEGIN USER NKEY SEED----- block)"
        )
    return path


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise ValueError(f"cannot read it ({exc.strerror or exc})") from None


def _line_after(lines: list[bytes], marker: bytes) -> bytes:
    """The line after the first that holds ``marker``, stripped; b"" if none."""
    for line, following in zip(lines, lines[1:], strict=False):
        if marker in line:
            return following.strip()
    return b""


def _is_seed(seed: bytes) -> bool:
    """Whether nkeys (nats-py's own NKey library) takes ``seed``."""
    import nkeys

    try:
        nkeys.from_seed(bytearray(seed)).wipe()
    except (nkeys.NkeysError, ValueError):
        return False
    return True


def _subject(text: str) -> str:
    _key(text)
    problem = subject_problem(text)
    if problem:
        raise ValueError(
            f"not a NATS subject the ingress can subscribe to: it {problem}"
        )
    # The subjects no client may publish to are no ingress either: the
    # gateway would listen on the server's own APIs or on others' replies.
    for prefix, why in RESERVED_PREFIXES.items():
        if text.startswith(prefix):
            raise ValueError(
                f"not a NATS subject for the ingress: it is reserved: {why}"
            )
    return text


def _consumer_name(text: str) -> str:
    # The name ends the consumer's Redis keys, which the other consumers find
    # with a SCAN pattern, and it is in their log lines: no pattern
    # characters, nothing that reads as two names. ':' is allowed, as in the
    # default name (host:process).
    if text and not (len(text) <= MAX_CONSUMER_NAME and _CONSUMER_NAME.fullmatch(text)):
        raise ValueError(
            f"must be 1 to {MAX_CONSUMER_NAME} ASCII letters, digits, '.', '_', "
            "':' or '-' (or empty, for the default name)"
        )
    return text


def _text(text: str) -> str:
    return text


def _level(text: str) -> str:
    level = text.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("must be debug, info, warning or error")
    return level


def _redact(url: str) -> str:
    """The URL with any password replaced, fit for a log line."""
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    # What follows the credentials, as written: reading ``parts.port``
    # raises on a bad port, which the caller is about to report.
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"***@{host}").geturl()


redact_url = _redact

SETTINGS: tuple[Setting, ...] = (
    Setting(
        "nats_urls",
        "FANOUT_NATS_URL",
        "URL list",
        "nats://127.0.0.1:4222",
        _urls(("nats", "tls")),
        "NATS server(s) for the ingress subject and the topics; a "
        "comma-separated list is a cluster. Unset: run an embedded nats-server.",
    ),
    Setting(
        "redis_url",
        "FANOUT_REDIS_URL",
        "URL",
        "redis://127.0.0.1:6379/0",
        _redis_url,
        "Redis server for the ingress list, the audit log and the dead-letter "
        "list. Unset: run an embedded Redis-compatible server.",
    ),
    Setting(
        "embedded_nats_port",
        "FANOUT_EMBEDDED_NATS_PORT",
        "port",
        "4222",
        _integer(1, 65535),
        "Port of the embedded nats-server, used only when FANOUT_NATS_URL is unset.",
    ),
    Setting(
        "embedded_redis_port",
        "FANOUT_EMBEDDED_REDIS_PORT",
        "port",
        "6379",
        _integer(1, 65535),
        "Port of the embedded Redis-compatible server, used only when "
        "FANOUT_REDIS_URL is unset.",
    ),
    Setting(
        "http_bind",
        "FANOUT_HTTP_BIND",
        "HOST:PORT",
        "127.0.0.1:8080",
        _bind,
        "Where the HTTP ingress listens.",
    ),
    Setting(
        "ws_bind",
        "FANOUT_WS_BIND",
        "HOST:PORT",
        "127.0.0.1:8081",
        _bind,
        "Where the WebSocket ingress listens.",
    ),
    Setting(
        "ingress_list",
        "FANOUT_INGRESS_LIST",
        "Redis key",
        "MESSAGES",
        _key,
        "Redis list the Redis ingress consumes.",
    ),
    Setting(
        "ingress_subject",
        "FANOUT_INGRESS_SUBJECT",
        "NATS subject",
        "MESSAGES",
        _subject,
        "NATS subject the NATS ingress subscribes to; not under $ or _INBOX.",
    ),
    Setting(
        "log_list",
        "FANOUT_LOG_LIST",
        "Redis key",
        "MESSAGES:log",
        _key,
        "Redis list that holds the audit log of accepted messages.",
    ),
    Setting(
        "dead_list",
        "FANOUT_DEAD_LIST",
        "Redis key",
        "MESSAGES:dead",
        _key,
        "Redis list that keeps refused Redis and NATS ingress items, with the reason.",
    ),
    Setting(
        "http_workers",
        "FANOUT_HTTP_WORKERS",
        "integer",
        "2",
        _integer(1, 64),
        "Number of gunicorn worker processes for the HTTP ingress.",
    ),
    Setting(
        "redis_consumers",
        "FANOUT_REDIS_CONSUMERS",
        "integer",
        "1",
        _integer(1, 64),
        "Number of Redis ingress consumer processes.",
    ),
    Setting(
        "nats_consumers",
        "FANOUT_NATS_CONSUMERS",
        "integer",
        "1",
        _integer(1, 64),
        "Number of NATS ingress consumer processes.",
    ),
    Setting(
        "log_dir",
        "FANOUT_LOG_DIR",
        "path",
        "var/log",
        _path,
        "Directory of the per-process log files (relative to the working directory).",
    ),
    Setting(
        "run_dir",
        "FANOUT_RUN_DIR",
        "path",
        "var/run",
        _path,
        "Directory of the embedded brokers' data (the Redis append-only file).",
    ),
    Setting(
        "log_level",
        "FANOUT_LOG_LEVEL",
        "level",
        "info",
        _level,
        "Least severe log level written: debug, info, warning or error.",
    ),
    Setting(
        "confirm",
        "FANOUT_CONFIRM",
        "boolean",
        "true",
        _boolean,
        "HTTP and WebSocket answer only after NATS confirmed the message and "
        "its audit entry is written. false: answer on receipt "
        "(fire-and-forget).",
    ),
    Setting(
        "publish_timeout",
        "FANOUT_PUBLISH_TIMEOUT",
        "seconds",
        "5",
        _seconds(0.1, 300),
        "How long a message waits for NATS and Redis before it is refused "
        "as retryable.",
    ),
    Setting(
        "max_pending",
        "FANOUT_MAX_PENDING",
        "integer",
        "20000",
        _integer(1, 10_000_000),
        "Unconfirmed messages one process may hold; beyond it new ones are "
        "refused as retryable.",
    ),
    Setting(
        "batch_size",
        "FANOUT_BATCH_SIZE",
        "integer",
        "2000",
        _integer(1, 100_000),
        "Most messages published, logged and confirmed together in one batch "
        "(a batch also stops at 8 MiB of messages).",
    ),
    Setting(
        "max_message_bytes",
        "FANOUT_MAX_MESSAGE_BYTES",
        "bytes",
        "1048576",
        _integer(64, 64 * 1024 * 1024),
        "Largest message accepted (an HTTP body or one message of a bulk "
        "request, a frame, a list item).",
    ),
    Setting(
        "max_bulk_messages",
        "FANOUT_MAX_BULK_MESSAGES",
        "integer",
        "1000",
        _integer(1, 100_000),
        "Most messages one bulk HTTP request (JSON array or NDJSON) may carry; "
        "beyond it the request gets 413.",
    ),
    Setting(
        "max_bulk_bytes",
        "FANOUT_MAX_BULK_BYTES",
        "bytes",
        "16777216",
        _integer(64, 256 * 1024 * 1024),
        "Largest bulk HTTP request body; each message in it is still held to "
        "FANOUT_MAX_MESSAGE_BYTES.",
    ),
    Setting(
        "redis_block_timeout",
        "FANOUT_REDIS_BLOCK_TIMEOUT",
        "seconds",
        "5",
        _seconds(0.1, 3600),
        "How long one blocking wait on the ingress list lasts before it is renewed.",
    ),
    Setting(
        "redis_pool_size",
        "FANOUT_REDIS_POOL_SIZE",
        "integer",
        "16",
        _integer(1, 1024),
        "Redis connections a process opens for pipelines (the NATS "
        "consumer's audit writes; a caller waits for a free one), besides "
        "the one its commands share.",
    ),
    Setting(
        "consumer_name",
        "FANOUT_CONSUMER_NAME",
        "string",
        "",
        _consumer_name,
        "Name of a Redis consumer's processing list, up to 64 ASCII letters, "
        "digits, ., _, : and -; one name per consumer (`fanout run` refuses it with "
        "FANOUT_REDIS_CONSUMERS above 1). Empty: host name and supervisord "
        "process name.",
    ),
    Setting(
        "consumer_ttl",
        "FANOUT_CONSUMER_TTL",
        "seconds",
        "15",
        _seconds(1, 3600),
        "A Redis consumer silent this long counts as dead; a live one then "
        "takes over its unfinished items.",
    ),
    Setting(
        "shutdown_timeout",
        "FANOUT_SHUTDOWN_TIMEOUT",
        "seconds",
        "10",
        _seconds(1, 25),
        "How long a stopping process may take to finish and flush what it "
        "holds (supervisord waits 30 s).",
    ),
    Setting(
        "allowed_topics",
        "FANOUT_ALLOWED_TOPICS",
        "pattern list",
        "",
        parse_patterns,
        "Comma-separated NATS subject patterns (* one token, > the rest) that "
        "clients may publish to. Empty: any topic not reserved or denied.",
    ),
    Setting(
        "denied_topics",
        "FANOUT_DENIED_TOPICS",
        "pattern list",
        "",
        parse_patterns,
        "Comma-separated NATS subject patterns clients may never publish to; "
        "deny wins over allow. $... and _INBOX. are refused regardless.",
    ),
    Setting(
        "tokens_file",
        "FANOUT_TOKENS_FILE",
        "path",
        "",
        tokens.read_file,
        "File of client tokens for HTTP and WebSocket, one NAME VALUE "
        "[PATTERNS] a line. With no token declared, clients need none.",
    ),
    Setting(
        "tokens",
        "FANOUT_TOKENS",
        "token list",
        "",
        tokens.parse_env,
        "More client tokens, NAME VALUE [PATTERNS] entries separated by ;.",
        secret=True,
    ),
    Setting(
        "http_header_timeout",
        "FANOUT_HTTP_HEADER_TIMEOUT",
        "seconds",
        "10",
        _seconds(0.5, 300),
        "How long an HTTP client may take to send a request's headers "
        "(from connecting, or from starting the request) before it is cut off.",
    ),
    Setting(
        "http_body_timeout",
        "FANOUT_HTTP_BODY_TIMEOUT",
        "seconds",
        "30",
        _seconds(0.5, 300),
        "How long an HTTP client may take to send a request's body; then 408.",
    ),
    Setting(
        "http_max_connections",
        "FANOUT_HTTP_MAX_CONNECTIONS",
        "integer",
        "1000",
        _integer(1, 100_000),
        "Open connections one HTTP worker serves; beyond it requests get 503.",
    ),
    Setting(
        "ws_max_connections",
        "FANOUT_WS_MAX_CONNECTIONS",
        "integer",
        "1000",
        _integer(1, 100_000),
        "Open connections one WebSocket process serves; beyond it the "
        "handshake gets 503.",
    ),
    Setting(
        "ws_ping_interval",
        "FANOUT_WS_PING_INTERVAL",
        "seconds",
        "20",
        _seconds(0.5, 3600),
        "How often the WebSocket ingress pings each client; a client that "
        "does not answer within the same time is disconnected.",
    ),
    Setting(
        "ws_idle_timeout",
        "FANOUT_WS_IDLE_TIMEOUT",
        "seconds",
        "300",
        _seconds(0.5, 86400),
        "A WebSocket connection that sends no message for this long is closed (1001).",
    ),
    Setting(
        "ws_compression",
        "FANOUT_WS_COMPRESSION",
        "boolean",
        "false",
        _boolean,
        "Offer permessage-deflate to WebSocket clients. Off by default: it "
        "costs memory on every connection.",
    ),
    Setting(
        "nats_user",
        "FANOUT_NATS_USER",
        "string",
        "",
        _text,
        "User name the gateway gives NATS (with FANOUT_NATS_PASSWORD).",
    ),
    Setting(
        "nats_password",
        "FANOUT_NATS_PASSWORD",
        "secret",
        "",
        _text,
        "Password for FANOUT_NATS_USER.",
        secret=True,
    ),
    Setting(
        "nats_token",
        "FANOUT_NATS_TOKEN",
        "secret",
        "",
        _text,
        "Token the gateway gives NATS, for a server started with token auth.",
        secret=True,
    ),
    Setting(
        "nats_nkey_seed_file",
        "FANOUT_NATS_NKEY_SEED_FILE",
        "path",
        "",
        _nkey_seed_file,
        "File holding the gateway's NKey seed, for NKey auth.",
    ),
    Setting(
        "nats_creds_file",
        "FANOUT_NATS_CREDS_FILE",
        "path",
        "",
        _creds_file,
        "A .creds file (user JWT and NKey seed), for decentralized auth.",
    ),
    Setting(
        "nats_tls_ca",
        "FANOUT_NATS_TLS_CA",
        "path",
        "",
        _optional_file,
        "CA bundle to verify the NATS server with; setting it turns TLS on.",
    ),
    Setting(
        "nats_tls_cert",
        "FANOUT_NATS_TLS_CERT",
        "path",
        "",
        _optional_file,
        "Client certificate for NATS TLS (with FANOUT_NATS_TLS_KEY).",
    ),
    Setting(
        "nats_tls_key",
        "FANOUT_NATS_TLS_KEY",
        "path",
        "",
        _optional_file,
        "Private key of FANOUT_NATS_TLS_CERT.",
    ),
    Setting(
        "redis_username",
        "FANOUT_REDIS_USERNAME",
        "string",
        "",
        _text,
        "Redis ACL user (overrides one in FANOUT_REDIS_URL).",
    ),
    Setting(
        "redis_password",
        "FANOUT_REDIS_PASSWORD",
        "secret",
        "",
        _text,
        "Redis password, for requirepass or the ACL user (overrides one in "
        "FANOUT_REDIS_URL).",
        secret=True,
    ),
    Setting(
        "redis_tls_ca",
        "FANOUT_REDIS_TLS_CA",
        "path",
        "",
        _optional_file,
        "CA bundle to verify Redis with; only with a rediss:// URL.",
    ),
    Setting(
        "redis_tls_cert",
        "FANOUT_REDIS_TLS_CERT",
        "path",
        "",
        _optional_file,
        "Client certificate for Redis TLS (with FANOUT_REDIS_TLS_KEY); only "
        "with a rediss:// URL.",
    ),
    Setting(
        "redis_tls_key",
        "FANOUT_REDIS_TLS_KEY",
        "path",
        "",
        _optional_file,
        "Private key of FANOUT_REDIS_TLS_CERT.",
    ),
)


class Settings:
    """The validated settings: one read-only attribute per :data:`SETTINGS`."""

    def __init__(self, values: Mapping[str, Any], embedded: frozenset[str]):
        self.__dict__.update(values)
        self.__dict__["embedded"] = embedded

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("settings are read-only")

    @property
    def nats_url_list(self) -> list[str]:
        return list(self.nats_urls)


def load(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate every setting, or raise :class:`ConfigError`."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        text = environ.get(setting.env, setting.default)
        try:
            values[setting.name] = setting.parse(text)
        except ValueError as exc:
            shown = text
            if setting.secret:
                shown = "***"
            elif setting.kind.startswith("URL"):
                shown = ",".join(_redact(u.strip()) for u in text.split(","))
            raise ConfigError(f"{setting.env}={shown!r}: {exc}") from exc

    # An unset broker URL means "run our own broker on the embedded port".
    embedded = set()
    if not environ.get("FANOUT_NATS_URL"):
        embedded.add("nats")
        values["nats_urls"] = (f"nats://127.0.0.1:{values['embedded_nats_port']}",)
    if not environ.get("FANOUT_REDIS_URL"):
        embedded.add("redis")
        values["redis_url"] = f"redis://127.0.0.1:{values['embedded_redis_port']}/0"

    _check_keys(values)
    _check_tokens(values)
    _check_nats_credentials(values)
    _check_tls(values, embedded)
    _check_limits(values)
    _check_processes(values, embedded)
    return Settings(values, frozenset(embedded))


def _check_processes(values: Mapping[str, Any], embedded: set[str]) -> None:
    # The processes of one gateway listen on one host: each needs a port of
    # its own (a host bound to 0.0.0.0 takes the port on every address).
    ports = {
        "FANOUT_HTTP_BIND": values["http_bind"][1],
        "FANOUT_WS_BIND": values["ws_bind"][1],
    }
    if "nats" in embedded:
        ports["FANOUT_EMBEDDED_NATS_PORT"] = values["embedded_nats_port"]
    if "redis" in embedded:
        ports["FANOUT_EMBEDDED_REDIS_PORT"] = values["embedded_redis_port"]
    repeat = _first_repeat(ports)
    if repeat:
        first, env, port = repeat
        raise ConfigError(
            f"{first} and {env} both use port {port}; each process of the "
            "gateway needs a port of its own"
        )


def _first_repeat(named: Mapping[str, Any]) -> tuple[str, str, Any] | None:
    """The first value two settings share: (the earlier, the later, value)."""
    seen: dict[Any, str] = {}
    for env, value in named.items():
        if value in seen:
            return seen[value], env, value
        seen[value] = env
    return None


def _check_limits(values: Mapping[str, Any]) -> None:
    # A bulk request is taken whole or refused whole as retryable: one larger
    # than the pending limit would be refused for ever.
    if values["max_bulk_messages"] > values["max_pending"]:
        raise ConfigError(
            f"FANOUT_MAX_BULK_MESSAGES={values['max_bulk_messages']} is above "
            f"FANOUT_MAX_PENDING={values['max_pending']}: a bulk request that "
            "large could never be taken; lower the first or raise the second"
        )


def _check_keys(values: Mapping[str, Any]) -> None:
    # The original description named the ingress list and the audit log both
    # MESSAGES: the Redis consumer would then re-ingest its own log forever.
    lists = {
        "FANOUT_INGRESS_LIST": values["ingress_list"],
        "FANOUT_LOG_LIST": values["log_list"],
        "FANOUT_DEAD_LIST": values["dead_list"],
    }
    repeat = _first_repeat(lists)
    if repeat:
        first, env, key = repeat
        why = (
            "the gateway would consume its own output"
            if first == "FANOUT_INGRESS_LIST"
            else "audit entries and dead letters would be mixed in one list"
        )
        raise ConfigError(
            f"{first} and {env} are both {key!r}; the ingress list, the audit "
            f"log and the dead-letter list must be different lists, or {why}"
        )

    # A Redis consumer takes over every processing list it finds under the
    # ingress list's name, and writes its batch list and heartbeat there: an
    # audit log or dead-letter list among them would be re-ingested or
    # overwritten.
    for env in ("FANOUT_LOG_LIST", "FANOUT_DEAD_LIST"):
        for kind in CONSUMER_KEY_KINDS:
            prefix = f"{values['ingress_list']}:{kind}:"
            if lists[env].startswith(prefix):
                raise ConfigError(
                    f"{env}={lists[env]!r}: starts with {prefix!r}, where the "
                    "Redis consumers keep their own keys; a consumer would take "
                    "it for one of its own"
                )


def _check_tokens(values: Mapping[str, Any]) -> None:
    # Each source was checked on its own; the HTTP and WebSocket processes
    # take the two together.
    try:
        tokens.tokens_unique(
            [*values["tokens_file"], *values["tokens"]],
            "FANOUT_TOKENS_FILE and FANOUT_TOKENS",
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _check_nats_credentials(values: Mapping[str, Any]) -> None:
    ways = [
        env
        for env, name in (
            ("FANOUT_NATS_USER", "nats_user"),
            ("FANOUT_NATS_TOKEN", "nats_token"),
            ("FANOUT_NATS_NKEY_SEED_FILE", "nats_nkey_seed_file"),
            ("FANOUT_NATS_CREDS_FILE", "nats_creds_file"),
        )
        if values[name]
    ]
    # nats-py sends a URL's user or token only when no other way is set, so
    # with both the URL's would be dropped without a word.
    if any(_has_credentials(url) for url in values["nats_urls"]):
        ways.insert(0, "credentials in FANOUT_NATS_URL")
    if len(ways) > 1:
        raise ConfigError(
            f"{' and '.join(ways)} are set together; the gateway authenticates "
            "to NATS in one way"
        )
    if values["nats_password"] and not values["nats_user"]:
        raise ConfigError("FANOUT_NATS_PASSWORD is set without FANOUT_NATS_USER")
    if values["nats_user"] and not values["nats_password"]:
        raise ConfigError("FANOUT_NATS_USER is set without FANOUT_NATS_PASSWORD")


def _has_credentials(url: str) -> bool:
    parts = urlsplit(url)
    return bool(parts.username or parts.password)


TLS_PREFIXES = ("FANOUT_NATS_TLS", "FANOUT_REDIS_TLS")


def _tls_files(prefix: str, values: Mapping[str, Any]) -> dict[str, str]:
    """The CA, certificate and key files set under ``prefix``, by variable."""
    name = prefix.lower().removeprefix("fanout_")
    return {
        f"{prefix}_{part.upper()}": values[f"{name}_{part}"]
        for part in ("ca", "cert", "key")
    }


def _check_tls(values: Mapping[str, Any], embedded: set[str]) -> None:
    files = {prefix: _tls_files(prefix, values) for prefix in TLS_PREFIXES}
    for prefix, tls in files.items():
        _, cert, key = tls.values()
        if bool(cert) != bool(key):
            raise ConfigError(f"{prefix}_CERT and {prefix}_KEY go together")

    # redis-py reads the TLS files only for a rediss:// URL; over redis:// (the
    # embedded server's too) the connection would go out in clear text.
    if not values["redis_url"].startswith("rediss://"):
        for env, path in files["FANOUT_REDIS_TLS"].items():
            if path:
                url = (
                    "FANOUT_REDIS_URL is unset (the embedded Redis takes plain "
                    "redis://)"
                    if "redis" in embedded
                    else "FANOUT_REDIS_URL is not a rediss:// URL"
                )
                raise ConfigError(
                    f"{env} is set, but {url}; the TLS files would go unused"
                )

    for prefix, tls in files.items():
        _check_tls_loads(prefix, *tls.values())


def _check_tls_loads(prefix: str, ca: str, cert: str, key: str) -> None:
    """The TLS files load as OpenSSL will load them for each connection.

    A file that does not would fail every connection, and the clients retry
    a failed connection as an outage: the log would say the broker is
    unreachable for as long as the gateway runs.
    """
    if not (ca or cert):
        return
    try:
        context = ssl.create_default_context(cafile=ca or None)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"{prefix}_CA={ca!r}: OpenSSL finds no CA certificate in it "
            f"({_openssl_reason(exc)})"
        ) from exc
    if cert:
        try:
            context.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"{prefix}_CERT={cert!r} and {prefix}_KEY={key!r}: OpenSSL cannot "
                f"load them as a certificate and its private key "
                f"({_openssl_reason(exc)})"
            ) from exc


def _openssl_reason(exc: Exception) -> str:
    """OpenSSL's own words, without the line of CPython's source."""
    return re.sub(r"\s*\(_ssl\.c:\d+\)$", "", str(exc))


def load_or_exit(environ: Mapping[str, str] | None = None) -> Settings:
    """:func:`load`, or print one line and exit with :data:`EXIT_CONFIG`."""
    try:
        return load(environ)
    except ConfigError as exc:
        exit_bad_setting(str(exc))


def exit_bad_setting(reason: str) -> NoReturn:
    """One line on stderr and the exit status that tells a supervisor not to
    start the process again."""
    print(f"fanout: bad setting {reason}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_CONFIG)


def markdown_table() -> str:
    """The README's settings table, made from :data:`SETTINGS`."""
    rows = [
        "| Variable | Type | Default | Meaning |",
        "| --- | --- | --- | --- |",
    ]
    for s in SETTINGS:
        default = f"`{s.default}`" if s.default else "(empty)"
        rows.append(f"| `{s.env}` | {s.kind} | {default} | {s.help} |")
    return "\n".join(rows)


BEGIN_MARK = "<!-- settings:begin -->"
END_MARK = "<!-- settings:end -->"


def update_readme(path: str) -> None:
    """Rewrite the table between the settings marks in ``path``."""
    with open(path, encoding="utf-8") as readme:
        text = readme.read()
    head, _, rest = text.partition(BEGIN_MARK)
    _, _, tail = rest.partition(END_MARK)
    with open(path, "w", encoding="utf-8") as readme:
        readme.write(f"{head}{BEGIN_MARK}\n{markdown_table()}\n{END_MARK}{tail}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--update"]:
        update_readme(sys.argv[2])
    else:
        print(markdown_table())
