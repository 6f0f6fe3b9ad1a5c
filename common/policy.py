"""Which topics clients may publish to.

On NATS, publishing is enough to administer the server: a message on
``$JS.API.STREAM.DELETE.<name>`` deletes a stream, one on ``$KV.<bucket>.<key>``
rewrites a key-value entry, and ``_INBOX.`` subjects carry other clients'
replies. So every topic passes three walls, in this order:

1. reserved subjects are refused whatever the settings say: anything that
   starts with ``$`` or ``_INBOX.``, and the gateway's own ingress subject;
2. ``FANOUT_DENIED_TOPICS``: a topic matching any of these is refused;
3. ``FANOUT_ALLOWED_TOPICS`` (when set) and the client token's own patterns
   (when it has any): the topic must match one pattern of each.

Patterns are NATS subject patterns: ``*`` stands for one token, ``>`` (only
as the last token) for one or more. nats-py offers no public matcher, so
:func:`matches` is ours.
"""

from collections.abc import Iterable

from common.errors import RejectedError

RESERVED_PREFIXES = {
    "$": "subjects starting with $ belong to the NATS server "
    "(system, JetStream, key-value and object store APIs)",
    "_INBOX.": "_INBOX. subjects carry replies addressed to other clients",
}

Pattern = tuple[str, ...]  # a subject pattern split into its tokens


class TopicRefused(RejectedError):
    """The topic is a valid subject, but clients may not publish to it."""

    http_status = 403


def pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a subject pattern, or None."""
    if not pattern:
        return "is empty"
    tokens = pattern.split(".")
    for position, token in enumerate(tokens):
        if not token:
            return "has an empty token (leading, trailing or double dot)"
        if any(ch.isspace() or not ch.isprintable() for ch in token):
            return "contains whitespace or a control character"
        if token == ">" and position != len(tokens) - 1:
            return "has > before its last token"
        if token not in ("*", ">") and ("*" in token or ">" in token):
            return "has * or > inside a token; a wildcard is a whole token"
    return None


def parse_patterns(text: str) -> tuple[Pattern, ...]:
    """A comma-separated list of patterns, or ValueError naming the bad one."""
    patterns = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        problem = pattern_problem(part)
        if problem:
            raise ValueError(f"pattern {part!r} {problem}")
        patterns.append(tuple(part.split(".")))
    if text.strip() and not patterns:
        # Only commas: an allow-list that reads as none would allow every
        # topic.
        raise ValueError("holds no pattern, only separators")
    return tuple(patterns)


def matches(pattern: Pattern, subject: str) -> bool:
    """True when ``subject`` (a valid subject) matches ``pattern``."""
    tokens = subject.split(".")
    for position, want in enumerate(pattern):
        if want == ">":
            return len(tokens) > position
        if position >= len(tokens):
            return False
        if want != "*" and want != tokens[position]:
            return False
    return len(tokens) == len(pattern)


def shown(pattern: Pattern) -> str:
    return ".".join(pattern)


def reserved_problem(topic: str, ingress_subject: str) -> str | None:
    """Why ``topic`` is reserved (never open to clients), or None."""
    for prefix, why in RESERVED_PREFIXES.items():
        if topic.startswith(prefix):
            return f"is reserved: {why}"
    if topic == ingress_subject:
        return (
            "is the gateway's own ingress subject; publishing to it would "
            "loop back into the gateway"
        )
    return None


class TopicPolicy:
    """The allow and deny patterns of one gateway process."""

    def __init__(
        self,
        ingress_subject: str,
        allowed: Iterable[Pattern] = (),
        denied: Iterable[Pattern] = (),
    ):
        self.ingress_subject = ingress_subject
        self.allowed = tuple(allowed)
        self.denied = tuple(denied)

    @classmethod
    def from_settings(cls, settings) -> "TopicPolicy":
        return cls(
            settings.ingress_subject, settings.allowed_topics, settings.denied_topics
        )

    def check(self, topic: str, token_patterns: tuple[Pattern, ...] = ()) -> None:
        """Raise :class:`TopicRefused` unless clients may publish to ``topic``.

        ``topic`` must already be a valid subject. ``token_patterns`` are the
        patterns of the client's token; empty means the token adds no limit.
        """
        problem = reserved_problem(topic, self.ingress_subject)
        if problem:
            raise TopicRefused(f'"topic" {topic!r} {problem}')
        for pattern in self.denied:
            if matches(pattern, topic):
                raise TopicRefused(
                    f'"topic" {topic!r} matches {shown(pattern)!r} in '
                    "FANOUT_DENIED_TOPICS"
                )
        if self.allowed and not any(matches(p, topic) for p in self.allowed):
            raise TopicRefused(
                f'"topic" {topic!r} matches no pattern in FANOUT_ALLOWED_TOPICS'
            )
        if token_patterns and not any(matches(p, topic) for p in token_patterns):
            raise TopicRefused(
                f'"topic" {topic!r} is not among the topics this client\'s '
                "token may publish to"
            )
