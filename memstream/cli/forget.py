"""``memstream forget session``: forget one session in every tier (crypto-shredding of its
Kafka records, erasure from the episodic store, the read ledger and the key table, and a
forget request with its purge in the long-term store), then prove it by a scan of every
location for fingerprints of what was forgotten (see memstream.maintenance.forget)."""

from __future__ import annotations

import json

from memstream.cli import common
from memstream.errors import ConfigError


def register(sub) -> None:
    forget = sub.add_parser("forget", help="forget a session everywhere and prove that nothing of it remains")
    verbs = forget.add_subparsers(dest="what", required=True, metavar="WHAT")
    p = verbs.add_parser("session", help="destroy the session's data key, erase its rows from every store, "
                                         "purge what long-term memory holds of it, and scan for leftovers")
    p.add_argument("--session", required=True, help="the session id")
    common.add_episodic(p)
    p.add_argument("--master-key-file", required=True,
                   help="the master key of the store's key table (`memstream keys new --role master`): the "
                        "session's data key is destroyed there")
    common.add_signing_key(p, "maintenance")
    p.add_argument("--longterm", default=None,
                   help="the long-term store root: forget what retention and consolidation wrote of the session")
    p.add_argument("--validator-key-file", default=None,
                   help="the validator key that signs the long-term forget request (with --longterm)")
    common.add_public_keys(p, what="validator (other than --validator-key-file's)")
    p.add_argument("--governance-key", action="append", default=[],
                   help="a governance public key of the long-term store's M-of-N policy; repeat")
    p.add_argument("--governance-threshold", type=int, default=None, help="M of the M-of-N policy")
    p.add_argument("--approver-key-file", action="append", default=[],
                   help="a governance signing key that approves the purge here; repeat up to M. Without any, "
                        "the purge is planned and the forget_purge DAG runs it once M of N approved")
    p.add_argument("--kafka-log-dir", action="append", default=[],
                   help="a broker log directory to include in the proof scan (the data key must be in no file "
                        "there); repeat")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_forget_session)


def _longterm(args, maintenance):
    """(store, validator key, approvers) for --longterm, else (None, None, ())."""
    if not args.longterm:
        if args.validator_key_file or args.approver_key_file:
            raise ConfigError("--validator-key-file and --approver-key-file need --longterm")
        return None, None, ()
    if not args.validator_key_file:
        raise ConfigError("--longterm needs --validator-key-file: a validator signs the forget request")
    from memstream.crypto.keys import SigningKey
    from memstream.maintenance.longterm import open_store

    validator = SigningKey.from_file(args.validator_key_file, role="validator")
    approvers = [SigningKey.from_file(f, role="governance") for f in args.approver_key_file]
    governance = list(args.governance_key) + [a.verify_key.hex() for a in approvers]
    store = open_store(args.longterm, common.storage_options(args, args.longterm),
                       validator_keys=[k.hex() for k in common.keyring(args.public_key)], signer=validator,
                       maintenance_keys=[maintenance], governance_keys=list(dict.fromkeys(governance)),
                       governance_threshold=args.governance_threshold)
    return store, validator, approvers


def _forget_session(args) -> int:
    from memstream.maintenance.forget import forget_session, prove_forgotten, session_markers
    from memstream.storage.keytable import KeyTable

    uri, options = common.episodic(args)
    maintenance = common.signing_key(args, "maintenance")
    longterm, validator, approvers = _longterm(args, maintenance)
    keys = KeyTable.open(uri, options, args.master_key_file)
    markers = session_markers(uri, options, args.session, keys=keys)
    out = forget_session(uri, options, args.session, keys=keys, key=maintenance, longterm=longterm,
                         longterm_key=validator, approvers=approvers)
    stores = [(uri, options)]
    if longterm is not None:
        from memstream.maintenance.purge import locations

        stores += locations(longterm)
    out["proof"] = prove_forgotten(markers, kafka_log_dirs=args.kafka_log_dir, stores=stores)
    if args.json:
        print(json.dumps(out, indent=2, default=str))
    else:
        proof = out["proof"]
        print(f"session {args.session} forgotten: data key destroyed={out['key_destroyed']}, "
              f"{out['summaries_removed']} summaries and {out['reads_removed']} reads erased")
        if not proof["sealed"]:
            print("  its Kafka records were never sealed under a data key: they stay readable until the topics' "
                  "retention drops them")
        if "longterm" in out:
            lt = out["longterm"]
            print(f"  long-term: {lt.get('entries', 0)} entries " +
                  ("planned; awaiting governance approval (then forget_purge erases them)"
                   if lt.get("awaits_approval") else "purged"))
        print(f"  proof scan: {proof['key_scan']['files'] + proof['row_scan']['files']} files, "
              f"{'nothing found' if proof['ok'] else 'FOUND LEFTOVERS: ' + json.dumps(proof)}")
    return 0 if out["proof"]["ok"] else 1
