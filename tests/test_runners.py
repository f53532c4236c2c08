"""Beam runners that really stream: per-key state and a timer, output while input is open."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer

from memstream.infra import process, runners
from tests.test_infra import create_topic

HERE = Path(__file__).resolve().parent


def _send(bootstrap: str, topic: str, pairs: list[tuple[bytes, bytes]]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for key, value in pairs:
        producer.send(topic, key=key, value=value)
    producer.flush()
    producer.close()


def _await_output(consumer: KafkaConsumer, want: set[bytes], pipeline: subprocess.Popen, timeout: float) -> set:
    seen: set[bytes] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not want <= seen:
        assert pipeline.poll() is None, "the pipeline stopped: a streaming job must keep running"
        for records in consumer.poll(timeout_ms=500).values():
            seen |= {r.value for r in records}
    return seen


def run_streaming_counts(bootstrap: str, source: str, sink: str, runner_args: list[str], log: Path) -> None:
    create_topic(bootstrap, source, partitions=2)
    create_topic(bootstrap, sink)
    _send(bootstrap, source, [(b"a", b"1"), (b"b", b"1"), (b"a", b"2")])
    consumer = KafkaConsumer(sink, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    with open(log, "wb") as out:
        pipeline = subprocess.Popen([sys.executable, str(HERE / "streaming_counts.py"), bootstrap, source, sink,
                                     *runner_args], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        first = _await_output(consumer, {b"a=2", b"b=1"}, pipeline, timeout=240)
        assert {b"a=2", b"b=1"} <= first, (first, process.tail(log))
        # The input topic is still open: more input, and the timer fires again with the new state.
        _send(bootstrap, source, [(b"a", b"3"), (b"a", b"4"), (b"c", b"1")])
        second = _await_output(consumer, {b"a=4", b"c=1"}, pipeline, timeout=120)
        assert {b"a=4", b"c=1"} <= second, (second, process.tail(log))
    finally:
        consumer.close()
        os.killpg(pipeline.pid, signal.SIGTERM)
        pipeline.wait(timeout=60)
        process.stop_pid(pipeline.pid, timeout=10)
        leftover = [p for p in process.descendants(os.getpid()) if process.pid_alive(p)
                    and "streaming_counts" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]
        assert not leftover


def _counts(runner_args: list[str], elements: int = 1500, size: int = 50_000) -> list[str]:
    out = subprocess.run([sys.executable, str(HERE / "prism_keyed_state.py"), str(elements), str(size), *runner_args],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split("\n")[:-1]


def test_prism_forks_keyed_state_when_it_splits_a_slow_bundle(prism_binary):
    """Prism 2.77's splitBundle (engine/elementmanager.go) frees the keys of a split's residual
    while the primary still holds them; the residual runs at once in another bundle against the
    old state, and a key's state forks: counts repeat and the last one falls short. This test
    pins that upstream bug (apache/beam#35771 added the code; Prism's tracking issue #29650): it
    fails, and the workaround can go, once a Prism release keeps the counts."""
    lines = _counts(["--runner=PrismRunner", f"--prism_location={prism_binary}", "--environment_type=LOOPBACK"])
    assert len(lines) == 1500
    assert len(set(lines)) < len(lines), "Prism kept keyed state through its splits: drop PRISM_EXPERIMENTS"


def test_prism_keeps_keyed_state_with_the_pipelines_options():
    lines = _counts(runners.prism_options(streaming=False))
    assert sorted(lines) == sorted(f"k{k} {n}" for k in range(7) for n in range(1, 1500 // 7 + (k < 1500 % 7) + 1))


def test_prism_streams_with_state_and_timer(kafka_bootstrap, prism_binary, topic_name, tmp_path):
    run_streaming_counts(kafka_bootstrap, topic_name + "-in", topic_name + "-out",
                         runners.prism_options(streaming=True), tmp_path / "pipeline.log")


@pytest.mark.flink
def test_flink_streams_with_state_and_timer(kafka_bootstrap, flink_job_endpoint, topic_name, tmp_path):
    run_streaming_counts(kafka_bootstrap, topic_name + "-in", topic_name + "-out",
                         runners.flink_options(flink_job_endpoint, extra=["--parallelism=1"]), tmp_path / "pipeline.log")
