"""Training of the read routing policy (:mod:`memstream.read.routing`) on generated scenarios.

A *session* is four documents of the local corpus, cut into windows of 4,096 latents and
compressed by the committed compressor into summaries; the *long-term store* holds every
latent of eight other documents. Queries are noisy cues (``operators.evaluate.make_cues``, noise
0.5-1.5 x the latent's rms) of a latent from the session, from the long-term documents, or from
a document in neither (one third each). Each query is served by both stores and scored against
the latent it was a cue of: episodic, the cosine of the decoder's reconstruction over the
session's summaries; long-term, the cosine of the nearest entry. Two models are trained on the
same queries (see :mod:`memstream.read.routing`): stage 1, from the session's summary centroids
alone, whether the episodic read alone serves (the entry is not better by more than
``SKIP_SLACK``), so that the long-term search can be skipped; stage 2, with the probe's
similarities too, whether the episodic read serves better by more than ``GAIN``. Held-out
scenarios are built from documents no training scenario uses. Seeded: the same command writes
the same weights; it is recorded in the npz's ``info``.

Retrain with ``python -m memstream.read.train_routing``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from memstream.operators.checkpoint import load_default
from memstream.operators.data import split_latents
from memstream.operators.evaluate import make_cues
from memstream.read.routing import (SKIP_FEATURES, WEIGHTS, RoutePolicy, _unit, centroids_of, features,
                                    project)

GAIN = 0.01  # an episodic read that serves less better than this is not worth its cost
SKIP_SLACK = 0.005  # stage 1's label: the episodic read alone serves when no entry beats it by more
TOLERANCE = 0.002  # served cosine the routed reads may lose against reading both stores every time
SESSION_DOCS, LONGTERM_DOCS = 4, 8


def scenario(model, docs: list[np.ndarray], rng: np.random.Generator, queries: int = 600):
    """(features, labels, episodic scores, long-term scores) of one generated scenario."""
    import torch

    pick = rng.permutation(len(docs))
    session = np.concatenate([docs[i] for i in pick[:SESSION_DOCS]])
    longterm = np.concatenate([docs[i] for i in pick[SESSION_DOCS:SESSION_DOCS + LONGTERM_DOCS]])
    elsewhere = np.concatenate([docs[i] for i in pick[SESSION_DOCS + LONGTERM_DOCS:]])
    window = model.config.window
    x = torch.zeros((-(-len(session) // window), window, session.shape[1]))
    lengths = torch.tensor([min(window, len(session) - i) for i in range(0, len(session), window)])
    for j, i in enumerate(range(0, len(session), window)):
        x[j, :lengths[j]] = torch.from_numpy(session[i:i + window])
    with torch.no_grad():
        tokens = model.encode(x, lengths).half().float()  # as stored: fp16
    memory = tokens.reshape(-1, tokens.shape[-1])
    centroids = centroids_of(model, tokens)
    per = queries // 3
    targets = np.concatenate([session[rng.integers(0, len(session), per)],
                              longterm[rng.integers(0, len(longterm), per)],
                              elsewhere[rng.integers(0, len(elsewhere), queries - 2 * per)]])
    g = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
    noise = torch.from_numpy(rng.uniform(0.5, 1.5, (len(targets), 1)).astype(np.float32))
    cues = make_cues(torch.from_numpy(targets), noise, g).numpy()
    ep = np.empty(len(cues), np.float32)
    for s in range(0, len(cues), 64):
        with torch.no_grad():
            out, _ = model.attend(torch.from_numpy(cues[s:s + 64]), memory)
        ep[s:s + 64] = (_unit(out.numpy()) * _unit(targets[s:s + 64])).sum(1)
    sims = _unit(cues) @ _unit(longterm).T
    order = np.argsort(-sims, axis=1)[:, :2]
    lt = (_unit(longterm[order[:, 0]]) * _unit(targets)).sum(1)
    probe = np.take_along_axis(sims, order, axis=1)
    return (features(cues, project(model, cues), centroids, probe), (ep > lt + GAIN).astype(np.float32), ep, lt)


def build(model, docs: list[np.ndarray], scenarios: int, seed: int):
    rng = np.random.default_rng(seed)
    parts = [scenario(model, docs, rng) for _ in range(scenarios)]
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(4))


def served(episodic: np.ndarray, ep: np.ndarray, lt: np.ndarray, skipped: np.ndarray | None = None) -> np.ndarray:
    """The score a routed read obtains: the episodic read's where stage 1 skipped the search,
    else the probe's, or the better of both where the episodic read ran too."""
    out = np.where(episodic, np.maximum(ep, lt), lt)
    return out if skipped is None else np.where(skipped, ep, out)


def fit(x: np.ndarray, y: np.ndarray, seed: int = 0, epochs: int = 20, hidden: int = 16, prefix: str = ""):
    """An MLP (x -> hidden -> 1) trained with binary cross-entropy: (its parameters, named with
    ``prefix``, and what training recorded)."""
    import torch

    torch.set_num_threads(1)  # tiny model: threads only fight over the shared cores
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    mu, sigma = x.mean(0), x.std(0) + 1e-6
    xt, yt = torch.from_numpy((x - mu) / sigma), torch.from_numpy(y)
    model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    losses = []
    for _ in range(epochs):
        perm = torch.from_numpy(rng.permutation(len(x)))
        total = 0.0
        for b in range(0, len(perm), 256):
            i = perm[b:b + 256]
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(xt[i]).squeeze(1), yt[i])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(i)
        losses.append(total / len(x))
    lin1, lin2 = model[0], model[2]
    params = {"w1": lin1.weight.detach().numpy().T, "b1": lin1.bias.detach().numpy(),
              "w2": lin2.weight.detach().numpy().T, "b2": lin2.bias.detach().numpy(), "mu": mu, "sigma": sigma}
    return ({prefix + k: v for k, v in params.items()},
            {"first_loss": losses[0], "last_loss": losses[-1], "epochs": epochs, "hidden": hidden})


def skip_labels(ep: np.ndarray, lt: np.ndarray) -> np.ndarray:
    return (lt <= ep + SKIP_SLACK).astype(np.float32)


def train(x: np.ndarray, y: np.ndarray, ep: np.ndarray, lt: np.ndarray, seed: int = 0) -> RoutePolicy:
    """Both stages, on the same queries; thresholds still to choose."""
    probe, probe_info = fit(x, y, seed)
    skip, skip_info = fit(x[:, :SKIP_FEATURES], skip_labels(ep, lt), seed, prefix="skip_")
    return RoutePolicy({**probe, **skip}, 0.5, {"train_rows": int(len(x)), "probe_model": probe_info,
                                                "skip_model": skip_info})


def choose_threshold(policy: RoutePolicy, x: np.ndarray, ep: np.ndarray, lt: np.ndarray,
                     tolerance: float = TOLERANCE / 2) -> float:
    """Stage 2: the highest threshold (fewest episodic reads) whose routed reads, the search
    never skipped, serve within ``tolerance`` of reading both stores every time."""
    p, both = policy.scores(x), np.maximum(ep, lt).mean()
    for t in np.sort(np.unique(np.round(p, 4)))[::-1]:
        if served(p >= t, ep, lt).mean() >= both - tolerance:
            return float(t)
    return 0.0


def choose_skip_threshold(policy: RoutePolicy, x: np.ndarray, ep: np.ndarray, lt: np.ndarray,
                          tolerance: float = TOLERANCE) -> float:
    """Stage 1, given stage 2's threshold: the lowest threshold (most searches skipped), going
    down from the most confident, at which both stages together serve within ``tolerance`` of
    reading both stores every time; 1.5 (never skip) when not even the most confident can."""
    p1, episodic = policy.skip_scores(x[:, :SKIP_FEATURES]), policy.scores(x) >= policy.threshold
    order = np.argsort(-p1, kind="stable")
    probe = served(episodic, ep, lt)
    # Served, summed, with the searches of the i+1 most confident queries skipped.
    total = probe.sum() + np.cumsum((ep - probe)[order].astype(np.float64))
    ends = np.flatnonzero(np.append(p1[order][1:] != p1[order][:-1], True))  # a threshold skips whole ties
    ok = total[ends] / len(p1) >= np.maximum(ep, lt).mean() - tolerance
    passing = len(ok) if ok.all() else int(np.argmin(ok))
    return float(p1[order][ends[passing - 1]]) if passing else 1.5


def evaluate(policy: RoutePolicy, x: np.ndarray, y: np.ndarray, ep: np.ndarray, lt: np.ndarray) -> dict:
    skipped = policy.skip_scores(x[:, :SKIP_FEATURES]) >= policy.skip_threshold
    episodic = policy.scores(x) >= policy.threshold
    ran = skipped | episodic
    return {"rows": int(len(y)), "helps_share": float(y.mean()), "skipped_search_share": float(skipped.mean()),
            "episodic_share": float(ran.mean()),
            "recall_of_helpful_episodic_reads": float(ran[y > 0.5].mean()) if y.any() else 1.0,
            "routed_score": float(served(episodic, ep, lt, skipped).mean()),
            "probe_always_score": float(served(episodic, ep, lt).mean()),
            "always_both_score": float(np.maximum(ep, lt).mean()), "episodic_only_score": float(ep.mean()),
            "longterm_only_score": float(lt.mean())}


def corpus_docs(split: str) -> list[np.ndarray]:
    return [d for d in split_latents(split).values() if len(d) >= 64]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="train the read routing policy on generated scenarios")
    ap.add_argument("--out", type=Path, default=WEIGHTS)
    ap.add_argument("--scenarios", type=int, default=24)
    ap.add_argument("--eval-scenarios", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, default=None,
                    help="keep the generated scenarios in this .npz and reuse them when it exists (same arguments)")
    args = ap.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    import torch

    torch.set_num_threads(2)
    t0 = time.monotonic()
    model = load_default()
    train_docs, eval_docs = corpus_docs("train"), corpus_docs("heldout") + corpus_docs("validation")
    if len(eval_docs) < SESSION_DOCS + LONGTERM_DOCS + 1:  # too few held-out texts: borrow untrained ones
        need = SESSION_DOCS + LONGTERM_DOCS + 1 - len(eval_docs)
        eval_docs, train_docs = eval_docs + train_docs[-need:], train_docs[:-need]
    key = f"{args.scenarios}/{args.eval_scenarios}/{args.seed}"
    if args.data is not None and args.data.exists() and str(np.load(args.data)["key"]) == key:
        with np.load(args.data) as z:
            x, y, ep, lt, ex, ey, eep, elt = (z[n] for n in ("x", "y", "ep", "lt", "ex", "ey", "eep", "elt"))
    else:
        x, y, ep, lt = build(model, train_docs, args.scenarios, args.seed)
        ex, ey, eep, elt = build(model, eval_docs, args.eval_scenarios, args.seed + 1)
        if args.data is not None:
            np.savez(args.data, key=key, x=x, y=y, ep=ep, lt=lt, ex=ex, ey=ey, eep=eep, elt=elt)
    t1 = time.monotonic()
    policy = train(x, y, ep, lt, args.seed)
    policy.threshold = choose_threshold(policy, x, ep, lt)
    policy.skip_threshold = choose_skip_threshold(policy, x, ep, lt)
    policy.info.update({"command": " ".join(["python -m memstream.read.train_routing", *argv]),
                        "seed": args.seed, "gain": GAIN, "skip_slack": SKIP_SLACK, "tolerance": TOLERANCE,
                        "threshold": policy.threshold, "skip_threshold": policy.skip_threshold,
                        "scenarios": args.scenarios, "eval_scenarios": args.eval_scenarios,
                        "train_docs": len(train_docs), "eval_docs": len(eval_docs), "data_s": t1 - t0,
                        "train_s": time.monotonic() - t1, "train": evaluate(policy, x, y, ep, lt),
                        "heldout": evaluate(policy, ex, ey, eep, elt)})
    policy.save(args.out)
    print(json.dumps(policy.info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
