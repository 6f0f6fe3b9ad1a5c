"""The JSON entries Fanout writes to Redis: audit log and dead-letter list."""

from datetime import UTC, datetime

import orjson

from common.message import Message


def utc_iso(timestamp: float) -> str:
    """``2026-12-03T21:53:23.123456Z`` for a time in seconds since the epoch."""
    stamp = datetime.fromtimestamp(timestamp, UTC)
    return stamp.isoformat(timespec="microseconds").replace("+00:00", "Z")


def audit_entry(message: Message) -> bytes:
    """One audit-log entry; the message is embedded as the JSON it arrived as."""
    return orjson.dumps(
        {
            "id": message.id,
            "received_at": utc_iso(message.received_at),
            "ingress": message.ingress,
            "topic": message.topic,
            "message": orjson.Fragment(message.payload),
        }
    )


def dead_entry(raw: bytes, reason: str, ingress: str, received_at: float) -> bytes:
    """One dead-letter entry: why the item was refused and its exact bytes.

    Bytes that are valid UTF-8 are kept as text under ``raw``; anything else
    is kept as hex under ``raw_hex``, so nothing is lost in the encoding.
    """
    entry: dict[str, str] = {
        "received_at": utc_iso(received_at),
        "ingress": ingress,
        "reason": reason,
    }
    try:
        entry["raw"] = raw.decode()
    except UnicodeDecodeError:
        entry["raw_hex"] = raw.hex()
    return orjson.dumps(entry)
