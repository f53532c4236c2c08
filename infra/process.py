"""Start a service as its own process group, wait until it is ready, stop it by PID."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from memstream.errors import ServiceNotReadyError


@dataclass
class ServiceProcess:
    """A running service: what :mod:`memstream.infra.stack` records in its state file."""

    name: str
    pid: int
    log: str
    endpoints: dict[str, str] = field(default_factory=dict)
    data_dir: str = ""

    def alive(self) -> bool:
        return pid_alive(self.pid)

    def stop(self, timeout: float = 30.0) -> None:
        stop_pid(self.pid, timeout)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def spawn(name: str, cmd: list[str], log: Path, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> subprocess.Popen:
    """Start ``cmd`` in a new session (its own process group) with output to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    out = open(log, "ab")
    try:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True)
    finally:
        out.close()


def wait_ready(name: str, proc: subprocess.Popen | None, pid: int, log: Path,
               ready: Callable[[], bool], timeout: float) -> None:
    """Poll ``ready()`` until it holds; fail fast, quoting the log, if the process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (proc is not None and proc.poll() is not None) or not pid_alive(pid):
            raise ServiceNotReadyError(f"{name} exited during start-up; last log lines:\n{tail(log)}")
        try:
            if ready():
                return
        except Exception:  # not ready yet: connection refused, metadata missing, ...
            pass
        time.sleep(0.25)
    stop_pid(pid)
    raise ServiceNotReadyError(f"{name} not ready after {timeout:.0f}s (log: {log}); last lines:\n{tail(log)}")


def stop_pid(pid: int, timeout: float = 30.0) -> None:
    """SIGTERM the process group led by ``pid``, then SIGKILL whatever is left after ``timeout``."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        except PermissionError:
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap(pid)
            if not pid_alive(pid) and not group_alive(pid):
                return
            time.sleep(0.1)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def group_alive(pgid: int) -> bool:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(") ", 1)[1].split()
                if int(fields[2]) == pgid and fields[0] != "Z":
                    return True
            except (OSError, IndexError, ValueError):
                continue
    return False


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def descendants(pid: int) -> list[int]:
    """PIDs of every live process below ``pid`` in the process tree."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(") ", 1)[1].split()
                if fields[0] != "Z":
                    children.setdefault(int(fields[1]), []).append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def processes_mentioning(text: str) -> list[tuple[int, str]]:
    """Live processes whose command line contains ``text`` (to find strays by their data folder)."""
    hits = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd and pid_alive(int(entry)):
                hits.append((int(entry), cmd.strip()))
    return hits
