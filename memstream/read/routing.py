"""The learned routing policy of reads: after the long-term probe, is the episodic read needed?

A routed read (``Memory.read`` without ``route``) first searches the long-term store (the
probe; its hits are what the read returns from that store, so this is the search a read of
both stores makes anyway). The policy then says whether the session's episodic read (the
decoder over the summary window, several times the search's cost) would serve the query
better; only then is it run (route *both*), else the read ends long-term only.

**Training signal: which store served the query best, measured.** Scenarios are built from
real latents (MiniLM token states of the local corpus): a *session* is four documents, cut into
windows of 4,096 latents and compressed by the committed compressor into summaries; the
*long-term store* holds every latent of eight other documents. Queries are noisy cues
(``operators.evaluate.make_cues``, noise 0.5-1.5 x the latent's rms) of a latent from the
session, from the long-term documents, or from a document in neither (one third each). Each
query is served by both stores and scored against the latent it was a cue of: episodic, the
cosine of the decoder's reconstruction over the window; long-term, the cosine of the nearest
entry. The label is 1 when the episodic read serves better by more than ``GAIN``.

**Features at read time**, before the episodic read: the log of the query's norm, statistics
of the cosines of the projected query to the session's summary centroids (one mean slot per
summary, cached with the window), and the cosines of its two nearest long-term entries from
the probe; see :func:`features`. **Model**: a two-layer MLP (8 -> 16 -> 1, sigmoid) trained
with binary cross-entropy in torch; weights ship as ``route_policy.npz`` and inference is
numpy. The threshold is the highest at which, on the training scenarios, routed reads serve
within ``TOLERANCE`` of reading both stores every time. Training is
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


def features(queries: np.ndarray, projected: np.ndarray, centroids: np.ndarray,
             longterm_sims: np.ndarray) -> np.ndarray:
    """[n, 8] features of queries [n, d] (``projected`` [n, rank] by :func:`project`): the log
    of the query's norm; statistics of its projected cosines to the session's summary centroids
    [m, rank] (:func:`centroids_of`; max, mean, mean of the top 4, spread,
    max - mean); and the cosines of its two nearest long-term entries, ``longterm_sims``
    [n, 2] (the probe: a long-term search, a fraction of the episodic read's cost).
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
    """The probability that the episodic read serves a query better than the long-term probe;
    the read runs it at or above ``threshold``."""

    def __init__(self, params: dict[str, np.ndarray], threshold: float, info: dict | None = None):
        self.params = {k: np.asarray(v, np.float32) for k, v in params.items()}
        self.threshold = float(threshold)
        self.info = info or {}

    @classmethod
    def load(cls, path: str | Path | None = None) -> "RoutePolicy":
        path = Path(path) if path else WEIGHTS
        try:
            with np.load(path) as z:
                return cls({k: z[k] for k in ("w1", "b1", "w2", "b2", "mu", "sigma")}, float(z["threshold"]),
                           json.loads(str(z["info"])))
        except (OSError, KeyError) as e:
            raise ConfigError(f"cannot load routing-policy weights {path}: {e}; retrain with "
                              "python -m memstream.read.train_routing") from None

    def save(self, path: str | Path) -> None:
        np.savez(path, threshold=np.float32(self.threshold), info=json.dumps(self.info), **self.params)

    def scores(self, x: np.ndarray) -> np.ndarray:
        """The probability [n] that the episodic read serves better, from features [n, 8]."""
        p = self.params
        h = np.maximum(((x - p["mu"]) / p["sigma"]) @ p["w1"] + p["b1"], 0.0)
        logit = (h @ p["w2"] + p["b2"]).reshape(-1)
        return 1.0 / (1.0 + np.exp(-np.clip(logit, -60.0, 60.0)))

    def episodic_probability(self, query, centroids: np.ndarray, model, longterm_sims) -> float:
        """Of one query [d] in a session whose summary centroids are [m, rank], whose two nearest
        long-term entries have cosines ``longterm_sims`` (NaN where there is none)."""
        query = np.asarray(query, np.float32).reshape(1, -1)
        x = features(query, project(model, query), centroids, np.asarray(longterm_sims, np.float32).reshape(1, 2))
        return float(self.scores(x)[0])
