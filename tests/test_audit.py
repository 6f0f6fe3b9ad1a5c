"""Audit and dead-letter entries are JSON a reader can rely on."""

import time
from datetime import UTC, datetime

import orjson
from hypothesis import given
from hypothesis import strategies as st

from common.audit import audit_entry, dead_entry, utc_iso
from common.message import Message


@given(
    # Any id a message can have: a sender's is checked against this alphabet.
    message_id=st.from_regex(r"[A-Za-z0-9._:\-]{1,20}", fullmatch=True),
    topic=st.text(min_size=1, max_size=20),
    body=st.dictionaries(
        st.text(max_size=5), st.integers(-(2**63), 2**63 - 1) | st.text(max_size=5)
    ),
    stamp=st.floats(min_value=0, max_value=4e9),
)
def test_audit_entry_is_the_json_it_describes(message_id, topic, body, stamp):
    """Whatever the topic holds, and any id a message can have, the entry
    parses back to its fields."""
    payload = orjson.dumps(body)
    entry = orjson.loads(audit_entry(Message(message_id, topic, payload, "ws", stamp)))
    assert entry == {
        "id": message_id,
        "received_at": utc_iso(stamp),
        "ingress": "ws",
        "topic": topic,
        "message": body,
    }


@given(stamp=st.floats(min_value=0, max_value=4e9))
def test_utc_iso_is_the_utc_time_to_the_microsecond(stamp):
    """The cached formatting agrees with datetime, truncated to microseconds."""
    text = utc_iso(stamp)
    parsed = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs(parsed.timestamp() - stamp) < 2e-6
    assert text.endswith("Z")


def test_dead_entry_keeps_bytes_that_are_not_utf8():
    """Undecodable bytes are kept as hex, so nothing is lost in the encoding."""
    entry = orjson.loads(dead_entry(b"\xff{", "bad", "redis", time.time()))
    assert bytes.fromhex(entry["raw_hex"]) == b"\xff{"
    assert "raw" not in entry
