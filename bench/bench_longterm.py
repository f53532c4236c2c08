"""Long-term store benchmark: ANN recall@10 and latency at 1M x 384, index build time, against
exact search on the same store in the same run; optionally demotion, search across tiers and
verification.

**Data.** Entries: every real MiniLM latent of the corpus's training and validation documents
(about 390k), and to reach ``--n`` draws from a mixture fitted to them (k-means, 1,024
components, each with its own per-dimension spread). Queries: real latents of the held-out
documents, which neither the entries nor the mixture saw. ``--vectors synthetic`` instead
uses the earlier Gaussian mixture of 4,096 unit clusters, queries drawn from it.

**Store.** Signed entries written by ``--writers`` processes, as validators write them; every
1,000th is bound to a forget subject and one in 20 is 100 days old, so that
bench_maintenance.py can purge and demote a copy of the same store. Built once per
(n, vectors) and kept under ``$MEMSTREAM_CACHE/bench/longterm`` with its index.

**Search.** For each index kind asked for (``--index``, built once, build time recorded),
a sweep of nprobes, ef and refine; recall@10 against the exact top 10 (numpy over every
stored vector, cosine); latency p50/p99 of ``LongTermStore.search``; the baseline is the
exact search through LanceDB (no index) on the same store in the same run.

    python bench/bench_longterm.py                          # 1M, ivf_hnsw_sq
    python bench/bench_longterm.py --index ivf_pq,ivf_hnsw_sq --n 200000
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

import common
from memstream.crypto import KeyRing, SigningKey

SUBJECT = "bench-subject@example.org"
DAY_NS = 86400 * 10**9
FORGET_EVERY = 1000  # one entry in this many is bound to the forget subject
OLD_EVERY = 20  # one in this many (in runs of 7) was written 100 days ago


def percentile(xs, p) -> float:
    return float(np.percentile(np.asarray(xs) * 1000, p))


def mixture(seed: int, n: int, dim: int, centers: np.ndarray) -> np.ndarray:
    """The synthetic data: unit vectors around Gaussian cluster centres."""
    rng = np.random.default_rng(seed)
    x = centers[rng.integers(0, len(centers), n)] + 0.5 * rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def fitted_vectors(n: int, seed: int = 0, components: int = 1024) -> tuple[np.ndarray, np.ndarray, dict]:
    """Entries (real training latents, then draws from a mixture fitted to them) and queries
    (real held-out latents)."""
    import torch

    from memstream.operators.data import split_latents

    real = np.concatenate([*split_latents("train").values(), *split_latents("validation").values()])
    # Each latent once: the corpus repeats some (the same text in the same context), and a
    # repeated vector would survive the purge of its forgotten copy in the erasure scan.
    real = real[np.sort(np.unique(real, axis=0, return_index=True)[1])]
    held = np.concatenate(list(split_latents("heldout").values()))
    rng = np.random.default_rng(seed)
    t0 = time.monotonic()
    x = torch.from_numpy(real)
    centres = x[torch.from_numpy(rng.choice(len(real), components, replace=False))].clone()
    sample = x[torch.from_numpy(rng.choice(len(real), min(len(real), 200_000), replace=False))]
    for _ in range(10):  # Lloyd on a sample
        assign = torch.cdist(sample, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, sample)
        counts = torch.bincount(assign, minlength=components).float()[:, None]
        centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
    assign = torch.cat([torch.cdist(x[i:i + 50_000], centres).argmin(1) for i in range(0, len(x), 50_000)])
    counts = torch.bincount(assign, minlength=components).float()
    var = torch.zeros_like(centres).index_add_(0, assign, (x - centres[assign]) ** 2) / counts[:, None].clamp_min(1)
    fit_s = time.monotonic() - t0
    extra = max(0, n - len(real))
    comp = rng.choice(components, extra, p=(counts / counts.sum()).numpy())
    drawn = centres.numpy()[comp] + np.sqrt(var.numpy())[comp] * rng.standard_normal((extra, real.shape[1]),
                                                                                        dtype=np.float32)
    entries = np.concatenate([real[:n], drawn]).astype(np.float32)
    entries = entries[rng.permutation(len(entries))]
    queries = held[rng.choice(len(held), 400, replace=False)]
    info = {"real_entries": int(min(n, len(real))), "drawn_entries": int(extra), "components": components,
            "fit_s": fit_s, "heldout_latents": int(len(held)), "unique": True}
    return entries, queries.astype(np.float32), info


def synthetic_vectors(n: int, dim: int, seed: int = 7) -> tuple[np.ndarray, np.ndarray, dict]:
    centres = np.random.default_rng(seed).standard_normal((4096, dim), dtype=np.float32)
    entries = np.concatenate([mixture(seed * 1000 + b, min(100_000, n - s), dim, centres)
                              for b, s in enumerate(range(0, n, 100_000))])
    return entries, mixture(999_999, 400, dim, centres), {"clusters": 4096}


def _writer(args) -> tuple[int, float]:
    uri, key_pem, vectors_path, start, stop, batch = args
    from memstream.longterm import Entry, LongTermStore

    key = SigningKey.parse(key_pem)
    store = LongTermStore(uri, keyring=KeyRing([key]), signer=key, dim=np.load(vectors_path, mmap_mode="r").shape[1])
    vectors = np.load(vectors_path, mmap_mode="r")
    now = time.time_ns()
    started = time.monotonic()
    for lo in range(start, stop, batch):
        entries = []
        for j in range(lo, min(stop, lo + batch)):
            forget = j % FORGET_EVERY == 0
            entries.append(Entry.create(
                key, store.store_id, vectors[j], f"entry-{j}-{'user' if forget else 'doc'}-payload".encode(),
                query=f"q{j}", timestamp_ns=now - (100 * DAY_NS if (j // 7) % OLD_EVERY == 0 else 0),
                forget_tag="chat" if forget else None, forget_subject=SUBJECT if forget else None))
        store.append(entries)
    store.close()
    return stop - start, time.monotonic() - started


def cached_store(args, log) -> tuple[Path, SigningKey, dict]:
    """The store (entries only, no index) and its vectors and queries, built once."""
    root = Path(args.cache) / f"{args.n}-{args.vectors}"
    done = root / "done.json"
    if args.rebuild and root.exists():
        shutil.rmtree(root)
    if args.vectors == "fitted" and done.exists() and not json.loads(done.read_text()).get("unique"):
        log(f"{root} holds repeated vectors (built before they were made unique): building it again")
        shutil.rmtree(root)
    if not done.exists():
        from memstream.longterm import LongTermStore

        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        t0 = time.monotonic()
        entries, queries, info = (fitted_vectors(args.n) if args.vectors == "fitted"
                                  else synthetic_vectors(args.n, args.dim))
        np.save(root / "vectors.npy", entries)
        np.save(root / "queries.npy", queries)
        info["data_s"] = time.monotonic() - t0
        key = SigningKey.generate()
        (root / "key.pem").write_bytes(key.private_pem())
        LongTermStore(str(root / "store"), keyring=KeyRing([key]), signer=key, dim=entries.shape[1])
        bounds = np.linspace(0, len(entries), args.writers + 1).astype(int)
        t0 = time.monotonic()
        with ProcessPoolExecutor(args.writers, mp_context=get_context("spawn")) as pool:
            list(pool.map(_writer, [(str(root / "store"), key.private_pem(), str(root / "vectors.npy"),
                                     int(bounds[w]), int(bounds[w + 1]), args.batch) for w in range(args.writers)]))
        info["ingest_s"] = time.monotonic() - t0
        info["writers"] = args.writers
        done.write_text(json.dumps(info))
        log(f"store of {args.n} built: {json.dumps(info)}")
    return root, SigningKey.parse((root / "key.pem").read_bytes()), json.loads(done.read_text())


def indexed_copy(root: Path, kind: str, log) -> tuple[Path, float | None]:
    """A copy of the store with a ``kind`` index (kept; its build time is recorded once)."""
    from memstream.longterm import LongTermStore

    target = root / f"store-{kind}"
    marker = target / "_index.json"
    if not marker.exists():
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(root / "store", target)
        key = SigningKey.parse((root / "key.pem").read_bytes())
        store = LongTermStore(str(target), keyring=KeyRing([key]))
        t0 = time.monotonic()
        store.build_index("hot", kind)
        built = time.monotonic() - t0
        marker.write_text(json.dumps({"build_s": built}))
        log(f"{kind} index built in {built:.0f} s")
    lookup_indexes(target)
    return target, json.loads(marker.read_text())["build_s"]


def lookup_indexes(target: Path) -> None:
    """The BTREEs (entry ids, edits, tree sizes) that appends now keep from 20k rows on:
    copies cached before they did get them here, as a store written today has them."""
    import lancedb
    from lancedb.index import BTree

    from memstream.longterm.store import LOOKUP_INDEXES

    db = lancedb.connect(str(target))
    for name, column in LOOKUP_INDEXES:
        table = db.open_table(name)
        if not any(i.columns == [column] for i in table.list_indices()):
            table.create_index(column, config=BTree())


def exact_top10(base: np.ndarray, queries: np.ndarray) -> np.ndarray:
    unit = base / np.linalg.norm(base, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    out = []
    for i in range(0, len(q), 50):
        sims = q[i:i + 50] @ unit.T
        out.append(np.argpartition(-sims, 10, axis=1)[:, :10])
    return np.concatenate(out)


def bare_search(ds, q, k: int, metric: str, nprobes: int, ef: int = 100, refine: int = 0):
    """The same ANN query on the bare lance dataset, ids only: what the index itself costs."""
    nearest = {"column": "vector", "q": q, "k": k, "metric": metric, "nprobes": nprobes,
               "ef": max(ef, k * max(1, refine))}
    if refine:
        nearest["refine_factor"] = refine
    return ds.to_table(columns=["entry_id", "_distance"], nearest=nearest)


def sweep(store, queries, ids, truth, grid: list[dict], log) -> list[dict]:
    rows = []
    ds = store.table("entries").to_lance()
    for params in grid:
        for q in queries[:3]:
            store.search(q, 10, record_access=False, **params)  # warm the caches
            bare_search(ds, q, 10, store.metric, **params)
        lat, rec, bare = [], [], []
        # Interleaved, so both see the same load, and in turns first: the first query on a
        # vector reads its partitions into the cache for the second.
        for i, (q, t) in enumerate(zip(queries, truth)):
            for which in ((0, 1) if i % 2 else (1, 0)):
                s = time.perf_counter()
                if which:
                    hits = store.search(q, 10, record_access=False, **params)
                    lat.append(time.perf_counter() - s)
                    rec.append(len(t & {h.entry_id for h in hits}) / 10)
                else:
                    bare_search(ds, q, 10, store.metric, **params)
                    bare.append(time.perf_counter() - s)
        row = {**params, "recall_at_10": float(np.mean(rec)), "p50_ms": percentile(lat, 50),
               "p99_ms": percentile(lat, 99), "bare_p50_ms": percentile(bare, 50)}
        row["p50_over_bare"] = row["p50_ms"] / row["bare_p50_ms"]
        log(json.dumps(row))
        rows.append(row)
    return rows


def exact_search(store, queries, k: int = 10) -> list[float]:
    """The baseline: LanceDB's exact search over every stored vector (the index bypassed)."""
    table = store.table("entries")
    lat = []
    for q in queries:
        s = time.perf_counter()
        (table.search(np.asarray(q, np.float32), vector_column_name="vector").distance_type(store.metric)
         .bypass_vector_index().limit(k).select(["entry_id", "_distance"]).to_arrow())
        lat.append(time.perf_counter() - s)
    return lat


GRIDS = {
    "ivf_hnsw_sq": [{"nprobes": p, "ef": e, "refine": r} for p, e, r in
                    itertools.product((1, 2, 4, 8), (50, 100, 200), (0, 4, 10))
                    if e >= 10 * max(1, r)],  # search raises ef to refine * k: skip the repeats
    "ivf_sq": [{"nprobes": p, "refine": r} for p, r in itertools.product((10, 20, 40, 80), (0, 4, 10))],
    "ivf_pq": [{"nprobes": p, "refine": r} for p, r in itertools.product((10, 20, 40), (4, 10))],
    "ivf_flat": [{"nprobes": p} for p in (10, 20, 40)],
}


def main(argv=None) -> int:
    from memstream.settings import cache_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.store_args(ap)
    ap.add_argument("--vectors", choices=("fitted", "synthetic"), default="fitted")
    ap.add_argument("--index", default="ivf_hnsw_sq", help="comma-separated index kinds")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--grid", default=None, help="JSON list of search parameter sets (default: per kind)")
    ap.add_argument("--exact-queries", type=int, default=20, help="queries of the exact-search baseline")
    ap.add_argument("--cache", default=str(cache_dir() / "bench" / "longterm"))
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)

    from memstream.longterm import LongTermStore

    def log(msg: str) -> None:
        print(msg, flush=True)

    root, key, info = cached_store(args, log)
    vectors = np.load(root / "vectors.npy", mmap_mode="r")
    queries = np.load(root / "queries.npy")[: args.queries]
    res: dict = {"n": args.n, "dim": int(vectors.shape[1]), "vectors": args.vectors, "queries": len(queries),
                 "data": info, "machine": common.machine_info("lancedb", "pylance", "numpy")}
    t0 = time.monotonic()
    base_store = LongTermStore(str(root / "store"), keyring=KeyRing([key]))
    table = base_store.table("entries").to_lance().to_table(columns=["entry_id", "vector"])
    ids = np.asarray(table["entry_id"].to_pylist())
    stored = table["vector"].combine_chunks().values.to_numpy().reshape(-1, vectors.shape[1])
    del table
    truth = [set(ids[e]) for e in exact_top10(stored, queries)]
    del stored
    res["ground_truth_s"] = time.monotonic() - t0
    res["indexes"] = {}
    for kind in args.index.split(","):
        path, build_s = indexed_copy(root, kind, log)
        store = LongTermStore(str(path), keyring=KeyRing([key]))
        baseline = exact_search(store, queries[: args.exact_queries])
        grid = json.loads(args.grid) if args.grid else GRIDS[kind]
        rows = sweep(store, queries, ids, truth, grid, log)
        base = {"p50_ms": percentile(baseline, 50), "p99_ms": percentile(baseline, 99), "n": len(baseline)}
        for r in rows:
            r["p50_over_exact"] = r["p50_ms"] / base["p50_ms"]
        good = [r for r in rows if r["recall_at_10"] >= 0.95]
        best = min(good, key=lambda r: r["p50_ms"]) if good else max(rows, key=lambda r: r["recall_at_10"])
        res["indexes"][kind] = {"build_s": build_s, "index_bytes": sum(
            p.stat().st_size for p in (path / "entries.lance" / "_indices").rglob("*") if p.is_file()),
            "exact_baseline": base, "rows": rows, "best": best}
        log(json.dumps({kind: {"build_s": build_s, "exact_p50_ms": base["p50_ms"], "best": best}}))
    res["load_average_at_end"] = os.getloadavg()  # other jobs share the cores: the load can change mid-run
    write_results(res, Path(args.out))
    return 0


def write_results(res: dict, out: Path) -> None:
    d = res["data"]
    lines = [f"# Long-term ANN benchmark, {res['n']:,} x {res['dim']} ({res['vectors']} vectors)", "",
             common.machine_line(res["machine"]) + (f"; at end {', '.join(f'{x:.1f}' for x in res['load_average_at_end'])}"
                                                    if "load_average_at_end" in res else "") + ".", ""]
    if res["vectors"] == "fitted":
        lines.append(f"- entries: {d['real_entries']:,} real MiniLM latents of the training and validation documents "
                     f"and {d['drawn_entries']:,} draws from a {d['components']}-component mixture fitted to them "
                     f"(fit {d['fit_s']:.0f} s); queries: {res['queries']} real latents of held-out documents")
    lines.append(f"- store: signed ingest {d['ingest_s']:.0f} s with {d['writers']} writers (cached between runs); "
                 f"exact top-10 ground truth (numpy) {res['ground_truth_s']:.0f} s")
    for kind, r in res["indexes"].items():
        b, base = r["best"], r["exact_baseline"]
        lines += ["", f"## {kind}", "",
                  f"Build {r['build_s']:.0f} s (timed once, when the cached indexed copy was built); index files "
                  f"{r['index_bytes'] / 2**20:.0f} MiB. Baseline, exact search "
                  f"through LanceDB (same store, same run, {base['n']} queries): p50 {base['p50_ms']:.0f} ms, "
                  f"p99 {base['p99_ms']:.0f} ms.", "",
                  "Bare: the same ANN query on the lance dataset, ids only, interleaved with the store's searches.", "",
                  "| nprobes | ef | refine | recall@10 | p50 ms | p99 ms | p50 / exact | bare p50 ms | p50 / bare |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in r["rows"]:
            lines.append(f"| {row.get('nprobes', '')} | {row.get('ef', '')} | {row.get('refine', '')} | "
                         f"{row['recall_at_10']:.3f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | "
                         f"{row['p50_over_exact']:.4f} | {row.get('bare_p50_ms', float('nan')):.1f} | "
                         f"{row.get('p50_over_bare', float('nan')):.2f} |")
        lines += ["", f"Fastest setting with recall@10 >= 0.95: {json.dumps(b)}" if b["recall_at_10"] >= 0.95 else
                  f"No setting reached recall@10 0.95; best: {json.dumps(b)}"]
    common.save(res, f"longterm-{res['n']}", lines, out)


if __name__ == "__main__":
    raise SystemExit(main())
