"""``memstream verify chain|episodic|longterm``: every integrity check of stored memory, and,
with ``--witness``, the check of the stores against every head a witness cosigned."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from memstream.cli import common
from memstream.crypto.keys import SigningKey, check_distinct_roles
from memstream.crypto.signed import SignedTreeHead
from memstream.episodic.chain import check_witnessed_chain, head_at, verify_chain
from memstream.errors import ConfigError
from memstream.longterm.entry import GovernancePolicy
from memstream.topics import read_summaries


def register(sub) -> None:
    verify = sub.add_parser("verify", help="check signatures, hash chains and Merkle proofs of stored memory")
    verbs = verify.add_subparsers(dest="what", required=True, metavar="WHAT")
    _register_chain(verbs)
    _register_episodic(verbs)
    _register_longterm(verbs)


def _add_witness(parser) -> None:
    parser.add_argument("--witness", default=None,
                        help="the witness's root (its folder or s3://bucket/prefix): check against every head it "
                             "cosigned, and report rollback, truncation and forks")
    parser.add_argument("--witness-key", action="append", default=[],
                        help="the witness's public key (file or hex); repeat for rotated keys")
    parser.add_argument("--witness-storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="storage option of the witness's root (its own credentials); repeat")


def _witness_log(args, validator_ring):
    """The WitnessLog that ``--witness`` names, or None."""
    if not args.witness:
        return None
    from memstream.witness import WitnessLog

    if not args.witness_key:
        raise ConfigError("--witness needs --witness-key: the witness's public key checks its cosignatures")
    ring = common.keyring(args.witness_key)
    check_distinct_roles({"validator": validator_ring, "witness": ring})
    options = {}
    for item in args.witness_storage_option:
        k, sep, v = item.partition("=")
        if not sep:
            raise ConfigError(f"--witness-storage-option {item!r}: expected KEY=VALUE")
        options[k] = v
    if args.witness.startswith("s3://") and getattr(args, "s3_from_stack", False) and not options:
        from memstream.infra.stack import Stack

        options = Stack().s3_config().storage_options()
    return WitnessLog(args.witness, options or None, witness_keys=ring)


def _register_chain(verbs) -> None:
    chain = verbs.add_parser("chain", help="check a session's hash chain and signatures")
    chain.add_argument("--session", required=True)
    chain.add_argument("--at", help="reconstruct the chain head as of this time (ISO 8601 or epoch seconds)")
    chain.add_argument("--from", dest="source", choices=["kafka", "store"], default="kafka")
    common.add_bootstrap(chain)
    chain.add_argument("--topic", default=None, help="summaries topic (default: memstream.summaries)")
    common.add_episodic(chain)
    common.add_public_keys(chain)
    chain.add_argument("--key-file", help="derive the public key from this signing key file")
    _add_witness(chain)
    chain.add_argument("--json", action="store_true")
    chain.set_defaults(func=_verify_chain)


def _parse_time(text: str) -> int:
    try:
        return int(float(text) * 1_000_000)
    except ValueError:
        dt = datetime.fromisoformat(text)
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        return int(dt.timestamp() * 1_000_000)


def _verify_chain(args) -> int:
    ring = common.keyring(args.public_key)
    if args.key_file:
        ring.add(SigningKey.from_file(args.key_file, role="validator"))
    if not len(ring):
        raise ConfigError("no public key to verify with: pass --public-key FILE (or --key-file)")
    if args.source == "kafka":
        records = read_summaries(common.bootstrap(args), args.session, security=common.kafka_security(args),
                                 **({"topic": args.topic} if args.topic else {}))
    else:
        from memstream.episodic.store import EpisodicStore

        uri, options = common.episodic(args)
        records = EpisodicStore(uri, options).records(args.session)
    if args.at:
        cutoff = _parse_time(args.at)
        records = [r for r in records if r.event_time_us <= cutoff]
    report = verify_chain(args.session, records, ring, anchored=args.source == "kafka" or
                          bool(records) and records[0].window_index == 0)
    head = head_at(records, _parse_time(args.at)) if args.at else None
    witness = _witness_log(args, ring)
    witness_failures = []
    if witness is not None:
        witness_failures = _chain_against_witness(args, args.session, records, witness, ring)
    ok = report.ok and not witness_failures
    out = {"session": args.session, "source": args.source, "ok": ok, "records": report.records,
           "duplicates": report.duplicates, "first_window": report.first_index, "head_window": report.head_index,
           "head_hash": report.head_hash.hex(), "key_ids": sorted(report.key_ids),
           "fault": str(report.fault) if report.fault else None, "witness_failures": witness_failures}
    if head is not None:
        out["head_at"] = {"time": args.at, "window": head.window_index, "hash": head.hash.hex()}
    if args.json:
        print(json.dumps(out, indent=2))
    elif ok:
        print(f"session {args.session}: {report.records} summaries verify "
              f"(windows {report.first_index}..{report.head_index}, head {report.head_hash.hex()[:16]}…)")
    else:
        print(f"session {args.session}: BROKEN at {report.fault or '; '.join(witness_failures)}")
    return 0 if ok else 1


def _chain_against_witness(args, session: str, records, witness, ring) -> list[str]:
    """The session's problems against its witnessed chain heads (validator signatures checked)."""
    from memstream.errors import IntegrityError

    try:
        heads = witness.chain_heads(session)
        for h in heads:
            h.verify(witness.witness_keys, ring)
    except IntegrityError as e:
        return [f"the witness's chain heads of session {session!r} do not check out: {e}"]
    collected = None
    if args.source == "store" and not records:
        from memstream.episodic.store import EpisodicStore

        uri, options = common.episodic(args)
        gc = [r for r in EpisodicStore(uri, options).gc_records() if r.session_id == session]
        collected = (gc[-1].head_window_index, gc[-1].head_hash) if gc else None
    return check_witnessed_chain(session, records, heads, collected)


def _register_episodic(verbs) -> None:
    p = verbs.add_parser("episodic", help="check every session of the episodic store: its hash chain and "
                                          "signatures, and with --witness every chain head the witness cosigned")
    common.add_episodic(p)
    common.add_public_keys(p, required=True)
    _add_witness(p)
    p.set_defaults(func=_verify_episodic, source="store")


def _verify_episodic(args) -> int:
    from memstream.episodic.store import EpisodicStore

    ring = common.keyring(args.public_key)
    uri, options = common.episodic(args)
    store = EpisodicStore(uri, options)
    witness = _witness_log(args, ring)
    sessions = set(store.sessions()) | set(witness.sessions() if witness is not None else ())
    out = {"ok": True, "sessions": len(sessions), "witnessed_sessions": 0, "failures": {}}
    for sid in sorted(sessions):
        records = store.records(sid)
        problems = []
        if records:
            report = verify_chain(sid, records, ring, anchored=records[0].window_index == 0)
            if not report.ok:
                problems.append(str(report.fault))
        if witness is not None:
            out["witnessed_sessions"] += bool(witness.chain_heads(sid))
            problems += _chain_against_witness(args, sid, records, witness, ring)
        if problems:
            out["failures"][sid] = problems
    out["ok"] = not out["failures"]
    print(json.dumps(out, indent=2))
    return 0 if out["ok"] else 1


def _register_longterm(verbs) -> None:
    p = verbs.add_parser("longterm", help="check every row's signature and its inclusion under the latest "
                                          "signed tree head; list the rows that fail")
    p.add_argument("uri", help="store root: a folder or s3://bucket/prefix")
    common.add_public_keys(p, required=True)
    p.add_argument("--governance-key", action="append", default=[],
                   help="a governance public key (to accept approved removals); repeat")
    p.add_argument("--governance-threshold", type=int, default=None, help="M of the M-of-N removal policy")
    p.add_argument("--maintenance-key", action="append", default=[],
                   help="a maintenance public key (to accept the forget purges it attested); repeat")
    p.add_argument("--cold-uri", default=None, help="cold tier root (default: <uri>/cold)")
    common.add_storage(p)
    p.add_argument("--tree-head", type=Path, default=None,
                   help="a signed tree head (JSON, as published to Kafka) to verify against instead of the stored one")
    p.add_argument("--workers", type=int, default=None, help="verification processes (default: by table size)")
    p.add_argument("--full", action="store_true",
                   help="also check every entry's own Ed25519 signature (default: rows hashed under the signed "
                        "tree heads)")
    _add_witness(p)
    p.set_defaults(func=_verify_longterm)


def _verify_longterm(args) -> int:
    from memstream.longterm.store import LongTermStore

    options = common.storage_options(args, args.uri)
    governance = None
    if args.governance_key:
        gk = common.keyring(args.governance_key)
        governance = GovernancePolicy(gk, args.governance_threshold or len(gk))
    ring = common.keyring(args.public_key)
    witness = _witness_log(args, ring)
    store = LongTermStore(args.uri, keyring=ring, storage_options=options,
                          cold_uri=args.cold_uri, governance=governance,
                          maintenance_keys=common.keyring(args.maintenance_key))
    head = SignedTreeHead.from_json(args.tree_head.read_text()) if args.tree_head else None
    witnessed = witness.tree_heads(store.store_id) if witness is not None else None
    report = store.verify(workers=args.workers, trusted_head=head, full=args.full, witnessed=witnessed)
    print(json.dumps(report.to_json(), indent=2))
    return 0 if report.ok else 1
