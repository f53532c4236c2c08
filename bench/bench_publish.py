"""Publish throughput of the SDK against raw kafka-python sends of the same bytes.

Starts its own Kafka broker in a temporary folder, and in one run alternates:
  * raw: a KafkaProducer with the SDK's settings sends the very chunk messages the SDK would
    build (encoded before the clock starts), with the same keys, then flushes;
  * sdk: Publisher sessions publish the float32 arrays (chunking, checks, encoding, sequence
    numbers, back-pressure, open/close events), then close.
Reports latents/s and MB/s of each (median of the repeats) and sdk/raw; writes
bench/results/publish.json and publish.md.

    python bench/bench_publish.py [--latents 100000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import common
from memstream.wire.codec import encode_chunk
from memstream.infra.kafka import KAFKA_VERSION
from memstream.infra.stack import Stack
from memstream.schemas.records import HEADER_SIZE, DType
from memstream.sdk import DEFAULT_CHUNK_BYTES, Publisher
from memstream.topics import create_topics

RESULTS = Path(__file__).resolve().parent / "results"


def encode_like_the_sdk(sessions: dict[str, np.ndarray], producer_id: bytes,
                        chunk_bytes: int) -> list[tuple[bytes, bytes]]:
    out = []
    for sid, x in sessions.items():
        per_chunk = (chunk_bytes - HEADER_SIZE) // (x.shape[1] * 4)
        for start in range(0, len(x), per_chunk):
            part = x[start:start + per_chunk]
            out.append((sid.encode(), encode_chunk(producer_id=producer_id, dtype=DType.fp32, dim=x.shape[1],
                                                   count=len(part), first_seq=start, event_time_us=0,
                                                   payload=part.tobytes())))
    return out


def run_raw(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]], config: dict) -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds (all threads) to send and flush."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, **config)
    producer.partitions_for(topic)  # metadata before the clock, as the Publisher does in __init__
    started, cpu = time.perf_counter(), time.process_time()
    futures = [producer.send(topic, key=k, value=v) for k, v in messages]
    producer.flush()
    for f in futures:
        f.get(timeout=0)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    producer.close()
    return seconds, cpu


def run_sdk(bootstrap: str, topic: str, sessions: dict[str, np.ndarray], chunk_bytes: int) -> tuple[float, float, int]:
    with Publisher(bootstrap, topic=topic, max_chunk_bytes=chunk_bytes) as pub:
        started, cpu = time.perf_counter(), time.process_time()
        for sid, x in sessions.items():
            with pub.session(sid) as s:
                s.publish(x)
        pub.flush()
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return seconds, cpu, pub.stats.bytes


def machine() -> dict:
    return {**common.machine_info("kafka-python", "numpy"), "kafka_broker": KAFKA_VERSION}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latents", type=int, default=100_000, help="latents per run, over --sessions sessions")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    per = args.latents // args.sessions
    with tempfile.TemporaryDirectory(prefix="memstream-bench-") as tmp:
        stack = Stack(Path(tmp))
        try:
            stack.up(("kafka",))
            bootstrap = stack.kafka_bootstrap()
            raw_s, sdk_s, raw_cpu, sdk_cpu, value_bytes = [], [], [], [], 0
            for r in range(-1, args.repeats):  # r = -1: a warm-up pair (broker and client), not recorded
                sessions = {f"bench-{r}-{i}": rng.standard_normal((per, args.dim)).astype(np.float32)
                            for i in range(args.sessions)}
                create_topics(bootstrap, [f"bench.raw.{r}", f"bench.sdk.{r}"])
                probe = Publisher(bootstrap, topic=f"bench.raw.{r}", max_chunk_bytes=args.chunk_bytes)
                config = {k: v for k, v in probe.kafka_config.items() if k != "bootstrap_servers"}
                probe.close()
                messages = encode_like_the_sdk(sessions, b"\0" * 16, args.chunk_bytes)
                times = {}
                for which in (("raw", "sdk") if r % 2 == 0 else ("sdk", "raw")):  # neither always goes first
                    if which == "raw":
                        times["raw"], times["raw_cpu"] = run_raw(bootstrap, f"bench.raw.{r}", messages, config)
                    else:
                        times["sdk"], times["sdk_cpu"], value_bytes = run_sdk(
                            bootstrap, f"bench.sdk.{r}", sessions, args.chunk_bytes)
                print(f"repeat {r}: raw {times['raw']:.2f}s (cpu {times['raw_cpu']:.2f}s)  "
                      f"sdk {times['sdk']:.2f}s (cpu {times['sdk_cpu']:.2f}s)", flush=True)
                if r >= 0:
                    raw_s.append(times["raw"])
                    sdk_s.append(times["sdk"])
                    raw_cpu.append(times["raw_cpu"])
                    sdk_cpu.append(times["sdk_cpu"])
        finally:
            stack.down()
    latents = per * args.sessions
    raw_t, sdk_t = statistics.median(raw_s), statistics.median(sdk_s)
    result = {
        "benchmark": "publish", "latents": latents, "dim": args.dim, "dtype": "fp32", "sessions": args.sessions,
        "chunk_bytes": args.chunk_bytes, "value_bytes": value_bytes, "repeats": args.repeats,
        "raw_seconds": raw_s, "sdk_seconds": sdk_s,
        "raw_client_cpu_seconds": raw_cpu, "sdk_client_cpu_seconds": sdk_cpu,
        "raw": {"latents_per_s": latents / raw_t, "mb_per_s": value_bytes / 1e6 / raw_t},
        "sdk": {"latents_per_s": latents / sdk_t, "mb_per_s": value_bytes / 1e6 / sdk_t},
        "sdk_over_raw": raw_t / sdk_t,
        "sdk_over_raw_paired_median": statistics.median(r / s for r, s in zip(raw_s, sdk_s)),
        "load_average_1m": os.getloadavg()[0],
        "machine": machine(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "publish.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    (args.out / "publish.md").write_text(
        f"# Publish throughput ({result['date']})\n\n"
        f"{latents} fp32 latents of dim {args.dim} ({value_bytes / 1e6:.0f} MB of messages, "
        f"{args.chunk_bytes >> 10} KiB chunks, {args.sessions} sessions), median of {args.repeats} "
        f"runs in alternating order, one local Kafka {KAFKA_VERSION} broker on the same machine.\n\n"
        "| sender | latents/s | MB/s |\n| --- | ---: | ---: |\n"
        f"| raw kafka-python, pre-encoded | {result['raw']['latents_per_s']:,.0f} | {result['raw']['mb_per_s']:.1f} |\n"
        f"| memstream Publisher | {result['sdk']['latents_per_s']:,.0f} | {result['sdk']['mb_per_s']:.1f} |\n\n"
        f"**SDK / raw: {result['sdk_over_raw']:.2f}** (ratio of medians; median of the per-repeat ratios "
        f"{result['sdk_over_raw_paired_median']:.2f}; target: at least 0.9)\n\n"
        f"Client CPU per run (median, all threads of the Python process): raw {statistics.median(raw_cpu):.2f} s, "
        f"sdk {statistics.median(sdk_cpu):.2f} s; the rest of the wall time is spent waiting for the broker. "
        f"1-minute load average at the end: {result['load_average_1m']:.1f} on {os.cpu_count()} CPUs "
        "(the machine is shared), so single runs vary widely.\n\n"
        f"Machine: {m['cpu_model']}, {m['cpus']} CPUs, {m['platform']}, Python {m['python']}, "
        f"kafka-python {m['kafka-python']}, numpy {m['numpy']}.\n")
    print(json.dumps({k: result[k] for k in ("raw", "sdk", "sdk_over_raw")}, indent=2))


if __name__ == "__main__":
    main()
