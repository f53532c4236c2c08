"""The learned routing policy of reads: episodic window, long-term store, or both?

**Training signal: which store served the query best, measured.** Scenarios are built from
real latents (MiniLM token states of the local corpus, as the write policy's): a *session*
is four documents, cut into windows of 4,096 latents and compressed by the committed
compressor into summaries; the *long-term store* holds every latent of eight other
documents. Queries are noisy cues (``operators.evaluate.make_cues``, noise 0.5-1.5 x the
latent's rms) of a latent from the session, from the long-term documents, or from a
document in neither (one third each). Each query is then served by both stores and scored
against the latent it was a cue of:

- episodic: cosine of the decoder's reconstruction over the session window (``read.attend``)
  to the target;
- long-term: cosine of the nearest entry (cosine search, as ``LongTermStore.search``) to the
  target.

The label is the store whose score is higher by more than ``MARGIN`` (0.05), and *both*
when neither is. The label is only known after reading both; the policy must predict it
before reading either.

**Features at read time**, before the (expensive) episodic read: the log of the query's norm,
statistics of the cosines of the projected query to the session's summary centroids (one
mean slot per summary, cached with the window), and the cosines of its two nearest
long-term entries from a probe search (whose hits are returned when the route includes the
long-term store); see :func:`features`. **Model**: a two-layer MLP (8 -> 16 -> 3, softmax) trained with cross-entropy in torch; weights ship as
``route_policy.npz`` and inference is numpy. Scenarios on held-out documents measure it.
Training is :mod:`memstream.read.train_routing` (``python -m memstream.read.train_routing``).
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


def features(queries: np.ndarray, projected: np.ndarray, centroids: np.ndarray,
             longterm_sims: np.ndarray) -> np.ndarray:
    """[n, 8] features of queries [n, d] (``projected`` [n, rank] by :func:`project`): the log
    of the query's norm; statistics of its projected cosines to the session's summary centroids
    [m, rank] (:func:`centroids_of`; max, mean, mean of the top 4, spread,
    max - mean); and the cosines of its two nearest long-term entries, ``longterm_sims``
    [n, 2] (a cheap probe: the long-term search is ~50x cheaper than the episodic read).
    The query's own coordinates are left out on purpose: with them the model learnt which
    training documents sat where, and fell below the majority label on held-out documents."""
    queries = np.atleast_2d(np.asarray(queries, np.float32))
    sims = _unit(np.atleast_2d(projected)) @ _unit(np.asarray(centroids, np.float32)).T
    top = -np.sort(-sims, axis=1)[:, :4]
    lognorm = np.log(np.linalg.norm(queries, axis=1) + 1e-6)
    mx, mean = sims.max(1), sims.mean(1)
    lt = np.nan_to_num(np.atleast_2d(np.asarray(longterm_sims, np.float32)), nan=-1.0)
    return np.stack([lognorm, mx, mean, top.mean(1), sims.std(1), mx - mean, lt[:, 0], lt[:, 0] - lt[:, 1]],
                    axis=1).astype(np.float32)


class RoutePolicy:
    def __init__(self, params: dict[str, np.ndarray], info: dict | None = None):
        self.params = {k: np.asarray(v, np.float32) for k, v in params.items()}
        self.info = info or {}

    @classmethod
    def load(cls, path: str | Path | None = None) -> "RoutePolicy":
        path = Path(path) if path else WEIGHTS
        try:
            with np.load(path) as z:
                return cls({k: z[k] for k in ("w1", "b1", "w2", "b2", "mu", "sigma")}, json.loads(str(z["info"])))
        except (OSError, KeyError) as e:
            raise ConfigError(f"cannot load routing-policy weights {path}: {e}; retrain with "
                              "python -m memstream.read.train_routing") from None

    def save(self, path: str | Path) -> None:
        np.savez(path, info=json.dumps(self.info), **self.params)

    def scores(self, x: np.ndarray) -> np.ndarray:
        """Route probabilities [n, 3] (order of ROUTES) from features [n, 8]."""
        p = self.params
        h = np.maximum(((x - p["mu"]) / p["sigma"]) @ p["w1"] + p["b1"], 0.0)
        z = h @ p["w2"] + p["b2"]
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    def probabilities(self, query, centroids: np.ndarray, model, longterm_sims) -> dict[str, float]:
        """Of one query [d] in a session whose summary centroids are [m, rank], whose two nearest
        long-term entries have cosines ``longterm_sims`` (NaN where there is none)."""
        query = np.asarray(query, np.float32).reshape(1, -1)
        x = features(query, project(model, query), centroids, np.asarray(longterm_sims, np.float32).reshape(1, 2))
        return {r: float(p) for r, p in zip(ROUTES, self.scores(x)[0])}
