"""Who may read what: tenants own sessions and long-term subjects, credentials are granted a
tenant's sessions, and a request's bearer credential is checked against them (pure; the
registry in :mod:`memstream.access.registry` stores and loads them).

A credential is ``mst_<16 hex: its id>_<secret>``. Only SHA-256 of the secret is stored (the
secret is 256 random bits, so a fast hash is enough: there is nothing to guess). Session ids
and subjects are stored as hashes too, so that forgetting one leaves nothing readable here;
a session owned by prefix (``acme/*``) keeps the prefix itself.

Ownership: a session registered by id belongs to that tenant; otherwise to the tenant whose
prefix matches it (prefixes of different tenants never overlap); otherwise to nobody, and
nobody is granted it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

from memstream.errors import AuthenticationError, AuthorizationError, ConfigError
from memstream.longterm.entry import subject_hash

TOKEN_PREFIX = "mst_"
_ID_HEX = 16
_TOKEN = re.compile(rf"^{TOKEN_PREFIX}([0-9a-f]{{{_ID_HEX}}})_([A-Za-z0-9_-]{{43}})$")
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def secret_sha256(secret: str) -> str:
    return hashlib.sha256(b"memstream-credential-v1\0" + secret.encode()).hexdigest()


def session_hash(session_id: str) -> str:
    return hashlib.sha256(b"memstream-session-v1\0" + session_id.encode()).hexdigest()


def new_token() -> tuple[str, str, str]:
    """(credential id, token to hand out once, SHA-256 of its secret to store)."""
    cid, secret = secrets.token_hex(_ID_HEX // 2), secrets.token_urlsafe(32)
    return cid, f"{TOKEN_PREFIX}{cid}_{secret}", secret_sha256(secret)


def check_tenant_name(name: str) -> str:
    if not isinstance(name, str) or not TENANT_NAME.match(name):
        raise ConfigError(f"tenant name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a "
                          "letter or digit")
    return name


def parse_sessions(items) -> tuple[frozenset[str], tuple[str, ...]]:
    """Session arguments as (hashes of exact ids, prefixes): ``acme/*`` is every session id
    starting with ``acme/``."""
    exact, prefixes = set(), []
    for s in items or ():
        if not isinstance(s, str) or not s or s == "*":
            raise ConfigError(f"session {s!r}: name a session id, or a prefix ending in '*' (not '*' alone)")
        if s.endswith("*"):
            prefixes.append(s[:-1])
        else:
            exact.add(session_hash(s))
    return frozenset(exact), tuple(sorted(set(prefixes)))


@dataclass(frozen=True)
class Credential:
    credential_id: str
    tenant: str
    secret_sha256: str
    sessions: frozenset[str] | None  # session hashes granted; None with prefixes None: all the tenant's
    prefixes: tuple[str, ...] | None
    expires_ns: int | None
    created_ns: int
    revoked: bool = False

    def covers(self, session_id: str, hashed: str) -> bool:
        if self.sessions is None and self.prefixes is None:
            return True
        return hashed in (self.sessions or ()) or any(session_id.startswith(p) for p in self.prefixes or ())


@dataclass(frozen=True)
class Principal:
    """Who a request authenticated as: its credential, tenant, and the long-term subjects
    (hashes) its searches are limited to."""

    credential_id: str
    tenant: str
    subjects: frozenset[str]


@dataclass(frozen=True)
class Grants:
    """A snapshot of the registry: owners of sessions (by hash and by prefix) and of subjects,
    and the credentials."""

    tenants: frozenset[str]
    session_owner: dict[str, str]  # session hash -> tenant
    prefix_owner: dict[str, str]  # session id prefix -> tenant
    subjects: dict[str, frozenset[str]]  # tenant -> subject hashes
    credentials: dict[str, Credential]

    @classmethod
    def empty(cls) -> "Grants":
        return cls(frozenset(), {}, {}, {}, {})

    def owner(self, session_id: str, hashed: str | None = None) -> str | None:
        hashed = hashed or session_hash(session_id)
        owner = self.session_owner.get(hashed)
        if owner is not None:
            return owner
        best = max((p for p in self.prefix_owner if session_id.startswith(p)), key=len, default=None)
        return None if best is None else self.prefix_owner[best]

    def authenticate(self, authorization: str | None, now_ns: int | None = None) -> Principal:
        """The principal of an ``Authorization: Bearer <credential>`` header value."""
        if not authorization:
            raise AuthenticationError("this read needs a credential: send 'Authorization: Bearer <credential>' "
                                      "with one from `memstream credentials issue --tenant <tenant>`")
        scheme, _, token = authorization.strip().partition(" ")
        m = _TOKEN.match(token.strip()) if scheme.lower() == "bearer" else None
        if m is None:
            raise AuthenticationError("the Authorization header must be 'Bearer mst_<id>_<secret>', as "
                                      "`memstream credentials issue` prints it")
        cred = self.credentials.get(m.group(1))
        # Compare digests in constant time, and the same way for an unknown id, so timing
        # does not tell which ids exist.
        stored = cred.secret_sha256 if cred is not None else "0" * 64
        if not hmac.compare_digest(stored, secret_sha256(m.group(2))) or cred is None:
            raise AuthenticationError(f"credential {m.group(1)} is not known here: check the token, or issue one "
                                      "with `memstream credentials issue`")
        if cred.revoked:
            raise AuthenticationError(f"credential {cred.credential_id} was revoked: issue a new one")
        now_ns = time.time_ns() if now_ns is None else now_ns
        if cred.expires_ns is not None and now_ns >= cred.expires_ns:
            raise AuthenticationError(f"credential {cred.credential_id} expired: issue a new one "
                                      "(`memstream credentials issue --ttl ...`)")
        return Principal(cred.credential_id, cred.tenant, self.subjects.get(cred.tenant, frozenset()))

    def authorize(self, principal: Principal, session_id: str) -> None:
        """Raise :class:`AuthorizationError` unless ``principal`` may read ``session_id``.
        The refusal is the same whether or not the session exists, so it reveals nothing."""
        hashed = session_hash(session_id)
        cred = self.credentials[principal.credential_id]
        if self.owner(session_id, hashed) != principal.tenant or not cred.covers(session_id, hashed):
            raise AuthorizationError(f"credential {principal.credential_id} (tenant {principal.tenant!r}) is not "
                                     f"granted session {session_id!r}: read with a credential of the tenant that "
                                     "owns it (`memstream tenants grant` / `memstream credentials issue`)")


__all__ = ["Credential", "Grants", "Principal", "TOKEN_PREFIX", "check_tenant_name", "new_token", "parse_sessions",
           "secret_sha256", "session_hash", "subject_hash"]
