"""Long-term store benchmark: ingest, index build, ANN latency and recall@10 against exact
search (hot only, and with cold entries included), and verification rate.

Data: synthetic 384-d vectors, a mixture of 4096 Gaussian clusters (unit-normalised), the
shape of real latents (clustered, not uniform); queries are held-out draws from the same
mixture, never stored. Generating 1M real MiniLM latents would take hours on 2 cores.
Because synthetic clusters are easy for IVF, ``--real-latents N`` adds a second, smaller
run on real MiniLM latents of the local corpus (queries: latents of documents not stored).
Ingest uses ``--writers`` processes, each signing and appending its own batches, as the
pipeline's validators would. Results (JSON and Markdown, with machine info) go to
bench/results/.

    python bench/bench_longterm.py               # 1M entries (default)
    python bench/bench_longterm.py --n 100000    # a smaller run
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
from memstream.crypto import KeyRing, SigningKey


def mixture(seed: int, n: int, dim: int, centers: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = centers[rng.integers(0, len(centers), n)] + 0.5 * rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _writer(args) -> tuple[int, float]:
    uri, key_pem, worker, n, dim, batch, seed = args
    from memstream.longterm import Entry, LongTermStore

    key = SigningKey.parse(key_pem)
    store = LongTermStore(uri, keyring=KeyRing([key]), signer=key, dim=dim)
    centers = np.random.default_rng(seed).standard_normal((4096, dim), dtype=np.float32)
    started = time.monotonic()
    done = 0
    for b, start in enumerate(range(0, n, batch)):
        m = min(batch, n - start)
        vecs = mixture(seed * 1000 + worker * 100_000 + b, m, dim, centers)
        entries = [Entry.create(key, store.store_id, v, f"w{worker}-{start + i}".encode(), query=f"q{start + i}")
                   for i, v in enumerate(vecs)]
        store.append(entries)
        done += m
    store.close()
    return done, time.monotonic() - started


def percentile(xs, p):
    return float(np.percentile(np.asarray(xs) * 1000, p))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.store_args(ap)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--cold-fraction", type=float, default=0.05)
    ap.add_argument("--nprobes", type=int, nargs="+", default=[10, 20, 40])
    ap.add_argument("--real-latents", type=int, default=20_000, help="size of the real-latent run (0: skip)")
    ap.add_argument("--only-real", action="store_true", help="run only the real-latent part")
    ap.add_argument("--root", default=None, help="store folder (default: a temporary folder, removed after)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)

    from memstream.longterm import LongTermStore

    root = args.root or tempfile.mkdtemp(prefix="ltm-bench-")
    key = SigningKey.generate()
    res: dict = {"n": args.n, "dim": args.dim, "batch": args.batch, "writers": args.writers,
                 "queries": args.queries, "machine": machine_info()}
    seed = 7
    if args.only_real:
        res["real_latents"] = real_latents_run(args.real_latents, args.queries, root, args.nprobes)
        write_results(res, Path(args.out))
        return 0
    store = LongTermStore(root, keyring=KeyRing([key]), signer=key, dim=args.dim)
    # ------------------------------------------------------------ ingest
    per = [args.n // args.writers + (1 if w < args.n % args.writers else 0) for w in range(args.writers)]
    t0 = time.monotonic()
    with ProcessPoolExecutor(args.writers, mp_context=get_context("spawn")) as pool:
        out = list(pool.map(_writer, [(root, key.private_pem(), w, per[w], args.dim, args.batch, seed)
                                      for w in range(args.writers)]))
    ingest_s = time.monotonic() - t0
    assert store.count() == args.n, f"lost rows: {store.count()} of {args.n}"
    res["ingest"] = {"seconds": ingest_s, "entries_per_s": args.n / ingest_s,
                     "per_writer_s": [o[1] for o in out]}
    print(f"ingest {args.n} in {ingest_s:.1f}s ({args.n / ingest_s:.0f}/s)", flush=True)
    # ------------------------------------------------------------ index
    t0 = time.monotonic()
    store.build_index()
    res["index"] = {"type": "IVF_FLAT", "metric": store.metric, "partitions": int(round(args.n ** 0.5)),
                    "build_s": time.monotonic() - t0}
    print(f"index built in {res['index']['build_s']:.1f}s", flush=True)
    # ------------------------------------------------------------ ground truth
    table = store._tables["entries"].to_lance().to_table(columns=["entry_id", "vector"])
    ids = np.asarray(table["entry_id"].to_pylist())
    base = table["vector"].combine_chunks().values.to_numpy().reshape(-1, args.dim)
    del table
    centers = np.random.default_rng(seed).standard_normal((4096, args.dim), dtype=np.float32)
    queries = mixture(999_999, args.queries, args.dim, centers)
    exact = exact_top10(base, queries)  # cosine on unit vectors = dot product
    res["search_hot"] = sweep(store, queries, ids, exact, args.nprobes, include_cold=False)
    # ------------------------------------------------------------ cold tier
    rng = np.random.default_rng(3)
    cold_ids = list(ids[rng.choice(len(ids), int(args.n * args.cold_fraction), replace=False)])
    t0 = time.monotonic()
    for i in range(0, len(cold_ids), 5000):
        store.demote(cold_ids[i:i + 5000])
    res["demote"] = {"entries": len(cold_ids), "seconds": time.monotonic() - t0}
    print(f"demoted {len(cold_ids)} in {res['demote']['seconds']:.1f}s", flush=True)
    res["search_hot_after_demotion"] = sweep(store, queries, ids, exact, args.nprobes, include_cold=False,
                                             note="exact top-10 over all entries; cold ones cannot be found")
    res["search_with_cold"] = sweep(store, queries, ids, exact, args.nprobes, include_cold=True)
    # ------------------------------------------------------------ verify
    t0 = time.monotonic()
    report = store.verify(workers=args.writers)
    vs = time.monotonic() - t0
    res["verify"] = {"ok": report.ok, "rows": report.rows_checked, "seconds": vs,
                     "entries_per_s": report.rows_checked / vs, "failures": len(report.failures)}
    print(f"verify {report.rows_checked} rows in {vs:.1f}s ok={report.ok}", flush=True)
    store.close()
    if args.real_latents:
        res["real_latents"] = real_latents_run(args.real_latents, args.queries, root, args.nprobes)
    if not args.root:
        shutil.rmtree(root, ignore_errors=True)
    write_results(res, Path(args.out))
    return 0 if report.ok else 1


def real_latents_run(n: int, n_queries: int, root: str, nprobes_list) -> dict:
    """Recall and latency on real MiniLM token latents: the first documents of the corpus
    stored, queries drawn from documents that are not."""
    from memstream.longterm import Entry, LongTermStore
    from memstream.text_latents import corpus_texts, iter_latents

    texts = corpus_texts()
    names = list(texts)
    t0 = time.monotonic()
    parts, got, used = [], 0, 0
    for name in names:
        for lat in iter_latents(texts[name]):
            parts.append(lat)
            got += len(lat)
            if got >= n:
                break
        used += 1
        if got >= n:
            break
    base = np.concatenate(parts)[:n]
    queries = []
    for name in names[used:]:
        queries.extend(next(iter_latents(texts[name])))
        if len(queries) >= 20 * n_queries:
            break
    queries = np.stack(queries)[np.random.default_rng(5).choice(len(queries), n_queries, replace=False)]
    encode_s = time.monotonic() - t0
    key = SigningKey.generate()
    store = LongTermStore(f"{root}/real", keyring=KeyRing([key]), signer=key, dim=base.shape[1])
    ids: list[str] = []
    for i in range(0, len(base), 5000):
        ids += store.append([Entry.create(key, store.store_id, v, b"", query=str(i + j))
                             for j, v in enumerate(base[i:i + 5000])]).entry_ids
    t0 = time.monotonic()
    store.build_index()
    build_s = time.monotonic() - t0
    unit = base / np.linalg.norm(base, axis=1, keepdims=True)
    exact = exact_top10(unit, queries / np.linalg.norm(queries, axis=1, keepdims=True))
    rows = sweep(store, queries, np.asarray(ids), exact, nprobes_list, include_cold=False)
    store.close()
    return {"n": len(base), "docs": used, "queries": n_queries, "encode_s": encode_s, "index_build_s": build_s,
            "search": rows}


def exact_top10(base: np.ndarray, queries: np.ndarray) -> np.ndarray:
    sims = queries @ base.T
    top = np.argpartition(-sims, 10, axis=1)[:, :10]
    return top


def sweep(store, queries, ids, exact, nprobes_list, include_cold: bool, note: str | None = None) -> list[dict]:
    rows = []
    truth = [set(ids[e]) for e in exact]
    for nprobes in nprobes_list:
        store.search(queries[0], 10, include_cold=include_cold, nprobes=nprobes)  # warm the caches
        lat, rec, tiers = [], [], {"hot": 0, "cold": 0}
        for q, t in zip(queries, truth):
            s = time.perf_counter()
            hits = store.search(q, 10, include_cold=include_cold, nprobes=nprobes)
            lat.append(time.perf_counter() - s)
            rec.append(len(t & {h.entry_id for h in hits}) / 10)
            for h in hits:
                tiers[h.tier] += 1
        row = {"nprobes": nprobes, "include_cold": include_cold, "recall_at_10": float(np.mean(rec)),
               "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99), "hits_by_tier": tiers}
        if note:
            row["note"] = note
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def machine_info() -> dict:
    return common.machine_info("lancedb", "pylance")


def write_results(res: dict, out: Path) -> None:
    lines = [f"# Long-term store benchmark, {res['n']:,} x {res['dim']}", "", common.machine_line(res["machine"]) + ".", ""]
    if "ingest" in res:
        lines += [
            f"- ingest: {res['ingest']['entries_per_s']:.0f} entries/s ({res['ingest']['seconds']:.1f} s, "
             f"{res['writers']} writer processes, batches of {res['batch']}, signed + logged)",
             f"- index build ({res['index']['type']}, {res['index']['partitions']} partitions): "
             f"{res['index']['build_s']:.1f} s",
             f"- demote {res['demote']['entries']} entries to cold: {res['demote']['seconds']:.1f} s",
             f"- verify: {res['verify']['rows']} rows in {res['verify']['seconds']:.1f} s = "
             f"{res['verify']['entries_per_s']:.0f} entries/s, ok={res['verify']['ok']}", ""]
    if "real_latents" in res:
        r = res["real_latents"]
        lines += [f"- real MiniLM latents: {r['n']} from {r['docs']} documents (encoded in {r['encode_s']:.0f} s), "
                  f"IVF_FLAT build {r['index_build_s']:.1f} s; queries from other documents", ""]
    lines += ["| search | nprobes | recall@10 | p50 ms | p99 ms | hits hot/cold |", "|---|---|---|---|---|---|"]
    for key in ("search_hot", "search_hot_after_demotion", "search_with_cold", "real_latents"):
        for r in (res[key]["search"] if key == "real_latents" else res[key]) if key in res else []:
            lines.append(f"| {key} | {r['nprobes']} | {r['recall_at_10']:.3f} | {r['p50_ms']:.1f} | "
                         f"{r['p99_ms']:.1f} | {r['hits_by_tier']['hot']}/{r['hits_by_tier']['cold']} |")
    common.save(res, f"longterm-{res['n']}", lines, out)


if __name__ == "__main__":
    raise SystemExit(main())
