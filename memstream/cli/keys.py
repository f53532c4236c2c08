"""``memstream keys new|show``: Ed25519 keys for each role, and the master key that wraps data
keys (``--role master``), in files only their owner can read."""

from __future__ import annotations

import json
from pathlib import Path

from memstream.crypto.datakeys import MasterKey
from memstream.crypto.keys import ROLES, SigningKey, key_file_role, write_key_file
from memstream.errors import ConfigError


def register(sub) -> None:
    keys = sub.add_parser("keys", help="make and inspect validator, governance, maintenance and witness keys")
    verbs = keys.add_subparsers(dest="verb", required=True)
    new = verbs.add_parser("new", help="write a new Ed25519 key to a file (mode 0600) and print its public half")
    new.add_argument("--role", choices=(*ROLES, "master"), required=True,
                     help="what the key signs; roles never share a key. master: the AES key that wraps the key "
                          "table's data keys (crypto-shredding), not a signing key")
    new.add_argument("--out", type=Path, required=True, help="the private key file to create (never overwritten)")
    new.add_argument("--public-out", type=Path, default=None,
                     help="also write the public key (hex) here, for the --public-key of readers and verifiers")
    new.add_argument("--json", action="store_true")
    new.set_defaults(func=_new)
    show = verbs.add_parser("show", help="print a key file's role, key id and public key")
    show.add_argument("file", type=Path)
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=_show)


def _describe(key: SigningKey, role: str | None, path: Path) -> dict:
    return {"file": str(path), "role": role, "key_id": key.key_id, "public_key": key.verify_key.hex()}


def _print(info: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        print(f"{info['file']}: {info['role'] or 'no stated'} key {info['key_id']}, public key {info['public_key']}")


def _new(args) -> int:
    if args.out.exists():
        raise ConfigError(f"{args.out} exists: memstream never overwrites a key; choose another --out")
    if args.role == "master":
        master = MasterKey.generate()
        master.write(args.out)
        _print({"file": str(args.out), "role": "master", "key_id": master.key_id, "public_key": "none (AES)"},
               args.json)
        return 0
    key = SigningKey.generate()
    write_key_file(args.out, key, args.role)
    if args.public_out:
        args.public_out.write_text(key.verify_key.hex() + "\n")
    _print(_describe(key, args.role, args.out), args.json)
    return 0


def _show(args) -> int:
    key = SigningKey.from_file(args.file)
    _print(_describe(key, key_file_role(args.file.read_bytes()), args.file), args.json)
    return 0
