"""The ``memstream`` command.

Each feature area registers its subcommands in its own module (a ``register(subparsers)``
function), listed in COMMAND_MODULES, so the CLI stays one small file.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from memstream.errors import MemstreamError

COMMAND_MODULES = [
    "memstream.infra.commands",
    "memstream.demo",
    "memstream.pipelines.commands",
    "memstream.commands_stream",
    "memstream.verify_cli",
    "memstream.operators.commands",
    "memstream.serve",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memstream", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except MemstreamError as e:
        print(f"memstream: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
