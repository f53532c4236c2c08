"""Read API benchmark: the episodic read (two-stage against exact), sessions under a bounded
cache, concurrent reads over HTTP, and long-term reads, each against a baseline measured in
the same run.

- **Episodic** (``--summaries``, default 1,220): one session of signed summaries of real
  MiniLM latents. The corpus holds about 440k latents, 107 windows of 4,096; the compressor
  summarises them, and then copies of them with noise (0.3 x the latents' rms) added before
  compression, until the session holds ``--summaries`` summaries (each copy compresses to
  different slots). Queries are cues of corpus latents (noise 0.2-0.6 x rms). Baseline: the
  exact read, ``Compressor.attend`` over the whole window's fp32 tokens with cached slot norms
  (what the read path did before), timed interleaved with the API's reads so that load from
  other jobs hits both alike. Agreement of the two-stage read with the API's exact read: top-8
  overlap, and the gap between their reconstructions' cosines to the latent cued.
- **Scaling**: the two-stage and the exact read of the first n summaries, n up to the window.
- **Sessions** (``--sessions``, default 100, of ``--session-summaries`` each): reads spread at
  random over the sessions with ``--cache-mib`` of cache, so most find their session cold;
  resident bytes per session; baseline: the same reads with every session cached.
- **HTTP**: ``memstream serve`` in its own process; 1, 4 and 16 clients each sending reads back
  to back; reads/s and p50/p99, against one client calling ``Memory.read`` in process.
- **Long-term** (``--longterm``, a store built by bench_longterm.py, optional): the API's
  long-term read against the bare ``LongTermStore.search``.

Built stores are cached under ``$MEMSTREAM_CACHE/bench/read`` (``--rebuild`` to build again).
Results and the machine go to bench/results/read-<time>.{json,md}.

    python bench/bench_read.py
    python bench/bench_read.py --parts episodic,scaling --summaries 600
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

import common

D = 384
SESSION = "bench"


def percentile(xs, p) -> float:
    return float(np.percentile(np.asarray(xs) * 1000, p))


def summary(lat: list[float]) -> dict:
    return {"n": len(lat), "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99),
            "reads_per_s": len(lat) / sum(lat)}


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------ data

def corpus_latents() -> np.ndarray:
    from memstream.operators.data import split_latents

    parts = []
    for split in ("heldout", "validation", "train"):
        parts += list(split_latents(split).values())
    return np.concatenate(parts)


def summary_tokens(model, x: np.ndarray, count: int, log) -> np.ndarray:
    """``count`` summaries [count, 256, 384] fp16: the corpus's windows, then noisy copies."""
    import torch

    from memstream.settings import WINDOW

    wins = torch.from_numpy(x[: len(x) // WINDOW * WINDOW].reshape(-1, WINDOW, D))
    out, copy = [], 0
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        while sum(len(o) for o in out) < count:
            xc = wins
            if copy:
                xc = wins + 0.3 * wins.norm(dim=-1, keepdim=True) / D ** 0.5 * torch.randn(wins.shape, generator=gen)
            for i in range(0, len(wins), 8):
                out.append(model.encode(xc[i:i + 8]).half().numpy())
            copy += 1
            log(f"compressed copy {copy}: {sum(len(o) for o in out)} summaries")
    return np.concatenate(out)[:count]


def write_session(uri: str, key, tokens: np.ndarray, session: str, first: int = 0) -> None:
    from memstream.episodic.chain import seal
    from memstream.episodic.store import EpisodicStore
    from memstream.pipelines.episodic import operator_version
    from memstream.schemas.records import SummaryRecord
    from memstream.settings import WINDOW

    store = EpisodicStore(uri, horizon=max(len(tokens), 1))
    version, prev, batch = operator_version(None), b"", []
    for i, t in enumerate(tokens):
        w = first + i
        rec = seal(SummaryRecord(
            schema_version=2, session_id=session, window_index=w, seq_start=w * WINDOW, seq_end=(w + 1) * WINDOW,
            cut="full", token_count=t.shape[0], dim=D, tokens_dtype="fp16", tokens=t.astype("<f2").tobytes(),
            operator_version=version, producer_id=b"\x01" * 16, latents_dtype="fp32", latent_dim=D,
            event_time_us=time.time_ns() // 1000 + w, prev_hash=prev, hash=b"", signature=b"", key_id=""), key)
        prev = rec.hash
        batch.append(rec)
        if len(batch) == 200 or i == len(tokens) - 1:
            store.append(batch)
            batch = []


def cached_stores(args, model, log) -> tuple[Path, "object", np.ndarray]:
    """The episodic stores (one long session; ``--sessions`` smaller ones), built once."""
    from memstream.crypto import SigningKey

    root = Path(args.cache) / f"s{args.summaries}-m{args.sessions}x{args.session_summaries}"
    done = root / "done.json"
    x = corpus_latents()
    if args.rebuild and root.exists():
        shutil.rmtree(root)
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        key = SigningKey.generate()
        (root / "key.pem").write_bytes(key.private_pem())
        t0 = time.monotonic()
        tokens = summary_tokens(model, x, max(args.summaries, args.session_summaries), log)
        compress_s = time.monotonic() - t0
        t0 = time.monotonic()
        write_session(str(root / "episodic"), key, tokens[: args.summaries], SESSION)
        rng = np.random.default_rng(2)
        for s in range(args.sessions):  # each session a different run of summaries
            start = int(rng.integers(0, len(tokens) - args.session_summaries + 1))
            write_session(str(root / "sessions"), key, tokens[start:start + args.session_summaries], f"s{s:03d}")
        done.write_text(json.dumps({"compress_s": compress_s, "write_s": time.monotonic() - t0}))
        log(f"stores built in {root}")
    return root, SigningKey.parse((root / "key.pem").read_bytes()), x


def cues(x: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from memstream.settings import WINDOW

    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x) // WINDOW * WINDOW, n)
    t = x[idx]
    noise = rng.uniform(0.2, 0.6, (n, 1))
    q = t + noise * np.linalg.norm(t, axis=1, keepdims=True) / np.sqrt(D) * rng.standard_normal(t.shape)
    return q.astype(np.float32), t


def cos(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# ------------------------------------------------------------------------------ parts

def episodic(args, model, root: Path, key, x: np.ndarray, log) -> dict:
    import torch

    from memstream.crypto import KeyRing
    from memstream.read.memory import Memory

    uri = str(root / "episodic")
    ring = KeyRing([key])
    out: dict = {}
    rss0 = rss_mib()
    fast = Memory(uri, keyring=ring, model=model, flush_every=64)
    t0 = time.perf_counter()
    window = fast.session_memory(SESSION)
    out["cold_load_s"] = time.perf_counter() - t0
    out["window_mib"] = window.nbytes / 2**20
    out["rss_growth_mib"] = rss_mib() - rss0
    t0 = time.perf_counter()
    window.window.add_many([(w, window.window.tokens(w)) for w in window.windows[:100]])
    out["index_100_summaries_s"] = time.perf_counter() - t0  # the grouping, re-done for 100 summaries
    exact = Memory(uri, keyring=ring, model=model, mode="exact", flush_every=64)
    exact.session_memory(SESSION)
    # The baseline: the exact read as it was, over fp32 tokens with cached slot norms.
    tokens = torch.cat([window.window.tokens(w).float() for w in window.windows])
    norms = model.slots_of(tokens).norm(dim=-1).clamp_min(1e-12)
    out["baseline_fp32_mib"] = tokens.numel() * 4 / 2**20
    queries, targets = cues(x, args.queries, 1)
    rows = {k: [] for k in ("exact_attend_baseline", "api_exact", "api_two_stage", "window_two_stage",
                            "store_hashes", "ledger_biases")}
    overlap, gap, agree, tokens_read = [], [], [], []
    for q in queries[:3]:  # warm
        fast.read(q, SESSION, 8, route="episodic", account=False)
        exact.read(q, SESSION, 8, route="episodic", account=False)
    qt = torch.from_numpy(queries)
    for i, (q, t) in enumerate(zip(queries, targets)):
        s = time.perf_counter()
        with torch.inference_mode():
            model.attend(qt[i][None], tokens, None, norms)
        rows["exact_attend_baseline"].append(time.perf_counter() - s)
        s = time.perf_counter()
        a = exact.read(q, SESSION, 8, route="episodic")
        rows["api_exact"].append(time.perf_counter() - s)
        s = time.perf_counter()
        b = fast.read(q, SESSION, 8, route="episodic")
        rows["api_two_stage"].append(time.perf_counter() - s)
        s = time.perf_counter()
        got = window.window.read(qt[i], None, 8)
        rows["window_two_stage"].append(time.perf_counter() - s)
        tokens_read.append(got.tokens_read)
        s = time.perf_counter()
        fast.store.hashes(SESSION)
        rows["store_hashes"].append(time.perf_counter() - s)
        s = time.perf_counter()
        fast.ledger.biases(SESSION)
        rows["ledger_biases"].append(time.perf_counter() - s)
        overlap.append(len({f.key for f in a.fragments} & {f.key for f in b.fragments}) / 8)
        gap.append(abs(cos(a.reconstruction, t) - cos(b.reconstruction, t)))
        agree.append(cos(a.reconstruction, b.reconstruction))
    fast.close()
    exact.close()
    out["rows"] = {k: summary(v) for k, v in rows.items()}
    out["tokens_read_mean"] = float(np.mean(tokens_read))
    out["tokens_in_window"] = int(tokens.shape[0])
    out["agreement"] = {"top8_overlap_mean": float(np.mean(overlap)), "top8_overlap_min": float(np.min(overlap)),
                        "cosine_gap_mean": float(np.mean(gap)), "cosine_gap_p95": float(np.percentile(gap, 95)),
                        "cosine_gap_max": float(np.max(gap)), "reconstruction_cosine_mean": float(np.mean(agree))
}
    r = out["rows"]
    out["ratios"] = {"two_stage_api_over_exact_attend_p50": r["api_two_stage"]["p50_ms"] / r["exact_attend_baseline"]["p50_ms"],
                     "two_stage_api_over_exact_api_p50": r["api_two_stage"]["p50_ms"] / r["api_exact"]["p50_ms"],
                     "window_two_stage_over_exact_attend_p50": (r["window_two_stage"]["p50_ms"]
                                                                / r["exact_attend_baseline"]["p50_ms"])}
    log(json.dumps({"episodic": out["rows"], "agreement": out["agreement"]}))
    return out


def scaling(args, model, root: Path, key, x: np.ndarray, log) -> dict:
    import torch

    from memstream.read.memory import Memory
    from memstream.read.window import SessionWindow

    full = Memory(str(root / "episodic"), model=model).session_memory(SESSION).window
    queries, _ = cues(x, args.queries // 2, 3)
    qt = torch.from_numpy(queries)
    out = []
    for n in sorted({n for n in (150, 300, 600, args.summaries) if n <= args.summaries}):
        w = SessionWindow(model)
        w.add_many([(i, full.tokens(i)) for i in full.windows[:n]])
        tokens = torch.cat([w.tokens(i).float() for i in w.windows])
        norms = model.slots_of(tokens).norm(dim=-1).clamp_min(1e-12)
        two, ex = [], []
        w.read(qt[0], None, 8)
        for q in qt:
            s = time.perf_counter()
            w.read(q, None, 8)
            two.append(time.perf_counter() - s)
            s = time.perf_counter()
            with torch.inference_mode():
                model.attend(q[None], tokens, None, norms)
            ex.append(time.perf_counter() - s)
        row = {"summaries": n, "two_stage": summary(two), "exact_attend_baseline": summary(ex)}
        row["ratio_p50"] = row["two_stage"]["p50_ms"] / row["exact_attend_baseline"]["p50_ms"]
        log(json.dumps({"scaling": {"n": n, "two_stage_p50": row["two_stage"]["p50_ms"],
                                    "exact_p50": row["exact_attend_baseline"]["p50_ms"]}}))
        out.append(row)
        del w, tokens
    return {"rows": out}


def sessions(args, model, root: Path, key, x: np.ndarray, log) -> dict:
    from memstream.crypto import KeyRing
    from memstream.read.memory import Memory

    uri = str(root / "sessions")
    ids = [f"s{s:03d}" for s in range(args.sessions)]
    queries, _ = cues(x, args.session_reads, 5)
    order = np.random.default_rng(6).integers(0, len(ids), args.session_reads)
    out: dict = {"sessions": args.sessions, "summaries_per_session": args.session_summaries,
                 "cache_mib": args.cache_mib, "reads": args.session_reads}
    rss0 = rss_mib()
    bounded = Memory(uri, keyring=KeyRing([key]), model=model, cache_bytes=args.cache_mib << 20)
    lat, cold = [], 0
    for q, s in zip(queries, order):
        hit = ids[s] in bounded.cached_bytes()
        t0 = time.perf_counter()
        bounded.read(q, ids[s], 8, route="episodic")
        lat.append(time.perf_counter() - t0)
        cold += not hit
    held = bounded.cached_bytes()
    out["bounded"] = {**summary(lat), "cold_reads": cold, "sessions_cached_at_end": len(held),
                      "cached_mib_at_end": sum(held.values()) / 2**20,
                      "bytes_per_session_mib": float(np.mean(list(held.values()))) / 2**20,
                      "rss_growth_mib": rss_mib() - rss0}
    log(json.dumps({"sessions_bounded": out["bounded"]}))
    bounded.close()
    del bounded
    everything = Memory(uri, keyring=KeyRing([key]), model=model, cache_bytes=1 << 40)
    for s in ids:
        everything.session_memory(s)
    lat = []
    for q, s in zip(queries, order):
        t0 = time.perf_counter()
        everything.read(q, ids[s], 8, route="episodic")
        lat.append(time.perf_counter() - t0)
    out["all_cached_baseline"] = {**summary(lat), "cached_mib": sum(everything.cached_bytes().values()) / 2**20}
    out["ratio_p50"] = out["bounded"]["p50_ms"] / out["all_cached_baseline"]["p50_ms"]
    everything.close()
    log(json.dumps({"sessions_all_cached": out["all_cached_baseline"]}))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def concurrent_reads(url: str, bodies: list[dict], clients: int, per_client: int,
                     headers: dict | None = None) -> tuple[list[float], list[str], float]:
    """``clients`` threads each posting ``per_client`` reads back to back: (latencies of the
    reads answered 200, texts of the others, wall seconds)."""
    import httpx

    lat, errors = [], []
    lock = threading.Lock()

    def client(j):
        with httpx.Client(timeout=600, headers=headers) as c:
            for n in range(per_client):
                t0 = time.perf_counter()
                r = c.post(f"{url}/v1/read", json=bodies[(j * 7 + n) % len(bodies)])
                dt = time.perf_counter() - t0
                with lock:
                    (lat if r.status_code == 200 else errors).append(dt if r.status_code == 200 else r.text)

    threads = [threading.Thread(target=client, args=(j,)) for j in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat, errors, time.perf_counter() - t0


def http(args, model, root: Path, key, x: np.ndarray, log) -> dict:
    import httpx

    from memstream.crypto import KeyRing
    from memstream.read.memory import Memory

    uri = str(root / "episodic")
    queries, _ = cues(x, 64, 7)
    body = [{"query": q.tolist(), "session_id": SESSION, "k": 8, "route": "episodic"} for q in queries]
    mem = Memory(uri, keyring=KeyRing([key]), model=model)
    mem.read(queries[0], SESSION, 8, route="episodic", account=False)
    lat = []
    for q in queries:
        t0 = time.perf_counter()
        mem.read(q, SESSION, 8, route="episodic")
        lat.append(time.perf_counter() - t0)
    mem.close()
    out: dict = {"in_process_baseline": summary(lat), "workers": args.workers, "clients": {}}
    port = _free_port()
    log_file = Path(args.cache) / "serve.log"
    env = {**os.environ, "MEMSTREAM_READ_WORKERS": str(args.workers)}
    with open(log_file, "wb") as fh:
        server = subprocess.Popen([sys.executable, "-m", "memstream.cli", "serve", "--episodic", uri,
                                   "--public-key", key.verify_key.hex(), "--port", str(port),
                                   "--insecure-no-auth"],  # serving, not access: bench_auth.py prices that
                                  stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{url}/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"memstream serve did not start: {log_file.read_text()[-2000:]}")
            time.sleep(0.5)
        with httpx.Client(timeout=600) as c:  # loads the session once
            assert c.post(f"{url}/v1/read", json=body[0]).status_code == 200
        for clients in args.clients:
            lat, errors, wall = concurrent_reads(url, body, clients, max(8, args.http_reads // clients))
            row = {**summary(lat), "reads_per_s": len(lat) / wall, "errors": len(errors)}
            out["clients"][str(clients)] = row
            log(json.dumps({"http_clients": clients, **row}))
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    base = out["in_process_baseline"]
    out["ratios"] = {f"{c}_clients_reads_per_s_over_in_process": r["reads_per_s"] / base["reads_per_s"]
                     for c, r in out["clients"].items()}
    return out


def longterm(args, model, root: Path, key, x: np.ndarray, log) -> dict:
    from memstream.crypto import KeyRing
    from memstream.longterm import LongTermStore

    if not args.longterm:
        return {"skipped": "no --longterm store given"}
    store = LongTermStore(args.longterm, keyring=KeyRing(), dim=D)
    queries, _ = cues(x, args.queries, 9)
    from memstream.read.memory import Memory

    mem = Memory(str(root / "episodic"), args.longterm, model=model)
    rows = {"api": [], "search_baseline": []}
    mem.read(queries[0], SESSION, 8, route="longterm")
    for q in queries:
        t0 = time.perf_counter()
        mem.read(q, SESSION, 8, route="longterm")
        rows["api"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        store.search(q, 8, nprobes=mem.nprobes, record_access=False)
        rows["search_baseline"].append(time.perf_counter() - t0)
    mem.close()
    out = {"entries": store.count(), "rows": {k: summary(v) for k, v in rows.items()}}
    out["ratio_p50"] = out["rows"]["api"]["p50_ms"] / out["rows"]["search_baseline"]["p50_ms"]
    log(json.dumps({"longterm": out}))
    return out


PARTS = {"episodic": episodic, "scaling": scaling, "sessions": sessions, "http": http, "longterm": longterm}


def main(argv=None) -> int:
    from memstream.settings import READ_WORKERS, cache_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    ap.add_argument("--summaries", type=int, default=1220)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--sessions", type=int, default=100)
    ap.add_argument("--session-summaries", type=int, default=60)
    ap.add_argument("--session-reads", type=int, default=300)
    ap.add_argument("--cache-mib", type=int, default=256)
    ap.add_argument("--clients", type=lambda s: [int(c) for c in s.split(",")], default=[1, 4, 16])
    ap.add_argument("--http-reads", type=int, default=128, help="reads per client count, shared by the clients")
    ap.add_argument("--workers", type=int, default=READ_WORKERS, help="read threads of memstream serve")
    ap.add_argument("--longterm", default=None, help="a long-term store (bench_longterm.py --keep builds one)")
    ap.add_argument("--cache", default=str(cache_dir() / "bench" / "read"))
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}")

    import torch

    from memstream.operators.checkpoint import load_default

    def log(msg: str) -> None:
        print(msg, flush=True)

    model = load_default()
    res: dict = {"summaries": args.summaries, "queries": args.queries, "torch_threads": torch.get_num_threads(),
                 "machine": common.machine_info("torch", "lancedb", "pylance", "fastapi", "uvicorn")}
    t0 = time.monotonic()
    root, key, x = cached_stores(args, model, log)
    res["stores"] = {"root": str(root), "prepared_s": time.monotonic() - t0,
                     **json.loads((root / "done.json").read_text())}
    for p in parts:
        res[p] = PARTS[p](args, model, root, key, x, log)
    write_results(res, Path(args.out))
    return 0


def write_results(res: dict, out: Path) -> None:
    lines = [f"# Read benchmark: episodic window of {res['summaries']:,} summaries", "",
             f"{common.machine_line(res['machine'])}; torch threads {res['torch_threads']}; k = 8.", "",
             f"Stores: compressed in {res['stores']['compress_s']:.0f} s, written in {res['stores']['write_s']:.0f} s "
             "(cached; see the script's docstring for the data).", ""]
    if "episodic" in res:
        e = res["episodic"]
        r, a = e["rows"], e["agreement"]
        lines += ["## Episodic read", "",
                  f"Cold load (read, verify hash and signature, fp16, index): {e['cold_load_s']:.1f} s; window "
                  f"{e['window_mib']:.0f} MiB held (fp16 tokens and index; the fp32 baseline holds "
                  f"{e['baseline_fp32_mib']:.0f} MiB); grouping 100 summaries {e['index_100_summaries_s']:.2f} s. "
                  f"The two-stage read attends over {e['tokens_read_mean']:.0f} of {e['tokens_in_window']:,} tokens.", "",
                  "| read | p50 ms | p99 ms | reads/s |", "|---|---|---|---|"]
        for name, row in r.items():
            lines.append(f"| {name} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['reads_per_s']:.1f} |")
        lines += ["", "Ratios (same run): " + ", ".join(f"{k} = {v:.3f}" for k, v in e["ratios"].items()), "",
                  f"Agreement with the exact read ({res['queries']} cues): top-8 overlap {a['top8_overlap_mean']:.3f} "
                  f"(min {a['top8_overlap_min']:.3f}); |cosine to the cued latent, two-stage - exact| mean "
                  f"{a['cosine_gap_mean']:.5f}, p95 {a['cosine_gap_p95']:.5f}, max {a['cosine_gap_max']:.5f}; "
                  f"cosine between the two reconstructions {a['reconstruction_cosine_mean']:.5f}.", ""]
    if "scaling" in res:
        lines += ["## Scaling with the window", "", "| summaries | two-stage p50 ms | exact p50 ms | ratio |",
                  "|---|---|---|---|"]
        for row in res["scaling"]["rows"]:
            lines.append(f"| {row['summaries']} | {row['two_stage']['p50_ms']:.2f} | "
                         f"{row['exact_attend_baseline']['p50_ms']:.2f} | {row['ratio_p50']:.3f} |")
        lines.append("")
    if "sessions" in res:
        s = res["sessions"]
        b, base = s["bounded"], s["all_cached_baseline"]
        lines += ["## Many sessions, bounded cache", "",
                  f"{s['sessions']} sessions of {s['summaries_per_session']} summaries, {s['reads']} reads at random, "
                  f"cache {s['cache_mib']} MiB: p50 {b['p50_ms']:.1f} ms, p99 {b['p99_ms']:.1f} ms, {b['cold_reads']} "
                  f"cold reads; {b['sessions_cached_at_end']} sessions cached at the end "
                  f"({b['cached_mib_at_end']:.0f} MiB, {b['bytes_per_session_mib']:.1f} MiB per session; process RSS "
                  f"grew {b['rss_growth_mib']:.0f} MiB). Baseline, every session cached "
                  f"({base['cached_mib']:.0f} MiB): p50 {base['p50_ms']:.1f} ms, p99 {base['p99_ms']:.1f} ms; "
                  f"ratio {s['ratio_p50']:.2f}.", ""]
    if "http" in res:
        h = res["http"]
        base = h["in_process_baseline"]
        lines += ["## Concurrent reads over HTTP", "",
                  f"`memstream serve` with {h['workers']} read threads; in-process baseline (one client, "
                  f"`Memory.read`): p50 {base['p50_ms']:.1f} ms, {base['reads_per_s']:.1f} reads/s.", "",
                  "| clients | reads/s | p50 ms | p99 ms | errors |", "|---|---|---|---|---|"]
        for c, row in h["clients"].items():
            lines.append(f"| {c} | {row['reads_per_s']:.1f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | "
                         f"{row['errors']} |")
        lines += ["", "Ratios (same run): " + ", ".join(f"{k} = {v:.2f}" for k, v in h["ratios"].items()), ""]
    if "longterm" in res and "rows" in res["longterm"]:
        lt = res["longterm"]
        lines += ["## Long-term read", "", f"{lt['entries']:,} entries: API p50 {lt['rows']['api']['p50_ms']:.1f} ms, "
                  f"bare search {lt['rows']['search_baseline']['p50_ms']:.1f} ms, ratio {lt['ratio_p50']:.2f}.", ""]
    common.save(res, "read", lines, out)


if __name__ == "__main__":
    raise SystemExit(main())
