"""Throughput of the compressor's encoder on the CPU, and of the fixed-query kernel on a GPU.

CPU mode (default): windows/s and latents/s of the encoder (k-means over each window in the
projected space: ``hard_iters`` Lloyd iterations, the first ``coarse_iters`` of them over every
other latent, then ``iters`` soft ones; windows batched) and of its reference path (the same
maths one window at a time), timed in the same run, and their ratio.

GPU mode (--device cuda): the Triton fixed-query cross-attention kernel of ``memstream.kernels``
(256 queries over a window; the default compressor no longer uses it, see operators/model.py)
on fp16/bf16 latents at batch sizes 1..256: bytes of latents read per second as a fraction of
the device-to-device copy bandwidth (bytes read plus written per second) measured in the same
run, and TFLOP/s (4 * N * M * d flops a window: scores and readout); and the compressor's
encoder on the same latents. Then the encoder's own kernel, the fused nearest-slot assignment
of its hard passes (``memstream.kernels.nearest_slot``, 4,096 projected latents against 512
slots in 192 dims, fp32 as the encoder runs it, and bf16): the kernel's bytes of latents read
per second (against the same copy bandwidth) and the torch path's time (baddbmm + argmax), and
the encoder's windows/s with impl="triton" against impl="torch" (bench/README.md).

    python bench/bench_compressor.py                   # CPU, writes bench/results/cpu-*.{json,md}
    python bench/bench_compressor.py --device cuda     # GPU, writes bench/results/cuda-*.{json,md}

Needs only torch and numpy (and triton for the GPU mode), with memstream installed
(pip install --no-deps --no-build-isolation -e .).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from memstream.kernels import attention_torch, fixed_query_attention, nearest_slot, triton_available
from memstream.operators import Compressor, CompressorConfig

RESULTS = Path(__file__).resolve().parent / "results"


def _time_interleaved(fns: list, repeats: int) -> list[float]:
    """Median seconds of each of ``fns`` after a warm-up call, calling them in turn in every
    round, so a change in the machine's load (other jobs share its cores) hits them alike."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


def machine_info(device: str) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1), cuda=torch.version.cuda)
        if triton_available():
            import triton
            info["triton"] = triton.__version__
    return info


def _model(device: str = "cpu") -> Compressor:
    """The default architecture with data-like weights (timing does not depend on their values)."""
    torch.manual_seed(0)
    model = Compressor(CompressorConfig())
    model.fit_to_data(torch.randn(8192, model.config.dim))
    return model.to(device).eval()


@torch.no_grad()
def bench_cpu(batches: list[int], repeats: int) -> list[dict]:
    model = _model()
    c = model.config
    rows = []
    for B in batches:
        x = torch.randn(B, c.window, c.dim)
        fast, ref = _time_interleaved([lambda: model.encode(x), lambda: model.encode(x, impl="reference")], repeats)
        rows.append({"batch": B, "hard_iters": c.hard_iters, "coarse_iters": c.coarse_iters, "iters": c.iters, "encoder_s": fast, "reference_s": ref,
                     "encoder_windows_per_s": B / fast, "reference_windows_per_s": B / ref,
                     "encoder_latents_per_s": B * c.window / fast, "reference_latents_per_s": B * c.window / ref,
                     "speedup": ref / fast})
        print(f"batch {B:3d}: encoder {B / fast:8.1f} windows/s ({B * c.window / fast:12,.0f} latents/s), "
              f"reference {B / ref:8.1f} windows/s, speedup {ref / fast:.2f}x")
    return rows


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 20) -> float:
    """Device-to-device copy: bytes moved (n read plus n written) per second, what the memory
    system sustains; the kernel only reads, so its bytes read per second compare to this."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / _cuda_time(lambda: dst.copy_(src), repeats)


def _cuda_time(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


@torch.no_grad()
def bench_cuda(batches: list[int], repeats: int, dtypes: list[str]) -> tuple[list[dict], float]:
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    if not triton_available():
        raise SystemExit("--device cuda: triton is not installed")
    model = _model("cuda")
    c = model.config
    queries = torch.randn(c.n_summary, c.dim, device="cuda") / c.dim ** 0.5
    bw = copy_bandwidth()
    print(f"device-to-device copy: {bw / 1e9:,.0f} GB/s moved (read + written)")
    rows = []
    for name in dtypes:
        dtype = getattr(torch, name)
        for B in batches:
            x = torch.randn(B, c.window, c.dim, device="cuda", dtype=dtype)
            kernel = _cuda_time(lambda: fixed_query_attention(x, queries), repeats)
            torch_path = _cuda_time(lambda: attention_torch(x, queries), repeats)
            encoder = _cuda_time(lambda: model.encode(x), repeats)
            nbytes = x.numel() * x.element_size()
            flops = 4 * B * c.window * queries.shape[0] * c.dim
            rows.append({"dtype": name, "batch": B, "kernel_s": kernel, "windows_per_s": B / kernel,
                         "latents_per_s": B * c.window / kernel, "bytes_per_s": nbytes / kernel,
                         "fraction_of_copy_bandwidth": nbytes / kernel / bw, "tflops": flops / kernel / 1e12,
                         "torch_path_s": torch_path, "speedup_vs_torch": torch_path / kernel,
                         "encoder_s": encoder, "encoder_windows_per_s": B / encoder})
            print(f"{name} batch {B:3d}: {B / kernel:9.0f} windows/s, {nbytes / kernel / 1e9:7.0f} GB/s "
                  f"({nbytes / kernel / bw:5.1%} of copy), {flops / kernel / 1e12:6.1f} TFLOP/s, "
                  f"{torch_path / kernel:.1f}x the torch path; encoder {B / encoder:9.0f} windows/s")
    return rows, bw


@torch.no_grad()
def bench_cuda_nearest(batches: list[int], repeats: int, bw: float) -> list[dict]:
    """The nearest-slot kernel (fp32 and bf16 latents) and the encoder with impl triton vs torch."""
    model = _model("cuda")
    c = model.config
    rows = []
    for B in batches:
        x = torch.randn(B, c.window, c.dim, device="cuda")
        enc_triton = _cuda_time(lambda: model.encode(x, impl="triton"), repeats)
        enc_torch = _cuda_time(lambda: model.encode(x, impl="torch"), repeats)
        z = model.project(x)
        slots = model.initial_slots(z, torch.full((B,), c.window, device="cuda"))
        for dtype in (torch.float32, torch.bfloat16):
            zd, sd = z.to(dtype), slots.to(dtype)
            kernel = _cuda_time(lambda: nearest_slot(zd, sd, impl="triton"), repeats)
            torch_path = _cuda_time(lambda: nearest_slot(zd, sd, impl="torch"), repeats)
            nbytes = zd.numel() * zd.element_size()
            flops = 2 * B * c.window * c.n_slots * c.rank
            name = str(dtype).removeprefix("torch.")
            rows.append({"dtype": name, "batch": B, "kernel_s": kernel, "bytes_per_s": nbytes / kernel,
                         "fraction_of_copy_bandwidth": nbytes / kernel / bw, "tflops": flops / kernel / 1e12,
                         "torch_path_s": torch_path, "speedup_vs_torch": torch_path / kernel,
                         "encoder_triton_s": enc_triton, "encoder_torch_s": enc_torch,
                         "encoder_triton_windows_per_s": B / enc_triton, "encoder_torch_windows_per_s": B / enc_torch})
            print(f"nearest slot {name} batch {B:3d}: {nbytes / kernel / 1e9:7.0f} GB/s of latents "
                  f"({nbytes / kernel / bw:5.1%} of copy), {flops / kernel / 1e12:6.1f} TFLOP/s, "
                  f"{torch_path / kernel:.1f}x the torch path; encoder triton {B / enc_triton:9.0f} windows/s, "
                  f"torch {B / enc_torch:9.0f} windows/s")
    return rows


def _markdown(result: dict) -> str:
    lines = [f"# Compressor benchmark ({result['device']})", "",
             f"{result['timestamp']}; " + ", ".join(f"{k} {v}" for k, v in result["machine"].items()), ""]
    rows = result["rows"]
    if result["device"] == "cpu":
        lines += ["| batch | encoder windows/s | encoder latents/s | reference windows/s | speedup |",
                  "| ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['batch']} | {r['encoder_windows_per_s']:.2f} | {r['encoder_latents_per_s']:,.0f} | "
                  f"{r['reference_windows_per_s']:.2f} | {r['speedup']:.2f}x |" for r in rows]
    else:
        lines += [f"Device-to-device copy: {result['copy_bytes_per_s'] / 1e9:,.0f} GB/s moved (read + written).", "",
                  "| dtype | batch | kernel windows/s | latents GB/s | of copy bw | TFLOP/s | vs torch | encoder windows/s |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['dtype']} | {r['batch']} | {r['windows_per_s']:,.0f} | {r['bytes_per_s'] / 1e9:,.0f} | "
                  f"{r['fraction_of_copy_bandwidth']:.1%} | {r['tflops']:.1f} | {r['speedup_vs_torch']:.1f}x | "
                  f"{r['encoder_windows_per_s']:,.0f} |"
                  for r in rows]
        lines += ["", "Nearest-slot kernel (4,096 latents x 512 slots x 192 dims a window) and the encoder by impl:", "",
                  "| z dtype | batch | kernel latents GB/s | of copy bw | TFLOP/s | kernel vs torch | encoder triton windows/s | encoder torch windows/s |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['dtype']} | {r['batch']} | {r['bytes_per_s'] / 1e9:,.0f} | {r['fraction_of_copy_bandwidth']:.1%} | "
                  f"{r['tflops']:.1f} | {r['speedup_vs_torch']:.1f}x | {r['encoder_triton_windows_per_s']:,.0f} | "
                  f"{r['encoder_torch_windows_per_s']:,.0f} |" for r in result.get("nearest_rows", [])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default: cpu 1,4,16; cuda 1..256)")
    p.add_argument("--dtypes", default="bfloat16,float16", help="GPU input types")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per point (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    default_batches = "1,4,16" if args.device == "cpu" else "1,2,4,8,16,32,64,128,256"
    batches = [int(b) for b in (args.batches or default_batches).split(",")]
    result = {"device": args.device, "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_info(args.device), "window": CompressorConfig().window,
              "summary_tokens": CompressorConfig().n_summary, "dim": CompressorConfig().dim}
    if args.device == "cpu":
        result["rows"] = bench_cpu(batches, args.repeats or 5)
    else:
        result["rows"], result["copy_bytes_per_s"] = bench_cuda(batches, args.repeats or 20, args.dtypes.split(","))
        result["nearest_rows"] = bench_cuda_nearest(batches, args.repeats or 20, result["copy_bytes_per_s"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{args.device}-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(_markdown(result))
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
