"""``memstream infra fetch|up|down|status``."""

from __future__ import annotations

import json
import time
from pathlib import Path

from memstream.infra.stack import OPTIONAL, SERVICES, Stack


def register(sub) -> None:
    infra = sub.add_parser("infra", help="start, stop and inspect the local services")
    infra.add_argument("--dir", type=Path, default=None, help="stack folder (default: $MEMSTREAM_CACHE/stack)")
    verbs = infra.add_subparsers(dest="verb", required=True)
    up = verbs.add_parser("up", help="start Kafka and S3 (SeaweedFS), or the services named, on 127.0.0.1")
    up.add_argument("services", nargs="*", default=list(SERVICES), help=f"any of: {', '.join(SERVICES + OPTIONAL)}")
    up.set_defaults(func=_up)
    verbs.add_parser("down", help="stop every service of the stack by PID").set_defaults(func=_down)
    verbs.add_parser("status", help="print the services as JSON").set_defaults(func=_status)
    verbs.add_parser("fetch", help="download and build what the services need (mvn, go install), once"
                     ).set_defaults(func=_fetch)


def _up(args) -> int:
    stack = Stack(args.dir)
    started = time.monotonic()
    running = stack.up(tuple(args.services))
    for name, svc in running.items():
        print(f"{name:6} pid {svc.pid:<7} {' '.join(f'{k}={v}' for k, v in svc.endpoints.items() if 'secret' not in k)}")
    print(f"up in {time.monotonic() - started:.1f}s; stop with: memstream infra down")
    return 0


def _down(args) -> int:
    stopped = Stack(args.dir).down()
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def _status(args) -> int:
    status = Stack(args.dir).status()
    for entry in status.values():
        entry.pop("secret_key", None)
    print(json.dumps(status, indent=2))
    return 0 if status and all(s["alive"] for s in status.values()) else 1


def _fetch(args) -> int:
    from memstream.infra import kafka, runners

    for name, ensure in (("kafka jars", kafka.ensure_jars), ("prism", runners.ensure_prism),
                         ("flink jars", runners.ensure_flink)):
        started = time.monotonic()
        path = ensure()
        print(f"{name:11} {path} ({time.monotonic() - started:.1f}s)")
    return 0
