"""Crash points for fault tests: ``MEMSTREAM_CRASH_AT=<name>`` makes the process kill itself
(SIGKILL: no cleanup, no flush) the first time it reaches :func:`crash_point` ``(name)``, so a
test can crash a real pipeline exactly between two of its writes. ``MEMSTREAM_STOP_AT=<name>``
stops it there instead (SIGSTOP: every thread, heartbeats included, until a SIGCONT), which is
how a test pauses a lease holder. Unset, it costs a dict lookup."""

from __future__ import annotations

import os
import signal


def crash_point(name: str) -> None:
    if os.environ.get("MEMSTREAM_CRASH_AT") == name:
        os.killpg(os.getpgrp(), signal.SIGKILL) if os.environ.get("MEMSTREAM_CRASH_GROUP") else \
            os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("MEMSTREAM_STOP_AT") == name:
        os.kill(os.getpid(), signal.SIGSTOP)
