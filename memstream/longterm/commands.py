"""``memstream verify longterm``: check every row of a long-term store."""

from __future__ import annotations

import json
from pathlib import Path

from memstream.crypto import KeyRing, SignedTreeHead, VerifyKey
from memstream.errors import ConfigError


def register_verify(verbs) -> None:
    p = verbs.add_parser("longterm", help="check every row's signature and its inclusion under the latest "
                                          "signed tree head; list the rows that fail")
    p.add_argument("uri", help="store root: a folder or s3://bucket/prefix")
    p.add_argument("--key", action="append", default=[], required=True,
                   help="a validator public key: a file (PEM, hex or base64) or the hex itself; repeat for old keys")
    p.add_argument("--governance-key", action="append", default=[],
                   help="a governance public key (to accept approved removals); repeat")
    p.add_argument("--governance-threshold", type=int, default=None, help="M of the M-of-N removal policy")
    p.add_argument("--cold-uri", default=None, help="cold tier root (default: <uri>/cold)")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="LanceDB storage option, e.g. aws_endpoint=http://127.0.0.1:8333; repeat")
    p.add_argument("--tree-head", type=Path, default=None,
                   help="a signed tree head (JSON, as published to Kafka) to verify against instead of the stored one")
    p.add_argument("--workers", type=int, default=None, help="verification processes (default: by table size)")
    p.set_defaults(func=_verify)


def _key(text: str) -> VerifyKey:
    path = Path(text)
    return VerifyKey.parse(path.read_bytes() if path.is_file() else text)


def _verify(args) -> int:
    from memstream.longterm.entry import GovernancePolicy
    from memstream.longterm.store import LongTermStore

    options = {}
    for item in args.storage_option:
        k, sep, v = item.partition("=")
        if not sep:
            raise ConfigError(f"--storage-option {item!r}: expected KEY=VALUE")
        options[k] = v
    governance = None
    if args.governance_key:
        gk = KeyRing([_key(k) for k in args.governance_key])
        governance = GovernancePolicy(gk, args.governance_threshold or len(gk))
    store = LongTermStore(args.uri, keyring=KeyRing([_key(k) for k in args.key]), storage_options=options,
                          cold_uri=args.cold_uri, governance=governance)
    head = SignedTreeHead.from_json(json.loads(args.tree_head.read_text())) if args.tree_head else None
    report = store.verify(workers=args.workers, trusted_head=head)
    print(json.dumps(report.to_json(), indent=2))
    return 0 if report.ok else 1
