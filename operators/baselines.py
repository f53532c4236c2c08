"""Baselines that store what the learned compressor stores: 256 vectors per window of 4,096.

They keep raw latents (or averages of them), so a cue reads them directly: its reconstruction
is the stored vector nearest to it by cosine, and a window's match score is that cosine.
"""

from __future__ import annotations

import torch


def mean_pool(windows: torch.Tensor, n: int = 256) -> torch.Tensor:
    """[W, N, d] -> [W, n, d]: the mean of each run of N/n consecutive latents."""
    W, N, d = windows.shape
    return windows.view(W, n, N // n, d).mean(2)


def stride_sample(windows: torch.Tensor, n: int = 256) -> torch.Tensor:
    """Every (N/n)-th latent."""
    return windows[:, :: windows.shape[1] // n][:, :n]


def kmeans(windows: torch.Tensor, n: int = 256, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """n centroids per window: Lloyd's algorithm from n distinct latents chosen by a seeded
    generator; a cluster that empties keeps its previous centroid."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for x in windows.float():
        c = x[torch.randperm(x.shape[0], generator=g)[:n]].clone()
        for _ in range(iters):
            assign = torch.cdist(x, c).argmin(1)
            sums = torch.zeros_like(c).index_add_(0, assign, x)
            counts = torch.bincount(assign, minlength=n).to(x.dtype)
            c = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], c)
        out.append(c)
    return torch.stack(out)


BASELINES = {"mean_pool": mean_pool, "stride_sample": stride_sample, "kmeans": kmeans}
