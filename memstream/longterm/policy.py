"""The learned write policy: is this latent worth keeping beyond the session?

**Training signal: later retrieval.** A stream of real latents (MiniLM token states of the
local corpus, one document = one session, sessions in a seeded random order) is split in
time: the first 70% are write candidates, the last 30% are the queries that come later.
A candidate is labelled *worth keeping* when it is among the 10 nearest candidates
(cosine) of at least one later query, i.e. when keeping it would have answered a future
retrieval. The label is only known afterwards; the policy must predict it at write time.

**Features at write time** (what the store can compute when a latent arrives): the unit
latent itself (384), the cosine similarity to its nearest stored entry (novelty), the mean
similarity to its 10 nearest (density) and the log of the latent's norm. During training
the "store" at time t is every earlier candidate.

The dataset stacks several random session orders, so the label estimates the chance of
retrieval over many futures. **Model**: a two-layer MLP (387 -> 32 -> 1, sigmoid) trained
with binary cross-entropy in torch for 3 epochs (seconds on an idle core); the weights ship as ``write_policy.npz`` and inference is numpy,
so deciding costs no torch import. The decision threshold maximises F1 on a held-out
split. Retrain with ``python -m memstream.longterm.policy``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from memstream.errors import ConfigError

if TYPE_CHECKING:
    from memstream.longterm.store import LongTermStore

WEIGHTS = Path(__file__).with_name("write_policy.npz")
K = 10


@dataclass(frozen=True)
class WriteDecision:
    keep: bool
    score: float  # predicted probability that the latent will be retrieved later
    novelty: float  # 1 - cosine similarity to the nearest stored entry (1.0 for an empty store)


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def features(latents: np.ndarray, neighbor_sims: np.ndarray) -> np.ndarray:
    """[n, 387] features from latents [n, d] and the cosine similarities of each to its
    nearest stored entries [n, <=K] (NaN-padded or empty when the store has fewer)."""
    latents = np.atleast_2d(np.asarray(latents, np.float32))
    sims = np.atleast_2d(np.asarray(neighbor_sims, np.float32))
    if sims.shape[1] == 0:
        sims = np.full((len(latents), 1), np.nan, np.float32)
    top = np.where(np.isnan(sims), -1.0, sims)  # an empty slot is as far as possible
    best = top.max(axis=1, keepdims=True)
    mean = top.mean(axis=1, keepdims=True)
    lognorm = np.log(np.linalg.norm(latents, axis=1, keepdims=True) + 1e-6)
    return np.concatenate([_unit(latents), best, mean, lognorm], axis=1).astype(np.float32)


class WritePolicy:
    def __init__(self, params: dict[str, np.ndarray], threshold: float, info: dict | None = None):
        self.params = {k: np.asarray(v, np.float32) for k, v in params.items()}
        self.threshold = float(threshold)
        self.info = info or {}

    @classmethod
    def load(cls, path: str | Path | None = None) -> "WritePolicy":
        path = Path(path) if path else WEIGHTS
        try:
            with np.load(path) as z:
                params = {k: z[k] for k in ("w1", "b1", "w2", "b2", "mu", "sigma")}
                return cls(params, float(z["threshold"]), json.loads(str(z["info"])))
        except (OSError, KeyError) as e:
            raise ConfigError(f"cannot load write-policy weights {path}: {e}; retrain with "
                              "python -m memstream.longterm.policy") from None

    def save(self, path: str | Path) -> None:
        np.savez(path, threshold=np.float32(self.threshold), info=json.dumps(self.info), **self.params)

    def scores(self, latents: np.ndarray, neighbor_sims: np.ndarray) -> np.ndarray:
        p = self.params
        x = (features(latents, neighbor_sims) - p["mu"]) / p["sigma"]
        h = np.maximum(x @ p["w1"] + p["b1"], 0.0)
        return 1.0 / (1.0 + np.exp(-(h @ p["w2"] + p["b2"]).reshape(-1)))

    def decide(self, latent: np.ndarray, neighbor_sims: Sequence[float]) -> WriteDecision:
        sims = np.asarray(neighbor_sims, np.float32).reshape(1, -1)
        score = float(self.scores(np.asarray(latent).reshape(1, -1), sims)[0])
        novelty = 1.0 - float(sims.max()) if sims.size else 1.0
        return WriteDecision(score >= self.threshold, score, novelty)

    def decide_for_store(self, latent: np.ndarray, store: "LongTermStore", include_cold: bool = True) -> WriteDecision:
        if store.metric != "cosine":
            raise ConfigError("the write policy reads cosine similarities: open the store with metric='cosine'")
        hits = store.search(latent, K, include_cold=include_cold, record_access=False)
        return self.decide(latent, [1.0 - h.distance for h in hits])


# ------------------------------------------------------------------------ training data


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
    from memstream.text_latents import corpus_texts, text_to_latents

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
