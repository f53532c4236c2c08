"""Training of the read routing policy (:mod:`memstream.read.routing`) on generated scenarios.

A *session* is four documents of the local corpus, cut into windows of 4,096 latents and
compressed by the committed compressor into summaries; the *long-term store* holds every
latent of eight other documents. Queries are noisy cues (``operators.evaluate.make_cues``, noise
0.5-1.5 x the latent's rms) of a latent from the session, from the long-term documents, or from
a document in neither (one third each). Each query is served by both stores and scored against
the latent it was a cue of: episodic, the cosine of the decoder's reconstruction over the
session's summaries to the target; long-term, the cosine of the nearest entry. The label is
the store whose score is higher by more than ``MARGIN``, and *both* when neither is.

Retrain with ``python -m memstream.read.train_routing``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from memstream.operators.checkpoint import load_default
from memstream.operators.data import split_latents
from memstream.operators.evaluate import make_cues
from memstream.read.routing import ROUTES, WEIGHTS, RoutePolicy, _unit, centroids_of, features, project

MARGIN = 0.05
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
    labels = np.where(ep > lt + MARGIN, 0, np.where(lt > ep + MARGIN, 1, 2))
    probe = np.take_along_axis(sims, order, axis=1)
    return features(cues, project(model, cues), centroids, probe), labels, ep, lt


def build(model, docs: list[np.ndarray], scenarios: int, seed: int):
    rng = np.random.default_rng(seed)
    parts = [scenario(model, docs, rng) for _ in range(scenarios)]
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(4))


def served(choice: np.ndarray, ep: np.ndarray, lt: np.ndarray) -> np.ndarray:
    """The score a routing choice obtains: the consulted store's, the better one for both."""
    return np.where(choice == 0, ep, np.where(choice == 1, lt, np.maximum(ep, lt)))


def train(x: np.ndarray, y: np.ndarray, seed: int = 0, epochs: int = 20, hidden: int = 16) -> RoutePolicy:
    import torch

    torch.set_num_threads(1)  # tiny model: threads only fight over the shared cores
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    mu, sigma = x.mean(0), x.std(0) + 1e-6
    xt, yt = torch.from_numpy((x - mu) / sigma), torch.from_numpy(y.astype(np.int64))
    model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 3))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    losses = []
    for _ in range(epochs):
        perm = torch.from_numpy(rng.permutation(len(x)))
        total = 0.0
        for b in range(0, len(perm), 256):
            i = perm[b:b + 256]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xt[i]), yt[i])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(i)
        losses.append(total / len(x))
    lin1, lin2 = model[0], model[2]
    params = {"w1": lin1.weight.detach().numpy().T, "b1": lin1.bias.detach().numpy(),
              "w2": lin2.weight.detach().numpy().T, "b2": lin2.bias.detach().numpy(), "mu": mu, "sigma": sigma}
    return RoutePolicy(params, {"train_rows": int(len(x)), "first_loss": losses[0], "last_loss": losses[-1],
                                "epochs": epochs, "hidden": hidden})


def evaluate(policy: RoutePolicy, x: np.ndarray, y: np.ndarray, ep: np.ndarray, lt: np.ndarray) -> dict:
    choice = policy.scores(x).argmax(1)
    oracle = np.maximum(ep, lt).mean()
    out = {"rows": int(len(y)), "accuracy": float((choice == y).mean()),
           "label_share": {r: float((y == i).mean()) for i, r in enumerate(ROUTES)},
           "route_share": {r: float((choice == i).mean()) for i, r in enumerate(ROUTES)},
           "served_score": float(served(choice, ep, lt).mean()), "oracle_score": float(oracle)}
    for i, r in enumerate(ROUTES):
        out[f"always_{r}_score"] = float(served(np.full_like(y, i), ep, lt).mean())
    out["majority_accuracy"] = float(max(out["label_share"].values()))
    return out


def corpus_docs(split: str) -> list[np.ndarray]:
    return [d for d in split_latents(split).values() if len(d) >= 64]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="train the read routing policy on generated scenarios")
    ap.add_argument("--out", type=Path, default=WEIGHTS)
    ap.add_argument("--scenarios", type=int, default=24)
    ap.add_argument("--eval-scenarios", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    t0 = time.monotonic()
    model = load_default()
    train_docs, eval_docs = corpus_docs("train"), corpus_docs("heldout") + corpus_docs("validation")
    if len(eval_docs) < SESSION_DOCS + LONGTERM_DOCS + 1:  # too few held-out texts: borrow untrained ones
        need = SESSION_DOCS + LONGTERM_DOCS + 1 - len(eval_docs)
        eval_docs, train_docs = eval_docs + train_docs[-need:], train_docs[:-need]
    x, y, ep, lt = build(model, train_docs, args.scenarios, args.seed)
    ex, ey, eep, elt = build(model, eval_docs, args.eval_scenarios, args.seed + 1)
    t1 = time.monotonic()
    policy = train(x, y, args.seed)
    policy.info.update({"margin": MARGIN, "scenarios": args.scenarios, "eval_scenarios": args.eval_scenarios,
                        "train_docs": len(train_docs), "eval_docs": len(eval_docs), "data_s": t1 - t0,
                        "train_s": time.monotonic() - t1, "train": evaluate(policy, x, y, ep, lt),
                        "heldout": evaluate(policy, ex, ey, eep, elt)})
    policy.save(args.out)
    print(json.dumps(policy.info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
