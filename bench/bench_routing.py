"""Routed reads against reading both stores every time and against episodic-only reads, on
real stores of held-out text: served quality and cost, measured in the same run.

- Session: the windows of two held-out documents (``pydoc:logging``, ``pydoc:pathlib``),
  compressed by the committed compressor, plus summaries of training-corpus windows (then noisy
  copies of them) up to ``--summaries`` (a long session holds much besides what one query is about).
- Long-term store: every latent of three other held-out documents (``pydoc:sqlite3``,
  ``pydoc:threading``, ``pydoc:json``), signed entries, vector index built.
- Queries: noisy cues (0.5-1.5 x rms) of latents of the session's documents, of the long-term
  documents, and of documents in neither (``pydoc:tarfile``, ``license:Apache-2.0``), a third each.
- Arms, per query in rotating order: ``Memory.read`` routed (the policy's two stages: skip the
  long-term search, else probe and decide on the episodic read), ``route="both"`` and
  ``route="episodic"``. Served: the cosine to the cued latent of the episodic reconstruction, of
  the top long-term entry, or the better of both when both were read. Cost: wall time of the read
  (mean and p50), the episodic reads and long-term searches it issued, and the share of reads
  that skipped the search.

    python bench/bench_routing.py
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

import common
from bench_read import write_session

D = 384
SESSION_DOCS = ("pydoc:logging", "pydoc:pathlib")
LONGTERM_DOCS = ("pydoc:sqlite3", "pydoc:threading", "pydoc:json")
ELSEWHERE_DOCS = ("pydoc:tarfile", "license:Apache-2.0")


def unit(x):
    return x / max(float(np.linalg.norm(x)), 1e-12)


def session_tokens(model, docs, filler: np.ndarray, summaries: int) -> np.ndarray:
    import torch

    from memstream.settings import WINDOW

    wins = []
    for d in docs:
        wins += [d[i:i + WINDOW] for i in range(0, len(d), WINDOW)]
    fill = [filler[i:i + WINDOW] for i in range(0, len(filler) - WINDOW + 1, WINDOW)]
    rng = np.random.default_rng(3)
    for j in range(max(0, summaries - len(wins))):  # past the corpus: its windows again, with noise
        w = fill[j % len(fill)]
        wins.append(w if j < len(fill) else w + 0.3 * np.linalg.norm(w, axis=1, keepdims=True) / np.sqrt(D)
                    * rng.standard_normal(w.shape).astype(np.float32))
    out = []
    with torch.inference_mode():
        for w in wins:
            x = torch.zeros(1, WINDOW, D)
            x[0, :len(w)] = torch.from_numpy(w)
            out.append(model.encode(x, torch.tensor([len(w)])).half().numpy())
    return np.concatenate(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--summaries", type=int, default=64)
    ap.add_argument("--queries", type=int, default=120)
    ap.add_argument("--root", default=None)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    import torch

    from memstream.crypto import KeyRing, SigningKey
    from memstream.longterm import LongTermStore
    from memstream.operators.checkpoint import load_default
    from memstream.operators.data import split_latents
    from memstream.read.memory import Memory
    from memstream.read.routing import RoutePolicy

    torch.set_num_threads(2)
    res = {"machine": common.machine_info("lancedb", "torch"), "args": vars(args)}
    named = {**split_latents("heldout"), **split_latents("validation")}
    model, key = load_default(), SigningKey.generate()
    root = Path(args.root or tempfile.mkdtemp(prefix="bench-routing-"))
    try:
        uri, lt_uri = str(root / "episodic"), str(root / "longterm")
        filler = np.concatenate(list(split_latents("train").values()))
        write_session(uri, key, session_tokens(model, [named[n] for n in SESSION_DOCS], filler, args.summaries),
                      "s")
        stored = np.concatenate([named[n] for n in LONGTERM_DOCS])
        lt = LongTermStore(lt_uri, keyring=KeyRing([key]), signer=key, dim=D)
        vec = {}
        for i in range(0, len(stored), 5000):
            ids = lt.append([lt.new_entry(v, f"lt{i + j}".encode(), query=f"q{i + j}")
                             for j, v in enumerate(stored[i:i + 5000])]).entry_ids
            vec.update(zip(ids, stored[i:i + 5000]))
        lt.build_index()
        lt.close()
        rng = np.random.default_rng(5)
        pools = [np.concatenate([named[n] for n in SESSION_DOCS]), stored,
                 np.concatenate([named[n] for n in ELSEWHERE_DOCS])]
        per = args.queries // 3
        targets = [(src, pools[src][j]) for src in range(3) for j in rng.integers(0, len(pools[src]), per)]
        arms = {"routed": None, "always-both": "both", "episodic-only": "episodic"}
        out = {a: {"ms": [], "served": [], "episodic_reads": 0, "searches": 0, "by_source": [[], [], []]}
               for a in arms}
        with Memory(uri, lt_uri, keyring=KeyRing([key]), model=model) as mem:
            mem.read(targets[0][1], "s", k=4, route="both", account=False)  # load and cache the window
            for n, (src, target) in enumerate(targets):
                q = (target + rng.uniform(0.5, 1.5) * np.linalg.norm(target) / np.sqrt(D)
                     * rng.standard_normal(D)).astype(np.float32)
                names = list(arms)
                for a in names[n % 3:] + names[:n % 3]:
                    s = time.perf_counter()
                    r = mem.read(q, "s", k=4, route=arms[a], account=False)
                    ms = (time.perf_counter() - s) * 1e3
                    scores = []
                    if r.reconstruction is not None:
                        scores.append(float(unit(r.reconstruction) @ unit(target)))
                    top = [f for f in r.fragments if f.source == "longterm"]
                    if top:
                        scores.append(float(unit(vec[top[0].provenance.entry_id]) @ unit(target)))
                    o = out[a]
                    o["ms"].append(ms)
                    o["served"].append(max(scores) if scores else 0.0)
                    o["by_source"][src].append(o["served"][-1])
                    o["episodic_reads"] += r.route.route in ("episodic", "both")
                    o["searches"] += r.route.route in ("longterm", "both")
        policy = RoutePolicy.load()
        res["policy"] = {"threshold": policy.threshold, "skip_threshold": policy.skip_threshold,
                         "command": policy.info.get("command"), "heldout_scenarios": policy.info.get("heldout")}
        res["arms"] = {a: {"reads": len(o["ms"]), "served_cosine": float(np.mean(o["served"])),
                           "served_by_source": [float(np.mean(b)) for b in o["by_source"]],
                           "p50_ms": float(np.percentile(o["ms"], 50)), "mean_ms": float(np.mean(o["ms"])),
                           "episodic_reads": o["episodic_reads"], "searches": o["searches"],
                           "skipped_search_share": 1.0 - o["searches"] / len(o["ms"])} for a, o in out.items()}
        routed, both = res["arms"]["routed"], res["arms"]["always-both"]
        res["routed_vs_always_both"] = {"served_delta": routed["served_cosine"] - both["served_cosine"],
                                        "mean_ms_ratio": routed["mean_ms"] / both["mean_ms"],
                                        "p50_ms_ratio": routed["p50_ms"] / both["p50_ms"]}
        res["summaries"], res["longterm_entries"] = args.summaries, int(len(stored))
    finally:
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)
    lines = ["# Routed reads against always-both and episodic-only (held-out text, real stores)", "",
             common.machine_line(res["machine"]), "",
             f"Session of {res['summaries']} summaries, long-term store of {res['longterm_entries']:,} entries; "
             f"{args.queries} queries (a third each about the session, the long-term store, neither), every arm "
             "per query in rotating order. Served: cosine to the cued latent of what the read returned (the better "
             "store's when it read both).", "",
             "| arm | served cosine | session / long-term / neither | p50 ms | mean ms | episodic reads | searches "
             "| skipped search |",
             "|---|---|---|---|---|---|---|---|"]
    for a, r in res["arms"].items():
        lines.append(f"| {a} | {r['served_cosine']:.4f} | {' / '.join(f'{x:.3f}' for x in r['served_by_source'])} | "
                     f"{r['p50_ms']:.1f} | {r['mean_ms']:.1f} | {r['episodic_reads']} | {r['searches']} | "
                     f"{r['skipped_search_share']:.0%} |")
    v = res["routed_vs_always_both"]
    lines += ["", f"Routed against always-both, same run: served {v['served_delta']:+.4f} cosine, mean time "
              f"x{v['mean_ms_ratio']:.3f}, p50 x{v['p50_ms_ratio']:.3f}. Policy: skip threshold "
              f"{res['policy']['skip_threshold']:.4f}, episodic threshold {res['policy']['threshold']:.4f} "
              f"(`{res['policy']['command']}`)."]
    common.save(res, "routing", lines, Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
