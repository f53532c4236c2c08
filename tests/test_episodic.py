"""The episodic pipeline end to end on real Kafka, LanceDB (local and S3) and Prism / Flink."""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from kafka import KafkaConsumer, KafkaProducer

from memstream import topics
from memstream.episodic.chain import seal, verify_chain
from memstream.crypto import KeyRing, SigningKey
from memstream.episodic.store import EpisodicStore
from memstream.infra import process, runners
from memstream.operators.checkpoint import save_compressor
from memstream.operators.model import Compressor, CompressorConfig
from memstream.pipelines.episodic import EpisodicConfig, run
from memstream.settings import WINDOW
from memstream.topics import read_summaries
from memstream.schemas.records import DeadLetterRecord, SummaryRecord
from memstream.sdk import Publisher


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    # The pipeline's mechanics do not depend on the weights; a seeded random compressor keeps
    # these tests independent of training (the committed default is tested in test_operator).
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "compressor.safetensors"
    save_compressor(Compressor(CompressorConfig()), path)
    return str(path)


@pytest.fixture(scope="module")
def key_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("keys") / "validator.pem"
    path.write_bytes(SigningKey.generate().private_pem())
    path.chmod(0o600)
    return str(path)


@pytest.fixture
def env(kafka_bootstrap, topic_name, tmp_path, checkpoint, key_file):
    names = {t: f"{topic_name}.{t}" for t in ("latents", "summaries", "deadletter")}
    topics.create_topics(kafka_bootstrap, list(names.values()), partitions=2)
    config = EpisodicConfig(bootstrap=kafka_bootstrap, store_uri=str(tmp_path / "episodic"), key_file=key_file,
                            checkpoint=checkpoint, batch_size=4, until_idle=True,
                            **{f"{t}_topic": n for t, n in names.items()})
    return config


def publish(config: EpisodicConfig, sessions: dict[str, int], chunk: int = 700, seed: int = 0,
            close: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    data = {}
    with Publisher(config.bootstrap, topic=config.latents_topic) as pub:
        for sid, n in sessions.items():
            x = rng.standard_normal((n, 384)).astype(np.float32)
            data[sid] = x
            s = pub.session(sid)
            for i in range(0, n, chunk):  # 700 does not divide 4,096: chunks straddle windows
                s.publish(x[i:i + chunk])
            if close:
                s.close()
    return data


def expected_windows(n: int) -> list[tuple[int, int, int, bool]]:
    return [(i, i * WINDOW, min(n, (i + 1) * WINDOW), (i + 1) * WINDOW > n) for i in range(-(-n // WINDOW))]


def keyring(config: EpisodicConfig) -> KeyRing:
    return KeyRing([config.signing_key()])


def assert_complete(config: EpisodicConfig, sessions: dict[str, int], store: EpisodicStore | None = None):
    """Every window exactly once in the store and on the topic, every chain verifies, every
    latent accounted for."""
    store = store or config.store()
    on_topic = read_summaries(config.bootstrap, topic=config.summaries_topic)
    for sid, n in sessions.items():
        stored = store.records(sid)
        assert [(r.window_index, r.seq_start, r.seq_end, r.partial) for r in stored] == expected_windows(n)
        report = verify_chain(sid, stored, keyring(config))
        assert report.ok, report.fault
        from_topic = [r for r in on_topic if r.session_id == sid]
        assert {r.hash for r in from_topic} == {r.hash for r in stored}  # no fork, nothing missing
        topic_report = verify_chain(sid, from_topic, keyring(config))
        assert topic_report.ok, topic_report.fault
        assert topic_report.records == len(stored)


def test_windows_chains_and_an_idempotent_replay(env):
    sessions = {"s1": 2 * WINDOW + 1000, "s2": 5000, "s3": WINDOW}
    publish(env, sessions)
    run(env, runners.prism_options(streaming=False))
    assert_complete(env, sessions)
    before = len(read_summaries(env.bootstrap, topic=env.summaries_topic))
    run(env, runners.prism_options(streaming=False))  # a replay of the whole topic
    assert_complete(env, sessions)
    assert len(read_summaries(env.bootstrap, topic=env.summaries_topic)) == before
    tokens = np.frombuffer(env.store().records("s1")[0].tokens, "<f2").reshape(256, 384)
    assert np.isfinite(tokens).all() and tokens.astype(np.float32).std() > 0


def test_s3_store(env, s3_config, s3_prefix):
    config = dataclasses.replace(env, store_uri=s3_config.uri(s3_prefix, "episodic"),
                                 storage_options=s3_config.storage_options())
    sessions = {"a": WINDOW + 10}
    publish(config, sessions)
    run(config, runners.prism_options(streaming=False))
    assert_complete(config, sessions)


def test_sliding_window_keeps_the_latest_summaries(env):
    config = dataclasses.replace(env, horizon=2)
    sessions = {"long": 5 * WINDOW}
    publish(config, sessions, chunk=WINDOW)
    run(config, runners.prism_options(streaming=False))
    stored = config.store().records("long")
    assert [r.window_index for r in stored] == [3, 4]
    assert verify_chain("long", stored, keyring(config), anchored=False).ok
    whole = read_summaries(config.bootstrap, "long", topic=config.summaries_topic)  # the topic keeps it all
    assert [r.window_index for r in whole] == [0, 1, 2, 3, 4] and verify_chain("long", whole, keyring(config)).ok


def test_bad_input_goes_to_the_dead_letter_topic(env):
    producer = KafkaProducer(bootstrap_servers=env.bootstrap)
    bad = [(b"\xff\xfe", b"MSLT whatever"), (b"ghost", b"not a memstream record"),
           (b"nokey-session", b"MSLT\x01truncated")]
    for key, value in bad:
        producer.send(env.latents_topic, key=key, value=value)
    producer.flush()
    producer.close()
    publish(env, {"good": WINDOW})
    run(env, runners.prism_options(streaming=False))
    assert_complete(env, {"good": WINDOW})
    consumer = KafkaConsumer(env.deadletter_topic, bootstrap_servers=env.bootstrap, auto_offset_reset="earliest",
                             consumer_timeout_ms=5000)
    letters = [DeadLetterRecord.from_json(m.value) for m in consumer]
    consumer.close()
    assert sorted((d.key, d.value) for d in letters) == sorted(bad)  # the original bytes, all of them
    assert {d.reason.value for d in letters} == {"bad_key", "bad_magic", "truncated"}
    assert all(d.topic == env.latents_topic and d.message for d in letters)


def test_verify_catches_a_flipped_byte_in_any_field(env):
    publish(env, {"v": 2 * WINDOW})
    run(env, runners.prism_options(streaming=False))
    records = env.store().records("v")
    ring = keyring(env)
    assert verify_chain("v", records, ring).ok
    rng = random.Random(7)
    for position in range(len(records)):
        for f in dataclasses.fields(SummaryRecord):
            value = getattr(records[position], f.name)
            if isinstance(value, bool):
                tampered = not value
            elif isinstance(value, int):
                tampered = value ^ (1 << rng.randrange(8))
            elif isinstance(value, bytes):
                if not value:
                    tampered = b"\x00"
                else:
                    i = rng.randrange(len(value))
                    tampered = value[:i] + bytes([value[i] ^ (1 << rng.randrange(8))]) + value[i + 1:]
            else:
                i = rng.randrange(len(value))
                tampered = value[:i] + chr(ord(value[i]) ^ 1) + value[i + 1:]
            broken = list(records)
            broken[position] = dataclasses.replace(records[position], **{f.name: tampered})
            report = verify_chain("v", broken, ring)
            assert not report.ok, f"flipping {f.name} of record {position} went unnoticed"
            assert report.fault.position == position, (f.name, position, report.fault)


def test_verify_chain_cli_reports_and_reconstructs_the_head_at_a_time(env, tmp_path):
    publish(env, {"c": 3 * WINDOW})
    run(env, runners.prism_options(streaming=False))
    records = env.store().records("c")
    cli = [sys.executable, "-m", "memstream.cli", "verify", "chain", "--session", "c",
           "--bootstrap", env.bootstrap, "--topic", env.summaries_topic, "--key-file", env.key_file, "--json"]
    ok = subprocess.run(cli, capture_output=True, text=True)
    assert ok.returncode == 0 and '"ok": true' in ok.stdout, ok.stderr
    at = (records[1].processing_time_us + 1) / 1e6
    then = subprocess.run(cli + ["--at", str(at)], capture_output=True, text=True)
    assert then.returncode == 0, then.stderr
    assert '"window": 1' in then.stdout and records[1].hash.hex() in then.stdout
    # Rotation: a second key signs later summaries; both verify by key id.
    other = tmp_path / "new.pem"
    new_key = SigningKey.generate()
    other.write_bytes(new_key.private_pem())
    resigned = seal(dataclasses.replace(records[2], key_id=""), new_key)
    ring = KeyRing([env.signing_key(), new_key])
    assert verify_chain("c", records[:2] + [resigned], ring).ok
    assert not verify_chain("c", records[:2] + [resigned], KeyRing([env.signing_key()])).ok


def _start_pipeline(config: EpisodicConfig, log: Path, extra: list[str] = ()) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "memstream.cli", "run", "--runner", "prism", "--bootstrap", config.bootstrap,
           "--episodic", config.store_uri, "--key-file", config.key_file, "--checkpoint", config.checkpoint,
           "--batch-size", str(config.batch_size), "--latents-topic", config.latents_topic,
           "--summaries-topic", config.summaries_topic, "--deadletter-topic", config.deadletter_topic, *extra]
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _kill9(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)  # the pipeline and its Prism runner, mid-whatever
    proc.wait(timeout=30)
    process.stop_pid(proc.pid, timeout=5)


@pytest.mark.slow
def test_kill_9_restarts_and_a_broker_restart_lose_and_duplicate_nothing(env, stack, tmp_path):
    sessions = {f"f{i}": WINDOW * 2 + 517 * (i + 1) for i in range(3)}
    publisher_error: list[BaseException] = []

    def publish_slowly():
        try:
            rng = np.random.default_rng(11)
            with Publisher(env.bootstrap, topic=env.latents_topic) as pub:
                handles = {sid: pub.session(sid) for sid in sessions}
                data = {sid: rng.standard_normal((n, 384)).astype(np.float16) for sid, n in sessions.items()}
                offsets = dict.fromkeys(sessions, 0)
                while any(offsets[s] < sessions[s] for s in sessions):  # sessions interleave, as in life
                    for sid in sessions:
                        if offsets[sid] < sessions[sid]:
                            handles[sid].publish(data[sid][offsets[sid]:offsets[sid] + 600])
                            offsets[sid] += 600
                    time.sleep(0.4)
                for h in handles.values():
                    h.close()
        except BaseException as e:  # surfaced in the test thread below
            publisher_error.append(e)

    log = tmp_path / "pipeline.log"
    publisher = threading.Thread(target=publish_slowly)
    publisher.start()
    rng = random.Random(3)
    pipeline = _start_pipeline(env, log)
    try:
        for round_ in range(3):
            time.sleep(rng.uniform(6, 14))
            _kill9(pipeline)
            if round_ == 1:
                stack.restart("kafka")  # the broker goes away and comes back mid-stream
            pipeline = _start_pipeline(env, log)
        publisher.join(timeout=300)
        assert not publisher.is_alive() and not publisher_error, publisher_error
        time.sleep(rng.uniform(2, 6))
    finally:
        _kill9(pipeline)
    drain = _start_pipeline(env, log, ["--until-idle"])
    assert drain.wait(timeout=600) == 0, process.tail(log, 40)
    assert_complete(env, sessions)


@pytest.mark.flink
def test_end_to_end_on_flink(env, flink_job_endpoint):
    sessions = {"k1": WINDOW + 100, "k2": 2 * WINDOW}
    publish(env, sessions)
    run(env, runners.flink_options(flink_job_endpoint, streaming=False, extra=["--parallelism=1"]))
    assert_complete(env, sessions)
