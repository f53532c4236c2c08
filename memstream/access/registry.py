"""The access registry: tenants, what they own, and credentials, as small JSON objects under a
root (a folder or ``s3://bucket/prefix``; by default ``<episodic store>/_access``).

Every object is written once, with a conditional put, so two tenants racing for one session,
subject or prefix cannot both win, and nothing is ever rewritten::

    tenants/<tenant>.json                 the tenant exists
    sessions/<session hash>.json          {tenant}: the session's owner
    prefixes/<sha256 of prefix>.json      {prefix, tenant}: sessions whose id starts with prefix
    subjects/<subject hash>.json          {tenant}: long-term entries of this subject are the tenant's
    credentials/<id>.json                 {tenant, secret_sha256, sessions, prefixes, expires_ns}
    revoked/<id>.json                     the credential is refused from now on

:class:`AccessGuard` holds the loaded :class:`~memstream.access.grants.Grants` for the read
service and reloads them every ``refresh_s`` seconds on a background thread (a listing, and
reads of the objects it has not seen), so a check is a few dictionary look-ups and one SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time

from memstream.access.grants import (Credential, Grants, Principal, check_tenant_name, new_token, parse_sessions,
                                     session_hash, subject_hash)
from memstream.errors import ConfigError, MemstreamError
from memstream.settings import ACCESS_REFRESH_S
from memstream.storage.objects import object_store

log = logging.getLogger(__name__)


def default_root(episodic_uri: str) -> str:
    return episodic_uri.rstrip("/") + "/_access"


class AccessRegistry:
    def __init__(self, uri: str, storage_options: dict[str, str] | None = None):
        self.uri = uri
        self._objects = object_store(uri, storage_options)
        self._seen: dict[str, dict] = {}  # objects are written once: a reload fetches only new ones

    # -- writing -----------------------------------------------------------------------
    def _put(self, key: str, doc: dict) -> bool:
        return self._objects.put_if_absent(key, json.dumps(doc, sort_keys=True).encode())

    def _get(self, key: str) -> dict | None:
        raw = self._objects.get(key)
        return None if raw is None else json.loads(raw)

    def _require_tenant(self, tenant: str) -> None:
        if self._get(f"tenants/{check_tenant_name(tenant)}.json") is None:
            raise ConfigError(f"no tenant {tenant!r} in {self.uri}: add it with `memstream tenants add {tenant}`")

    def add_tenant(self, tenant: str) -> bool:
        """Create ``tenant``; False if it already exists."""
        return self._put(f"tenants/{check_tenant_name(tenant)}.json", {"tenant": tenant, "created_ns": time.time_ns()})

    def grant(self, tenant: str, sessions=(), subjects=()) -> None:
        """Make ``tenant`` the owner of ``sessions`` (ids, or prefixes ending in ``*``) and of
        the long-term entries of ``subjects``. Refused for anything another tenant owns."""
        self._require_tenant(tenant)
        _, prefixes = parse_sessions(sessions)
        taken = []
        for s in sorted({s for s in sessions if not s.endswith("*")}):
            h = session_hash(s)
            if not self._put(f"sessions/{h}.json", {"tenant": tenant}) and self._get(f"sessions/{h}.json")[
                    "tenant"] != tenant:
                taken.append(f"session {s!r}")
        if prefixes:
            others = {p: t for p, t in self.load().prefix_owner.items() if t != tenant}
            for p in prefixes:
                clash = [o for o in others if o.startswith(p) or p.startswith(o)]
                if clash:
                    taken.append(f"prefix {p + '*'!r} (overlaps {clash[0] + '*'!r} of tenant {others[clash[0]]!r})")
                    continue
                key = f"prefixes/{hashlib.sha256(p.encode()).hexdigest()}.json"
                if not self._put(key, {"prefix": p, "tenant": tenant}) and self._get(key)["tenant"] != tenant:
                    taken.append(f"prefix {p + '*'!r}")
        for s in subjects or ():
            h = subject_hash(s)
            if not self._put(f"subjects/{h}.json", {"tenant": tenant}) and self._get(f"subjects/{h}.json")[
                    "tenant"] != tenant:
                taken.append(f"subject {s!r}")
        if taken:
            raise ConfigError(f"not granted to {tenant!r}, another tenant owns it: {', '.join(taken)} (the rest was "
                              "granted); a session or subject has one owner")

    def issue(self, tenant: str, sessions=None, ttl_s: float | None = None) -> tuple[Credential, str]:
        """A new credential of ``tenant`` and its token (shown once; only its hash is stored).
        ``sessions``: a subset of the tenant's (ids or ``prefix*``); None: all it owns, now and later."""
        self._require_tenant(tenant)
        if ttl_s is not None and ttl_s <= 0:
            raise ConfigError(f"--ttl must be positive, got {ttl_s}")
        exact = prefixes = None
        if sessions is not None:
            exact, prefixes = parse_sessions(sessions)
            grants = self.load()
            owned = {p for p, t in grants.prefix_owner.items() if t == tenant}
            foreign = [h for h in exact if grants.session_owner.get(h) != tenant]
            foreign += [p for p in prefixes if not any(p.startswith(o) for o in owned)]
            if foreign:
                raise ConfigError(f"tenant {tenant!r} does not own {len(foreign)} of the sessions named: grant them "
                                  f"first with `memstream tenants grant {tenant} --sessions ...`")
        cid, token, digest = new_token()
        now = time.time_ns()
        expires = None if ttl_s is None else now + int(ttl_s * 1e9)
        cred = Credential(cid, tenant, digest, exact, prefixes, expires, now)
        if not self._put(f"credentials/{cid}.json", _credential_doc(cred)):
            raise ConfigError(f"credential id {cid} collided; issue again")
        return cred, token

    def revoke(self, credential_id: str) -> None:
        if self._get(f"credentials/{credential_id}.json") is None:
            raise ConfigError(f"no credential {credential_id!r} in {self.uri}: see `memstream credentials list`")
        self._put(f"revoked/{credential_id}.json", {"revoked_ns": time.time_ns()})

    # -- reading -----------------------------------------------------------------------
    def _docs(self, folder: str) -> dict[str, dict]:
        out = {}
        for key in self._objects.list(folder):
            doc = self._seen.get(key)
            if doc is None:
                doc = self._get(key)
            if doc is not None:
                self._seen[key] = doc
                out[key.rsplit("/", 1)[-1].removesuffix(".json")] = doc
        return out

    def load(self) -> Grants:
        revoked = set(self._docs("revoked"))
        subjects: dict[str, set[str]] = {}
        for h, d in self._docs("subjects").items():
            subjects.setdefault(d["tenant"], set()).add(h)
        creds = {}
        for cid, d in self._docs("credentials").items():
            creds[cid] = Credential(cid, d["tenant"], d["secret_sha256"],
                                    None if d["sessions"] is None else frozenset(d["sessions"]),
                                    None if d["prefixes"] is None else tuple(d["prefixes"]), d["expires_ns"],
                                    d["created_ns"], cid in revoked)
        return Grants(frozenset(self._docs("tenants")), {h: d["tenant"] for h, d in self._docs("sessions").items()},
                      {d["prefix"]: d["tenant"] for d in self._docs("prefixes").values()},
                      {t: frozenset(s) for t, s in subjects.items()}, creds)


def _credential_doc(c: Credential) -> dict:
    return {"credential_id": c.credential_id, "tenant": c.tenant, "secret_sha256": c.secret_sha256,
            "sessions": None if c.sessions is None else sorted(c.sessions),
            "prefixes": None if c.prefixes is None else list(c.prefixes), "expires_ns": c.expires_ns,
            "created_ns": c.created_ns}


class AccessGuard:
    """The read service's view of the registry: :meth:`check` authenticates a request and
    authorizes its session; the grants are reloaded every ``refresh_s`` seconds (a failed
    reload keeps the last ones and is logged)."""

    def __init__(self, registry: AccessRegistry, refresh_s: float = ACCESS_REFRESH_S):
        if refresh_s <= 0:
            raise ConfigError(f"the access refresh interval must be positive, got {refresh_s}")
        self.registry = registry
        self.grants = registry.load()
        self.refresh_s = refresh_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh_loop, name="access-refresh", daemon=True)
        self._thread.start()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.refresh_s):
            self.refresh()

    def refresh(self) -> None:
        try:
            self.grants = self.registry.load()  # one assignment: a check sees the old or the new grants
        except (MemstreamError, OSError, ValueError, KeyError) as e:
            log.warning("reloading the access registry %s failed, keeping the last grants: %s", self.registry.uri, e)

    def authenticate(self, authorization: str | None) -> Principal:
        return self.grants.authenticate(authorization)

    def check(self, authorization: str | None, session_id: str) -> Principal:
        grants = self.grants
        principal = grants.authenticate(authorization)
        grants.authorize(principal, session_id)
        return principal

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


__all__ = ["AccessGuard", "AccessRegistry", "default_root", "session_hash"]
