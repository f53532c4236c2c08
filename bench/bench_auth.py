"""What authentication costs the read API: reads/s of ``memstream serve`` with access control
on and with ``--insecure-no-auth``, over the same store, in the same run.

Two servers over one episodic store of ``--summaries`` signed summaries (random fp16 tokens:
the ratio is what is measured, not the read itself). Rounds alternate between them (ABBA),
so load from other jobs on the machine hits both alike; each round is ``--clients`` clients
sending ``--reads`` reads back to back. Also: the access check alone
(``AccessGuard.check``: header parse, SHA-256, look-ups), timed in process, and its share of
the median read. Results: bench/results/auth-<time>.{json,md}.

    python bench/bench_auth.py
    python bench/bench_auth.py --rounds 8 --clients 4 --reads 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import common
from bench_read import D, SESSION, _free_port, concurrent_reads, write_session


def _start(cmd: list[str], log: Path, port: int):
    import httpx

    with open(log, "wb") as fh:
        server = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"memstream serve did not start: {log.read_text()[-2000:]}")
        time.sleep(0.5)


def _round(url: str, bodies: list[dict], headers: dict, clients: int, reads: int) -> dict:
    lat, errors, wall = concurrent_reads(url, bodies, clients, reads, headers)
    if errors:
        raise RuntimeError(f"{len(errors)} reads failed, e.g. {errors[0][:300]}")
    return {"reads_per_s": len(lat) / wall, "p50_ms": 1e3 * statistics.median(lat)}


def main(argv=None) -> int:
    from memstream.settings import READ_WORKERS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--summaries", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=8, help="rounds per mode, alternating ABBA")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--reads", type=int, default=48, help="reads per client per round")
    ap.add_argument("--workers", type=int, default=READ_WORKERS)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)

    from memstream.access.registry import AccessGuard, AccessRegistry
    from memstream.crypto import SigningKey

    res: dict = {"summaries": args.summaries, "rounds": args.rounds, "clients": args.clients,
                 "reads_per_client": args.reads, "workers": args.workers,
                 "machine": common.machine_info("torch", "lancedb", "fastapi", "uvicorn")}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="bench-auth-") as tmp:
        root = Path(tmp)
        key = SigningKey.generate()
        uri, access = str(root / "episodic"), str(root / "access")
        write_session(uri, key, rng.standard_normal((args.summaries, 256, D)).astype(np.float16), SESSION)
        reg = AccessRegistry(access)
        reg.add_tenant("bench")
        reg.grant("bench", [SESSION])
        for i in range(200):  # a registry that is not trivially small
            reg.add_tenant(f"t{i}")
            reg.grant(f"t{i}", [f"t{i}/s"])
            reg.issue(f"t{i}")
        _, token = reg.issue("bench")
        auth = {"Authorization": f"Bearer {token}"}

        guard = AccessGuard(reg, refresh_s=3600)
        n = 20000
        t0 = time.perf_counter()
        for _ in range(n):
            guard.check(auth["Authorization"], SESSION)
        res["check_us"] = (time.perf_counter() - t0) / n * 1e6
        guard.close()

        bodies = [{"query": rng.standard_normal(D).astype(np.float32).tolist(), "session_id": SESSION, "k": 8,
                   "route": "episodic"} for _ in range(64)]
        env_cmd = [sys.executable, "-m", "memstream.cli", "serve", "--episodic", uri, "--public-key",
                   key.verify_key.hex(), "--workers", str(args.workers)]
        servers, urls = {}, {}
        try:
            for mode, extra in (("auth", ["--access", access]), ("open", ["--insecure-no-auth"])):
                port = _free_port()
                servers[mode] = _start([*env_cmd, "--port", str(port), *extra], root / f"{mode}.log", port)
                urls[mode] = f"http://127.0.0.1:{port}"
                _round(urls[mode], bodies, auth, 1, 4)  # loads the session, warms up
            rows: dict[str, list[dict]] = {"auth": [], "open": []}
            order = []
            for r in range(args.rounds):
                order += ["auth", "open"] if r % 2 == 0 else ["open", "auth"]
            for mode in order:
                row = _round(urls[mode], bodies, auth, args.clients, args.reads)
                rows[mode].append(row)
                print(json.dumps({"mode": mode, **row}), flush=True)
        finally:
            for s in servers.values():
                s.terminate()
                try:
                    s.wait(30)
                except subprocess.TimeoutExpired:
                    s.kill()
    for mode, rs in rows.items():
        res[mode] = {"rounds": rs, "median_reads_per_s": statistics.median(r["reads_per_s"] for r in rs),
                     "median_p50_ms": statistics.median(r["p50_ms"] for r in rs)}
    res["ratio_auth_over_open"] = res["auth"]["median_reads_per_s"] / res["open"]["median_reads_per_s"]
    res["check_share_of_p50"] = res["check_us"] / 1e3 / res["auth"]["median_p50_ms"]
    m = res["machine"]
    lines = [f"# Read API with and without authentication ({args.summaries} summaries, {args.clients} clients, "
             f"{args.workers} read threads)", "", f"{common.machine_line(m)}.", "",
             "| mode | median reads/s | median p50 ms |", "|---|---|---|",
             *(f"| {mode} | {res[mode]['median_reads_per_s']:.1f} | {res[mode]['median_p50_ms']:.1f} |"
               for mode in ("auth", "open")), "",
             f"Ratio auth / open: **{res['ratio_auth_over_open']:.3f}** (medians of {args.rounds} alternating rounds "
             "each; the budget is >= 0.95).", "",
             f"The access check alone: {res['check_us']:.1f} µs per request "
             f"({100 * res['check_share_of_p50']:.3f}% of the median read), over a registry of 201 tenants and "
             "credentials."]
    common.save(res, "auth", lines, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
