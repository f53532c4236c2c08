"""The compression operator: every window of 4,096 latents becomes 256 summary tokens.

Encoder: k-means over each window, so the summary adapts to the window. Latents are projected
into a learned ``rank``-dim space (initialized as the top principal directions of training
latents: the variance that the other directions hold is mostly what the cue noise is made of).
``n_summary * slots_per_token`` slots start as evenly spaced latents of the window, then
``hard_iters`` times every latent goes to its nearest slot and every slot becomes the mean of
its latents (Lloyd's k-means; the first ``coarse_iters`` of these passes look at every other
latent only), then ``iters`` times every latent distributes itself over the slots by a softmax
(soft k-means, as in Slot Attention, Locatello et al. 2020: differentiable, and about twice
the cost of a hard pass, which reads each latent once for the update instead of once per slot).
Slots are packed ``slots_per_token`` to a summary token (2 x 192 = 384), so a summary stores
512 cluster centres of the projected latents in the same 256 x 384 numbers as the baselines'
256 raw vectors.

Other encoders, for training and for the baselines: ``encoder_hidden`` adds a GELU MLP to the
linear projection (its last layer starts at zero, so the model starts as the linear one; trained
end to end with ``--train-encoder``, gradient reaching it through the slot means of the hard
passes); ``encoder="mean_pool"`` makes slot j the mean of the j-th of n_slots equal runs of
latents instead of a k-means centre. ``decoder_hidden`` adds a GELU MLP over (retrieved slot,
cue) to the decoder's reconstruction, also starting at zero.

Why hard passes by default: on held-out windows they reconstruct and recall as well as soft ones
in a fraction of the CPU time (figures: operators/checkpoints/README.md and bench/README.md).

Decoder: a cue attends over the slots (cosine in the projected space, a learned sharp
temperature), and the reconstruction is a learned per-direction combination of the retrieved
slot and the projected cue, plus a learned fraction of the cue's component outside the
projection. ``score`` is how well a window's slots explain a cue (a soft maximum of those
cosines): what the read path and the recall evaluation use to find a cue's window.

Why not fixed queries: a first pass of fixed global queries (the fixed-query cross-attention
of ``memstream.kernels``; measured with 512 training latents as queries, as the version-1 model
started its queries) as the slots' start covers a window worse than its own evenly spaced
latents, and soft iterations do not separate slots that start together (the checkpoint README
has the held-out figures). The kernel stays in
``memstream.kernels``; a slot update is attention with per-window queries and a per-latent key
bias (softmax_n(q_k . z_n - logsumexp_k' q_k' . z_n) z_n), the generalization a fused kernel
for this encoder would take.

The hard passes' assignment (nearest slot by 2 z.c - |c|^2) is ``memstream.kernels.nearest_slot``:
on CUDA (``impl`` "auto" or "triton") a fused Triton kernel that never writes the [B, N, S]
scores, on fp32 projected latents; on the CPU the same baddbmm and argmax as before it (the
CPU output, and so the default checkpoint, is unchanged bit for bit).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from memstream.kernels.nearest_slot import nearest_slot, triton_available

CONFIG_VERSION = 2  # 1: the fixed-query Perceiver compressor (not loadable by this version)
ENCODERS = ("kmeans", "mean_pool")


@dataclass
class CompressorConfig:
    dim: int = 384  # latent width (MiniLM)
    window: int = 4096  # latents per window
    n_summary: int = 256  # summary tokens per window
    rank: int = 192  # width of the projected space the slots live in
    slots_per_token: int = 2  # slots packed into one summary token: rank * slots_per_token == dim
    encoder: str = "kmeans"  # how slots are made from projected latents: "kmeans", or "mean_pool" (runs of latents)
    hard_iters: int = 3  # k-means (Lloyd) iterations: every latent goes to its nearest slot
    coarse_iters: int = 1  # the first hard iterations see every other latent only (half the cost)
    iters: int = 0  # soft k-means iterations after those
    encoder_hidden: int = 0  # width of an MLP added to the linear projection of latents (and cues); 0: linear
    decoder_hidden: int = 0  # width of the decoder's MLP over (retrieved slot, cue); 0: per-direction gates only
    version: int = CONFIG_VERSION

    def __post_init__(self):
        if self.rank * self.slots_per_token != self.dim:
            raise ValueError(f"rank * slots_per_token must equal dim ({self.rank} * {self.slots_per_token} != {self.dim})")
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {', '.join(ENCODERS)}, not {self.encoder!r}")

    @property
    def n_slots(self) -> int:
        return self.n_summary * self.slots_per_token

    @classmethod
    def from_dict(cls, d: dict) -> "CompressorConfig":
        version = d.get("version", 1)
        if version != CONFIG_VERSION:
            raise ValueError(f"compressor config version {version}; this memstream reads version {CONFIG_VERSION} "
                             "(version 1, the fixed-query Perceiver, was replaced: retrain with "
                             "`memstream train-compressor`)")
        known = {f.name for f in fields(cls)}
        d = {"hard_iters": 0, "coarse_iters": 0, **d}  # configs from before hard iterations: soft ones only
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)


def _bias_over_slots(bias: torch.Tensor, per_token: int) -> torch.Tensor:
    """An additive bias over memory tokens, broadcastable to [B, Q, M], repeated for each slot of a token."""
    return bias.repeat_interleave(per_token, dim=-1)


class Compressor(nn.Module):
    def __init__(self, config: CompressorConfig | None = None):
        super().__init__()
        c = self.config = config or CompressorConfig()
        d, r = c.dim, c.rank
        self.register_buffer("shift", torch.zeros(d))  # mean of training latents
        self.proj = nn.Parameter(torch.eye(d)[:r].clone())  # [r, d]: latent -> slot space
        self.log_beta = nn.Parameter(torch.tensor(math.log(10.0)))  # sharpness of the slot assignment
        # Decoder.
        self.unproj = nn.Parameter(torch.eye(d)[:r].T.clone())  # [d, r]: slot space -> latent
        self.log_kappa = nn.Parameter(torch.tensor(math.log(50.0)))  # attention over slots: cos * kappa
        self.gate_slot = nn.Parameter(torch.full((r,), 0.6))  # per direction: weight of the retrieved slot
        self.gate_cue = nn.Parameter(torch.full((r,), 0.4))  # ... and of the projected cue
        self.gate_rest = nn.Parameter(torch.tensor(0.3))  # the cue outside the projection
        self.log_score_kappa = nn.Parameter(torch.tensor(math.log(50.0)))  # ``score``'s soft maximum
        if c.encoder_hidden:  # starts at zero: the projection alone
            self.enc_mlp = nn.Sequential(nn.Linear(d, c.encoder_hidden), nn.GELU(), nn.Linear(c.encoder_hidden, r))
            nn.init.zeros_(self.enc_mlp[2].weight)
            nn.init.zeros_(self.enc_mlp[2].bias)
        if c.decoder_hidden:  # starts at zero: the gates' reconstruction, which the MLP then corrects
            self.mlp = nn.Sequential(nn.Linear(r + d, c.decoder_hidden), nn.GELU(), nn.Linear(c.decoder_hidden, d))
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)

    # -- encoder ---------------------------------------------------------------------------
    def project(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() - self.shift
        z = x @ self.proj.T
        return z + self.enc_mlp(x) if self.config.encoder_hidden else z

    def initial_slots(self, z: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Evenly spaced latents of each window's valid prefix: [B, N, r] -> [B, S, r]."""
        S = self.config.n_slots
        j = torch.arange(S, device=z.device)
        idx = (j[None, :] * lengths[:, None]) // S  # [B, S], < length (0 for an empty window)
        return z.gather(1, idx[..., None].expand(-1, -1, z.shape[-1]))

    @staticmethod
    def closeness(z: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """-squared distance of every latent to every slot, up to a per-latent constant:
        2 z.s - |s|^2, [B, N, S] (one fused matmul-and-add)."""
        return torch.baddbmm((slots * slots).sum(-1)[:, None, :], z, slots.transpose(1, 2), alpha=2, beta=-1)

    def iterate_hard(self, z: torch.Tensor, slots: torch.Tensor, valid: torch.Tensor, impl: str = "torch",
                     lengths: torch.Tensor | None = None) -> torch.Tensor:
        """One k-means (Lloyd) step: every valid latent goes to its nearest slot, and a slot
        becomes the mean of its latents (a slot that gets none keeps its place). The update
        reads each latent once (index_add), not once per slot as the soft step does.

        The assignment is ``memstream.kernels.nearest_slot``: impl "torch" is ``closeness``'s
        baddbmm and an argmax (all latents, padding too), "triton" the fused kernel (no [B, N, S]
        scores; ``lengths`` lets it skip padding, which goes to slot 0). Padding's z is 0, so
        the slot it goes to does not change the update."""
        B, N, r = z.shape
        S = slots.shape[1]
        nearest = nearest_slot(z, slots, lengths if impl == "triton" else None, impl=impl)  # [B, N]
        nearest = (nearest + S * torch.arange(B, device=z.device)[:, None]).flatten()  # into [B * S]
        if impl == "triton":  # CUDA's index_add_ sums with atomics (order varies run to run); a sorted index_put_ does not
            total = z.new_zeros(B * S, r).index_put_((nearest,), z.reshape(B * N, r), accumulate=True)
            mass = z.new_zeros(B * S).index_put_((nearest,), valid.flatten(), accumulate=True)
        else:
            total = z.new_zeros(B * S, r).index_add_(0, nearest, z.reshape(B * N, r))  # padding's z is 0
            mass = z.new_zeros(B * S).index_add_(0, nearest, valid.flatten())
        eps = 1e-3
        return (total.view(B, S, r) + eps * slots) / (mass.view(B, S, 1) + eps)

    def pool_runs(self, z: torch.Tensor, valid: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Mean pooling: slot j is the mean of the j-th of n_slots equal runs of a window's valid
        latents (a slot with no latent, in a window shorter than n_slots, is zero)."""
        B, N, r = z.shape
        S = self.config.n_slots
        run = (torch.arange(N, device=z.device)[None, :] * S) // lengths.clamp_min(1)[:, None]
        run = (run.clamp_max(S - 1) + S * torch.arange(B, device=z.device)[:, None]).flatten()
        total = z.new_zeros(B * S, r).index_add_(0, run, z.reshape(B * N, r))  # padding's z is 0
        mass = z.new_zeros(B * S).index_add_(0, run, valid.flatten())
        return (total / mass.clamp_min(1)[:, None]).view(B, S, r)

    def iterate(self, z: torch.Tensor, slots: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """One soft k-means step: every valid latent spreads over the slots by a softmax of
        -beta * squared distance; a slot becomes the weighted mean of its latents (a slot that
        gets almost no weight keeps its place)."""
        logits = self.closeness(z, slots) * self.log_beta.exp()  # [B, N, S]
        assign = torch.softmax(logits, dim=-1) * valid[..., None]
        mass = assign.sum(1)[..., None]  # [B, S, 1]
        eps = 1e-3
        return (assign.transpose(1, 2) @ z + eps * slots) / (mass + eps)

    def encode(self, x: torch.Tensor, lengths: torch.Tensor | None = None, impl: str = "auto") -> torch.Tensor:
        """Windows of latents [B, N, d] (N <= window; ``lengths`` masks padding) -> summaries [B, 256, d] fp32.
        impl: "torch" batches the windows; "triton" too, with the hard passes' nearest-slot
        assignment in the fused kernel of ``memstream.kernels.nearest_slot`` (on fp32 projected
        latents: see that module); "auto" is "triton" on CUDA when triton is installed, "torch"
        otherwise (so the CPU path is the torch one); "reference" runs the windows one at a time
        through the torch path (same maths)."""
        if x.dim() != 3 or x.shape[-1] != self.config.dim:
            raise ValueError(f"want latents [B, N, {self.config.dim}], got {tuple(x.shape)}")
        if impl == "reference":
            lengths = self._lengths(x, lengths)
            return torch.cat([self.encode(x[b:b + 1, :int(lengths[b])], impl="torch") for b in range(x.shape[0])])
        if impl not in ("auto", "torch", "triton"):
            raise ValueError(f"impl must be auto, torch, triton or reference, not {impl!r}")
        if impl == "auto":
            impl = "triton" if (x.is_cuda and triton_available()) else "torch"
        B, N, _ = x.shape
        lengths = self._lengths(x, lengths)
        valid = (torch.arange(N, device=x.device)[None, :] < lengths[:, None]).float()
        z = self.project(x) * valid[..., None]  # padding reads as zeros (and weighs nothing)
        if self.config.encoder == "mean_pool":
            return self.pool_runs(z, valid, lengths).reshape(B, self.config.n_summary, self.config.dim)
        slots = self.initial_slots(z, lengths)
        for i in range(self.config.hard_iters):
            step = 2 if i < self.config.coarse_iters else 1  # a coarse pass: every other latent
            slots = self.iterate_hard(z[:, ::step], slots, valid[:, ::step], impl, (lengths + step - 1) // step)
        for _ in range(self.config.iters):
            slots = self.iterate(z, slots, valid)
        return slots.reshape(B, self.config.n_summary, self.config.dim)

    @staticmethod
    def _lengths(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        if lengths is None:
            return torch.full((x.shape[0],), x.shape[1], dtype=torch.long, device=x.device)
        return lengths.to(device=x.device, dtype=torch.long).clamp(0, x.shape[1])

    forward = encode

    # -- decoder ---------------------------------------------------------------------------
    def slots_of(self, memory: torch.Tensor) -> torch.Tensor:
        """Summary tokens [.., M, d] -> slots [.., M * slots_per_token, rank]."""
        return memory.float().reshape(*memory.shape[:-2], -1, self.config.rank)

    def _similarity(self, query: torch.Tensor, memory: torch.Tensor):
        """Projected cues [B, Q, r] and cosines [B, Q, S] to the slots of ``memory``."""
        if memory.dim() == 2:
            memory = memory.unsqueeze(0)
        zq = self.project(query)  # once, however many windows it is scored against
        if zq.dim() == 2:
            zq = zq.unsqueeze(0).expand(memory.shape[0], -1, -1)
        slots = self.slots_of(memory)
        cos = F.normalize(zq, dim=-1) @ F.normalize(slots, dim=-1).transpose(-1, -2)
        return zq, slots, cos

    def attend(self, query: torch.Tensor, memory: torch.Tensor, bias: torch.Tensor | None = None,
               slot_norms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder: cues attend over the slots of summary tokens, and each reconstruction
        mixes the retrieved slot with the cue.

        query [.., Q, d]; memory [.., M, d] (summary tokens, possibly of many windows
        concatenated, with the same leading dimensions as ``query`` or none); bias: an additive
        attention bias over the memory tokens, broadcastable to [.., Q, M]; slot_norms: the norm
        of every slot [.., M * slots_per_token], when the caller keeps them (the read path
        caches them with a session's tokens, which saves a pass over the tokens per read).
        Returns (reconstruction [.., Q, d], attention over the slots [.., Q, M * slots_per_token]).
        The cosine is taken by dividing by the slot norms, so the slots are used where they lie
        (no normalized copy of the memory)."""
        zq = self.project(query)  # [.., Q, r]
        slots = self.slots_of(memory)  # [.., S, r], a view
        logits = self.attention_logits(zq, slots, slot_norms)
        if bias is not None:
            logits = logits + _bias_over_slots(bias.to(logits.dtype), self.config.slots_per_token)
        p = torch.softmax(logits, dim=-1)
        return self.combine(query, zq, p @ slots), p

    def attention_logits(self, zq: torch.Tensor, slots: torch.Tensor, slot_norms: torch.Tensor | None = None):
        """kappa * cos(projected cue, slot): [.., Q, r] x [.., S, r] -> [.., Q, S]."""
        norms = slots.norm(dim=-1).clamp_min(1e-12) if slot_norms is None else slot_norms
        return (F.normalize(zq, dim=-1) @ slots.transpose(-1, -2)) / norms.unsqueeze(-2) * self.log_kappa.exp()

    def combine(self, query: torch.Tensor, zq: torch.Tensor, retrieved: torch.Tensor) -> torch.Tensor:
        """The reconstruction from the cue [.., Q, d], its projection and the retrieved slot [.., Q, r]."""
        centred = query.float() - self.shift
        rest = centred - zq @ self.unproj.T  # what of the cue the projection leaves out
        z = self.gate_slot * retrieved + self.gate_cue * zq
        out = z @ self.unproj.T + self.gate_rest * rest + self.shift
        if self.config.decoder_hidden:
            out = out + self.mlp(torch.cat([retrieved, centred.expand(*retrieved.shape[:-1], -1)], -1))
        return out

    def decode(self, query: torch.Tensor, memory: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruct latents from summary tokens, conditioned on query latents (see
        :meth:`attend`): query [Q, d] or [B, Q, d], memory [M, d] or [B, M, d]; a query of one
        set against a batch of memories is broadcast. Returns [.., Q, d] in latent space."""
        if query.dim() == 2 and memory.dim() == 3:
            query = query.unsqueeze(0).expand(memory.shape[0], -1, -1)
        elif query.dim() == 3 and memory.dim() == 2:
            memory = memory.unsqueeze(0).expand(query.shape[0], -1, -1)
        return self.attend(query, memory, bias)[0]

    def score(self, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """How well a window's summary explains each cue: a soft maximum over its slots of the
        cosine in the projected space. query [Q, d] or [B, Q, d], memory [M, d] or [B, M, d] -> [.., Q]."""
        unbatched = query.dim() == 2 and memory.dim() == 2
        _, _, cos = self._similarity(query, memory)
        k = self.log_score_kappa.exp()
        s = (torch.logsumexp(k * cos, dim=-1) - math.log(cos.shape[-1])) / k
        return s[0] if unbatched else s

    @torch.no_grad()
    def fit_to_data(self, latents: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Shift and projection from training latents [n, d]: their mean and top principal
        directions (``generator`` is unused; kept so every initializer takes one)."""
        x = latents.float()
        self.shift.copy_(x.mean(0))
        xc = x - self.shift
        cov = xc.T @ xc / len(xc)
        _, vecs = torch.linalg.eigh(cov.double())  # ascending eigenvalues
        top = vecs.flip(1)[:, : self.config.rank].float()  # [d, r]
        top = top * torch.where(top.sum(0) < 0, -1.0, 1.0)  # a fixed sign per direction
        self.proj.copy_(top.T)
        self.unproj.copy_(top)
