"""The compression operator: every window of 4,096 latents becomes 256 summary tokens.

Encoder (Perceiver-style): 256 learned queries cross-attend over the raw latents of a window,
then a few self-attention/MLP blocks mix the 256 tokens. Decoder: query latents cross-attend
over summary tokens (one window's, or many windows' concatenated, with an optional additive
bias per memory token) and return a reconstructed latent. The decoder trains the encoder
(recall fidelity) and is what the read path calls.

The cross-attention has fixed queries, so the key projection folds into them once
(q' = W_k^T q / sqrt(d_k)) and the value projection moves after the readout
(softmax(X q') X W_v^T = softmax(X q') (X W_v^T)): a window costs one pass over its raw
latents (``memstream.kernels``). ``cross_attention_reference`` is the textbook path with key
and value projections of all 4,096 latents; the two agree to rounding.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from memstream.kernels import fixed_query_attention


@dataclass
class CompressorConfig:
    dim: int = 384  # latent width (MiniLM)
    window: int = 4096  # latents per window
    n_summary: int = 256  # summary tokens per window
    cross_heads: int = 1  # every head is one more pass of scores over the window: 1 keeps it cheap
    n_layers: int = 1  # self-attention/MLP blocks over the summary tokens
    n_heads: int = 6  # heads of those blocks and of the decoder
    mlp_ratio: int = 2
    decoder_layers: int = 1

    @classmethod
    def from_dict(cls, d: dict) -> "CompressorConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)


class MLP(nn.Module):
    def __init__(self, dim: int, ratio: int):
        super().__init__()
        self.fc = nn.Linear(dim, ratio * dim)
        self.proj = nn.Linear(ratio * dim, dim)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


def _head_bias(bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bias broadcastable to [..., Q, M] gets a head axis, so it broadcasts to [B, H, Q, M]."""
    bias = bias.to(dtype)
    if bias.dim() == 1:
        return bias.view(1, -1)  # [M]: one bias per memory token for every query
    return bias.unsqueeze(-3) if bias.dim() >= 3 else bias


class Attention(nn.Module):
    """Multi-head attention; keys and values from ``memory`` (self-attention when None)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, memory=None, bias=None):
        B, T, D = x.shape
        mem = x if memory is None else memory
        S, H = mem.shape[1], self.heads
        q = self.q(x).view(B, T, H, D // H).transpose(1, 2)
        k, v = self.kv(mem).view(B, S, 2, H, D // H).permute(2, 0, 3, 1, 4)
        mask = None if bias is None else _head_bias(bias, q.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    """Pre-LN block: (cross-)attention then MLP, each residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio)

    def forward(self, x, memory=None, bias=None):
        x = x + self.attn(self.ln1(x), memory, bias)
        return x + self.mlp(self.ln2(x))


class Compressor(nn.Module):
    def __init__(self, config: CompressorConfig | None = None):
        super().__init__()
        c = self.config = config or CompressorConfig()
        d, H = c.dim, c.cross_heads
        # Per-dimension standardization of latents, fitted to the training data. It is free in
        # the fast path: the shift adds a constant to every score of a query (softmax ignores
        # it) and comes out of the readout exactly, because attention weights sum to one.
        self.register_buffer("shift", torch.zeros(d))
        self.register_buffer("scale", torch.ones(d))
        self.queries = nn.Parameter(torch.randn(c.n_summary, d))
        self.ln_q = nn.LayerNorm(d)
        self.wq = nn.Linear(d, H * d)
        self.wk = nn.Linear(d, H * d, bias=False)  # a key bias shifts every score of a query alike
        self.wv = nn.Linear(d, H * d)
        self.wo = nn.Linear(H * d, d)
        self.cross_ln = nn.LayerNorm(d)
        self.cross_mlp = MLP(d, c.mlp_ratio)
        self.blocks = nn.ModuleList(Block(d, c.n_heads, c.mlp_ratio) for _ in range(c.n_layers))
        self.ln_summary = nn.LayerNorm(d)
        # Decoder.
        self.dec_in = nn.Linear(d, d)
        self.dec_blocks = nn.ModuleList(Block(d, c.n_heads, c.mlp_ratio) for _ in range(c.decoder_layers))
        self.dec_ln = nn.LayerNorm(d)
        self.dec_out = nn.Linear(d, d)
        self._init_for_recall()

    @torch.no_grad()
    def _init_for_recall(self) -> None:
        # Identity projections make the cross-attention a soft nearest-neighbour readout from
        # the first step (scores are cosines of standardized latents times about sqrt(d)), and
        # likewise the decoder's attention: a cue attends to the summary tokens that resemble it.
        # A zero output layer makes the decoder start from its cue (see ``decode``). All of this
        # shortens CPU training a lot; none of it limits what the layers can learn.
        H, d = self.config.cross_heads, self.config.dim
        eye = torch.eye(d)
        self.dec_in.weight.copy_(eye)
        self.dec_in.bias.zero_()
        for block in self.dec_blocks:
            block.attn.q.weight.copy_(eye)
            block.attn.kv.weight.copy_(torch.cat([eye, eye]))
            block.attn.proj.weight.copy_(eye)
            for lin in (block.attn.q, block.attn.kv, block.attn.proj):
                lin.bias.zero_()
        self.wq.weight.copy_(eye.repeat(H, 1))
        self.wk.weight.copy_(eye.repeat(H, 1))
        self.wv.weight.copy_(eye.repeat(H, 1))
        self.wo.weight.copy_(eye.repeat(1, H) / H)
        for lin in (self.wq, self.wv, self.wo):
            lin.bias.zero_()
        self.dec_out.weight.zero_()
        self.dec_out.bias.zero_()

    # -- encoder ---------------------------------------------------------------------------
    def effective_queries(self) -> torch.Tensor:
        """[H * M, d]: queries already multiplied by the key projection, the softmax scale and
        the input standardization, to be dotted with raw latents."""
        c, d = self.config, self.config.dim
        q = self.wq(self.ln_q(self.queries)).view(c.n_summary, c.cross_heads, d)
        wk = self.wk.weight.view(c.cross_heads, d, d)  # [H, d_k, d_in]
        qe = torch.einsum("mhk,hki->hmi", q, wk) / math.sqrt(d)
        return (qe / self.scale).reshape(c.cross_heads * c.n_summary, d)

    def _values(self, readout: torch.Tensor) -> torch.Tensor:
        """Readouts of standardized latents [B, H, M, d] -> cross-attention output [B, M, d]."""
        c, d = self.config, self.config.dim
        wv = self.wv.weight.view(c.cross_heads, d, d)
        v = torch.einsum("bhmi,hki->bmhk", readout, wv) + self.wv.bias.view(c.cross_heads, d)
        return self.wo(v.reshape(v.shape[0], c.n_summary, c.cross_heads * d))

    def read(self, x: torch.Tensor, lengths: torch.Tensor | None = None, impl: str = "auto") -> torch.Tensor:
        """The one pass over raw latents x [B, N, d]: attention readouts [B, H*M, d] fp32."""
        return fixed_query_attention(x, self.effective_queries(), lengths, impl=impl)

    def cross_attention(self, x: torch.Tensor, lengths: torch.Tensor | None = None, impl: str = "auto") -> torch.Tensor:
        """The fast path: [B, N, d] -> [B, M, d] fp32."""
        return self.values_of_readout(self.read(x, lengths, impl))

    def values_of_readout(self, raw: torch.Tensor) -> torch.Tensor:
        c = self.config
        readout = (raw - self.shift) / self.scale
        return self._values(readout.view(raw.shape[0], c.cross_heads, c.n_summary, c.dim))

    def cross_attention_reference(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """The plain path: key and value projections of every latent, then attention."""
        c, d = self.config, self.config.dim
        B, N, _ = x.shape
        xs = (x.float() - self.shift) / self.scale
        q = self.wq(self.ln_q(self.queries)).view(c.n_summary, c.cross_heads, d).transpose(0, 1)
        k = self.wk(xs).view(B, N, c.cross_heads, d).transpose(1, 2)
        v = self.wv(xs).view(B, N, c.cross_heads, d).transpose(1, 2)
        mask = None
        if lengths is not None:
            mask = torch.arange(N, device=x.device)[None, :] < lengths.to(x.device)[:, None]
            mask = mask[:, None, None, :]
        y = F.scaled_dot_product_attention(q.expand(B, -1, -1, -1), k, v, attn_mask=mask)  # [B, H, M, d]
        return self.wo(y.transpose(1, 2).reshape(B, c.n_summary, c.cross_heads * d))

    def encode(self, x: torch.Tensor, lengths: torch.Tensor | None = None, impl: str = "auto") -> torch.Tensor:
        """Windows of latents [B, N, d] (N <= window; ``lengths`` masks padding) -> summaries [B, 256, d].
        impl: "auto"/"torch"/"triton" pick the fast path's kernel, "reference" the plain path."""
        if x.dim() != 3 or x.shape[-1] != self.config.dim:
            raise ValueError(f"want latents [B, N, {self.config.dim}], got {tuple(x.shape)}")
        if impl == "reference":
            return self.summarize(self.cross_attention_reference(x, lengths))
        return self.summarize(self.cross_attention(x, lengths, impl))

    def summarize(self, t: torch.Tensor) -> torch.Tensor:
        """Cross-attention outputs [B, M, d] -> summary tokens: the layers over the 256 tokens."""
        t = self.queries + t
        t = t + self.cross_mlp(self.cross_ln(t))
        for block in self.blocks:
            t = block(t)
        return self.ln_summary(t)

    forward = encode

    # -- decoder ---------------------------------------------------------------------------
    def decode(self, query: torch.Tensor, memory: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruct latents from summary tokens, conditioned on query latents.

        query [Q, d] or [B, Q, d]; memory [M, d] or [B, M, d] (summary tokens, possibly of many
        windows concatenated); bias: additive attention bias over the memory tokens,
        broadcastable to [B, Q, M] (e.g. [M], [Q, M] or [B, 1, M]). Returns [.., Q, d] in
        latent space."""
        unbatched = query.dim() == 2 and memory.dim() == 2
        if memory.dim() == 2:
            memory = memory.unsqueeze(0)
        if query.dim() == 2:
            query = query.unsqueeze(0).expand(memory.shape[0], -1, -1)
        q = (query.float() - self.shift) / self.scale
        h = self.dec_in(q)
        for block in self.dec_blocks:
            h = block(h, memory, bias)
        # Residual from the query: the decoder learns what the summary adds to (or corrects
        # in) the cue. The eval reports the cue's own cosine, so this gain stays visible.
        out = (q + self.dec_out(self.dec_ln(h))) * self.scale + self.shift
        return out[0] if unbatched else out

    @torch.no_grad()
    def fit_to_data(self, latents: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Standardization from training latents [n, d]; queries start as standardized
        latents drawn from them, so each starts out attending to one region of latent space."""
        x = latents.float()
        self.shift.copy_(x.mean(0))
        self.scale.copy_(x.std(0).clamp_min(0.05))  # a near-constant dimension stays finite
        pick = torch.randperm(len(x), generator=generator)[: self.config.n_summary]
        self.queries.copy_((x[pick] - self.shift) / self.scale)
