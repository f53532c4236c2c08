"""``memstream verify ...``: one subcommand group for every integrity check.

Each checker registers a verb with :func:`add_verifier` from its own module; this module
owns the ``verify`` parser so later checks (``verify chain``) plug in beside ``longterm``.
"""

from __future__ import annotations

import importlib

VERIFIER_MODULES = [
    "memstream.longterm.commands",
    "memstream.pipelines.commands",
]


def register(sub) -> None:
    verify = sub.add_parser("verify", help="check signatures, hash chains and Merkle proofs of stored memory")
    verbs = verify.add_subparsers(dest="what", required=True, metavar="WHAT")
    for name in VERIFIER_MODULES:
        importlib.import_module(name).register_verify(verbs)
