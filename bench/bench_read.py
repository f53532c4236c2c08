"""Read API benchmark: latency p50/p99 and reads/s of episodic-only, long-term-only and
routed reads through :class:`memstream.read.memory.Memory`, at realistic sizes, with same-run
baselines.

- Episodic: one session of ``--summaries`` (1,220) signed summaries of 256 x 384 fp16 tokens,
  about 5M latents of context. Compressing 5M latents takes long on 2 cores, so the tokens
  are the committed compressor's output for ``--encoded-windows`` windows of random latents,
  repeated with a small fp16 perturbation per summary; each summary is still sealed and
  chained. Reads cross-attend over all 312,320 tokens.
- Long-term: ``--longterm-n`` (default 1M) signed 384-d entries built as bench_longterm.py
  builds them (a Gaussian mixture, writer processes, IVF_FLAT index).
- Routed: queries half near long-term entries, half near session summaries; the policy decides.

Baselines, measured in the same run on the same data: the decoder attention alone over the
cached tokens (``Compressor.attend`` with the cached slot norms), ``Compressor.decode`` over the
same tokens (a few reads: it takes every slot's norm again), and ``LongTermStore.search`` alone. Each API figure is given
as a ratio to its baseline. Results + machine go to bench/results/read-<time>.{json,md}.

    python bench/bench_read.py                       # 1,220 summaries, 1M long-term entries
    python bench/bench_read.py --longterm-n 100000   # a smaller long-term store
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

import common
from bench_longterm import _writer, mixture, percentile

D = 384


def build_session(uri: str, key, model, summaries: int, encoded: int, seed: int = 0) -> None:
    import torch

    from memstream.episodic.chain import seal
    from memstream.episodic.store import EpisodicStore
    from memstream.pipelines.episodic import operator_version
    from memstream.settings import WINDOW
    from memstream.schemas.records import SummaryRecord

    rng = np.random.default_rng(seed)
    with torch.inference_mode():
        base = model.encode(torch.from_numpy(rng.standard_normal((encoded, WINDOW, D), dtype=np.float32)))
    base = base.numpy()
    store = EpisodicStore(uri, horizon=summaries)
    version, prev, batch = operator_version(None), b"", []
    for w in range(summaries):
        tokens = (base[w % encoded] + 0.05 * rng.standard_normal(base.shape[1:], dtype=np.float32)).astype("<f2")
        rec = seal(SummaryRecord(
            schema_version=2, session_id="bench", window_index=w, seq_start=w * WINDOW, seq_end=(w + 1) * WINDOW,
            cut="full", token_count=tokens.shape[0], dim=D, tokens_dtype="fp16", tokens=tokens.tobytes(),
            operator_version=version, producer_id=b"\x01" * 16, latents_dtype="fp32", latent_dim=D,
            event_time_us=time.time_ns() // 1000 + w, prev_hash=prev, hash=b"", signature=b"", key_id=""), key)
        prev = rec.hash
        batch.append(rec)
        if len(batch) == 100 or w == summaries - 1:
            store.append(batch)
            batch = []


def timed(fn, queries) -> list[float]:
    out = []
    for q in queries:
        s = time.perf_counter()
        fn(q)
        out.append(time.perf_counter() - s)
    return out


def summary(lat: list[float]) -> dict:
    return {"n": len(lat), "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99),
            "reads_per_s": len(lat) / sum(lat)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--summaries", type=int, default=1220)
    ap.add_argument("--encoded-windows", type=int, default=8)
    ap.add_argument("--longterm-n", type=int, default=1_000_000)
    ap.add_argument("--writers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--decode-reads", type=int, default=3, help="reads of the textbook decoder baseline")
    ap.add_argument("--root", default=None, help="folder of the stores (default: temporary, removed after)")
    ap.add_argument("--reuse", action="store_true", help="the stores under --root exist already: skip building")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)

    import torch

    from memstream.crypto import KeyRing, SigningKey
    from memstream.longterm import LongTermStore
    from memstream.operators.checkpoint import load_default
    from memstream.read.memory import Memory

    root = Path(args.root or tempfile.mkdtemp(prefix="read-bench-"))
    ep_uri, lt_uri = str(root / "episodic"), str(root / "longterm")
    key = SigningKey.generate()
    model = load_default()
    res: dict = {"summaries": args.summaries, "tokens": args.summaries * model.config.n_summary,
                 "longterm_n": args.longterm_n, "queries": args.queries, "k": args.k,
                 "torch_threads": torch.get_num_threads(),
                 "machine": common.machine_info("torch", "lancedb", "pylance")}
    seed = 7
    if not args.reuse:
        t0 = time.monotonic()
        build_session(ep_uri, key, model, args.summaries, args.encoded_windows)
        res["build_session_s"] = time.monotonic() - t0
        print(f"session of {args.summaries} summaries in {res['build_session_s']:.0f}s", flush=True)
        LongTermStore(lt_uri, keyring=KeyRing([key]), signer=key, dim=D)
        per = [args.longterm_n // args.writers + (1 if w < args.longterm_n % args.writers else 0)
               for w in range(args.writers)]
        t0 = time.monotonic()
        with ProcessPoolExecutor(args.writers, mp_context=get_context("spawn")) as pool:
            list(pool.map(_writer, [(lt_uri, key.private_pem(), w, per[w], D, args.batch, seed)
                                    for w in range(args.writers)]))
        res["build_longterm_s"] = time.monotonic() - t0
        t0 = time.monotonic()
        LongTermStore(lt_uri, keyring=KeyRing([key]), dim=D).build_index()
        res["index_s"] = time.monotonic() - t0
        print(f"long-term {args.longterm_n} in {res['build_longterm_s']:.0f}s, index {res['index_s']:.0f}s",
              flush=True)

    memory = Memory(ep_uri, lt_uri, model=model, flush_every=64)
    t0 = time.perf_counter()
    window = memory.session_memory("bench")
    res["cold_window_load_s"] = time.perf_counter() - t0
    res["window_cache_mib"] = window.nbytes / 2**20
    rng = np.random.default_rng(1)
    centers = np.random.default_rng(seed).standard_normal((4096, D), dtype=np.float32)
    lt_queries = mixture(424242, args.queries, D, centers)
    # episodic queries: a summary's mean slot mapped back to latent space
    ep_queries = (window.centroids.numpy()[rng.integers(0, len(window.windows), args.queries)] @ model.unproj.detach().numpy().T
                  + model.shift.numpy()).astype(np.float32)
    mixed = np.concatenate([lt_queries[: args.queries // 2], ep_queries[: args.queries - args.queries // 2]])
    rng.shuffle(mixed)
    k = args.k
    memory.read(ep_queries[0], "bench", k, route="both")  # warm
    rows = {}
    rows["episodic_api"] = summary(timed(lambda q: memory.read(q, "bench", k, route="episodic"), ep_queries))
    print(json.dumps({"episodic_api": rows["episodic_api"]}), flush=True)
    tokens = window.tokens
    with torch.inference_mode():
        rows["episodic_attend_baseline"] = summary(timed(
            lambda q: model.attend(torch.from_numpy(q)[None], tokens, None, window.slot_norms), ep_queries))
    with torch.inference_mode():
        rows["episodic_textbook_decode_baseline"] = summary(timed(
            lambda q: model.decode(torch.from_numpy(q)[None], tokens), ep_queries[: args.decode_reads]))
    rows["longterm_api"] = summary(timed(lambda q: memory.read(q, "bench", k, route="longterm"), lt_queries))
    print(json.dumps({"longterm_api": rows["longterm_api"]}), flush=True)
    rows["longterm_search_baseline"] = summary(timed(
        lambda q: memory.longterm.search(q, k, nprobes=memory.nprobes, record_access=False), lt_queries))
    routes: dict[str, int] = {}

    def routed(q):
        r = memory.read(q, "bench", k)
        routes[r.route.route] = routes.get(r.route.route, 0) + 1

    rows["routed_api"] = summary(timed(routed, mixed))
    rows["routed_api"]["routes"] = routes
    rows["both_api"] = summary(timed(lambda q: memory.read(q, "bench", k, route="both"), mixed))
    print(json.dumps({"routed_api": rows["routed_api"]}), flush=True)
    memory.close()
    res["rows"] = rows
    res["ratios"] = {
        "episodic_api_over_attend_p50": rows["episodic_api"]["p50_ms"] / rows["episodic_attend_baseline"]["p50_ms"],
        "textbook_decode_over_episodic_api_p50": (rows["episodic_textbook_decode_baseline"]["p50_ms"]
                                                  / rows["episodic_api"]["p50_ms"]),
        "longterm_api_over_search_p50": rows["longterm_api"]["p50_ms"] / rows["longterm_search_baseline"]["p50_ms"],
        "routed_over_both_p50": rows["routed_api"]["p50_ms"] / rows["both_api"]["p50_ms"],
    }
    if not args.root:
        shutil.rmtree(root, ignore_errors=True)
    write_results(res, Path(args.out))
    return 0


def write_results(res: dict, out: Path) -> None:
    lines = [f"# Read API benchmark: {res['summaries']:,} summaries ({res['tokens']:,} tokens) per session, "
             f"{res['longterm_n']:,} long-term entries", "",
             f"{common.machine_line(res['machine'])}; torch threads {res['torch_threads']}; k = {res['k']}; {res['queries']} queries per row, one client.", "",
             f"- session window load (read, verify hash + signature, decode to fp32): {res['cold_window_load_s']:.1f} s,"
             f" cached {res['window_cache_mib']:.0f} MiB", ""]
    lines += ["| read | p50 ms | p99 ms | reads/s |", "|---|---|---|---|"]
    for name_, r in res["rows"].items():
        extra = f" (routes {r['routes']})" if "routes" in r else ""
        lines.append(f"| {name_}{extra} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['reads_per_s']:.2f} |")
    lines += ["", "Ratios (same run): " + ", ".join(f"{k} = {v:.2f}" for k, v in res["ratios"].items())]
    common.save(res, "read", lines, out)


if __name__ == "__main__":
    raise SystemExit(main())
