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


def test_prism_streams_with_state_and_timer(kafka_bootstrap, prism_binary, topic_name, tmp_path):
    run_streaming_counts(kafka_bootstrap, topic_name + "-in", topic_name + "-out",
                         ["--runner=PrismRunner", f"--prism_location={prism_binary}", "--streaming",
                          "--environment_type=LOOPBACK"], tmp_path / "pipeline.log")


@pytest.mark.flink
def test_flink_streams_with_state_and_timer(kafka_bootstrap, flink_job_endpoint, topic_name, tmp_path):
    run_streaming_counts(kafka_bootstrap, topic_name + "-in", topic_name + "-out",
                         runners.flink_options(flink_job_endpoint, extra=["--parallelism=1"]), tmp_path / "pipeline.log")
