"""``memstream infra fetch|up|down|status`` and ``memstream airflow up|down|status``."""

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

    air = sub.add_parser("airflow", help="run Airflow with the maintenance DAGs on 127.0.0.1 (SQLite, parallelism 2)")
    air.add_argument("--dir", type=Path, default=None, help="AIRFLOW_HOME (default: $MEMSTREAM_CACHE/airflow)")
    verbs = air.add_subparsers(dest="verb", required=True)
    up = verbs.add_parser("up", help="start scheduler, DAG processor and API server; return once healthy")
    up.add_argument("--timeout", type=float, default=240.0, help="seconds to wait for health (default 240)")
    up.set_defaults(func=_airflow_up)
    verbs.add_parser("down", help="stop every component by PID (SIGINT, then force)").set_defaults(func=_airflow_down)
    verbs.add_parser("status", help="components, URL and health as JSON").set_defaults(func=_airflow_status)


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


def _airflow_up(args) -> int:
    from memstream.infra.airflow import LocalAirflow

    af = LocalAirflow(args.dir)
    started = time.monotonic()
    st = af.up(timeout=args.timeout)
    print(f"airflow up in {time.monotonic() - started:.1f}s at {af.url()} (user admin, password in "
          f"{af.home / 'simple_auth_manager_passwords.json.generated'})")
    print("pids: " + ", ".join(f"{n} {p}" for n, p in st["pids"].items()) + "; stop with: memstream airflow down")
    return 0


def _airflow_down(args) -> int:
    from memstream.infra.airflow import LocalAirflow

    stopped = LocalAirflow(args.dir).down()
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def _airflow_status(args) -> int:
    from memstream.infra.airflow import LocalAirflow

    status = LocalAirflow(args.dir).status()
    print(json.dumps(status, indent=2))
    return 0 if status["running"] and all(c["alive"] for c in status["components"].values()) else 1
