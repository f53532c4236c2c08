"""Baselines that store what the learned compressor stores (256 x 384 numbers per window of
4,096 latents) and use the cue as it does.

Each baseline is a :class:`Compressor` with another encoder and the learned model's decoder
family (``decoder_hidden`` included), its decoder fitted on the training windows by the learned
model's own training options with the encoder frozen (``operators/train.py``), so a baseline
blends the cue into its reconstruction exactly as the learned model may:

* mean_pool: 256 means of 16 consecutive latents.
* mean_pool_trained: the same pooling after a learned linear map, trained end to end with the
  decoder (trained mean pooling, a strong baseline of context-compression studies).
* kmeans: 256 centroids in the full 384 dims (Lloyd passes from evenly spaced latents).
* pca_kmeans: 512 centroids in the top 192 principal directions of the training latents (the same
  storage; the encoder of the previous default).
* untrained_encoder: the learned model's own configuration with its encoder left at the
  data-fitted start (only when that differs from pca_kmeans): what the training of the
  encoder adds.

Reference, not a baseline (the read path cannot attend over its codes): product quantization of
every latent, 48 sub-vectors of 8 bits, 48 bytes a latent, exactly 256 x 384 fp16 per window
(:class:`ProductQuantizer`).

Fitted baselines are cached under ``$MEMSTREAM_CACHE/baselines`` by a hash of their configuration,
training options and training data.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, replace

import torch
import torch.nn.functional as F

from memstream.operators.model import Compressor, CompressorConfig

log = logging.getLogger(__name__)


def specs(learned: CompressorConfig, train_cfg) -> dict:
    """name -> (CompressorConfig, TrainConfig) of every baseline, given the learned model's."""
    d = learned.dim
    common = {"dim": d, "window": learned.window, "n_summary": learned.n_summary,
              "decoder_hidden": learned.decoder_hidden}
    frozen = replace(train_cfg, train_encoder=False)
    full = {**common, "rank": d, "slots_per_token": 1}
    pooled = CompressorConfig(**full, encoder="mean_pool")
    out = {
        "mean_pool": (pooled, frozen),
        "mean_pool_trained": (pooled, replace(train_cfg, train_encoder=True)),
        "kmeans": (CompressorConfig(**full, hard_iters=5, coarse_iters=1, iters=0), frozen),
        "pca_kmeans": (CompressorConfig(**common, rank=d // 2, slots_per_token=2, hard_iters=3, coarse_iters=1,
                                        iters=0), frozen),
    }
    # (an encoder MLP starts at zero: frozen there, the learned configuration is pca_kmeans)
    if replace(learned, decoder_hidden=0, encoder_hidden=0) != replace(out["pca_kmeans"][0], decoder_hidden=0):
        out["untrained_encoder"] = (learned, frozen)
    return out


def fingerprint(windows) -> str:
    """A short hash of training data (every 97th latent of the stream, and the shapes)."""
    stream, train, val = windows
    h = hashlib.sha256(str((tuple(stream.shape), tuple(train.shape), tuple(val.shape))).encode())
    h.update(stream[::97].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def fitted(name: str, model_cfg: CompressorConfig, train_cfg, windows, cache=None) -> Compressor:
    """Baseline ``name`` fitted on ``windows`` (the training-windows triple), from the cache when there."""
    from memstream import settings
    from memstream.operators.checkpoint import load_compressor, save_compressor
    from memstream.operators.train import fit

    key = hashlib.sha256(json.dumps([name, model_cfg.to_dict(), asdict(train_cfg), fingerprint(windows)],
                                    sort_keys=True).encode()).hexdigest()[:24]
    path = (cache or settings.cache_dir() / "baselines") / f"{name}-{key}.safetensors"
    if path.exists():
        return load_compressor(path)
    log.info("fitting baseline %s (seed %d)", name, train_cfg.seed)
    model, info = fit(model_cfg, train_cfg, windows)
    save_compressor(model, path, extra={"baseline": name, "train": asdict(train_cfg), "fit": info})
    return load_compressor(path)


class ProductQuantizer:
    """Every latent as ``m`` codes of 8 bits: the centred latent cut into m sub-vectors, each
    replaced by the nearest of 256 centroids (k-means on training latents). ``encode`` returns the
    decoded latents, so it fits the evaluation's interface; ``decode`` is the stored latent
    nearest to the cue by cosine, blended with the cue by a least-squares fit on training windows;
    ``score`` the highest cosine between the cue and a stored latent."""

    def __init__(self, m: int = 48, bits: int = 8):
        self.m, self.k = m, 1 << bits
        self.shift = self.codebooks = None
        self.blend = (1.0, 0.0)

    def eval(self):
        return self

    def fit(self, stream: torch.Tensor, train_windows: torch.Tensor, seed: int = 0, sample: int = 32768,
            iters: int = 15) -> "ProductQuantizer":
        g = torch.Generator().manual_seed(seed)
        x = stream[torch.randperm(len(stream), generator=g)[:sample]].float()
        self.shift = x.mean(0)
        sub = (x - self.shift).view(len(x), self.m, -1).transpose(0, 1)  # [m, n, d/m]
        c = sub[:, torch.randperm(len(x), generator=g)[:self.k]].clone()  # [m, k, d/m]
        for _ in range(iters):
            a = torch.cdist(sub, c).argmin(-1)  # [m, n]
            total = torch.zeros_like(c).scatter_add_(1, a[..., None].expand_as(sub), sub)
            mass = torch.zeros(c.shape[:2]).scatter_add_(1, a, torch.ones_like(a, dtype=torch.float))
            c = torch.where(mass[..., None] > 0, total / mass.clamp_min(1)[..., None], c)
        self.codebooks = c
        # The blend r = a * nearest + b * cue, least squares over latents of a few training windows.
        from memstream.operators.evaluate import make_cues

        w = train_windows[torch.randperm(len(train_windows), generator=g)[:4]].float()
        cues = make_cues(w, 0.5 + torch.rand((*w.shape[:2], 1), generator=g), g)
        near = torch.cat([self._nearest(cues[i], self.encode(w[i:i + 1])[0])[0] for i in range(len(w))])
        A = torch.stack([near.flatten(), cues.flatten()], 1).double()
        sol = torch.linalg.lstsq(A, w.flatten().double()[:, None]).solution[:, 0]
        self.blend = (float(sol[0]), float(sol[1]))
        return self

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Latents [n, d] -> codes [n, m] uint8 (the stored form: m bytes a latent)."""
        sub = (x.float() - self.shift).view(len(x), self.m, -1).transpose(0, 1)  # [m, n, d/m]
        c = self.codebooks
        # nearest centroid by 2 x.c - |c|^2 (one batched matmul; cdist is several times slower here)
        return torch.baddbmm((c * c).sum(-1)[:, None, :], sub, c.transpose(1, 2), alpha=2, beta=-1).argmax(-1).T.to(
            torch.uint8)

    def decoded(self, codes: torch.Tensor) -> torch.Tensor:
        parts = self.codebooks[torch.arange(self.m)[None, :], codes.long()]  # [n, m, d/m]
        return parts.reshape(len(codes), -1) + self.shift

    def encode(self, windows: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.decoded(self.codes(w)) for w in windows])

    @staticmethod
    def _nearest(cues: torch.Tensor, stored: torch.Tensor):
        sims = F.normalize(cues, dim=-1) @ F.normalize(stored, dim=-1).T
        best, idx = sims.max(-1)
        return stored[idx], best

    def decode(self, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        a, b = self.blend
        return a * self._nearest(query, memory)[0] + b * query

    def score(self, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """query [Q, d], memory [N, d] or [B, N, d] -> [Q] or [B, Q]."""
        sims = F.normalize(query, dim=-1) @ F.normalize(memory, dim=-1).transpose(-1, -2)
        return sims.max(-1).values
