"""The learned routing policy of reads, in two stages: is the long-term search needed, and
after it, is the episodic read?

A routed read (``Memory.read`` without ``route``) decides in two steps, each a small MLP:

1. **Skip** (before any long-term search): from the query and the session's routing index (one
   centroid per summary, cached with the window), the probability that the episodic read alone
   serves the query as well as both stores would. At or above ``skip_threshold`` the read is
   episodic only and no long-term search runs (route *episodic*).
2. **Probe** (otherwise): the long-term search runs (its hits are what the read returns from that
   store, so it is the search a read of both stores makes anyway), and from its similarities too
   the policy gives the probability that the episodic read (the decoder over the summary window)
   serves better than the probe's hits; at or above ``threshold`` it runs (route *both*), else the
   read ends long-term only.

**Training signal: which store served the query best, measured.** Scenarios are built from
real latents (MiniLM token states of the local corpus): a *session* is four documents, cut into
windows of 4,096 latents and compressed by the committed compressor into summaries; the
*long-term store* holds every latent of eight other documents. Queries are noisy cues
(``operators.evaluate.make_cues``, noise 0.5-1.5 x the latent's rms) of a latent from the
session, from the long-term documents, or from a document in neither (one third each). Each
query is served by both stores and scored against the latent it was a cue of: episodic, the
cosine of the decoder's reconstruction over the window; long-term, the cosine of the nearest
entry. Stage 1's label: the long-term entry is not better than the episodic read by more than
``SKIP_SLACK``; stage 2's: the episodic read is better than the entry by more than ``GAIN``.

**Features at read time**: stage 1, the log of the query's norm and statistics of the cosines
of the projected query to the session's summary centroids (:func:`skip_features`); stage 2,
those and the cosines of its two nearest long-term entries from the probe (:func:`features`).
**Models**: two-layer MLPs (-> 16 -> 1, sigmoid) trained with binary cross-entropy in torch;
weights ship as ``route_policy.npz`` and inference is numpy. The thresholds are chosen on the
training scenarios: stage 2's the highest at which routed reads serve within half of
``TOLERANCE`` of reading both stores every time, then stage 1's the lowest (most skipped
searches) at which both stages together stay within ``TOLERANCE``. Training is
:mod:`memstream.read.train_routing` (``python -m memstream.read.train_routing``); held-out
scenarios measure it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from memstream.errors import ConfigError

WEIGHTS = Path(__file__).with_name("route_policy.npz")
ROUTES = ("episodic", "longterm", "both")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def centroids_of(model, tokens):
    """Per summary, the mean of its slots in the compressor's projected space: tokens
    [n, T, d] (torch) -> [n, rank] numpy."""
    return model.slots_of(tokens.float()).mean(-2).numpy()


def project(model, queries: np.ndarray) -> np.ndarray:
    """Queries [n, d] in the compressor's projected space, where the slots live."""
    import torch

    with torch.no_grad():
        return model.project(torch.from_numpy(np.ascontiguousarray(queries, np.float32))).numpy()


SKIP_FEATURES = 6  # the leading columns of :func:`features`, known before any long-term search


def skip_features(queries: np.ndarray, projected: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """[n, 6] stage-1 features of queries [n, d] (``projected`` [n, rank] by :func:`project`):
    the log of the query's norm and statistics of its projected cosines to the session's summary
    centroids [m, rank] (:func:`centroids_of`; max, mean, mean of the top 4, spread, max - mean).
    The query's own coordinates are left out on purpose: with them the model learnt which
    training documents sat where, and fell below the majority label on held-out documents."""
    queries = np.atleast_2d(np.asarray(queries, np.float32))
    sims = _unit(np.atleast_2d(projected)) @ _unit(np.asarray(centroids, np.float32)).T
    top = -np.sort(-sims, axis=1)[:, :4]
    lognorm = np.log(np.linalg.norm(queries, axis=1) + 1e-6)
    mx, mean = sims.max(1), sims.mean(1)
    return np.stack([lognorm, mx, mean, top.mean(1), sims.std(1), mx - mean], axis=1).astype(np.float32)


def features(queries: np.ndarray, projected: np.ndarray, centroids: np.ndarray,
             longterm_sims: np.ndarray) -> np.ndarray:
    """[n, 8] stage-2 features: :func:`skip_features`, then the cosine of the query's nearest
    long-term entry and its margin over the second, from ``longterm_sims`` [n, 2] (the probe's;
    NaN where there is none)."""
    lt = np.nan_to_num(np.atleast_2d(np.asarray(longterm_sims, np.float32)), nan=-1.0)
    return np.concatenate([skip_features(queries, projected, centroids),
                           np.stack([lt[:, 0], lt[:, 0] - lt[:, 1]], axis=1)], axis=1).astype(np.float32)


def _mlp(p: dict[str, np.ndarray], x: np.ndarray, prefix: str = "") -> np.ndarray:
    h = np.maximum(((x - p[prefix + "mu"]) / p[prefix + "sigma"]) @ p[prefix + "w1"] + p[prefix + "b1"], 0.0)
    logit = (h @ p[prefix + "w2"] + p[prefix + "b2"]).reshape(-1)
    return 1.0 / (1.0 + np.exp(-np.clip(logit, -60.0, 60.0)))


PARAMS = ("w1", "b1", "w2", "b2", "mu", "sigma")


class RoutePolicy:
    """Stage 1: the probability that the episodic read alone serves a query (no long-term
    search at or above ``skip_threshold``). Stage 2: the probability that the episodic read
    serves better than the long-term probe (run at or above ``threshold``). ``params`` holds
    both MLPs, stage 1's keys prefixed ``skip_``."""

    def __init__(self, params: dict[str, np.ndarray], threshold: float, info: dict | None = None,
                 skip_threshold: float = 1.0):
        self.params = {k: np.asarray(v, np.float32) for k, v in params.items()}
        self.threshold = float(threshold)
        self.skip_threshold = float(skip_threshold)  # above every probability (never skip) until chosen
        self.info = info or {}

    @classmethod
    def load(cls, path: str | Path | None = None) -> "RoutePolicy":
        path = Path(path) if path else WEIGHTS
        try:
            with np.load(path) as z:
                return cls({k: z[k] for p in ("", "skip_") for k in (p + n for n in PARAMS)}, float(z["threshold"]),
                           json.loads(str(z["info"])), float(z["skip_threshold"]))
        except (OSError, KeyError) as e:
            raise ConfigError(f"cannot load routing-policy weights {path}: {e}; retrain with "
                              "python -m memstream.read.train_routing") from None

    def save(self, path: str | Path) -> None:
        np.savez(path, threshold=np.float32(self.threshold), skip_threshold=np.float32(self.skip_threshold),
                 info=json.dumps(self.info), **self.params)

    def skip_scores(self, x: np.ndarray) -> np.ndarray:
        """Stage 1: the probability [n] that the episodic read alone serves, from features [n, 6]."""
        return _mlp(self.params, x, "skip_")

    def scores(self, x: np.ndarray) -> np.ndarray:
        """Stage 2: the probability [n] that the episodic read serves better, from features [n, 8]."""
        return _mlp(self.params, x)

    def skip_probability(self, query, projected: np.ndarray, centroids: np.ndarray) -> float:
        """Stage 1 of one query [d] (``projected`` by :func:`project`) in a session whose summary
        centroids are [m, rank]."""
        query = np.asarray(query, np.float32).reshape(1, -1)
        return float(self.skip_scores(skip_features(query, projected, centroids))[0])

    def episodic_probability(self, query, projected: np.ndarray, centroids: np.ndarray, longterm_sims) -> float:
        """Stage 2 of one query [d], whose two nearest long-term entries have cosines
        ``longterm_sims`` (NaN where there is none)."""
        query = np.asarray(query, np.float32).reshape(1, -1)
        x = features(query, projected, centroids, np.asarray(longterm_sims, np.float32).reshape(1, 2))
        return float(self.scores(x)[0])
