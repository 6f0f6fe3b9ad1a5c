"""Turning what a client sent into a :class:`Message`, or a refusal.

Every ingress decodes JSON here, once, with orjson, so the same bytes get
the same decision on every front end. orjson refuses ``NaN`` and
``Infinity``, invalid UTF-8 and lone surrogates, and nesting deeper than
:data:`MAX_DEPTH` levels.

Two shapes are understood:

* the *envelope* ``{"message": <text or object>, "id": <optional>}``, the
  HTTP body of the original protocol description, where ``message`` is the
  JSON text of an object (or the object itself); a bulk HTTP request carries
  many envelopes, as a JSON array or as NDJSON lines (:func:`ndjson_lines`);
* the *bare* message object ``{"topic": ..., ...}``, what WebSocket frames,
  Redis list items and NATS ingress messages usually carry.

The payload published to NATS is the message JSON as the client sent it:
for a text ``message`` its UTF-8 bytes unchanged, for an object ``message``
its compact serialization, for a bare message the bytes received.
"""

import itertools
import os
import re
import time
from dataclasses import dataclass

import orjson

from common.errors import BulkTooLarge, MessageTooLarge, RejectedError
from common.policy import Pattern, TopicPolicy

MAX_DEPTH = 1024  # nesting levels; orjson's own limit, refused beyond it
MAX_OBJECT_DEPTH = 254  # levels orjson can write back, for an object "message"
# The audit entry holds the message one level down, and must stay readable
# by the same parser: a message may nest one level less than orjson reads.
MAX_MESSAGE_DEPTH = MAX_DEPTH - 1
MAX_TOPIC_LENGTH = 256  # characters
MAX_ID_LENGTH = 128  # characters
KNOWN_TOPICS = 10_000  # topics remembered as allowed, per parser
# What a published message carries besides its payload: the Nats-Msg-Id
# header and its framing. NATS counts both against the server's max_payload.
HEADER_ALLOWANCE = 256  # bytes

_TOKEN = r"[^\s.*>\x00-\x1f\x7f-\x9f]+"
_VALID_SUBJECT = re.compile(rf"{_TOKEN}(?:\.{_TOKEN})*")
# An HTTP body is a bulk request when its first byte other than whitespace,
# within this many bytes, is "["; HTTP reads this much before it chooses a
# body's limit, since only an array may be larger than one message.
BULK_PEEK = 4096
VALID_ID = re.compile(r"[A-Za-z0-9._:\-]+", re.ASCII)


@dataclass(slots=True)
class Message:
    """One accepted message on its way to NATS and the audit log."""

    id: str
    topic: str
    payload: bytes  # published to the topic unchanged
    ingress: str  # http, ws, redis or nats
    received_at: float  # seconds since the epoch


class MessageIds:
    """Message ids unique across processes: a random prefix and a counter.

    Cheaper than a uuid4 per message, and sortable within one process.
    """

    def __init__(self, prefix: str | None = None):
        self.prefix = prefix or os.urandom(6).hex()
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self.prefix}-{next(self._counter):x}"


def describe(value: object) -> str:
    """A JSON type name for an error message: 'a number', 'an array'..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def subject_problem(subject: str) -> str | None:
    """Why ``subject`` is not a valid NATS subject to publish to, or None."""
    if len(subject) > MAX_TOPIC_LENGTH:
        return f"is longer than {MAX_TOPIC_LENGTH} characters"
    # Checked here rather than left to nats-py, whose checks changed between
    # versions: CR, LF, space and tab would split the PUB line on the wire.
    if _VALID_SUBJECT.fullmatch(subject) and subject.isprintable():
        return None
    if not subject:
        return "is empty"
    if any(ch.isspace() or not ch.isprintable() for ch in subject):
        return "contains whitespace or a control character"
    if "*" in subject or ">" in subject:
        return "contains a wildcard (* or >)"
    return "has an empty token (leading, trailing or double dot)"


def check_topic(
    topic: object,
    ingress_subject: str,
    policy: TopicPolicy | None = None,
    token_patterns: tuple[Pattern, ...] = (),
) -> str:
    """Return ``topic`` if clients may publish to it, else raise why not.

    Without a ``policy`` only the reserved subjects are refused.
    """
    if not isinstance(topic, str):
        raise RejectedError(f'"topic" must be a string, not {describe(topic)}')
    problem = subject_problem(topic)
    if problem:
        raise RejectedError(f'"topic" {topic!r} {problem}')
    (policy or TopicPolicy(ingress_subject)).check(topic, token_patterns)
    return topic


def _loads(data: bytes | str, what: str) -> object:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        reason = str(exc)
        if "depth limit" in reason or "recursion" in reason:
            reason = f"nested deeper than {MAX_DEPTH} levels"
        elif "not valid UTF-8" in reason:
            # orjson says "surrogates not allowed" for any bad byte.
            raise RejectedError(f"{what} is not valid UTF-8") from None
        raise RejectedError(f"{what} is not valid JSON: {reason}") from None


def _nests_too_deep(payload: bytes) -> bool:
    """Whether ``payload``, read whole already, nests MAX_DEPTH levels."""
    if payload.count(b"{") + payload.count(b"[") < MAX_DEPTH:
        return False
    try:
        orjson.loads(b"[" + payload + b"]")
    except orjson.JSONDecodeError:
        return True
    return False


def ndjson_lines(body: bytes) -> list[tuple[int, bytes]]:
    """The non-blank lines of an NDJSON body, each with its 1-based number.

    Lines end with LF; a CR before it is JSON whitespace, so CRLF works too.
    """
    return [
        (number, line)
        for number, line in enumerate(body.split(b"\n"), 1)
        if line.strip(b" \t\r")
    ]


def _check_count(count: int, max_count: int) -> None:
    if count > max_count:
        raise BulkTooLarge(
            f"request holds {count} envelopes; the limit is {max_count} "
            "(FANOUT_MAX_BULK_MESSAGES)"
        )


def _check_id(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise RejectedError(f'"id" must be a string, not {describe(value)}')
    if not 0 < len(value) <= MAX_ID_LENGTH or not VALID_ID.fullmatch(value):
        raise RejectedError(
            f'"id" must be 1 to {MAX_ID_LENGTH} characters of letters, digits '
            "and . _ : -"
        )
    return value


class Parser:
    """Parses and validates messages for one ingress."""

    def __init__(
        self,
        ingress: str,
        ingress_subject: str,
        max_bytes: int,
        ids: MessageIds | None = None,
        clock=time.time,
        policy: TopicPolicy | None = None,
    ):
        self.ingress = ingress
        self.ingress_subject = ingress_subject
        self.max_bytes = max_bytes
        self.ids = ids or MessageIds()
        self.clock = clock
        self.policy = policy or TopicPolicy(ingress_subject)
        # PERF: the subject and policy checks cost more than decoding a
        # small message, and producers reuse a few topics; the policy never
        # changes while the process runs.
        self._allowed: set[str] = set()

    @classmethod
    def for_ingress(cls, ingress: str, settings) -> "Parser":
        """The parser an ingress process uses, from its settings."""
        return cls(
            ingress,
            settings.ingress_subject,
            settings.max_message_bytes,
            policy=TopicPolicy.from_settings(settings),
        )

    def limit_to(self, max_payload: int) -> None:
        """Never accept more than the NATS server will take (its max_payload).

        Called once NATS is connected; a message the server would refuse
        must be refused here, or a consumer would retry it forever.
        """
        self.max_bytes = min(self.max_bytes, max_payload - HEADER_ALLOWANCE)

    def check_size(self, size: int) -> None:
        if size > self.max_bytes:
            raise MessageTooLarge(
                f"message is {size} bytes; the limit is {self.max_bytes} bytes"
            )

    def check_body_size(self, size: int) -> None:
        """An HTTP body of one message is held to the message limit whole."""
        if size > self.max_bytes:
            raise MessageTooLarge(
                f"request body is {size} bytes; the limit for one message, its "
                f"envelope included, is {self.max_bytes} bytes"
            )

    def envelope(
        self,
        body: bytes,
        token_patterns: tuple[Pattern, ...] = (),
        received_at: float | None = None,
    ) -> Message:
        """An HTTP body: ``{"message": <JSON text or object>, "id": ...}``.

        ``token_patterns`` are the topic patterns of the client's token;
        ``received_at`` is the parser's clock when not given.
        """
        self.check_body_size(len(body))
        if not body.strip():
            raise RejectedError("request body is empty; send a JSON object")
        document = _loads(body, "request body")
        if not isinstance(document, dict):
            if isinstance(document, list):
                # Only an array that the bulk check did not see.
                raise RejectedError(
                    f"request body is an array whose [ comes after its first "
                    f"{BULK_PEEK} bytes; a bulk request's must come within them"
                )
            raise RejectedError(
                'request body must be a JSON object with a "message" field '
                f"or an array of them, not {describe(document)}"
            )
        return self._from_envelope(
            document, None, token_patterns, received_at=received_at
        )

    def item(
        self,
        document: object,
        token_patterns: tuple[Pattern, ...] = (),
        received_at: float | None = None,
    ) -> Message:
        """One envelope of a bulk request, already decoded with the body."""
        if not isinstance(document, dict):
            raise RejectedError(
                'envelope must be a JSON object with a "message" field, '
                f"not {describe(document)}"
            )
        return self._from_envelope(
            document, None, token_patterns, "envelope", received_at
        )

    def array(
        self,
        body: bytes,
        max_count: int,
        token_patterns: tuple[Pattern, ...] = (),
    ) -> list[Message | RejectedError]:
        """A bulk JSON body: an array of envelopes, one outcome each, in order.

        Only a body that is not an array at all, an empty one or one with
        more than ``max_count`` envelopes is refused whole.
        """
        documents = _loads(body, "request body")
        if not isinstance(documents, list):
            raise RejectedError(
                f"request body must be a JSON array of envelopes, not "
                f"{describe(documents)}"
            )
        if not documents:
            raise RejectedError(
                "request body is an empty array; send at least one envelope"
            )
        _check_count(len(documents), max_count)
        return self._outcomes(((d, None) for d in documents), token_patterns)

    def ndjson(
        self,
        body: bytes,
        max_count: int,
        token_patterns: tuple[Pattern, ...] = (),
    ) -> list[Message | RejectedError]:
        """A bulk NDJSON body: one envelope a line, one outcome each, in order.

        A line that is not valid JSON is that line's error only; blank lines
        are skipped and get no outcome.
        """
        lines = ndjson_lines(body)
        if not lines:
            raise RejectedError(
                "request body has no envelope; send one JSON envelope per line"
            )

        # Counted before any line is decoded, so an oversized request costs
        # no parsing.
        _check_count(len(lines), max_count)
        return self._outcomes(
            ((line, f"line {number}") for number, line in lines), token_patterns
        )

    def _outcomes(self, items, token_patterns) -> list[Message | RejectedError]:
        """Each ``(document or JSON line, what to call it)`` as a message or
        as its refusal; a line is decoded first (``None``: already decoded).
        The messages of one request share its ``received_at``."""
        outcomes: list[Message | RejectedError] = []
        now = self.clock()
        for document, line_name in items:
            try:
                if line_name is not None:
                    document = _loads(document, line_name)
                outcomes.append(self.item(document, token_patterns, now))
            except RejectedError as exc:
                outcomes.append(exc)
        return outcomes

    def bare(
        self,
        data: bytes,
        default_id: str | None = None,
        token_patterns: tuple[Pattern, ...] = (),
        received_at: float | None = None,
    ) -> Message:
        """A frame or queue item: the message object, or an envelope.

        ``default_id`` is the id to use when the sender gave none (the Redis
        consumer assigns ids when it takes items, so that a redelivered item
        keeps its id). ``received_at`` is the time the item was taken, when
        a whole batch was taken at once; the parser's clock otherwise.
        """
        self.check_size(len(data))
        document = _loads(data, "message")
        if not isinstance(document, dict):
            raise RejectedError(
                f"message must be a JSON object, not {describe(document)}"
            )
        if "topic" not in document and "message" in document:
            return self._from_envelope(
                document, default_id, token_patterns, received_at=received_at
            )
        return self._accept(document, data, default_id, token_patterns, received_at)

    def frame(
        self,
        data: bytes,
        token_patterns: tuple[Pattern, ...] = (),
        received_at: float | None = None,
    ) -> Message:
        """A WebSocket frame: :meth:`bare`, with an id of Fanout's unless the
        frame is an envelope that names one."""
        return self.bare(data, None, token_patterns, received_at)

    def _from_envelope(
        self,
        document: dict,
        default_id: str | None,
        token_patterns: tuple[Pattern, ...],
        what: str = "request body",
        received_at: float | None = None,
    ) -> Message:
        if "message" not in document:
            raise RejectedError(f'{what} has no "message" field')
        message_id = _check_id(document.get("id")) or default_id
        inner = document["message"]
        if isinstance(inner, str):
            if not inner:
                raise RejectedError(
                    '"message" is an empty string; it must hold a JSON object'
                )
            payload = inner.encode()
            # The payload is what NATS receives. A single body was measured
            # whole already; an envelope of a bulk request was not.
            self.check_size(len(payload))
            parsed = _loads(payload, '"message"')
            if not isinstance(parsed, dict):
                raise RejectedError(
                    f'"message" must hold a JSON object, not {describe(parsed)}'
                )
            return self._accept(
                parsed, payload, message_id, token_patterns, received_at
            )
        if isinstance(inner, dict):
            try:
                payload = orjson.dumps(inner)
            except TypeError:
                # orjson writes at most MAX_OBJECT_DEPTH levels, fewer than it
                # reads; the same message as JSON text is published unchanged.
                raise RejectedError(
                    f'"message" is nested deeper than {MAX_OBJECT_DEPTH} levels, '
                    "the most an object message may have; send it as JSON text"
                ) from None
            # Not always shorter than the text it came from: 1e5 becomes
            # 100000.0.
            self.check_size(len(payload))
            return self._accept(inner, payload, message_id, token_patterns, received_at)
        raise RejectedError(
            '"message" must be a JSON object or a string holding one, '
            f"not {describe(inner)}"
        )

    def _accept(
        self,
        obj: dict,
        payload: bytes,
        message_id: str | None,
        token_patterns: tuple[Pattern, ...],
        received_at: float | None = None,
    ) -> Message:
        # PERF: only a payload of 2 bytes a level can be that deep.
        if len(payload) >= 2 * MAX_DEPTH and _nests_too_deep(payload):
            raise RejectedError(
                f"message is nested deeper than {MAX_MESSAGE_DEPTH} levels, the "
                "most its audit entry can hold"
            )
        topic = obj.get("topic")
        if token_patterns or type(topic) is not str or topic not in self._allowed:
            if "topic" not in obj:
                raise RejectedError('message has no "topic" field')
            check_topic(topic, self.ingress_subject, self.policy, token_patterns)
            if not token_patterns:
                if len(self._allowed) >= KNOWN_TOPICS:
                    self._allowed.clear()
                self._allowed.add(topic)
        return Message(
            message_id or self.ids.next(),
            topic,
            payload,
            self.ingress,
            received_at or self.clock(),
        )
