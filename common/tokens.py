"""Client tokens for the HTTP and WebSocket ingresses.

A token is declared as one entry ``NAME VALUE [PATTERNS]``: a name for the
log (the value never appears there), the secret value, and optionally the
comma-separated topic patterns this token may publish to. Entries come from
the file ``FANOUT_TOKENS_FILE`` (one a line; a line starting with ``#`` is
a comment) and from ``FANOUT_TOKENS`` (entries separated by ``;``), never
from the command line, where any user of the host could read them. No two
tokens, from either source, share a name or a value.

Only a SHA-256 digest of each value is kept; a presented value is hashed
and compared with every digest in constant time, so neither the answer's
timing nor a memory dump gives the values away.
"""

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass

from common.policy import Pattern, parse_patterns

MIN_TOKEN_LENGTH = 16  # characters; shorter values are refused as guessable


@dataclass(frozen=True)
class Token:
    name: str
    digest: bytes = b""  # SHA-256 of the value
    patterns: tuple[Pattern, ...] = ()  # empty: any topic the policy allows

    def __repr__(self) -> str:
        return f"Token({self.name!r})"


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


def parse_entries(entries: Iterable[str], item: str) -> tuple[Token, ...]:
    """Tokens from ``NAME VALUE [PATTERNS]`` entries; errors never quote a
    value, and name an entry as ``item`` and its number ("line 3")."""
    tokens = []
    for number, entry in enumerate(entries, 1):
        fields = entry.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) not in (2, 3):
            raise ValueError(
                f"{item} {number} has {len(fields)} fields; want NAME VALUE [PATTERNS]"
            )
        name, value = fields[0], fields[1]
        if len(value) < MIN_TOKEN_LENGTH:
            raise ValueError(
                f"{item} {number} ({name}): the value is shorter than "
                f"{MIN_TOKEN_LENGTH} characters"
            )
        patterns = parse_patterns(fields[2]) if len(fields) == 3 else ()
        tokens.append(Token(name, _digest(value), patterns))
    return tokens_unique(tokens)


def tokens_unique(tokens: list[Token], where: str = "") -> tuple[Token, ...]:
    """``tokens``, or ValueError (led by ``where``, if given) when two share a
    name or a value."""
    lead = f"{where}: " if where else ""
    names: set[str] = set()
    digests: set[bytes] = set()
    for token in tokens:
        if token.name in names:
            raise ValueError(
                f"{lead}two tokens are named {token.name}; the logs tell tokens "
                "apart by name"
            )
        if token.digest in digests:
            raise ValueError(f"{lead}token {token.name} has the value of another")
        names.add(token.name)
        digests.add(token.digest)
    return tuple(tokens)


def parse_env(text: str) -> tuple[Token, ...]:
    return parse_entries(text.split(";"), "entry")


def read_file(path: str) -> tuple[Token, ...]:
    if not path:
        return ()
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except OSError as exc:
        raise ValueError(f"cannot read the tokens file: {exc.strerror}") from None
    return parse_entries(lines, "line")


class Tokens:
    """The tokens a process accepts; with none declared, no token is asked."""

    def __init__(self, tokens: Iterable[Token]):
        self.tokens = tokens_unique(list(tokens), "tokens")

    @property
    def required(self) -> bool:
        return bool(self.tokens)

    def identify(self, presented: str | None) -> Token | None:
        """The token whose value is ``presented``, or None."""
        if not presented:
            return None
        digest = _digest(presented)
        found = None
        # Compare with every token, not stopping at a match: the time taken
        # does not depend on which token (if any) matched.
        for token in self.tokens:
            if hmac.compare_digest(digest, token.digest):
                found = token
        return found


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None
