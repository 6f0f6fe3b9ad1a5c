"""Topic policy, tokens and the parser under hostile input (no servers)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import RejectedError
from common.message import MessageIds, Parser, subject_problem
from common.policy import TopicPolicy, TopicRefused, matches, parse_patterns
from common.tokens import Tokens, bearer, parse_env


def policy(allowed="", denied="") -> TopicPolicy:
    return TopicPolicy("MESSAGES", parse_patterns(allowed), parse_patterns(denied))


@pytest.mark.parametrize(
    "pattern,subject,expected",
    [
        ("a.b", "a.b", True),
        ("a.b", "a.b.c", False),
        ("a.*", "a.b", True),
        ("a.*", "a.b.c", False),
        ("a.>", "a.b.c", True),
        ("a.>", "a", False),
        (">", "x", True),
        ("*.b.>", "a.b.c", True),
        ("*.b.>", "a.c.d", False),
    ],
)
def test_pattern_matching(pattern, subject, expected):
    """* matches one token, > one or more at the end, as NATS does."""
    assert matches(tuple(pattern.split(".")), subject) is expected


@pytest.mark.parametrize(
    "text,error",
    [
        ("a.>.b", "pattern 'a.>.b' has > before its last token"),
        ("a..b", "pattern 'a..b' has an empty token (leading, trailing or double dot)"),
        (
            "a.b*",
            "pattern 'a.b*' has * or > inside a token; a wildcard is a whole token",
        ),
        ("a b", "pattern 'a b' contains whitespace or a control character"),
    ],
)
def test_bad_pattern_is_refused(text, error):
    """A malformed pattern in a setting is refused, naming it."""
    with pytest.raises(ValueError) as caught:
        parse_patterns(text)
    assert str(caught.value) == error


@pytest.mark.parametrize(
    "topic,error",
    [
        (
            "$JS.API.STREAM.DELETE.orders",
            "\"topic\" '$JS.API.STREAM.DELETE.orders' is reserved: subjects starting "
            "with $ belong to the NATS server (system, JetStream, key-value and "
            "object store APIs)",
        ),
        (
            "_INBOX.abc",
            "\"topic\" '_INBOX.abc' is reserved: _INBOX. subjects carry replies "
            "addressed to other clients",
        ),
        (
            "MESSAGES",
            "\"topic\" 'MESSAGES' is the gateway's own ingress subject; publishing "
            "to it would loop back into the gateway",
        ),
    ],
)
def test_reserved_topics_are_refused_even_when_allowed(topic, error):
    """Allowing > does not open $..., _INBOX. or the ingress subject."""
    with pytest.raises(TopicRefused) as caught:
        policy(allowed=">").check(topic)
    assert str(caught.value) == error


def test_deny_wins_over_allow():
    """A topic both allowed and denied is refused, naming the deny pattern."""
    rules = policy(allowed="internal.>", denied="internal.secret.>")
    rules.check("internal.a")
    with pytest.raises(TopicRefused) as caught:
        rules.check("internal.secret.keys")
    assert str(caught.value) == (
        "\"topic\" 'internal.secret.keys' matches 'internal.secret.>' in "
        "FANOUT_DENIED_TOPICS"
    )
    with pytest.raises(TopicRefused) as caught:
        rules.check("public.a")
    assert str(caught.value) == (
        "\"topic\" 'public.a' matches no pattern in FANOUT_ALLOWED_TOPICS"
    )


def test_token_patterns_narrow_the_policy():
    """A token's patterns are a further wall, inside the global policy."""
    with pytest.raises(TopicRefused) as caught:
        policy().check("b.x", parse_patterns("a.>"))
    assert str(caught.value) == (
        "\"topic\" 'b.x' is not among the topics this client's token may publish to"
    )
    policy().check("a.x", parse_patterns("a.>"))


def test_tokens_are_identified_by_value_and_never_shown():
    """A token is found by its value; its repr and errors name only the name."""
    tokens = Tokens(parse_env("alpha aaaaaaaaaaaaaaaa1 a.>;beta bbbbbbbbbbbbbbbb2"))
    assert tokens.identify("aaaaaaaaaaaaaaaa1").name == "alpha"
    assert tokens.identify("bbbbbbbbbbbbbbbb2").patterns == ()
    assert tokens.identify("wrong") is None
    assert tokens.identify(None) is None
    assert "aaaa" not in repr(tokens.tokens)
    with pytest.raises(ValueError) as caught:
        parse_env("gamma short")
    assert str(caught.value) == (
        "entry 1 (gamma): the value is shorter than 16 characters"
    )
    assert bearer("Bearer abc") == "abc"
    assert bearer("Basic abc") is None


HOSTILE_TOPICS = [
    ("a b", "contains whitespace or a control character"),
    ("a..b", "has an empty token (leading, trailing or double dot)"),
    (".x", "has an empty token (leading, trailing or double dot)"),
    ("x.", "has an empty token (leading, trailing or double dot)"),
    ("", "is empty"),
    ("a.*", "contains a wildcard (* or >)"),
    ("a.>", "contains a wildcard (* or >)"),
    ("a\r\nPUB x 2\r\nhi", "contains whitespace or a control character"),
    ("a\tb", "contains whitespace or a control character"),
    ("a\u2028b", "contains whitespace or a control character"),
    ("a\x85b", "contains whitespace or a control character"),
    ("x" * 257, "is longer than 256 characters"),
]


@pytest.mark.parametrize("topic,problem", HOSTILE_TOPICS)
def test_hostile_subjects_are_refused(topic, problem):
    """Each hostile subject from the security review gets its own reason."""
    assert subject_problem(topic) == problem


def parser() -> Parser:
    return Parser("ws", "MESSAGES", 4096, MessageIds("t"), policy=policy())


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_give_a_message_or_a_refusal(data):
    """Random bytes never raise anything but a refusal."""
    try:
        message = parser().bare(data)
    except RejectedError:
        return
    assert subject_problem(message.topic) is None


_json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=500, deadline=None)
@given(topic=_json_values, extra=_json_values)
def test_any_topic_value_is_accepted_only_when_valid(topic, extra):
    """Whatever "topic" holds, an accepted one is a valid, unreserved subject."""
    import orjson

    try:
        raw = orjson.dumps({"topic": topic, "x": extra})
    except (TypeError, orjson.JSONEncodeError):
        return
    try:
        message = parser().bare(raw)
    except RejectedError:
        return
    assert subject_problem(message.topic) is None
    assert not message.topic.startswith(("$", "_INBOX."))
    assert message.topic != "MESSAGES"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_subject_check_never_raises(text):
    """Any text gets a verdict; accepted subjects hold no space, dot run or wildcard."""
    problem = subject_problem(text)
    if problem is None:
        assert text and ".." not in text and not text.startswith(".")
        assert not any(ch.isspace() for ch in text)
        assert "*" not in text and ">" not in text
