"""``memstream tenants add|grant|list`` and ``memstream credentials issue|revoke|list``: who may
read which sessions through ``memstream serve``."""

from __future__ import annotations

import json
import time

from memstream.cli import common


def add_access(parser) -> None:
    parser.add_argument("--access", default=None,
                        help="the access registry (tenants, credentials): a folder or s3://bucket/prefix "
                             "(default: the read.access setting, else <episodic store>/_access)")


def registry(args):
    from memstream.access.registry import AccessRegistry, default_root

    uri = args.access or common.settings().read.access or default_root(common.episodic(args)[0])
    return AccessRegistry(uri, common.storage_options(args, uri))


def _parse_ttl(text: str | None) -> float | None:
    if text is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError):
        from memstream.errors import ConfigError
        raise ConfigError(f"--ttl {text!r}: a number of seconds, or with a unit s, m, h or d (e.g. 30d)") from None


def register(sub) -> None:
    tenants = sub.add_parser("tenants", help="tenants of the read API and the sessions and subjects they own")
    verbs = tenants.add_subparsers(dest="verb", required=True)
    add = verbs.add_parser("add", help="create a tenant (optionally granting it sessions and subjects)")
    grant = verbs.add_parser("grant", help="make a tenant the owner of sessions and long-term subjects")
    for p in (add, grant):
        p.add_argument("tenant")
        p.add_argument("--sessions", nargs="+", default=[], metavar="SESSION",
                       help="session ids, or prefixes ending in '*' (quote them: 'acme/*')")
        p.add_argument("--subjects", nargs="+", default=[], metavar="SUBJECT",
                       help="long-term subjects (forget_subject of entries) the tenant's searches see")
    ls = verbs.add_parser("list", help="tenants and how many sessions, prefixes and subjects each owns")
    for p in (add, grant, ls):
        common.add_episodic(p)
        add_access(p)
        p.add_argument("--json", action="store_true")
    add.set_defaults(func=_tenants_add)
    grant.set_defaults(func=_tenants_grant)
    ls.set_defaults(func=_tenants_list)

    creds = sub.add_parser("credentials", help="issue, revoke and list read API credentials (stored hashed)")
    verbs = creds.add_subparsers(dest="verb", required=True)
    issue = verbs.add_parser("issue", help="issue a credential of a tenant and print it once")
    issue.add_argument("--tenant", required=True)
    issue.add_argument("--sessions", nargs="+", default=None, metavar="SESSION",
                       help="only these of the tenant's sessions (ids or 'prefix*'); default: all it owns")
    issue.add_argument("--ttl", default=None, help="lifetime, e.g. 3600, 12h, 30d (default: until revoked)")
    revoke = verbs.add_parser("revoke", help="refuse a credential from now on (serve sees it within seconds)")
    revoke.add_argument("credential_id")
    cls = verbs.add_parser("list", help="credentials: id, tenant, expiry, revoked (never the secret)")
    for p in (issue, revoke, cls):
        common.add_episodic(p)
        add_access(p)
        p.add_argument("--json", action="store_true")
    issue.set_defaults(func=_issue)
    revoke.set_defaults(func=_revoke)
    cls.set_defaults(func=_credentials_list)


def _out(info, as_json: bool, text: str) -> None:
    print(json.dumps(info, indent=2) if as_json else text)


def _tenants_add(args) -> int:
    reg = registry(args)
    created = reg.add_tenant(args.tenant)
    if args.sessions or args.subjects:
        reg.grant(args.tenant, args.sessions, args.subjects)
    _out({"tenant": args.tenant, "created": created, "registry": reg.uri}, args.json,
         f"tenant {args.tenant} {'added' if created else 'exists'} in {reg.uri}")
    return 0


def _tenants_grant(args) -> int:
    reg = registry(args)
    reg.grant(args.tenant, args.sessions, args.subjects)
    _out({"tenant": args.tenant, "sessions": args.sessions, "subjects": len(args.subjects)}, args.json,
         f"granted to {args.tenant}: {len(args.sessions)} session argument(s), {len(args.subjects)} subject(s)")
    return 0


def _tenants_list(args) -> int:
    g = registry(args).load()
    rows = [{"tenant": t, "sessions": sum(1 for o in g.session_owner.values() if o == t),
             "prefixes": sorted(p + "*" for p, o in g.prefix_owner.items() if o == t),
             "subjects": len(g.subjects.get(t, ()))} for t in sorted(g.tenants)]
    _out(rows, args.json, "\n".join(f"{r['tenant']}: {r['sessions']} session(s), prefixes {r['prefixes']}, "
                                    f"{r['subjects']} subject(s)" for r in rows) or "no tenants")
    return 0


def _issue(args) -> int:
    reg = registry(args)
    cred, token = reg.issue(args.tenant, args.sessions, _parse_ttl(args.ttl))
    expires = None if cred.expires_ns is None else time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                 time.gmtime(cred.expires_ns / 1e9))
    _out({"credential_id": cred.credential_id, "tenant": cred.tenant, "token": token, "expires": expires},
         args.json, f"{token}\n(credential {cred.credential_id} of tenant {cred.tenant}, expires {expires or 'never'}; "
                    "shown once: only its hash is stored. Send it as 'Authorization: Bearer <token>')")
    return 0


def _revoke(args) -> int:
    reg = registry(args)
    reg.revoke(args.credential_id)
    _out({"credential_id": args.credential_id, "revoked": True}, args.json, f"revoked {args.credential_id}")
    return 0


def _credentials_list(args) -> int:
    g = registry(args).load()
    rows = [{"credential_id": c.credential_id, "tenant": c.tenant, "revoked": c.revoked,
             "expires_ns": c.expires_ns, "all_sessions": c.sessions is None and c.prefixes is None}
            for c in sorted(g.credentials.values(), key=lambda c: c.created_ns)]
    _out(rows, args.json, "\n".join(f"{r['credential_id']} tenant={r['tenant']} revoked={r['revoked']} "
                                    f"expires_ns={r['expires_ns']} all_sessions={r['all_sessions']}" for r in rows)
         or "no credentials")
    return 0
