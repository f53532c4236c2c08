"""``memstream demo``: the README's main job, end to end on embedded defaults (``make run``)."""

from __future__ import annotations


def register(sub) -> None:
    demo = sub.add_parser("demo", help="run the main job end to end on embedded defaults")
    demo.add_argument("--sessions", type=int, default=3, help=f"sessions to publish (at most 4)")
    demo.add_argument("--keep", action="store_true", help="leave the services running afterwards")
    demo.set_defaults(func=_demo)


def _demo(args) -> int:
    from memstream.demo import run

    return run(sessions=args.sessions, keep=args.keep)
