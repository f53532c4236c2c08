"""The Triton kernels against their torch references on a CUDA device, without pytest:

    python -m memstream.kernels.check

(tests/test_kernels.py runs the same checks under pytest.) Tolerances: the kernel rounds the
attention weights to the input type before the readout matmul, as flash attention does, while
the reference keeps them in fp32; outputs are averages of O(1) latents, so the error is about
the type's epsilon.

The nearest-slot kernel (memstream.kernels.nearest_slot) returns indices: it must equal the
reference except on latents whose two best slots score within NEAREST_GAP (relative to the
scores' scale) of each other, where the two fp32 sums, added in different orders, may rank
them differently; in the full-size encoder (fp32 projected latents) at least 99.9% of the
assignments of every hard pass agree and every summary token has cosine > 0.999 with the
torch path's; the kernel and the encoder's triton path are bitwise identical run to run.
"""

from __future__ import annotations

import sys

import torch

from memstream.kernels.fixed_query_attention import attention_torch, fixed_query_attention, triton_available
from memstream.kernels.nearest_slot import nearest_slot, nearest_slot_torch

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


NEAREST_GAP = 1e-5  # of 2 |z| max|c| + max|c|^2: two fp32 sums of r <= 256 terms differ by less
NEAREST_AGREEMENT = 0.999
SUMMARY_COSINE = 0.999


def nearest_inputs(B: int, N: int, S: int, r: int, dtype=torch.float32, device="cpu", seed: int = 0,
                   separated: bool = False):
    """Latents z [B, N, r] and slots [B, S, r]; ``separated``: every latent is a slot plus small
    noise (a unique nearest slot by a wide margin), else both are standard normal."""
    g = torch.Generator().manual_seed(seed)
    slots = torch.randn(B, S, r, generator=g) * (3.0 if separated else 1.0)
    if separated:
        pick = torch.randint(0, S, (B, N), generator=g)
        z = slots.gather(1, pick[..., None].expand(-1, -1, r)) + 0.05 * torch.randn(B, N, r, generator=g)
    else:
        z = torch.randn(B, N, r, generator=g)
    return z.to(device, dtype), slots.to(device, dtype)


def near_ties(z: torch.Tensor, slots: torch.Tensor, rel: float = NEAREST_GAP) -> torch.Tensor:
    """[B, N] bool: latents whose two best slots score within ``rel`` of the scale (fp64 scores)."""
    zd, cd = z.double(), slots.double()
    scores = 2 * zd @ cd.transpose(1, 2) - (cd * cd).sum(-1)[:, None, :]
    top = scores.topk(2, dim=-1).values
    cn = cd.norm(dim=-1).amax(-1)[:, None]  # [B, 1]
    scale = 2 * zd.norm(dim=-1) * cn + cn ** 2
    return (top[..., 0] - top[..., 1]) <= rel * scale


def check_nearest_matches_reference(dtype: torch.dtype, batch: int, with_lengths: bool = False) -> float:
    """Full-size nearest-slot (4096 latents, 512 slots, r 192) on random data: the kernel equals the
    reference except on near ties. Returns the fraction that agrees."""
    z, slots = nearest_inputs(batch, 4096, 512, 192, dtype, "cuda", seed=batch)
    lengths = None
    if with_lengths:
        lengths = torch.randint(0, 4097, (batch,), generator=torch.Generator().manual_seed(batch)).cuda()
    out = nearest_slot(z, slots, lengths)  # auto: the Triton kernel on CUDA
    ref = nearest_slot_torch(z, slots, lengths)
    differ = out != ref
    assert not (differ & ~near_ties(z, slots)).any(), f"{dtype} batch {batch}: differs beyond a near tie"
    assert torch.equal(nearest_slot(z[:, ::2], slots), nearest_slot(z[:, ::2].contiguous(), slots)), "strided z"
    return 1.0 - differ.float().mean().item()


def _encoder_inputs(batch: int = 4):
    from memstream.operators import load_default

    model = load_default().cuda()
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(batch, 4096, 384, generator=g) * 0.5).cuda()
    lengths = torch.tensor([4096, 3001, 1, 4096][:batch] + [4096] * max(0, batch - 4)).cuda()
    return model, x, lengths


@torch.no_grad()
def check_encoder_agreement(batch: int = 4) -> tuple[float, float]:
    """The full-size encoder with impl="triton" against impl="torch" on CUDA: per hard pass the
    assignments of the same z and slots (>= 99.9% agree), then the summaries (cosine > 0.999).
    Returns (least agreement, least cosine)."""
    model, x, lengths = _encoder_inputs(batch)
    c = model.config
    valid = (torch.arange(x.shape[1], device="cuda")[None, :] < lengths[:, None]).float()
    z = model.project(x) * valid[..., None]
    slots = model.initial_slots(z, lengths)
    agreement = 1.0
    for i in range(c.hard_iters):
        step = 2 if i < c.coarse_iters else 1
        zs, vs = z[:, ::step], valid[:, ::step].bool()
        a = nearest_slot(zs, slots, (lengths + step - 1) // step, impl="triton")
        b = nearest_slot(zs, slots, impl="torch")
        agreement = min(agreement, (a == b)[vs].float().mean().item())
        slots = model.iterate_hard(zs, slots, valid[:, ::step])
    assert agreement >= NEAREST_AGREEMENT, f"assignment agreement {agreement:.5f} < {NEAREST_AGREEMENT}"
    ours = model.encode(x, lengths, impl="triton")
    ref = model.encode(x, lengths, impl="torch")
    cos = torch.nn.functional.cosine_similarity(ours, ref, dim=-1).min().item()
    assert cos > SUMMARY_COSINE, f"summary cosine {cos:.6f} <= {SUMMARY_COSINE}"
    return agreement, cos


@torch.no_grad()
def check_nearest_deterministic(repeats: int = 3) -> None:
    """The kernel (fp32, fp16, bf16) and the encoder's triton path: the same bits every run."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        z, slots = nearest_inputs(8, 4096, 512, 192, dtype, "cuda")
        first = nearest_slot(z, slots)
        for _ in range(repeats):
            assert torch.equal(nearest_slot(z, slots), first), f"{dtype}: nearest slots changed between runs"
    model, x, lengths = _encoder_inputs()
    first = model.encode(x, lengths, impl="triton")
    for _ in range(repeats):
        assert torch.equal(model.encode(x, lengths, impl="triton"), first), "encoder (triton): output changed between runs"


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
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for batch in BATCHES:
            for with_lengths in (False, True):
                agree = check_nearest_matches_reference(dtype, batch, with_lengths)
                print(f"nearest slot {dtype} batch {batch:3d} lengths {with_lengths!s:5}: {agree:.5%} agree "
                      f"(the rest near ties)")
    agreement, cos = check_encoder_agreement()
    print(f"encoder triton vs torch: assignments agree >= {agreement:.5%}, summary cosine >= {cos:.6f}")
    check_nearest_deterministic()
    print("nearest slot and encoder (triton): bitwise identical over repeated runs")
    print("ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
