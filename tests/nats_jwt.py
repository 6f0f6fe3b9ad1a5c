"""NATS decentralized auth for the tests: an operator, an account, user JWTs.

nats-server in operator mode trusts an operator's JWT, loads the account
JWTs the operator signed (here from its config: ``resolver: MEMORY``), and
admits a user whose JWT the account signed and whose NKey signs the
server's nonce. A ``.creds`` file carries that JWT and NKey seed together.

No library on PyPI encodes these JWTs with care (``nats-jwt`` says of
itself that it is not well tested), so this module writes the few claims
nats-server reads and signs them with the ``nkeys`` package. Limits are
left unlimited (-1): a claim left out means zero to the server, and zero
connections would shut everyone out.
"""

import base64
import hashlib
import json
import os
import time
from pathlib import Path

import nkeys

HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
UNLIMITED = {"subs": -1, "data": -1, "payload": -1}
ACCOUNT_LIMITS = {
    **UNLIMITED,
    "conn": -1,
    "leaf": -1,
    "imports": -1,
    "exports": -1,
    "wildcards": True,
}


def new_key(prefix: int) -> nkeys.KeyPair:
    """A fresh NKey pair; ``prefix`` is one of nkeys.PREFIX_BYTE_*."""
    return nkeys.from_seed(bytearray(nkeys.encode_seed(os.urandom(32), prefix)))


def public(key: nkeys.KeyPair) -> str:
    return key.public_key.decode()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _compact(value: dict) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def encode(kind: str, name: str, subject: str, issuer: nkeys.KeyPair, **nats) -> str:
    """A JWT of ``kind`` (operator, account, user) for ``subject``, signed."""
    claims = {
        "jti": "",
        "iat": int(time.time()),
        "iss": public(issuer),
        "name": name,
        "sub": subject,
        "nats": {**nats, "type": kind, "version": 2},
    }

    # The id is a hash of the claims, taken while the id is still empty;
    # the server only needs one that differs from JWT to JWT.
    digest = hashlib.sha256(_compact(claims)).digest()
    claims["jti"] = base64.b32encode(digest).rstrip(b"=").decode()

    signed = f"{_b64(_compact(HEADER))}.{_b64(_compact(claims))}"
    return f"{signed}.{_b64(issuer.sign(signed.encode()))}"


class Operator:
    """An operator with one account, for one nats-server in operator mode."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.key = new_key(nkeys.PREFIX_BYTE_OPERATOR)
        self.account = new_key(nkeys.PREFIX_BYTE_ACCOUNT)
        self.jwt = encode("operator", "fanout-test", public(self.key), self.key)
        self.account_jwt = encode(
            "account",
            "FANOUT",
            public(self.account),
            self.key,
            limits=ACCOUNT_LIMITS,
        )

    def server_config(self) -> Path:
        """A nats-server config that trusts this operator and its account."""
        config = self.directory / "operator.conf"
        config.write_text(
            f'operator: "{self.jwt}"\n'
            "resolver: MEMORY\n"
            f'resolver_preload: {{ {public(self.account)}: "{self.account_jwt}" }}\n'
        )
        return config

    def user(
        self,
        name: str,
        publish: list[str] | None = None,
        signer: nkeys.KeyPair | None = None,
    ) -> tuple[Path, str, str]:
        """Write ``name``.creds; return it, the user JWT and the NKey seed.

        ``publish`` limits the subjects the user may publish to; ``signer``
        (default: the account) signs the JWT, so a stranger's key makes a
        user the server must refuse.
        """
        key = new_key(nkeys.PREFIX_BYTE_USER)
        permissions = {"pub": {"allow": publish}} if publish is not None else {}
        jwt = encode(
            "user",
            name,
            public(key),
            signer or self.account,
            **UNLIMITED,
            **permissions,
        )
        seed = key.seed.decode()
        creds = self.directory / f"{name}.creds"
        creds.write_text(
            "-----BEGIN NATS USER JWT-----\n"
            f"{jwt}\n"
            "------END NATS USER JWT------\n"
            "\n"
            "-----BEGIN USER NKEY SEED-----\n"
            f"{seed}\n"
            "------END USER NKEY SEED------\n"
        )
        creds.chmod(0o600)
        return creds, jwt, seed
