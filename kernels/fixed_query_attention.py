"""Cross-attention of a fixed set of queries over a batch of windows of raw latents.

    out[b] = softmax_n(queries @ x[b].T) @ x[b]        x [B, N, d], queries [M, d] -> [B, M, d]

The queries already hold the key projection and the softmax scale (q' = W_k^T q / sqrt(d_k)),
so the keys are the raw latents and the value projection is applied after the readout by the
caller: per window the work is one pass over the N latents, which is what bounds its speed.

Two implementations with one contract (fp32 output, optional per-window valid lengths):
``attention_torch`` (the reference, and the CPU path) and ``attention_triton`` (a fused
flash-attention-style kernel: online softmax over key blocks, fp32 accumulation, fp16/bf16
inputs, one program per (window, block of queries), no atomics, so it is deterministic).
"""

from __future__ import annotations

import math

import torch

try:  # triton is optional: the CPU path and every import work without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None


def attention_torch(x: torch.Tensor, queries: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: scores in fp32, masked softmax over the keys, readout of the raw latents."""
    xf = x.float()
    scores = torch.matmul(queries.float(), xf.transpose(1, 2))  # [B, M, N]: softmax over the last, contiguous axis
    if lengths is not None:
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < lengths.to(x.device)[:, None]
        scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        probs = torch.where(valid.any(1)[:, None, None], probs, 0.0)  # a window of length 0 reads as zeros
    else:
        probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, xf)  # [B, M, d]


if triton is not None:

    @triton.jit
    def _fixed_query_attention_kernel(
        X, Q, Lengths, Out,
        N, M, D,
        stride_xb, stride_xn, stride_qm, stride_ob, stride_om,
        HAS_LENGTHS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # Query blocks of one window are adjacent program ids, so they run together and
        # re-read that window's latents from L2 rather than from HBM.
        m_blocks = tl.cdiv(M, BLOCK_M)
        pid = tl.program_id(0)
        b = pid // m_blocks
        offs_m = (pid % m_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        n_valid = N
        if HAS_LENGTHS:
            n_valid = tl.minimum(tl.load(Lengths + b), N)

        q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :], mask=(offs_m < M)[:, None] & d_ok[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        x_base = X + b.to(tl.int64) * stride_xb
        for start in range(0, N, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_ok = offs_n < n_valid
            x = tl.load(x_base + offs_n[:, None] * stride_xn + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            s = tl.dot(q, tl.trans(x))  # [BLOCK_M, BLOCK_N], log2 domain (the wrapper folded in log2 e)
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A fully masked block keeps m at -inf; subtracting 0 there avoids inf - inf.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(x.dtype), x)
            m_i = m_new
        acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # a window of length 0 reads as zeros
        out_ptr = Out + b.to(tl.int64) * stride_ob + offs_m[:, None] * stride_om + offs_d[None, :]
        tl.store(out_ptr, acc, mask=(offs_m < M)[:, None] & d_ok[None, :])


def triton_available() -> bool:
    return triton is not None


# Block shapes tried in order; the first that fits the device's shared memory and registers is
# kept for the (dtype, d) pair, so a process always runs one configuration (deterministic).
CONFIGS = ((64, 64, 8, 2), (64, 32, 8, 2), (32, 32, 4, 2))  # block_m, block_n, num_warps, num_stages
_chosen: dict = {}


def attention_triton(x: torch.Tensor, queries: torch.Tensor, lengths: torch.Tensor | None = None,
                     config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """The fused kernel. x [B, N, d] fp16/bf16 (fp32 accepted for testing), queries [M, d]."""
    if triton is None:
        raise RuntimeError("triton is not installed: use attention_torch")
    if x.dim() != 3 or queries.dim() != 2 or queries.shape[1] != x.shape[2]:
        raise ValueError(f"want x [B, N, d] and queries [M, d], got {tuple(x.shape)} and {tuple(queries.shape)}")
    B, N, D = x.shape
    M = queries.shape[0]
    x = x.contiguous()
    # log2(e) folded into the queries in fp32 so the kernel can use exp2; then cast to x's type
    # because tl.dot wants both operands of one type.
    q = (queries.float() * math.log2(math.e)).to(x.dtype).contiguous()
    out = torch.empty((B, M, D), device=x.device, dtype=torch.float32)
    if lengths is not None:
        lengths = lengths.to(device=x.device, dtype=torch.int32).contiguous()

    def launch(block_m, block_n, num_warps, num_stages):
        _fixed_query_attention_kernel[(B * triton.cdiv(M, block_m),)](
            x, q, lengths if lengths is not None else x, out,
            N, M, D,
            x.stride(0), x.stride(1), q.stride(0), out.stride(0), out.stride(1),
            HAS_LENGTHS=lengths is not None, BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_D=max(16, triton.next_power_of_2(D)), num_warps=num_warps, num_stages=num_stages,
        )

    launch_fitting(launch, config, CONFIGS, _chosen, (x.dtype, D, x.device.type), f"d={D}")
    return out


def launch_fitting(launch, config, configs, chosen: dict, key, what: str) -> None:
    """Run ``launch(*config)``; without a config, the configuration kept for ``key`` in ``chosen``,
    else the first of ``configs`` that fits the device (then kept: one per process, deterministic)."""
    if config is not None:
        launch(*config)
        return
    if key in chosen:
        launch(*chosen[key])
        return
    from triton.runtime.errors import OutOfResources

    for candidate in configs:
        try:
            launch(*candidate)
        except OutOfResources:
            continue
        chosen[key] = candidate
        return
    raise RuntimeError(f"no kernel configuration fits this device for {what}")


def fixed_query_attention(x: torch.Tensor, queries: torch.Tensor, lengths: torch.Tensor | None = None,
                          impl: str = "auto") -> torch.Tensor:
    """Dispatch: the Triton kernel for fp16/bf16 CUDA tensors when triton is present, else torch."""
    if impl == "auto":
        impl = "triton" if (triton is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)) else "torch"
    if impl == "triton":
        return attention_triton(x, queries, lengths)
    if impl == "torch":
        return attention_torch(x, queries, lengths)
    raise ValueError(f"impl must be auto, torch or triton, not {impl!r}")
