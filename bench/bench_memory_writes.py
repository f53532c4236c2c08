"""Long-term writes by the memory itself: append cost at two log sizes, verification of the
whole store, and read latency with and without query-time retention.

- Appends: a store of signed 384-d entries is filled to ``--small`` (10k) and then to
  ``--large`` (1M) entries in batches of ``--fill-batch``; at each size ``--probes`` appends of
  ``--probe-batch`` entries (the retention writer's batch) are timed. An append's cost should
  not depend on the log's size.
- Verification: ``LongTermStore.verify()`` at the large size (ids, key bindings and Merkle
  leaves hashed under the verified tree-head signatures), and ``verify(full=True)`` (every
  entry's own Ed25519 signature too) at the small size, for the per-entry cost.
- Reads: ``Memory.read`` p50 over a session of ``--summaries`` summaries, route episodic,
  without retention and with each ``--retention`` writer (a child process at nice 10, a thread
  of the reader), every arm in the same run, in blocks of the same queries whose order rotates.

    python bench/bench_memory_writes.py                  # 10k and 1M
    python bench/bench_memory_writes.py --large 200000   # a smaller second size
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

import common
from bench_longterm import mixture, percentile
from bench_read import write_session

D = 384


def fill(store, key, upto: int, batch: int, centers, seed: int) -> float:
    from memstream.longterm import Entry

    started, n = time.monotonic(), store.count()
    while n < upto:
        m = min(batch, upto - n)
        vecs = mixture(seed + n, m, D, centers)
        store.append([Entry.create(key, store.store_id, v, f"fill-{n + i}".encode(), query=f"q{n + i}")
                      for i, v in enumerate(vecs)])
        n += m
    return time.monotonic() - started


def probe_appends(store, key, probes: int, batch: int, centers, seed: int) -> dict:
    from memstream.longterm import Entry

    times = []
    for p in range(probes):
        vecs = mixture(seed + p, batch, D, centers)
        entries = [Entry.create(key, store.store_id, v, f"probe-{seed}-{p}-{i}".encode(), query=f"p{p}-{i}")
                   for i, v in enumerate(vecs)]
        s = time.perf_counter()
        store.append(entries)
        times.append(time.perf_counter() - s)
    return {"log_size_before": store.count() - probes * batch, "appends": probes, "batch": batch,
            "p50_ms": percentile(times, 50), "p90_ms": percentile(times, 90),
            "appends_per_s": probes / sum(times), "entries_per_s": probes * batch / sum(times)}


def build_session(uri: str, key, model, summaries: int, encoded: int, seed: int = 0) -> None:
    """Session "bench" of ``summaries`` summaries: ``encoded`` compressed windows of random latents,
    repeated with small noise (what a read costs depends on the count, not on the content)."""
    import torch

    from memstream.settings import WINDOW

    rng = np.random.default_rng(seed)
    with torch.inference_mode():
        base = model.encode(torch.from_numpy(rng.standard_normal((encoded, WINDOW, D), dtype=np.float32))).numpy()
    tokens = np.stack([base[w % encoded] + 0.05 * rng.standard_normal(base.shape[1:], dtype=np.float32)
                       for w in range(summaries)]).astype(np.float16)
    write_session(uri, key, tokens, "bench")


def reads_with_and_without_retention(root: Path, key, model, summaries: int, queries: int, blocks: int,
                                     modes: tuple[str, ...] = ("process", "thread")) -> dict:
    """Read latency without retention and with each retention writer in ``modes``, measured in
    the same run: blocks of the same queries, the arms' order rotating from block to block."""
    from memstream.crypto import KeyRing
    from memstream.longterm import LongTermStore
    from memstream.longterm.retention import Retention, RetentionProcess
    from memstream.read.memory import Memory

    uri = str(root / "episodic")
    build_session(uri, key, model, summaries, encoded=min(8, summaries))
    ring = KeyRing([key])
    rng = np.random.default_rng(11)
    qs = rng.standard_normal((queries, D)).astype(np.float32)
    arms = {"without": Memory(uri, keyring=ring, model=model)}
    writers = {}
    for mode in modes:
        lt_uri = str(root / f"lt-reads-{mode}")
        writers[mode] = (RetentionProcess(lt_uri, keyring=ring, signer=key) if mode == "process"
                         else Retention(LongTermStore(lt_uri, keyring=ring, signer=key)))
        arms[mode] = Memory(uri, keyring=ring, model=model, retention=writers[mode])
    for m in arms.values():  # load and cache the window once
        m.read(qs[0], "bench", k=8, route="episodic")
    lat = {name: [] for name in arms}
    offer_ms = {mode: [] for mode in modes}
    names = list(arms)
    for b in range(blocks):
        for name in names[b % len(names):] + names[:b % len(names)]:
            m = arms[name]
            for q in qs:
                s = time.perf_counter()
                r = m.read(q, "bench", k=8, route="episodic")
                lat[name].append(time.perf_counter() - s)
                if name != "without":
                    offer_ms[name].append(r.timings_ms["retain_ms"])
    for m in arms.values():
        m.close()
    out = {name: {"n": len(v), "p50_ms": percentile(v, 50), "p99_ms": percentile(v, 99)} for name, v in lat.items()}
    for mode in modes:
        st = writers[mode].stats
        out[mode].update({"added_p50_ms": out[mode]["p50_ms"] - out["without"]["p50_ms"],
                          "offer_p50_ms": float(np.percentile(offer_ms[mode], 50)),
                          "retention": {"offered": st.offered, "kept": st.kept, "written": st.written,
                                        "batches": st.batches, "failed": st.failed}})
    out["summaries"], out["modes"] = summaries, list(modes)
    return out


def writes(root: Path, key, centers, args) -> dict:
    from memstream.crypto import KeyRing, SigningKey
    from memstream.longterm import LongTermStore

    res = {}
    store = LongTermStore(str(root / "lt"), keyring=KeyRing([key]), signer=key, dim=D)
    res["fill_small_s"] = fill(store, key, args.small, args.fill_batch, centers, 1)
    res["appends_small"] = probe_appends(store, key, args.probes, args.probe_batch, centers, 10**7)
    print("appends at", store.count(), res["appends_small"], flush=True)
    t = time.monotonic()
    full = store.verify(full=True)
    res["verify_full_small"] = {"rows": full.rows_checked, "ok": full.ok, "seconds": time.monotonic() - t}
    cached = Path(args.large_from) if args.large_from else None
    if cached is not None and (cached / "store").exists():
        # bench_longterm.py's signed store (written by 2 processes in batches of 10k), copied:
        # filling one here would sign and verify the same million entries again.
        from bench_longterm import lookup_indexes

        store.close()
        t = time.monotonic()
        shutil.copytree(cached / "store", root / "lt-large")
        lookup_indexes(root / "lt-large")  # what appends keep from 20k rows on
        key = SigningKey.parse((cached / "key.pem").read_bytes())
        store = LongTermStore(str(root / "lt-large"), keyring=KeyRing([key]), signer=key, dim=D)
        res["large_from"] = {"path": str(cached / "store"), "copy_s": time.monotonic() - t}
    res["fill_large_s"] = fill(store, key, args.large, args.fill_batch, centers, 2 * 10**7)
    res["appends_large"] = probe_appends(store, key, args.probes, args.probe_batch, centers, 3 * 10**7)
    print("appends at", store.count(), res["appends_large"], flush=True)
    load = os.getloadavg()
    t = time.monotonic()
    report = store.verify()
    res["verify_large"] = {"rows": report.rows_checked, "ok": report.ok, "seconds": time.monotonic() - t,
                           "tree_heads": len(store.tree_heads()), "load_average_before": load}
    print("verify", res["verify_large"], flush=True)
    store.close()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=10_000)
    ap.add_argument("--large", type=int, default=1_000_000)
    ap.add_argument("--fill-batch", type=int, default=10_000)
    ap.add_argument("--probes", type=int, default=20)
    ap.add_argument("--probe-batch", type=int, default=64)
    ap.add_argument("--summaries", type=int, default=64)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--skip-reads", action="store_true")
    ap.add_argument("--skip-writes", action="store_true", help="only the reads with and without retention")
    ap.add_argument("--retention", choices=["process", "thread"], nargs="+", default=["process", "thread"],
                    help="the retention writers to measure against no retention, in the same run: in its own "
                         "process (nice 10) and/or a thread of the reader")
    ap.add_argument("--large-from", default=None,
                    help="bench_longterm.py's cached store of --large entries to copy for the large size "
                         "(default: $MEMSTREAM_CACHE/bench/longterm/<large>-fitted if built; 'none' fills one)")
    ap.add_argument("--root", default=None, help="folder of the stores (default: temporary, removed after)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)

    from memstream.crypto import SigningKey
    from memstream.settings import cache_dir

    if args.large_from is None:
        args.large_from = str(cache_dir() / "bench" / "longterm" / f"{args.large}-fitted")
    elif args.large_from == "none":
        args.large_from = None
    root = Path(args.root or tempfile.mkdtemp(prefix="bench-writes-"))
    res = {"machine": common.machine_info("lancedb", "pylance", "cryptography"), "args": vars(args)}
    key = SigningKey.generate()
    if args.root:  # a kept root's stores stay verifiable later (bench_verify.py)
        root.mkdir(parents=True, exist_ok=True)
        (root / "key.pem").write_bytes(key.private_pem())
    centers = np.random.default_rng(0).standard_normal((4096, D), dtype=np.float32)
    try:
        if not args.skip_writes:
            res.update(writes(root, key, centers, args))
        if not args.skip_reads:
            from memstream.operators.checkpoint import load_default

            res["reads"] = reads_with_and_without_retention(root, key, load_default(), args.summaries, args.queries,
                                                            args.blocks, tuple(args.retention))
            print("reads", res["reads"], flush=True)
    finally:
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)
    write_results(res, Path(args.out))
    return 0


def write_results(res: dict, out: Path) -> None:
    lines = ["# Long-term writes: appends at two sizes, verification, reads with retention", "",
             common.machine_line(res["machine"]), ""]
    if "appends_small" in res:
        s, big = res["appends_small"], res["appends_large"]
        v, vf = res["verify_large"], res["verify_full_small"]
        lines += ["| log size | appends timed | entries each | p50 ms | p90 ms | appends/s | entries/s |",
                  "|---|---|---|---|---|---|---|"]
        for a in (s, big):
            lines.append(f"| {a['log_size_before']:,} | {a['appends']} | {a['batch']} | {a['p50_ms']:.1f} | "
                         f"{a['p90_ms']:.1f} | {a['appends_per_s']:.1f} | {a['entries_per_s']:,.0f} |")
        if "large_from" in res:
            lines += ["", f"The large store is a copy of bench_longterm.py's signed store ({res['large_from']['path']}, "
                          "written by 2 processes in batches of 10k, lookup BTREEs added as appends keep them)."]
        lv = v.get("load_average_before")
        lines += ["", f"Verification of {v['rows']:,} entries (tree-head signatures, every leaf hashed): "
                      f"{v['seconds']:.1f} s, ok={v['ok']}, {v['tree_heads']} tree heads"
                      + (f" (load average {lv[0]:.1f} when it started)." if lv else "."),
                  f"With every entry's Ed25519 signature (`full=True`) at {vf['rows']:,} entries: "
                  f"{vf['seconds']:.1f} s ({vf['seconds'] / max(vf['rows'], 1) * 1e6:.0f} µs an entry)."]
    if "reads" in res:
        r = res["reads"]
        lines += ["", f"Reads (route episodic, {r['summaries']} summaries), the same queries in blocks whose order "
                      "rotates, every arm in the same run:", "",
                  "| retention writer | reads | p50 ms | p99 ms | added p50 ms | offer p50 µs | kept / offered | batches |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| none | {r['without']['n']} | {r['without']['p50_ms']:.2f} | {r['without']['p99_ms']:.2f} "
                  "| | | | |"]
        for mode in r["modes"]:
            a = r[mode]
            lines.append(f"| {mode} | {a['n']} | {a['p50_ms']:.2f} | {a['p99_ms']:.2f} | {a['added_p50_ms']:+.2f} | "
                         f"{a['offer_p50_ms'] * 1e3:.0f} | {a['retention']['kept']} / {a['retention']['offered']} | "
                         f"{a['retention']['batches']} |")
    common.save(res, "memory-writes", lines, out)


if __name__ == "__main__":
    raise SystemExit(main())
