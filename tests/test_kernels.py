"""The fixed-query cross-attention: torch reference, Triton kernel (interpreter on CPU, CUDA on GPU)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from memstream.kernels import attention_torch, fixed_query_attention, triton_available

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _inputs(B, N, M, D, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g)
    q = torch.randn(M, D, generator=g) * (3.0 / D ** 0.5)  # scores of std about 3: a peaked softmax
    return x.to(device, dtype), q.to(device, dtype)


def test_reference_is_softmax_attention():
    x, q = _inputs(2, 300, 16, 24)
    want = F.scaled_dot_product_attention(q.expand(2, -1, -1), x, x, scale=1.0)
    torch.testing.assert_close(attention_torch(x, q), want, atol=1e-5, rtol=1e-5)


def test_reference_lengths_mask_the_tail():
    x, q = _inputs(3, 128, 8, 16)
    out = attention_torch(x, q, torch.tensor([128, 50, 0]))
    torch.testing.assert_close(out[0], attention_torch(x[:1], q)[0])
    torch.testing.assert_close(out[1], attention_torch(x[1:2, :50], q)[0])
    assert torch.equal(out[2], torch.zeros_like(out[2]))  # an empty window reads as zeros


def test_cpu_dispatch_is_torch_and_bitwise_deterministic():
    x, q = _inputs(2, 4096, 256, 384)
    a, b = fixed_query_attention(x, q), fixed_query_attention(x, q)
    assert a.dtype == torch.float32 and a.shape == (2, 256, 384)
    assert torch.equal(a, b)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_kernel_in_interpreter_matches_reference():
    """The kernel's logic (blocking, online softmax, masks, non-power-of-two d) on the CPU,
    through Triton's interpreter. bf16 is left to the GPU test: the interpreter's bf16 dot is wrong."""
    code = textwrap.dedent("""
        import torch
        from memstream.kernels import attention_torch, attention_triton
        g = torch.Generator().manual_seed(0)
        for dtype, atol in ((torch.float32, 1e-4), (torch.float16, 3e-3)):
            for B, N, M, D in ((2, 200, 70, 48), (1, 128, 64, 384)):
                x = torch.randn(B, N, D, generator=g).to(dtype)
                q = (torch.randn(M, D, generator=g) * 3 / D ** 0.5).to(dtype)
                lengths = torch.tensor([N, 37][:B])
                for L in (None, lengths):
                    torch.testing.assert_close(attention_triton(x, q, L, block_m=32, block_n=32, num_warps=4),
                                               attention_torch(x, q, L), atol=atol, rtol=0)
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


# Tolerances on the GPU: the kernel rounds attention weights to the input type before the
# readout matmul (as flash attention does); the reference keeps them in fp32. Outputs are
# averages of O(1) latents, so the error is about the type's epsilon.
GPU_TOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3, 16, 64])
def test_triton_matches_reference_on_gpu(dtype, batch):
    x, q = _inputs(batch, 4096, 256, 384, dtype, "cuda", seed=batch)
    out = fixed_query_attention(x, q)  # auto: the Triton kernel
    ref = attention_torch(x, q)  # fp32 math on the same rounded inputs
    torch.testing.assert_close(out, ref, atol=GPU_TOL[dtype], rtol=0)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_lengths_and_determinism_on_gpu(dtype):
    x, q = _inputs(4, 4096, 256, 384, dtype, "cuda")
    lengths = torch.tensor([4096, 4000, 1, 0], device="cuda")
    out = fixed_query_attention(x, q, lengths)
    torch.testing.assert_close(out, attention_torch(x, q, lengths), atol=GPU_TOL[dtype], rtol=0)
    for _ in range(3):
        assert torch.equal(fixed_query_attention(x, q, lengths), out)  # no atomics: bitwise repeatable


@pytest.mark.gpu
@cuda
def test_compressor_on_gpu_matches_cpu_reference():
    from memstream.operators import load_default

    model = load_default()
    x = torch.randn(2, 4096, 384) * 0.5
    ref = model.encode(x, impl="reference")
    gpu = model.to("cuda").encode(x.to("cuda", torch.bfloat16)).cpu()
    assert (F.cosine_similarity(gpu, ref, dim=-1) > 0.999).all()
