"""What every benchmark records beside its figures: the machine and the code it ran on."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info(*packages: str) -> dict:
    """Platform, CPU, memory, load, Python, git commit and the versions of ``packages``."""
    info = {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count(),
            "load_average_at_start": os.getloadavg(),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        cpu = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        info["cpu_model"] = cpu[0].split(":", 1)[1].strip() if cpu else platform.processor()
        info["mem_total_gib"] = round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                            cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        pass
    for name in packages:
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = None
    return info


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) so far of this process and every descendant, by pid."""
    import psutil

    me = psutil.Process()
    out = {}
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            out[p.pid] = (p.name(), t.user + t.system)
        except psutil.Error:
            pass
    return out


def cpu_used(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds spent between two :func:`cpu_seconds` snapshots, summed by process name."""
    used: dict[str, float] = {}
    for pid, (name, t) in after.items():
        used[name] = used.get(name, 0.0) + t - before.get(pid, (name, 0.0))[1]
    return {k: round(v, 2) for k, v in sorted(used.items(), key=lambda kv: -kv[1]) if v > 0.005}


def machine_line(m: dict) -> str:
    """The machine in one sentence, for a result's Markdown."""
    return (f"Machine: {m.get('cpu_model')}, {m['cpus']} CPUs, {m.get('mem_total_gib')} GiB; load average at start "
            f"{', '.join(f'{x:.1f}' for x in m['load_average_at_start'])} (shared machine)")


def save(res: dict, prefix: str, lines: list[str], out: Path) -> None:
    """Write ``out/<prefix>-<UTC time>.json`` (the figures) and ``.md`` (``lines``)."""
    out.mkdir(parents=True, exist_ok=True)
    name = f"{prefix}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    (out / f"{name}.json").write_text(json.dumps(res, indent=2))
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(f"results: {out / name}.json and .md")


def store_args(ap, n: int = 1_000_000) -> None:
    """The arguments of a benchmark that builds a long-term store of ``n`` signed entries."""
    ap.add_argument("--n", type=int, default=n)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--batch", type=int, default=10_000)
    ap.add_argument("--writers", type=int, default=2)
