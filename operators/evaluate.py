"""Recall fidelity of a compressor, judged against baselines given the same help.

Every latent x of a window gets a noisy cue c = x + noise * |x| / sqrt(d) * eps (eps standard
normal; noise 1 gives cos(c, x) about 0.7).

Every method is a :class:`~memstream.operators.model.Compressor`: an encoder that turns a window
into 256 x 384 numbers, and one decoder family (attention over the summary's slots, per-direction
gates that mix the retrieved slot with the cue, and the decoder's MLP when the learned one has
one) whose weights are fitted on the training windows by the learned model's own training
options (``operators/train.py``). So every method uses the cue the same way; only the summaries
differ. The baselines are in ``operators/baselines.py``. The reference line, product
quantization of every latent at the same storage, is not a summary the read path can attend
over; it shows how much of each latent's identity the storage can hold.

Per method, with summaries rounded to fp16 as the pipeline stores them:

* reconstruction_cosine: the mean over all latents of cos(x, decode(c, the window's summary)).
* recall_at_1.text: for ``cues_per_window`` seeded positions per window, the share of cues whose
  best-scoring window (``model.score``: a soft maximum over the window's slots of the cosine
  to the cue) is their own, among all windows of the text.
* recall_at_1.episodic: the same among an episodic window of ``horizon`` summaries (the read
  path's setting: a session's horizon, 1,220 by default): the text's windows and windows of
  other texts (``data.episodic_pool``), ``episodic_cues`` cues per window of the text.
* episodic_reconstruction_cosine: cos(x, the decoder's read of c over that whole episodic
  window), as ``Memory.read`` reconstructs (one softmax over every summary's slots; for the
  reference, the nearest stored latent of them all).

Each figure is given per seed (the seed draws the cues and fits the baselines) and as mean,
standard deviation, min and max over the seeds. Only whole windows count. Several texts are
evaluated in one pass (:func:`evaluate_texts`): the pool's windows are summarized once for all.
"""

from __future__ import annotations

import hashlib
import math
import statistics

import torch
import torch.nn.functional as F

from memstream.operators.model import Compressor


def make_cues(x: torch.Tensor, noise: float | torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Noisy cues of latents x [..., d]: isotropic noise of ``noise`` times the latent's rms."""
    eps = torch.randn(x.shape, generator=generator, device=generator.device).to(x.device)
    noise = torch.as_tensor(noise, dtype=x.dtype, device=x.device)
    return x + noise * x.norm(dim=-1, keepdim=True) / math.sqrt(x.shape[-1]) * eps


def as_stored(summaries: torch.Tensor) -> torch.Tensor:
    return summaries.half().float()  # the pipeline stores summary tokens as fp16


def summarize(model, windows: torch.Tensor, batch: int = 8) -> torch.Tensor:
    return torch.cat([as_stored(model.encode(windows[i:i + batch].float())) for i in range(0, len(windows), batch)])


def encoder_key(model) -> str:
    """What a model's summaries depend on, hashed: methods of several seeds that share an encoder
    (a frozen baseline's) summarize each window once."""
    h = hashlib.sha256(type(model).__name__.encode())
    if isinstance(model, Compressor):
        c = model.config
        h.update(str((c.dim, c.n_summary, c.rank, c.slots_per_token, c.encoder, c.hard_iters, c.coarse_iters,
                      c.iters)).encode())
        for t in (model.shift, model.proj, model.log_beta):
            h.update(t.detach().cpu().float().numpy().tobytes())
    else:
        h.update(str(id(model)).encode())
    return h.hexdigest()


def _probe(windows: torch.Tensor, cues: torch.Tensor, per_window: int, g: torch.Generator):
    """Cues [W, P, d] at P seeded positions of every window, and their latents."""
    W, N, d = windows.shape
    P = min(per_window, N)
    pos = torch.stack([torch.randperm(N, generator=g)[:P].sort().values for _ in range(W)])  # [W, P]
    at = pos[..., None].expand(-1, -1, d)
    return cues.gather(1, at), windows.gather(1, at), P


class _Reader:
    """The cues' read over a memory too large to hold at once (the episodic window), fed window
    by window: the decoder's softmax attention kept as a running maximum, normalizer and
    weighted sum of slots (the same result as one softmax over all slots); for the reference,
    the stored latent nearest by cosine. ``add`` also returns every cue's score against each
    window it is fed (``model.score``, from the same cosines: one pass over the memory)."""

    def __init__(self, model, cues: torch.Tensor):
        self.model, self.cues = model, cues
        self.learned = isinstance(model, Compressor)
        if self.learned:
            self.zq = model.project(cues)
            self.m = torch.full((len(cues),), -math.inf)
            self.l = torch.zeros(len(cues))
            self.acc = torch.zeros_like(self.zq)
        else:
            self.best = torch.full((len(cues),), -math.inf)
            self.vec = torch.zeros_like(cues)

    def add(self, summaries: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        """Feed summaries [w, M, d]; returns the scores [Q, w]."""
        scores = []
        for i in range(0, len(summaries), chunk):
            part = summaries[i:i + chunk]
            if self.learned:
                model = self.model
                slots = model.slots_of(part).reshape(-1, model.config.rank)
                cos = F.normalize(self.zq, dim=-1) @ F.normalize(slots, dim=-1).T  # [Q, w * S]
                k = model.log_score_kappa.exp()
                per_window = cos.view(len(cos), len(part), -1)
                scores.append((torch.logsumexp(k * per_window, -1) - math.log(per_window.shape[-1])) / k)
                logits = cos * model.log_kappa.exp()  # = model.attention_logits
                m = torch.maximum(self.m, logits.max(1).values)
                scale, e = torch.exp(self.m - m), torch.exp(logits - m[:, None])
                self.l = self.l * scale + e.sum(1)
                self.acc = self.acc * scale[:, None] + e @ slots
                self.m = m
            else:
                stored = part.reshape(-1, part.shape[-1])
                cos = F.normalize(self.cues, dim=-1) @ F.normalize(stored, dim=-1).T
                scores.append(cos.view(len(cos), len(part), -1).max(-1).values)  # = model.score
                best, idx = cos.max(1)
                better = best > self.best
                self.best = torch.where(better, best, self.best)
                self.vec = torch.where(better[:, None], stored[idx], self.vec)
        return torch.cat(scores, 1)

    def result(self) -> torch.Tensor:
        if self.learned:
            return self.model.combine(self.cues, self.zq, self.acc / self.l[:, None])
        a, b = self.model.blend
        return a * self.vec + b * self.cues


def _scores(model, probe: torch.Tensor, summaries: torch.Tensor, windows: int = 8, cues: int = 2048) -> torch.Tensor:
    """Scores [Q, W] of cues [Q, d] against every window's summary [W, M, d], in blocks."""
    return torch.cat([torch.cat([model.score(probe[q:q + cues], summaries[i:i + windows]).T
                                 for i in range(0, len(summaries), windows)], 1)
                      for q in range(0, len(probe), cues)])


@torch.no_grad()
def evaluate(methods: dict, windows: torch.Tensor, pool=None, cues_per_window: int = 256, episodic_cues: int = 32,
             noise: float = 1.0, horizon: int | None = None, skip_episodic=()) -> dict:
    """Figures of every method on windows [W, N, d] of one text (see :func:`evaluate_texts`)."""
    return evaluate_texts(methods, {"text": windows}, pool, cues_per_window, episodic_cues, noise, horizon,
                          skip_episodic)["text"]


@torch.no_grad()
def evaluate_texts(methods: dict, texts: dict, pool=None, cues_per_window: int = 256, episodic_cues: int = 32,
                   noise: float = 1.0, horizon: int | None = None, skip_episodic=()) -> dict:
    """Figures of every method on each text, {name: windows [W, N, d]}: {name: figures}.

    ``methods``: {seed: {name: model}} (the seed draws the cues; a method may differ by seed,
    e.g. a baseline fitted with it), or {name: model} for seed 0 alone. ``pool``: None (no
    episodic setting), or a function returning an iterator over (name, windows [w, N, d]) of
    other texts, read once (so it can stream them from disk) and shared by the texts: a text
    of W windows reads the first ``horizon`` - W of them (all of them when ``horizon`` is None).
    Methods named in ``skip_episodic`` are left out of the episodic setting (the reference's
    codes take about half a second a window to make on two CPU cores). Returns per text, metric
    and method the mean, std, min, max and per-seed values."""
    if not all(isinstance(k, int) for k in methods):
        methods = {0: methods}
    runs, own, readers, need = {}, {}, {}, {}
    cache: dict = {}  # (text, encoder key) -> summaries of the text's windows
    for text, windows in texts.items():
        windows = windows.float()
        W, N, d = windows.shape
        need[text] = math.inf if horizon is None else horizon - W
        for seed, ms in methods.items():
            g = torch.Generator().manual_seed(seed)
            cues = make_cues(windows, noise, g)
            probe, target, P = _probe(windows, cues, cues_per_window, g)
            owner = torch.arange(W).repeat_interleave(P)
            E = min(episodic_cues, P)
            episodic_probe, episodic_target = probe[:, :E].reshape(W * E, d), target[:, :E].reshape(W * E, d)
            probe = probe.reshape(W * P, d)
            run = runs[text, seed] = {"reconstruction_cosine": {}, "recall_at_1": {"text": {}},
                                      "cue_cosine": F.cosine_similarity(cues, windows, dim=-1).mean().item(),
                                      "shape": (W, N, d), "P": P, "E": E, "target": episodic_target}
            for name, model in ms.items():
                model.eval()
                key = text, encoder_key(model)
                summaries = cache[key] if key in cache else cache.setdefault(key, summarize(model, windows))
                recon = torch.cat([F.cosine_similarity(model.decode(cues[w], summaries[w]), windows[w], dim=-1)
                                   for w in range(W)])
                run["reconstruction_cosine"][name] = recon.mean().item()
                hits = _scores(model, probe, summaries).argmax(1) == owner
                run["recall_at_1"]["text"][name] = hits.float().mean().item()
                if pool is not None and name not in skip_episodic:
                    readers[text, seed, name] = reader = _Reader(model, episodic_probe)
                    own[text, seed, name] = reader.add(summaries)  # [W*E, W]
    cache.clear()
    pool_windows, offset_windows = 0, 0
    if pool is not None:
        best_other = {k: torch.full((len(v),), -math.inf) for k, v in own.items()}
        for name, part in pool():
            if pool_windows >= max(need.values()):
                break
            for i in range(0, len(part), 32):
                chunk, sums = part[i:i + 32].float(), {}
                for text in texts:
                    take = int(min(len(chunk), need[text] - pool_windows - i))  # this text's horizon
                    if take <= 0:
                        continue
                    for seed, ms in methods.items():
                        for method, model in ms.items():
                            if method in skip_episodic:
                                continue
                            key = encoder_key(model)
                            s = sums[key] if key in sums else sums.setdefault(key, summarize(model, chunk))
                            k = text, seed, method
                            best_other[k] = torch.maximum(best_other[k], readers[k].add(s[:take]).max(1).values)
            used = len(part) if horizon is None else min(len(part), max(need.values()) - pool_windows)
            pool_windows += used
            offset_windows += used if "@" in name else 0
        for (text, seed, method), scores in own.items():
            run, W = runs[text, seed], runs[text, seed]["shape"][0]
            owner = torch.arange(W).repeat_interleave(run["E"])
            hit = (scores.argmax(1) == owner) & (scores.gather(1, owner[:, None])[:, 0] > best_other[text, seed, method])
            run["recall_at_1"].setdefault("episodic", {})[method] = hit.float().mean().item()
            recon = F.cosine_similarity(readers[text, seed, method].result(), run["target"], dim=-1)
            run.setdefault("episodic_reconstruction_cosine", {})[method] = recon.mean().item()
    out = {}
    for text in texts:
        rs = [runs[text, seed] for seed in methods]
        (W, N, d), names = rs[0]["shape"], list(rs[0]["reconstruction_cosine"])
        col = lambda f, ns=names: {n: spread([f(r, n) for r in rs]) for n in ns}  # noqa: E731
        result = {
            "windows": W, "dim": d, "window": N, "noise": noise, "seeds": list(methods),
            "cue_cosine": round(statistics.fmean(r["cue_cosine"] for r in rs), 5),  # what the cue alone scores
            "cues_per_window": rs[0]["P"], "methods": names,
            "reconstruction_cosine": col(lambda r, n: r["reconstruction_cosine"][n]),
            "recall_at_1": {"text": col(lambda r, n: r["recall_at_1"]["text"][n])},
        }
        if pool is not None:
            used, distinct = int(min(need[text], pool_windows)), pool_windows - offset_windows
            ep = [n for n in names if n not in skip_episodic]
            result["recall_at_1"]["episodic"] = col(lambda r, n: r["recall_at_1"]["episodic"][n], ep)
            result["episodic_reconstruction_cosine"] = col(lambda r, n: r["episodic_reconstruction_cosine"][n], ep)
            result["episodic"] = {"summaries": W + used, "cues_per_window": rs[0]["E"],
                                  "offset_windows": max(0, used - distinct)}
        out[text] = result
    return out


def spread(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 5), "std": round(statistics.pstdev(values), 5),
            "min": round(min(values), 5), "max": round(max(values), 5), "per_seed": [round(v, 5) for v in values]}


def margins(metrics: dict, method: str = "learned", baselines=None) -> dict:
    """Per metric, ``method``'s mean minus the best baseline's mean (and that baseline)."""
    out = {}
    cols = {"reconstruction_cosine": metrics["reconstruction_cosine"],
            **{f"recall_at_1.{s}": v for s, v in metrics["recall_at_1"].items()}}
    for key, col in cols.items():
        others = {n: v["mean"] for n, v in col.items() if n != method and (baselines is None or n in baselines)}
        best = max(others, key=others.get)
        out[key] = {"margin": round(col[method]["mean"] - others[best], 5), "best_baseline": best}
    return out


def beats(metrics: dict, margin: float = 0.0, method: str = "learned", baselines=None) -> bool:
    """Whether ``method`` beats every baseline by more than ``margin`` on every metric."""
    return all(m["margin"] > margin for m in margins(metrics, method, baselines).values())
