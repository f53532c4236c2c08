"""Verification of a large long-term store against a plain read of the same tables.

``LongTermStore.verify()`` (ids, key bindings, every Merkle leaf hashed and matched to the
log, the tree heads' signatures and roots) on a store kept by ``bench_memory_writes.py
--root DIR`` (its ``lt`` folder and ``key.pem``), timed ``--repeats`` times, interleaved with
the baseline of the same run: reading every column verify reads (the entries table and the
Merkle log) into Arrow, which is the I/O and decode floor any verification pays.

    python bench/bench_memory_writes.py --large-from none --skip-reads --root DIR   # once
    python bench/bench_verify.py --root DIR
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import common


def plain_read(store) -> int:
    """Every row of the tiers and the log, as verify reads them; returns the rows read."""
    n = 0
    for _, table in store._tier_tables(True):
        n += store._read(table).num_rows
    n += store._read(store.table("merkle_log")).num_rows
    store.tree_heads()
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True, help="bench_memory_writes.py's --root (holds lt/ and key.pem)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)

    from memstream.crypto import KeyRing, SigningKey
    from memstream.longterm import LongTermStore

    root = Path(args.root)
    key = SigningKey.parse((root / "key.pem").read_bytes())
    res = {"machine": common.machine_info("lancedb", "pylance", "cryptography", "numpy"), "args": vars(args),
           "verify_s": [], "plain_read_s": [], "load_average_before": []}
    for _ in range(args.repeats):
        store = LongTermStore(str(root / "lt"), keyring=KeyRing([key.verify_key]))
        res["load_average_before"].append(os.getloadavg()[0])
        t = time.monotonic()
        res["rows_read"] = plain_read(store)
        res["plain_read_s"].append(time.monotonic() - t)
        store = LongTermStore(str(root / "lt"), keyring=KeyRing([key.verify_key]))
        t = time.monotonic()
        report = store.verify()
        res["verify_s"].append(time.monotonic() - t)
        assert report.ok, report.to_json()
        res["rows"], res["tree_size"], res["tree_heads"] = report.rows_checked, report.tree_size, len(store.tree_heads())
        print(f"verify {res['verify_s'][-1]:.2f} s, plain read {res['plain_read_s'][-1]:.2f} s", flush=True)
    v, b = statistics.median(res["verify_s"]), statistics.median(res["plain_read_s"])
    res["verify_median_s"], res["plain_read_median_s"], res["ratio"] = v, b, v / b
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"verify-{stamp}.json").write_text(json.dumps(res, indent=2, default=str))
    lines = [f"# Long-term verification of {res['rows']:,} entries", "", common.machine_line(res["machine"]), "",
             "| measure | runs (s) | median s |", "|---|---|---|",
             f"| `verify()` | {', '.join(f'{x:.2f}' for x in res['verify_s'])} | {v:.2f} |",
             f"| plain read of the same tables (baseline) | {', '.join(f'{x:.2f}' for x in res['plain_read_s'])} "
             f"| {b:.2f} |", "",
             f"verify / plain read: **{v / b:.2f}**; tree size {res['tree_size']:,}, {res['tree_heads']} signed tree "
             f"heads; load average before each run: {', '.join(f'{x:.1f}' for x in res['load_average_before'])}.",
             "Target (issue 14): 1M entries verified in <= 10 s on this machine."]
    (out / f"verify-{stamp}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
