"""The ``memstream`` command.

Each feature area registers its subcommands in its own module of this package (a
``register(subparsers)`` function), listed in COMMAND_MODULES. A command imports what it runs
(the pipeline, the stores, torch) inside its handler, so ``memstream --help`` loads none of them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from memstream.errors import MemstreamError

COMMAND_MODULES = [f"memstream.cli.{name}" for name in
                   ("infra", "demo", "run", "stream", "verify", "forget", "keys", "access", "compressor", "serve")]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memstream", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


# Libraries whose routine chatter means nothing to a user: their warnings of lost connections
# that they retry, services they start and stop, optional cloud modules that are not installed.
_CHATTY = {"kafka": logging.ERROR, "apache_beam": logging.ERROR, "PrismRunner": logging.ERROR,
           "root": logging.ERROR, "urllib3": logging.ERROR}


def quiet() -> None:
    for name, level in _CHATTY.items():
        (logging.getLogger() if name == "root" else logging.getLogger(name)).setLevel(level)
    logging.getLogger("memstream").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        quiet()
    try:
        return int(args.func(args) or 0)
    except MemstreamError as e:
        print(f"memstream: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
