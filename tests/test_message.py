"""The parser: one decision per input, on every front end."""

import orjson
import pytest

from common.errors import MessageTooLarge, RejectedError
from common.message import MessageIds, Parser, subject_problem


@pytest.fixture
def parser():
    return Parser("ws", "MESSAGES", 4096, MessageIds("test"), clock=lambda: 1.5)


def test_bare_message_keeps_the_bytes_received(parser):
    """The payload of a bare message is exactly the input."""
    raw = b'{ "topic" : "a.b",  "x": 1 }'
    message = parser.bare(raw)
    assert (message.id, message.topic, message.payload) == ("test-1", "a.b", raw)
    assert (message.ingress, message.received_at) == ("ws", 1.5)


def test_envelope_text_payload_is_the_text(parser):
    """A text "message" is published as that text's UTF-8 bytes."""
    inner = '{"topic": "a", "v": "é"}'
    message = parser.envelope(orjson.dumps({"message": inner}))
    assert message.payload == inner.encode()


def test_default_id_is_used_when_the_sender_gave_none(parser):
    """A consumer-assigned id wins over a generated one, a sender's over both."""
    assert parser.bare(b'{"topic": "a"}', "r-1").id == "r-1"
    envelope = b'{"id": "mine", "message": {"topic": "a"}}'
    assert parser.bare(envelope, "r-2").id == "mine"


@pytest.mark.parametrize(
    "raw,error",
    [
        (
            b"NaN",
            "message is not valid JSON: unexpected character, expected a JSON "
            "value: line 1 column 1 (char 0)",
        ),
        (
            b'{"topic": "a", "v": Infinity}',
            "message is not valid JSON: unexpected "
            "character, expected a JSON value: line 1 column 21 (char 20)",
        ),
        (
            b'{"topic": "a", "v": "\\ud83d"}',
            "message is not valid JSON: no low "
            "surrogate in string: line 1 column 22 (char 21)",
        ),
        (
            b"[" * 1100 + b"]" * 1100,
            "message is not valid JSON: nested deeper than 1024 levels",
        ),
        (b'{"topic": "a", "message": 1, "id": 5}', None),
    ],
)
def test_json_edge_cases(parser, raw, error):
    """NaN, Infinity, lone surrogates and deep nesting are refused by name."""
    if error is None:
        assert parser.bare(raw).topic == "a"
        return
    with pytest.raises(RejectedError) as caught:
        parser.bare(raw)
    assert str(caught.value) == error


def test_surrogate_pair_is_accepted(parser):
    """A valid surrogate pair is a real character and is accepted."""
    assert parser.bare(b'{"topic": "a", "v": "\\ud83d\\ude00"}').topic == "a"


def test_oversize_input_is_refused_with_the_limit(parser):
    """Input over the maximum is refused naming both sizes."""
    with pytest.raises(MessageTooLarge) as caught:
        parser.bare(b'{"topic": "a", "pad": "' + b"x" * 5000 + b'"}')
    assert str(caught.value) == "message is 5025 bytes; the limit is 4096 bytes"


@pytest.mark.parametrize(
    "subject,problem",
    [
        ("a.b.c", None),
        ("", "is empty"),
        ("a b", "contains whitespace or a control character"),
        ("a\tb", "contains whitespace or a control character"),
        ("a\r\nPUB x 2\r\nhi", "contains whitespace or a control character"),
        ("a..b", "has an empty token (leading, trailing or double dot)"),
        (".x", "has an empty token (leading, trailing or double dot)"),
        ("x.", "has an empty token (leading, trailing or double dot)"),
        ("a.*", "contains a wildcard (* or >)"),
        ("a.>", "contains a wildcard (* or >)"),
        ("x" * 257, "is longer than 256 characters"),
    ],
)
def test_subject_syntax(subject, problem):
    """Fanout checks subject syntax itself, naming what is wrong."""
    assert subject_problem(subject) == problem


def test_deepest_message_keeps_a_readable_audit_entry():
    """The audit entry nests the message one level down: 1023 levels at most.

    orjson reads 1024 levels; a 1024-level message would be published with
    an audit entry that neither orjson nor a replay could read back.
    """
    from common.audit import audit_entry

    parser = Parser("ws", "MESSAGES", 1 << 20, MessageIds("test"), clock=lambda: 1.5)

    def nested(levels: int) -> bytes:
        return b'{"topic":"a","v":' + b"[" * (levels - 1) + b"]" * (levels - 1) + b"}"

    deepest = parser.bare(nested(1023))
    assert orjson.loads(audit_entry(deepest))["message"]["topic"] == "a"
    orjson.loads(nested(1024))  # valid JSON, within orjson's own limit
    with pytest.raises(RejectedError) as caught:
        parser.bare(nested(1024))
    assert str(caught.value) == (
        "message is nested deeper than 1023 levels, the most its audit entry can hold"
    )
