"""Recall fidelity of a compressor against baselines that store as much (256 vectors a window).

Every latent x of a window gets a noisy cue c = x + noise * |x| / sqrt(d) * eps (eps standard
normal; noise 1 gives cos(c, x) about 0.7). Then, per method:

* reconstruction_cosine: the mean over all latents of cos(x, r), r reconstructed from the
  window's own summary given c. Learned: the decoder's output. Baselines: the stored vector
  nearest to c by cosine.
* cue_recall_at_1: for ``cues_per_window`` seeded positions per window, every window scores the
  cue, and a hit is when the best-scoring window is the cue's own. Learned: the score is
  ``model.score(c, summary_w)``, a function the model computes from the cue and that window's
  summary alone (the default compressor: a soft maximum over the window's slots of the cosine
  between the projected cue and the slot, see ``operators/model.py``). Baselines: the highest
  cosine between c and the window's stored vectors.

Only whole windows count: the latents after the last whole window are dropped (reported).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from memstream.operators.baselines import BASELINES
from memstream.operators.model import Compressor


def make_cues(x: torch.Tensor, noise: float | torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Noisy cues of latents x [..., d]: isotropic noise of ``noise`` times the latent's rms."""
    eps = torch.randn(x.shape, generator=generator, device=generator.device).to(x.device)
    noise = torch.as_tensor(noise, dtype=x.dtype, device=x.device)
    return x + noise * x.norm(dim=-1, keepdim=True) / math.sqrt(x.shape[-1]) * eps


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a, b, dim=-1)


def _nearest(cues: torch.Tensor, stored: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per cue [Q, d]: the stored vector [K, d] nearest by cosine, and that cosine."""
    sims = F.normalize(cues, dim=-1) @ F.normalize(stored, dim=-1).T
    best, idx = sims.max(1)
    return stored[idx], best


@torch.no_grad()
def evaluate(model: Compressor, windows: torch.Tensor, cues_per_window: int = 256, noise: float = 1.0,
             seed: int = 0, batch: int = 4) -> dict:
    """Metrics of ``model`` and the baselines on windows [W, N, d] of latents (fp32, CPU)."""
    model.eval()
    W, N, d = windows.shape
    g = torch.Generator().manual_seed(seed)
    cues = make_cues(windows, noise, g)
    P = min(cues_per_window, N)
    pos = torch.stack([torch.randperm(N, generator=g)[:P].sort().values for _ in range(W)])  # [W, P]
    owner = torch.arange(W).repeat_interleave(P)
    probe = cues.gather(1, pos[..., None].expand(-1, -1, d)).reshape(W * P, d)

    summaries = torch.cat([model.encode(windows[i:i + batch]) for i in range(0, W, batch)])
    recon = torch.cat([_cos(model.decode(cues[w], summaries[w]), windows[w]) for w in range(W)])
    scores = torch.stack([model.score(probe, summaries[w]) for w in range(W)], 1)
    result = {"learned": (recon.mean().item(), (scores.argmax(1) == owner).float().mean().item())}

    for name, fn in BASELINES.items():
        stored = fn(windows, model.config.n_summary)
        rec, sc = [], []
        for w in range(W):
            nearest, _ = _nearest(cues[w], stored[w])
            rec.append(_cos(nearest, windows[w]))
            sc.append(_nearest(probe, stored[w])[1])
        hits = (torch.stack(sc, 1).argmax(1) == owner).float().mean().item()
        result[name] = (torch.cat(rec).mean().item(), hits)

    return {
        "windows": W,
        "dim": d,
        "window": N,
        "summary_tokens": model.config.n_summary,
        "noise": noise,
        "cue_cosine": _cos(cues, windows).mean().item(),  # what returning the cue itself would score
        "cues_per_window": P,
        "seed": seed,
        "reconstruction_cosine": {k: round(v[0], 5) for k, v in result.items()},
        "cue_recall_at_1": {k: round(v[1], 5) for k, v in result.items()},
    }


def learned_beats_baselines(metrics: dict) -> bool:
    return all(metrics[m]["learned"] > v for m in ("reconstruction_cosine", "cue_recall_at_1")
               for k, v in metrics[m].items() if k != "learned")
