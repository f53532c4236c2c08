"""The learned write policy: is this latent worth keeping beyond the session?

**Training signal: what happens in use.** Sessions of real text are replayed
(:mod:`memstream.longterm.train_policy`): every read offers its query latent, as query-time
retention does, and a candidate is labelled *worth keeping* when, had it been retained, a
later read retrieved it (top 8 by cosine) and it served that read better than the read's own
episodic reconstruction. The label is only known afterwards; the policy predicts it at write
time.

**Features at write time** (what the store can compute when a latent arrives): the unit
latent itself (384), the cosine similarity to its nearest stored entry (novelty), the mean
similarity to its 10 nearest (density) and the log of the latent's norm. The shipped model
reads only the last three (``SCALARS``): the coordinates describe which training documents
sat where, not what later reads come back to. **Model**: a two-layer MLP (3 -> 32 -> 1,
sigmoid) trained with binary cross-entropy in torch; the weights, the threshold and their
provenance (``info``) ship as ``write_policy.npz``, and inference is numpy, so deciding costs
no torch import. Retrain with ``python -m memstream.longterm.train_policy``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from memstream.errors import ConfigError

WEIGHTS = Path(__file__).with_name("write_policy.npz")
K = 10
SCALARS = 3  # the last columns of features(): best and mean neighbour cosine, log norm


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
                              "python -m memstream.longterm.train_policy") from None

    def save(self, path: str | Path) -> None:
        np.savez(path, threshold=np.float32(self.threshold), info=json.dumps(self.info), **self.params)

    def scores(self, latents: np.ndarray, neighbor_sims: np.ndarray) -> np.ndarray:
        p = self.params
        x = features(latents, neighbor_sims)
        x = (x[:, -p["w1"].shape[0]:] - p["mu"]) / p["sigma"]  # a model of the scalars only reads the last SCALARS
        h = np.maximum(x @ p["w1"] + p["b1"], 0.0)
        logit = (h @ p["w2"] + p["b2"]).reshape(-1)
        return 1.0 / (1.0 + np.exp(-np.clip(logit, -60.0, 60.0)))  # a logit past +-60 is 0 or 1 anyway

    def decide(self, latent: np.ndarray, neighbor_sims: Sequence[float]) -> WriteDecision:
        sims = np.asarray(neighbor_sims, np.float32).reshape(1, -1)
        score = float(self.scores(np.asarray(latent).reshape(1, -1), sims)[0])
        novelty = 1.0 - float(sims.max()) if sims.size else 1.0
        # A store of fewer than K entries keeps what it is offered: the model scores nearness to
        # what is stored, so an empty store would otherwise never take its first entry.
        return WriteDecision(score >= self.threshold or sims.size < K, score, novelty)
