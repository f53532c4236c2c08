"""Training of the long-term write policy (:mod:`memstream.longterm.policy`) on replayed use.

**Replay.** A replay is a run of sessions over real text: each session is a chunk of
``SESSION_TOKENS`` MiniLM latents of one document (a different document per session),
compressed by the committed compressor into one summary, which is the session's episodic
memory. Each session makes ``READS`` reads. A read's query is a noisy cue
(``operators.evaluate.make_cues``, noise ``NOISE`` x the latent's rms) of a target latent: from
the current session's text, or, with probability ``REVISIT``, from an earlier session's (later
sessions come back to what earlier ones read, recent ones most). Each read is served by the episodic read (the
decoder over the session's summary; its score is the cosine of the reconstruction to the
target) and by the long-term search (top ``READ_K`` entries by cosine to the query; score: the
best entry's cosine to the target).

**Candidates and labels.** As in :mod:`memstream.longterm.retention`, every read offers its
query latent. A candidate's label is whether, had it been retained, it *was later retrieved
and helped*: some later read has it among its ``READ_K`` nearest earlier candidates, and its
cosine to that read's target beats the read's episodic score by ``MARGIN``, i.e. the long-term
entry served that read better than the episodic memory alone. The label is known only after
the replay; the policy predicts it at write time from :func:`memstream.longterm.policy.features`
(the store at time t is every earlier candidate, as the label assumes).

**Evaluation** (:func:`evaluate`) replays held-out documents with a store of at most ``budget``
entries, the same for every policy: the learned policy, retain-all-until-full, retain-random
and novelty-only. The selective ones keep the same share of candidates while the store has
room (``KEEP_RATES``; each threshold set on unlabelled replays of the domain by
:func:`calibrate`). It reports the recall of later queries (the share of the reads that an
unbounded retain-all store helps which the budgeted store helps too) and the served cosine.

Retrain with ``python -m memstream.longterm.train_policy``; the weights go to
``memstream/longterm/write_policy.npz``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from memstream.longterm.policy import K, SCALARS, WEIGHTS, WritePolicy, _unit, features

SESSION_TOKENS = 1024  # latents of one session's text (one summary)
READS = 48  # reads per session
SESSIONS = 8  # sessions per replay
REVISIT = 0.5  # chance that a read's target is in an earlier session's text
NOISE = (0.3, 1.0)  # cue noise, times the latent's rms
READ_K = 8  # long-term entries a read retrieves
MARGIN = 0.02  # how much better than the episodic read an entry must serve to count as help
CALIBRATION = 12  # unlabelled replays that set a threshold for a keep rate
KEEP_RATES = (0.5, 0.25)  # shares of candidates kept while the store has room (retain-all-until-full: 1)


@dataclass
class Replay:
    queries: np.ndarray  # [n, d] query latents in read order: the retention candidates
    targets: np.ndarray  # [n, d] what each query is a cue of
    session: np.ndarray  # [n] session index of each read
    episodic: np.ndarray  # [n] cosine of the episodic read's reconstruction to the target


def chunks_of(docs: Sequence[np.ndarray], tokens: int = SESSION_TOKENS) -> list[list[np.ndarray]]:
    """Per document, its whole chunks of ``tokens`` latents (a document shorter than that is one chunk)."""
    return [[d[i:i + tokens] for i in range(0, max(len(d) - tokens, 0) + 1, tokens)] for d in docs if len(d) >= 64]


def summarise(model, chunks: list[list[np.ndarray]]) -> list[list]:
    """The compressor's summary of each chunk, as stored (fp16), torch [256, d]."""
    import torch

    out = []
    with torch.no_grad():
        for doc in chunks:
            out.append([model.encode(torch.from_numpy(c[None].astype(np.float32))).half().float()[0] for c in doc])
    return out


def replay(model, chunks: list[list[np.ndarray]], summaries: list[list], rng: np.random.Generator,
           sessions: int = SESSIONS, reads: int = READS, revisit: float = REVISIT) -> Replay:
    """One replay: ``sessions`` chunks of distinct documents, ``reads`` reads each."""
    import torch

    from memstream.operators.evaluate import make_cues

    docs = rng.choice(len(chunks), size=min(sessions, len(chunks)), replace=False)
    picked = [(d, int(rng.integers(len(chunks[d])))) for d in docs]
    qs, ts, ss, eps = [], [], [], []
    for s, (d, c) in enumerate(picked):
        # A revisit goes back 1, 2, 3, ... sessions with chance 1/2, 1/4, 1/8, ...: recent sessions
        # come back most (the oldest one takes what is left).
        back = np.minimum(rng.geometric(0.5, reads), s)
        src = np.where(rng.random(reads) < revisit, s - back, s) if s else np.zeros(reads, int)
        targets = np.stack([chunks[picked[j][0]][picked[j][1]][rng.integers(len(chunks[picked[j][0]][picked[j][1]]))]
                            for j in src]).astype(np.float32)
        noise = torch.from_numpy(rng.uniform(*NOISE, (reads, 1)).astype(np.float32))
        g = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
        cues = make_cues(torch.from_numpy(targets), noise, g)
        with torch.no_grad():
            rec, _ = model.attend(cues, summaries[d][c])
        eps.append((_unit(rec.numpy()) * _unit(targets)).sum(1))
        qs.append(cues.numpy())
        ts.append(targets)
        ss.append(np.full(reads, s))
    return Replay(np.concatenate(qs), np.concatenate(ts), np.concatenate(ss), np.concatenate(eps))


def help_matrix(rep: Replay, k: int = READ_K, margin: float = MARGIN) -> np.ndarray:
    """[n, n] bool: candidate i, retained with every earlier one, is among read j's ``k``
    retrieved entries (j > i) and serves j's target better than j's episodic read by ``margin``."""
    uq, ut = _unit(rep.queries), _unit(rep.targets)
    n = len(uq)
    sims = uq @ uq.T
    sims[np.tril_indices(n)] = -np.inf  # row i, column j: only reads after the candidate
    sims = sims.T  # [j, i]: read j over earlier candidates i
    rank = np.argsort(-sims, axis=1)[:, :k]
    retrieved = np.zeros((n, n), bool)
    np.put_along_axis(retrieved, rank, True, axis=1)
    retrieved &= np.isfinite(sims)
    better = (ut @ uq.T) >= rep.episodic[:, None] + margin  # [j, i]: entry i serves read j
    return (retrieved & better).T


def dataset(rep: Replay) -> tuple[np.ndarray, np.ndarray]:
    """(features [n, F], labels [n]) of one replay's candidates."""
    return features(rep.queries, prior_neighbor_sims(rep.queries)), help_matrix(rep).any(1).astype(np.float32)


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


# ------------------------------------------------------------------------------ evaluation

# A keep rule sees what retention sees when a candidate arrives: its latent and the cosines of
# its nearest stored entries (as many as the store holds, up to K).
KeepRule = Callable[[np.ndarray, np.ndarray], bool]


def run_store(rep: Replay, keep: KeepRule, budget: int, k: int = READ_K, margin: float = MARGIN) -> dict:
    """Replay ``rep`` with a long-term store of at most ``budget`` entries filled by ``keep``:
    per read, whether the store helped it (an entry among the ``k`` retrieved serves the target
    better than the episodic read by ``margin``) and the cosine served (the better of both)."""
    uq, ut = _unit(rep.queries), _unit(rep.targets)
    stored: list[int] = []
    helped = np.zeros(len(uq), bool)
    served = rep.episodic.copy()
    offered = 0  # candidates offered while the store had room
    for j in range(len(uq)):
        sims = uq[stored] @ uq[j] if stored else np.zeros(0, np.float32)
        if stored:
            top = np.asarray(stored)[np.argsort(-sims)[:k]]
            best = float((ut[j] @ uq[top].T).max())
            helped[j] = best >= rep.episodic[j] + margin
            served[j] = max(served[j], best)
        if len(stored) < budget:
            offered += 1
            if keep(rep.queries[j], np.sort(sims)[::-1][:K]):
                stored.append(j)
    return {"helped": helped, "served": served, "kept": len(stored), "offered": offered}


def rules(policy: WritePolicy, keep_rate: float, novelty_threshold: float, rng: np.random.Generator
          ) -> dict[str, KeepRule]:
    return {"learned": lambda v, s: policy.decide(v, s).keep,
            "novelty-only": lambda v, s: (1.0 - (s.max() if s.size else -1.0)) >= novelty_threshold,
            "random": lambda v, s: rng.random() < keep_rate,
            "all-until-full": lambda v, s: True}


def calibrate(policy: WritePolicy, reps: Sequence[Replay], keep_rate: float, budget_share: float
              ) -> tuple[float, float]:
    """Thresholds of the learned policy and of novelty-only at which each keeps ``keep_rate`` of
    the candidates offered while its store of ``budget_share`` of the reads has room (bisection;
    no labels, so a deployment can do the same on its own stream)."""
    def rate(rule) -> float:
        runs = [run_store(r, rule, max(1, int(round(budget_share * len(r.queries))))) for r in reps]
        return sum(r["kept"] for r in runs) / max(sum(r["offered"] for r in runs), 1)

    def bisect(make, lo, hi, increasing: bool) -> float:
        for _ in range(14):
            mid = (lo + hi) / 2
            r = rate(make(mid))
            if (r > keep_rate) == increasing:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    saved = policy.threshold
    try:
        def learned(t):
            policy.threshold = t
            return lambda v, s: policy.decide(v, s).keep
        t_learned = bisect(learned, 0.0, 1.0, True)
    finally:
        policy.threshold = saved
    t_novel = bisect(lambda t: (lambda v, s: (1.0 - (s.max() if s.size else -1.0)) >= t), 0.0, 2.0, True)
    return t_learned, t_novel


def evaluate(policy: WritePolicy, reps: Sequence[Replay], budget_share: float, novelty_threshold: float,
             keep_rate: float, seed: int = 0) -> dict:
    """Per rule: recall of later queries, served cosine and entries kept, over ``reps`` with a
    store of ``budget_share`` of each replay's reads (random keeps ``keep_rate`` of candidates)."""
    rng = np.random.default_rng(seed)
    totals: dict[str, dict] = {}
    for rep in reps:
        budget = max(1, int(round(budget_share * len(rep.queries))))
        reference = run_store(rep, lambda v, s: True, len(rep.queries))["helped"]  # unbounded retain-all
        later = rep.session > 0
        for name, rule in rules(policy, keep_rate, novelty_threshold, rng).items():
            r = run_store(rep, rule, budget)
            t = totals.setdefault(name, {"answerable": 0, "helped": 0, "served": [], "kept": 0, "budget": 0})
            t["answerable"] += int(reference.sum())
            t["helped"] += int((r["helped"] & reference).sum())
            t["served"].append(r["served"][later])
            t["kept"] += r["kept"]
            t["budget"] += budget
    return {name: {"recall": t["helped"] / max(t["answerable"], 1), "served_cosine": float(np.concatenate(
        t["served"]).mean()), "kept": t["kept"], "budget": t["budget"]} for name, t in totals.items()}


# ------------------------------------------------------------------------------ training

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
    lin1, lin2 = model[0], model[2]
    params = {"w1": lin1.weight.detach().numpy().T, "b1": lin1.bias.detach().numpy(),
              "w2": lin2.weight.detach().numpy().T, "b2": lin2.bias.detach().numpy(), "mu": mu, "sigma": sigma}
    info = {"train_rows": int(len(tr)), "val_rows": int(len(val)), "positive_rate": float(y.mean()),
            "val_auc": auc(val_scores, y[val]), "val_auc_novelty_only": auc(-x[val, -3], y[val]),
            "first_loss": losses[0], "last_loss": losses[-1]}
    return WritePolicy(params, 0.5, info)


def corpus_docs(split: str) -> list[np.ndarray]:
    from memstream.operators.data import split_latents

    return list(split_latents(split).values())


def replays(model, docs: list[np.ndarray], count: int, seed: int) -> list[Replay]:
    chunks = chunks_of(docs)
    summaries = summarise(model, chunks)
    rng = np.random.default_rng(seed)
    return [replay(model, chunks, summaries, rng) for _ in range(count)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="train the long-term write policy on replayed sessions of real text")
    ap.add_argument("--out", type=str, default=str(WEIGHTS))
    ap.add_argument("--replays", type=int, default=160)
    ap.add_argument("--eval-replays", type=int, default=40)
    ap.add_argument("--budget", type=float, default=0.1, help="store size, as a share of a replay's reads")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    import torch

    from memstream.operators.checkpoint import load_default

    torch.set_num_threads(1)
    t0 = time.monotonic()
    model = load_default()
    # The compressor's own splits: training text is pydoc; held out, the held-out pydoc pages and
    # every licence (a domain neither the compressor nor this policy trains on).
    train_reps = replays(model, corpus_docs("train"), args.replays, args.seed)
    licenses = [d for n, d in _named("untrained") + _named("heldout") if n.startswith("license:")]
    pydoc = [d for n, d in _named("heldout") + _named("validation") if n.startswith("pydoc:")]
    heldout = {name: (replays(model, docs, CALIBRATION, args.seed + 10 + i),
                      replays(model, docs, args.eval_replays, args.seed + 20 + i))
               for i, (name, docs) in enumerate((("licenses", licenses), ("pydoc", pydoc)))}
    parts = [dataset(r) for r in train_reps]
    x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    t1 = time.monotonic()
    policy = train(x[:, -SCALARS:], y, args.seed, epochs=args.epochs)
    # The keep rate while the store has room: 1 is retain-all-until-full; lower rates choose more
    # and fill later. The shipped threshold is the rate that served the training replays best.
    calib = train_reps[:CALIBRATION]
    rates = {}
    for rate in KEEP_RATES:
        policy.threshold, t_novel = calibrate(policy, calib, rate, args.budget)
        rates[rate] = (policy.threshold, t_novel, evaluate(policy, calib, args.budget, t_novel, rate)["learned"])
    best = max(rates, key=lambda r: rates[r][2]["recall"])
    policy.threshold = rates[best][0]
    policy.info.update({"label": "later retrieved (top-%d) and served better than the episodic read by %.2f" % (
        READ_K, MARGIN), "inputs": "novelty features (best and mean neighbour cosine, log norm)",
        "replays": args.replays, "sessions": SESSIONS, "reads": READS, "revisit": REVISIT,
        "session_tokens": SESSION_TOKENS, "budget_share": args.budget, "keep_rate": best,
        "train_recall_by_keep_rate": {str(r): v[2]["recall"] for r, v in rates.items()},
        "threshold": policy.threshold, "data_s": t1 - t0, "train_s": time.monotonic() - t1, "heldout": {}})
    shipped = policy.threshold
    for name, (calib, reps) in heldout.items():
        # Thresholds for each keep rate, set on other (unlabelled) replays of the domain: what a
        # deployment can do from its own stream, without knowing what will be read later.
        policy.info["heldout"][name] = {}
        for rate in KEEP_RATES:
            policy.threshold, t_domain = calibrate(policy, calib, rate, args.budget)
            policy.info["heldout"][name][str(rate)] = {"thresholds": [policy.threshold, t_domain], **evaluate(
                policy, reps, args.budget, t_domain, rate, args.seed)}
    policy.threshold = shipped
    policy.save(args.out)
    print(json.dumps(policy.info, indent=2))
    return 0


def _named(split: str) -> list[tuple[str, np.ndarray]]:
    from memstream.operators.data import split_latents

    return list(split_latents(split).items())


if __name__ == "__main__":
    raise SystemExit(main())
