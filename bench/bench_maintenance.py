"""Maintenance benchmark: forget_purge and cold demotion on a large long-term store.

The store is bench_longterm.py's (default 1M x 384 signed entries, real MiniLM latents and a
mixture fitted to them, built once and cached with its ``--index``, default ivf_hnsw_sq);
each run works on a fresh copy of it. One entry in 1,000 is bound to the forget subject,
spread over every fragment (the worst case for a purge that rewrites only the fragments
holding forgotten rows), and one in 20 was written 100 days ago and never retrieved. Then,
timed, with the bytes each step wrote and removed (files appear and disappear, Lance never
rewrites one):

1. baseline, same run: a plain copy of the whole hot table (read every row, write a new
   dataset), the cost floor of any full rewrite;
2. cold demotion of the entries not retrieved in 90 days (merge_access_log, then demote:
   copy, verify the cold copy's signatures, delete from hot);
3. forget purge of the subject (plan; erase under the maintenance lease: delete, rewrite the
   fragments that held the rows with the index remapped in the same commit, drop old
   versions; scan of every stored byte for the fingerprints; attest).

Results (JSON and Markdown, with machine info) go to bench/results/.

    python bench/bench_maintenance.py               # 1M entries
    python bench/bench_maintenance.py --n 100000    # a smaller run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import common
from bench_longterm import SUBJECT, cached_store, indexed_copy
from memstream.crypto import KeyRing


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
    from memstream.settings import LONGTERM_INDEX, cache_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.store_args(ap)
    ap.add_argument("--vectors", choices=("fitted", "synthetic"), default="fitted")
    ap.add_argument("--index", default=LONGTERM_INDEX)
    ap.add_argument("--cache", default=str(cache_dir() / "bench" / "longterm"))
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--work", default=None, help="folder for the store's copy (default: a temporary folder)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)

    from memstream.crypto import SigningKey
    from memstream.longterm import ForgetRequest, LongTermStore
    from memstream.longterm.entry import GovernancePolicy
    from memstream.maintenance import purge
    from memstream.maintenance.longterm import demote_stale

    def log(msg: str) -> None:
        print(msg, flush=True)

    cache, key, info = cached_store(args, log)
    source, index_build_s = indexed_copy(cache, args.index, log)
    tmp = Path(tempfile.mkdtemp(prefix="bench-maint-", dir=args.work))
    root = tmp / "store"
    res = {"n": args.n, "dim": args.dim, "vectors": args.vectors, "index": args.index, "index_build_s": index_build_s,
           "data": info,
           "machine": common.machine_info("lancedb", "pylance", "numpy")}
    try:
        _, res["store_copy_s"] = timed(lambda: shutil.copytree(source, root))
        governance = SigningKey.generate()  # one of one: the purge needs its approval before it erases
        store = LongTermStore(str(root), keyring=KeyRing([key]), signer=key,
                              governance=GovernancePolicy(KeyRing([governance]), 1))
        res["hot_table_bytes"] = sum(files(root / "entries.lance").values())
        res["fragments"] = len(store.table("entries").to_lance().get_fragments())
        log(json.dumps({k: v for k, v in res.items() if k not in ("machine", "data")}))

        # 1. baseline: a plain copy of the whole hot table
        import lance

        copy_to = tmp / "copy.lance"
        ds = store.table("entries").to_lance()
        _, t = timed(lambda: lance.write_dataset(ds.to_batches(batch_size=8192), str(copy_to), schema=ds.schema))
        res["baseline_copy"] = {"seconds": round(t, 1), "bytes_written": sum(files(copy_to).values())}
        shutil.rmtree(copy_to)
        log(json.dumps({"baseline_copy": res["baseline_copy"]}))

        # 2. cold demotion
        before = files(root)
        out, t = timed(lambda: demote_stale(store, older_than_s=90 * 86400))
        res["cold_demotion"] = {"seconds": round(t, 1), **out, **delta(before, files(root))}
        log(json.dumps({"cold_demotion": res["cold_demotion"]}))

        # 3. forget purge, step by step as the DAG runs it
        store.request_forget(SUBJECT, ForgetRequest.create(key, store.store_id, SUBJECT))
        steps = {}
        before = files(root)
        planned, steps["plan_s"] = timed(lambda: purge.plan(store))
        _, steps["approve_s"] = timed(lambda: purge.approve(store, planned["purge_id"], governance))
        erased, steps["erase_s"] = timed(lambda: purge.erase(store, planned["purge_id"]))
        after_erase = files(root)
        scanned, steps["scan_s"] = timed(lambda: purge.check(store, planned["purge_id"]))
        attested, steps["attest_s"] = timed(lambda: purge.attest(store, planned["purge_id"], key, scanned))
        total = sum(steps.values())
        done = erased["removed_now"]
        res["forget_purge"] = {"seconds": round(total, 1), **{k: round(v, 1) for k, v in steps.items()},
                               "entries": planned["entries"], "hot": planned["hot"], "cold": planned["cold"],
                               "markers": planned["markers"], "files_scanned": scanned["files"],
                               "bytes_scanned": scanned["bytes"], **delta(before, after_erase),
                               "fragments_rewritten": done["fragments_rewritten"], "fragments": done["fragments"],
                               "index_rebuilds": done["index_rebuilds"],
                               "ratio_to_copy": round(total / res["baseline_copy"]["seconds"], 2),
                               "erase_ratio_to_copy": round(steps["erase_s"] / res["baseline_copy"]["seconds"], 2)}
        log(json.dumps({"forget_purge": res["forget_purge"]}))
        res["hot_after"], res["cold_after"] = store.count("hot"), store.count("cold")
        index = [i for i in store.table("entries").list_indices() if "vector" in getattr(i, "columns", ())]
        res["index_after"] = {"type": index[0].index_type, "indexed_rows": index[0].num_indexed_rows} if index else None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["load_average_at_end"] = os.getloadavg()  # other jobs share the cores: the load can change mid-run
    write_results(res, Path(args.out))
    return 0


def write_results(res: dict, out: Path) -> None:
    b, d, p = res["baseline_copy"], res["cold_demotion"], res["forget_purge"]
    gib = 2**30
    lines = [f"# Maintenance benchmark, {res['n']:,} x {res['dim']}", "",
             common.machine_line(res["machine"]) + f"; at end {', '.join(f'{x:.1f}' for x in res['load_average_at_end'])}.",
             "",
             f"- store: bench_longterm.py's ("
             + (f"{res['data'].get('real_entries', 0):,} real latents, the rest drawn from a mixture fitted to them"
                if res.get("vectors", "fitted") == "fitted" else "synthetic: unit vectors around Gaussian cluster centres")
             + f"; signed ingest {res['data']['ingest_s']:.0f} s, {res['index']} index "
             f"{res['index_build_s']:.0f} s, both cached), copied for this run in {res['store_copy_s']:.0f} s; hot "
             f"table {res['hot_table_bytes'] / gib:.2f} GiB in {res['fragments']} fragments",
             f"- baseline, plain copy of the hot table: {b['seconds']} s, {b['bytes_written'] / gib:.2f} GiB written",
             f"- cold demotion: {d['demoted']:,} of {d['hot_entries']:,} entries in {d['seconds']} s; "
             f"{d['bytes_written'] / gib:.3f} GiB written, {d['bytes_removed'] / gib:.3f} GiB removed",
             f"- forget purge: {p['entries']:,} entries ({p['hot']} hot, {p['cold']} cold) in {p['seconds']} s = "
             f"{p['ratio_to_copy']}x the copy (plan {p['plan_s']} s, erase {p['erase_s']} s = "
             f"{p['erase_ratio_to_copy']}x, scan {p['scan_s']} s of {p['bytes_scanned'] / gib:.2f} GiB in "
             f"{p['files_scanned']} files, attest {p['attest_s']} s); erase rewrote {p['fragments_rewritten']} of "
             f"{p['fragments']} fragments (both tiers) with {p['index_rebuilds']} index rebuilds, wrote "
             f"{p['bytes_written'] / gib:.2f} GiB and removed {p['bytes_removed'] / gib:.2f} GiB; scan found none of "
             f"{p['markers']:,} fingerprints",
             f"- after: {res['hot_after']:,} hot, {res['cold_after']:,} cold; vector index {res['index_after']}"]
    common.save(res, f"maintenance-{res['n']}", lines, out)


if __name__ == "__main__":
    raise SystemExit(main())
