"""Maintenance benchmark: forget_purge and cold demotion on a large long-term store.

Builds a store of ``--n`` signed entries (default 1M, 384-d, synthetic clustered vectors as
in bench_longterm.py; ``--writers`` processes sign and append batches), with an IVF_FLAT
index over the hot tier. ``--old-fraction`` of the entries were written 100 days ago and
never retrieved, and ``--forget`` entries are bound to one subject. Then, timed, with the
bytes each step wrote and removed (files appear and disappear, Lance never rewrites one):

1. baseline, same run: a plain copy of the whole hot table (read every row, write a new
   dataset), the cost floor of any full rewrite;
2. cold demotion of the entries not retrieved in 90 days (merge_access_log, then demote:
   copy, verify the cold copy's signatures, delete from hot);
3. forget purge of the subject (plan, erase under the maintenance lease: delete, compact,
   rebuild the index, drop old versions; scan every stored byte for the fingerprints;
   attest).

Results (JSON and Markdown, with machine info) go to bench/results/.

    python bench/bench_maintenance.py               # 1M entries
    python bench/bench_maintenance.py --n 100000    # a smaller run
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
from bench_longterm import mixture
from memstream.crypto import KeyRing, SigningKey

SUBJECT = "bench-subject@example.org"
DAY_NS = 86400 * 10**9


def _writer(args) -> tuple[int, float]:
    uri, key_pem, worker, n, dim, batch, seed, old_every, forget_every = args
    from memstream.longterm import Entry, LongTermStore

    key = SigningKey.parse(key_pem)
    store = LongTermStore(uri, keyring=KeyRing([key]), signer=key, dim=dim)
    centers = np.random.default_rng(seed).standard_normal((4096, dim), dtype=np.float32)
    now = time.time_ns()
    started = time.monotonic()
    for b, start in enumerate(range(0, n, batch)):
        m = min(batch, n - start)
        x = mixture(seed * 1000 + worker * 100_000 + b, m, dim, centers)
        entries = []
        for i, v in enumerate(x):
            j = worker * n + start + i
            forget = j % forget_every == 0
            entries.append(Entry.create(
                key, store.store_id, v, f"w{worker}-{start + i}-{'user' if forget else 'doc'}-payload".encode(),
                query=f"q{j}", timestamp_ns=now - (100 * DAY_NS if (j // 7) % old_every == 0 else 0),
                forget_tag="chat" if forget else None, forget_subject=SUBJECT if forget else None))
        store.append(entries)
    store.close()
    return n, time.monotonic() - started


def files(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def delta(before: dict[str, int], after: dict[str, int]) -> dict:
    written = sum(s for p, s in after.items() if p not in before)
    removed = sum(s for p, s in before.items() if p not in after)
    return {"bytes_written": written, "bytes_removed": removed, "store_bytes": sum(after.values())}


def timed(fn):
    started = time.monotonic()
    out = fn()
    return out, time.monotonic() - started


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.store_args(ap)
    ap.add_argument("--old-fraction", type=float, default=0.05, help="entries last touched 100 days ago")
    ap.add_argument("--forget", type=int, default=1000, help="entries bound to the forgotten subject")
    ap.add_argument("--root", default=None, help="store folder (default: a temporary folder, removed after)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)

    from memstream.longterm import ForgetRequest, LongTermStore
    from memstream.maintenance import purge
    from memstream.maintenance.longterm import demote_stale

    tmp = Path(tempfile.mkdtemp(prefix="bench-maint-"))
    root = Path(args.root) if args.root else tmp / "store"
    key = SigningKey.generate()
    res = {"n": args.n, "dim": args.dim, "writers": args.writers, "forget": args.forget,
           "old_fraction": args.old_fraction, "machine": common.machine_info("lancedb", "pylance", "numpy")}
    try:
        LongTermStore(str(root), keyring=KeyRing([key]), signer=key, dim=args.dim)
        per = [args.n // args.writers + (1 if w < args.n % args.writers else 0) for w in range(args.writers)]
        old_every, forget_every = max(1, round(1 / args.old_fraction)), max(1, args.n // args.forget)
        started = time.monotonic()
        with ProcessPoolExecutor(args.writers, mp_context=get_context("spawn")) as pool:
            list(pool.map(_writer, [(str(root), key.private_pem(), w, per[w], args.dim, args.batch, 7, old_every,
                                     forget_every) for w in range(args.writers)]))
        res["ingest_s"] = round(time.monotonic() - started, 1)
        store = LongTermStore(str(root), keyring=KeyRing([key]), signer=key)
        _, res["index_build_s"] = timed(lambda: store.build_index("hot"))
        res["hot_table_bytes"] = sum(files(root / "entries.lance").values())
        print(json.dumps({k: v for k, v in res.items() if k != "machine"}), flush=True)

        # 1. baseline: a plain copy of the whole hot table
        import lance

        copy_to = tmp / "copy.lance"
        ds = store.table("entries").to_lance()
        _, t = timed(lambda: lance.write_dataset(ds.to_batches(batch_size=8192), str(copy_to), schema=ds.schema))
        res["baseline_copy"] = {"seconds": round(t, 1), "bytes_written": sum(files(copy_to).values())}
        shutil.rmtree(copy_to)
        print(json.dumps({"baseline_copy": res["baseline_copy"]}), flush=True)

        # 2. cold demotion
        before = files(root)
        out, t = timed(lambda: demote_stale(store, older_than_s=90 * 86400))
        res["cold_demotion"] = {"seconds": round(t, 1), **out, **delta(before, files(root))}
        print(json.dumps({"cold_demotion": res["cold_demotion"]}), flush=True)

        # 3. forget purge, step by step as the DAG runs it
        store.request_forget(SUBJECT, ForgetRequest.create(key, store.store_id, SUBJECT))
        steps = {}
        before = files(root)
        planned, steps["plan_s"] = timed(lambda: purge.plan(store))
        erased, steps["erase_s"] = timed(lambda: purge.erase(store, planned["purge_id"]))
        after_erase = files(root)
        scanned, steps["scan_s"] = timed(lambda: purge.check(store, planned["purge_id"]))
        attested, steps["attest_s"] = timed(lambda: purge.attest(store, planned["purge_id"], key, scanned))
        total = sum(steps.values())
        res["forget_purge"] = {"seconds": round(total, 1), **{k: round(v, 1) for k, v in steps.items()},
                               "entries": planned["entries"], "hot": planned["hot"], "cold": planned["cold"],
                               "markers": planned["markers"], "files_scanned": scanned["files"],
                               "bytes_scanned": scanned["bytes"], **delta(before, after_erase),
                               "ratio_to_copy": round(total / res["baseline_copy"]["seconds"], 2),
                               "erase_ratio_to_copy": round(steps["erase_s"] / res["baseline_copy"]["seconds"], 2)}
        print(json.dumps({"forget_purge": res["forget_purge"]}), flush=True)
        res["hot_after"], res["cold_after"] = store.count("hot"), store.count("cold")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_results(res, Path(args.out))
    return 0


def write_results(res: dict, out: Path) -> None:
    b, d, p = res["baseline_copy"], res["cold_demotion"], res["forget_purge"]
    gib = 2**30
    lines = [f"# Maintenance benchmark, {res['n']:,} x {res['dim']}", "",
             common.machine_line(res["machine"]) + ".", "",
             f"- store: ingest {res['ingest_s']} s ({res['writers']} writers), IVF_FLAT index {res['index_build_s']:.1f} s, "
             f"hot table {res['hot_table_bytes'] / gib:.2f} GiB",
             f"- baseline, plain copy of the hot table: {b['seconds']} s, {b['bytes_written'] / gib:.2f} GiB written",
             f"- cold demotion: {d['demoted']:,} of {d['hot_entries']:,} entries in {d['seconds']} s; "
             f"{d['bytes_written'] / gib:.3f} GiB written, {d['bytes_removed'] / gib:.3f} GiB removed",
             f"- forget purge: {p['entries']:,} entries ({p['hot']} hot, {p['cold']} cold) in {p['seconds']} s = "
             f"{p['ratio_to_copy']}x the copy (plan {p['plan_s']} s, erase {p['erase_s']} s = "
             f"{p['erase_ratio_to_copy']}x, scan {p['scan_s']} s of {p['bytes_scanned'] / gib:.2f} GiB in "
             f"{p['files_scanned']} files, attest {p['attest_s']} s); erase wrote {p['bytes_written'] / gib:.2f} GiB "
             f"and removed {p['bytes_removed'] / gib:.2f} GiB; scan found none of {p['markers']:,} fingerprints",
             f"- after: {res['hot_after']:,} hot, {res['cold_after']:,} cold"]
    common.save(res, f"maintenance-{res['n']}", lines, out)


if __name__ == "__main__":
    raise SystemExit(main())
