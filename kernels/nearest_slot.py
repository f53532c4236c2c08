"""Nearest-slot assignment of the k-means encoder's hard pass (operators/model.py).

    nearest[b, n] = argmax_s (2 z[b, n] . c[b, s] - |c[b, s]|^2)      z [B, N, r], slots c [B, S, r] -> [B, N] int64

(the slot at the least squared distance; ties go to the lowest index, as ``torch.argmax``).

Two implementations with one contract: ``nearest_slot_torch`` (the reference, and the CPU path:
exactly what the encoder computed before this module, a ``baddbmm`` of the [B, N, S] scores and
an argmax) and ``nearest_slot_triton`` (a fused kernel: one program per (window, block of
latents) loops over blocks of slots, scores each block with ``tl.dot`` in fp32 accumulation and
keeps a running max and argmax, so the [B, N, S] score matrix is never written; fp16/bf16/fp32
inputs, non-contiguous latents along N (the coarse pass's every other latent) read in place; no
atomics and one block configuration per process, so the output is the same bits run to run).

``lengths`` (optional, [B]): latents at n >= lengths[b] are padding; both implementations give
them slot 0 (the kernel skips their blocks). Without it every latent is scored, padding included.

The encoder (operators/model.py, impl "triton") calls the kernel on fp32 projected latents and
slots, multiplied in full fp32 (not tf32): on unstructured latents (the default checkpoint,
4 windows of N(0, 0.25) latents, simulated on the CPU by rounding z and slots before fp32
scores) bf16 rounding moved 0.13-0.25% of a hard pass's assignments and the summaries to a
least token cosine of 0.76 after three passes (fp16: 0-0.06%, 0.80), while fp32 scores summed
in another order (fp64) moved none (least cosine 0.9999997). fp16/bf16 inputs are for callers
whose latents are already of that type.
"""

from __future__ import annotations

import os

import torch

from memstream.kernels.fixed_query_attention import launch_fitting

try:  # triton is optional: the CPU path and every import work without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None


def triton_available() -> bool:
    return triton is not None


def _check(z: torch.Tensor, slots: torch.Tensor) -> None:
    if z.dim() != 3 or slots.dim() != 3 or z.shape[0] != slots.shape[0] or z.shape[2] != slots.shape[2]:
        raise ValueError(f"want z [B, N, r] and slots [B, S, r], got {tuple(z.shape)} and {tuple(slots.shape)}")


def nearest_slot_torch(z: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: the [B, N, S] scores 2 z.c - |c|^2 as one ``baddbmm`` (fp32 for half inputs), argmax over S."""
    _check(z, slots)
    if z.dtype in (torch.float16, torch.bfloat16):
        z, slots = z.float(), slots.float()
    scores = torch.baddbmm((slots * slots).sum(-1)[:, None, :], z, slots.transpose(1, 2), alpha=2, beta=-1)
    nearest = scores.argmax(-1)
    if lengths is not None:
        valid = torch.arange(z.shape[1], device=z.device)[None, :] < lengths.to(z.device)[:, None]
        nearest = torch.where(valid, nearest, 0)
    return nearest


if triton is not None:

    @triton.jit
    def _nearest_slot_kernel(
        Z, C, Norms, Lengths, Out,
        N, S, R,
        stride_zb, stride_zn, stride_cb, stride_cs, stride_nb, stride_ob,
        HAS_LENGTHS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr,
        IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ):
        # Latent blocks of one window are adjacent program ids, so they run together and read
        # that window's slots from L2.
        n_blocks = tl.cdiv(N, BLOCK_N)
        pid = tl.program_id(0)
        b = pid // n_blocks
        offs_n = (pid % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        n_valid = N
        if HAS_LENGTHS:
            n_valid = tl.minimum(tl.load(Lengths + b), N)
        n_ok = offs_n < n_valid
        best = tl.full([BLOCK_N], float("-inf"), tl.float32)
        best_idx = tl.zeros([BLOCK_N], tl.int32)
        if (pid % n_blocks) * BLOCK_N < n_valid:  # a block of padding only: slot 0, nothing read
            z = tl.load(Z + b.to(tl.int64) * stride_zb + offs_n[:, None].to(tl.int64) * stride_zn + offs_r[None, :],
                        mask=n_ok[:, None] & r_ok[None, :], other=0.0)
            if UPCAST:
                z = z.to(tl.float32)
            c_base = C + b.to(tl.int64) * stride_cb
            for start in range(0, S, BLOCK_S):
                offs_s = start + tl.arange(0, BLOCK_S)
                s_ok = offs_s < S
                c = tl.load(c_base + offs_s[:, None] * stride_cs + offs_r[None, :], mask=s_ok[:, None] & r_ok[None, :],
                            other=0.0)
                if UPCAST:
                    c = c.to(tl.float32)
                if IEEE:
                    dots = tl.dot(z, tl.trans(c), input_precision="ieee")  # [BLOCK_N, BLOCK_S] fp32
                else:
                    dots = tl.dot(z, tl.trans(c))
                norms = tl.load(Norms + b * stride_nb + offs_s, mask=s_ok, other=0.0)
                scores = 2.0 * dots - norms[None, :]
                scores = tl.where(s_ok[None, :], scores, float("-inf"))
                block_best = tl.max(scores, 1)
                block_idx = tl.argmax(scores, 1, tie_break_left=True).to(tl.int32) + start
                better = block_best > best  # strictly: an earlier (lower) slot keeps a tie
                best_idx = tl.where(better, block_idx, best_idx)
                best = tl.where(better, block_best, best)
        best_idx = tl.where(n_ok, best_idx, 0)
        tl.store(Out + b.to(tl.int64) * stride_ob + offs_n, best_idx.to(tl.int64), mask=offs_n < N)


# Block shapes tried in order; the first that fits the device's shared memory and registers is
# kept for the (dtype, r) pair, so a process always runs one configuration (deterministic).
CONFIGS = ((128, 64, 8, 2), (64, 64, 4, 2), (32, 32, 4, 1))  # block_n, block_s, num_warps, num_stages
_chosen: dict = {}


def nearest_slot_triton(z: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor | None = None,
                        config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """The fused kernel. z [B, N, r] (any stride along N) and slots [B, S, r] of one type:
    fp16/bf16 (fp32 accumulation), or fp32 (products in full fp32, not tf32). Returns [B, N] int64."""
    if triton is None:
        raise RuntimeError("triton is not installed: use nearest_slot_torch")
    _check(z, slots)
    if slots.dtype != z.dtype:
        raise ValueError(f"z and slots must share a type, got {z.dtype} and {slots.dtype}")
    B, N, R = z.shape
    S = slots.shape[1]
    if z.stride(2) != 1:
        z = z.contiguous()
    slots = slots.contiguous()
    norms = (slots.float() * slots.float()).sum(-1).contiguous()  # [B, S] fp32: |c|^2 of the slots as given
    out = torch.empty((B, N), device=z.device, dtype=torch.long)
    if lengths is not None:
        lengths = lengths.to(device=z.device, dtype=torch.int32).contiguous()

    # Triton's CPU interpreter multiplies bf16 wrongly in tl.dot; there bf16 is widened to fp32
    # first (exact, so the products are the same; only the GPU runs the bf16 dot itself).
    upcast = z.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"

    def launch(block_n, block_s, num_warps, num_stages):
        _nearest_slot_kernel[(B * triton.cdiv(N, block_n),)](
            z, slots, norms, lengths if lengths is not None else norms, out,
            N, S, R,
            z.stride(0), z.stride(1), slots.stride(0), slots.stride(1), norms.stride(0), out.stride(0),
            HAS_LENGTHS=lengths is not None, BLOCK_N=block_n, BLOCK_S=block_s,
            BLOCK_R=max(16, triton.next_power_of_2(R)), IEEE=z.dtype == torch.float32 or upcast, UPCAST=upcast,
            num_warps=num_warps, num_stages=num_stages,
        )

    launch_fitting(launch, config, CONFIGS, _chosen, (z.dtype, R, z.device.type), f"r={R}")
    return out


def nearest_slot(z: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor | None = None,
                 impl: str = "auto") -> torch.Tensor:
    """Dispatch: auto is the Triton kernel for CUDA tensors when triton is present, else torch."""
    if impl == "auto":
        impl = "triton" if (triton is not None and z.is_cuda) else "torch"
    if impl == "triton":
        return nearest_slot_triton(z, slots, lengths)
    if impl == "torch":
        return nearest_slot_torch(z, slots, lengths)
    raise ValueError(f"impl must be auto, torch or triton, not {impl!r}")
