"""The Triton kernel against the torch reference on a CUDA device, without pytest:

    python -m memstream.kernels.check

(tests/test_kernels.py runs the same checks under pytest.) Tolerances: the kernel rounds the
attention weights to the input type before the readout matmul, as flash attention does, while
the reference keeps them in fp32; outputs are averages of O(1) latents, so the error is about
the type's epsilon.
"""

from __future__ import annotations

import sys

import torch

from memstream.kernels.fixed_query_attention import attention_torch, fixed_query_attention, triton_available

TOLERANCE = {torch.float16: 4e-3, torch.bfloat16: 3e-2}
BATCHES = (1, 3, 16, 64)


def random_inputs(B: int, N: int, M: int, D: int, dtype=torch.float32, device="cpu", seed: int = 0):
    """Latents x [B, N, D] and queries [M, D] whose scores have a std of about 3 (a peaked softmax)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g)
    q = torch.randn(M, D, generator=g) * (3.0 / D ** 0.5)
    return x.to(device, dtype), q.to(device, dtype)


def check_matches_reference(dtype: torch.dtype, batch: int, with_lengths: bool = False) -> float:
    """Max abs error of the kernel (window 4096, 256 queries, d 384) against the reference."""
    x, q = random_inputs(batch, 4096, 256, 384, dtype, "cuda", seed=batch)
    lengths = None
    if with_lengths:
        lengths = torch.randint(0, 4097, (batch,), generator=torch.Generator().manual_seed(batch)).cuda()
        lengths[0] = 0  # an empty window reads as zeros in both
    out = fixed_query_attention(x, q, lengths)  # auto: the Triton kernel for fp16/bf16 on CUDA
    ref = attention_torch(x, q, lengths)
    err = (out - ref).abs().max().item()
    assert err <= TOLERANCE[dtype], f"{dtype} batch {batch}: max error {err:.2e} > {TOLERANCE[dtype]:.0e}"
    return err


def check_deterministic(dtype: torch.dtype, repeats: int = 3) -> None:
    x, q = random_inputs(8, 4096, 256, 384, dtype, "cuda")
    first = fixed_query_attention(x, q)
    for _ in range(repeats):
        assert torch.equal(fixed_query_attention(x, q), first), f"{dtype}: output changed between runs"


def main() -> int:
    if not torch.cuda.is_available() or not triton_available():
        print("needs CUDA and triton", file=sys.stderr)
        return 2
    for dtype in TOLERANCE:
        for batch in BATCHES:
            for with_lengths in (False, True):
                err = check_matches_reference(dtype, batch, with_lengths)
                print(f"{dtype} batch {batch:3d} lengths {with_lengths!s:5}: max error {err:.2e} (tolerance {TOLERANCE[dtype]:.0e})")
        check_deterministic(dtype)
        print(f"{dtype}: bitwise identical over repeated runs")
    print("ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
