"""Training of the long-term write policy (:mod:`memstream.longterm.policy`) on real latents.

Retrain with ``python -m memstream.longterm.train_policy``; the weights go to
``memstream/longterm/write_policy.npz``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from memstream.longterm.policy import K, WEIGHTS, WritePolicy, _unit, features
from memstream.text_latents import corpus_texts, text_to_latents


def prior_neighbor_sims(stream: np.ndarray, k: int = K, block: int = 1024) -> np.ndarray:
    """For each t, the similarities of stream[t] to its k nearest in stream[:t] (NaN-padded)."""
    u = _unit(stream.astype(np.float32))
    out = np.full((len(u), k), np.nan, np.float32)
    for s in range(0, len(u), block):
        e = min(s + block, len(u))
        sims = u[s:e] @ u[:e].T
        sims[np.arange(e)[None, :] >= np.arange(s, e)[:, None]] = -np.inf  # only the past
        kk = min(k, e)
        top = -np.sort(-np.partition(sims, e - kk, axis=1)[:, e - kk:], axis=1)
        out[s:e, :kk] = np.where(np.isinf(top), np.nan, top)
    return out


def retrieval_labels(candidates: np.ndarray, queries: np.ndarray, k: int = K) -> np.ndarray:
    """1 where a candidate is among the k nearest candidates of at least one later query."""
    c, q = _unit(candidates.astype(np.float32)), _unit(queries.astype(np.float32))
    hit = np.zeros(len(c), bool)
    for s in range(0, len(q), 1024):
        sims = q[s:s + 1024] @ c.T
        top = np.argpartition(-sims, k, axis=1)[:, :k]
        hit[np.unique(top)] = True
    return hit.astype(np.float32)


def build_dataset(sessions: Sequence[np.ndarray], seed: int = 0, split: float = 0.7):
    """(features, labels) from sessions of latents in time order."""
    order = np.random.default_rng(seed).permutation(len(sessions))
    stream = np.concatenate([sessions[i] for i in order]).astype(np.float32)
    cut = int(len(stream) * split)
    cand, later = stream[:cut], stream[cut:]
    return features(cand, prior_neighbor_sims(cand)), retrieval_labels(cand, later)


def build_training_set(sessions: Sequence[np.ndarray], orders: int = 4):
    """Datasets from ``orders`` random session orders, stacked: the label then estimates the
    chance of retrieval over many possible futures rather than one (one order alone let the
    model memorise which documents happened to come later)."""
    parts = [build_dataset(sessions, seed) for seed in range(orders)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (rank statistic, ties averaged)."""
    from scipy.stats import rankdata

    pos = labels > 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if not n_pos or not n_neg:
        raise ValueError("AUC needs both classes")
    ranks = rankdata(scores)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def train(x: np.ndarray, y: np.ndarray, seed: int = 0, epochs: int = 3, hidden: int = 32) -> WritePolicy:
    import torch

    torch.set_num_threads(1)  # tiny model: threads only fight over the shared cores
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(x))
    n_val = max(1, len(x) // 5)
    val, tr = idx[:n_val], idx[n_val:]
    mu, sigma = x[tr].mean(0), x[tr].std(0) + 1e-6
    xt = torch.from_numpy((x - mu) / sigma)
    yt = torch.from_numpy(y)
    model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    pos_weight = torch.tensor((len(y) - y.sum()) / max(y.sum(), 1.0))
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    losses = []
    for _ in range(epochs):
        perm = torch.from_numpy(rng.permutation(tr))
        total = 0.0
        for b in range(0, len(perm), 256):
            i = perm[b:b + 256]
            opt.zero_grad()
            loss = loss_fn(model(xt[i]).squeeze(1), yt[i])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(i)
        losses.append(total / len(tr))
    with torch.no_grad():
        val_scores = torch.sigmoid(model(xt[val]).squeeze(1)).numpy()
    threshold = _best_f1_threshold(val_scores, y[val])
    lin1, lin2 = model[0], model[2]
    params = {"w1": lin1.weight.detach().numpy().T, "b1": lin1.bias.detach().numpy(),
              "w2": lin2.weight.detach().numpy().T, "b2": lin2.bias.detach().numpy(), "mu": mu, "sigma": sigma}
    info = {"train_rows": int(len(tr)), "val_rows": int(len(val)), "positive_rate": float(y.mean()),
            "val_auc": auc(val_scores, y[val]), "val_auc_novelty_only": auc(-x[val, -3], y[val]),
            "first_loss": losses[0], "last_loss": losses[-1], "threshold": threshold}
    return WritePolicy(params, threshold, info)


def _best_f1_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    best, best_t = -1.0, 0.5
    for t in np.quantile(scores, np.linspace(0.05, 0.95, 37)):
        pred = scores >= t
        tp = float((pred & (labels > 0.5)).sum())
        f1 = 2 * tp / max(pred.sum() + (labels > 0.5).sum(), 1)
        if f1 > best:
            best, best_t = f1, float(t)
    return best_t


def corpus_sessions(names: Sequence[str] | None = None, max_tokens_per_doc: int = 1500) -> list[np.ndarray]:
    """Real latents: the first ``max_tokens_per_doc`` tokens of each named corpus text."""
    texts = corpus_texts()
    names = list(names) if names else list(texts)
    out = []
    for name in names:
        words = texts[name].split()
        # about 1.3 word pieces per word: cut the text before encoding, not after
        lat = text_to_latents(" ".join(words[:int(max_tokens_per_doc / 1.3)]))
        out.append(lat[:max_tokens_per_doc])
    return out


TRAIN_DOCS = ["pydoc:asyncio", "pydoc:collections", "pydoc:dataclasses", "pydoc:datetime", "pydoc:email",
              "pydoc:functools", "pydoc:http.client", "pydoc:inspect", "pydoc:json", "pydoc:logging",
              "pydoc:os", "pydoc:pathlib", "pydoc:re", "pydoc:socket", "pydoc:sqlite3", "pydoc:subprocess"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="train the long-term write policy on real latents")
    ap.add_argument("--out", type=Path, default=WEIGHTS)
    ap.add_argument("--tokens-per-doc", type=int, default=1200)
    ap.add_argument("--orders", type=int, default=4, help="random session orders to label over")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    sessions = corpus_sessions(TRAIN_DOCS, args.tokens_per_doc)
    x, y = build_training_set(sessions, args.orders)
    t1 = time.monotonic()
    policy = train(x, y, args.seed)
    policy.info.update({"docs": TRAIN_DOCS, "tokens_per_doc": args.tokens_per_doc, "orders": args.orders,
                        "data_s": t1 - t0,
                        "train_s": time.monotonic() - t1})
    policy.save(args.out)
    print(json.dumps(policy.info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
