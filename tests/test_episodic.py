"""The episodic pipeline end to end on real Kafka, LanceDB (local and S3) and Prism / Flink:
windows and chains, bounded restarts, poison input, determinism, fencing, crashes."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
import torch
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewPartitions

from memstream import topics
from memstream.crypto.keys import KeyRing, SigningKey, write_key_file
from memstream.episodic.chain import seal, verify_chain
from memstream.episodic.store import EpisodicStore
from memstream.infra import process, runners
from memstream.operators.checkpoint import save_compressor
from memstream.operators.model import Compressor, CompressorConfig
from memstream.pipelines.episodic import EpisodicConfig, run
from memstream.schemas.records import DeadLetterRecord, DType, SessionEvent, SummaryRecord
from memstream.sdk import Publisher
from memstream.settings import WINDOW
from memstream.topics import read_summaries
from memstream.wire.codec import encode_chunk, encode_event


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
    write_key_file(path, SigningKey.generate(), "validator")
    return str(path)


def make_config(kafka_bootstrap, topic_name, store, checkpoint, key_file, partitions=2, **kw) -> EpisodicConfig:
    names = {t: f"{topic_name}.{t}" for t in ("latents", "summaries", "deadletter")}
    topics.create_topics(kafka_bootstrap, list(names.values()), partitions=partitions)
    return EpisodicConfig(bootstrap=kafka_bootstrap, store_uri=str(store), key_file=key_file, checkpoint=checkpoint,
                          batch_size=4, until_idle=True, group=f"{topic_name}.group",
                          **{f"{t}_topic": n for t, n in names.items()}, **kw)


@pytest.fixture
def env(kafka_bootstrap, topic_name, tmp_path, checkpoint, key_file) -> EpisodicConfig:
    return make_config(kafka_bootstrap, topic_name, tmp_path / "episodic", checkpoint, key_file)


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


def prism(config: EpisodicConfig):
    return run(config, runners.prism_options(streaming=False))


def expected_windows(n: int, closed: bool = True) -> list[tuple[int, int, int, str]]:
    """(window, seq_start, seq_end, cut) of a session of n latents; a closed one ends in its close
    (a record with no latents when n fills its last window)."""
    out = [(i, i * WINDOW, (i + 1) * WINDOW, "full") for i in range(n // WINDOW)]
    if n % WINDOW or closed:
        out.append((n // WINDOW, n // WINDOW * WINDOW, n, "close"))
    return out


def keyring(config: EpisodicConfig) -> KeyRing:
    return KeyRing([config.signing_key()])


def assert_complete(config: EpisodicConfig, sessions: dict[str, int], store: EpisodicStore | None = None):
    """Every window exactly once in the store and (committed) on the topic, every chain
    verifies, every latent accounted for."""
    store = store or config.store()
    stored_hashes = {r.hash for sid in sessions for r in store.records(sid)}
    deadline = time.monotonic() + 90
    while True:
        # read_committed: a transaction a killed worker left open hides what follows it on the
        # topic until the broker aborts it (the producers' transaction timeout)
        on_topic = read_summaries(config.bootstrap, topic=config.summaries_topic)
        if stored_hashes <= {r.hash for r in on_topic} or time.monotonic() > deadline:
            break
        time.sleep(2)
    for sid, n in sessions.items():
        stored = store.records(sid)
        assert [(r.window_index, r.seq_start, r.seq_end, r.cut) for r in stored] == expected_windows(n), sid
        report = verify_chain(sid, stored, keyring(config))
        assert report.ok, report.fault
        from_topic = [r for r in on_topic if r.session_id == sid]
        assert {r.hash for r in from_topic} == {r.hash for r in stored}  # no fork, nothing missing
        topic_report = verify_chain(sid, from_topic, keyring(config))
        assert topic_report.ok, topic_report.fault
        assert topic_report.records == len(stored)
        assert topic_report.duplicates == 0 and len(from_topic) == len(stored), sid


def committed(config: EpisodicConfig) -> dict[int, int]:
    c = KafkaConsumer(bootstrap_servers=config.bootstrap, group_id=config.group, enable_auto_commit=False)
    try:
        tps = [TopicPartition(config.latents_topic, p) for p in sorted(c.partitions_for_topic(config.latents_topic))]
        # an empty partition has nothing to commit: it counts as committed at 0
        return {tp.partition: (c.committed(tp) or 0, c.end_offsets([tp])[tp]) for tp in tps}
    finally:
        c.close()


def dead_letters(config: EpisodicConfig) -> list[DeadLetterRecord]:
    c = KafkaConsumer(config.deadletter_topic, bootstrap_servers=config.bootstrap, auto_offset_reset="earliest",
                      consumer_timeout_ms=4000, isolation_level="read_committed", max_partition_fetch_bytes=64 << 20)
    try:
        return [DeadLetterRecord.from_json(m.value) for m in c]
    finally:
        c.close()


# -- windows, chains, restarts --------------------------------------------------------------------

def test_windows_chains_and_a_restart_reads_nothing_again(env):
    sessions = {"s1": 2 * WINDOW + 1000, "s2": 5000, "s3": WINDOW}
    publish(env, sessions)
    prism(env)
    assert_complete(env, sessions)
    assert all(c == end for c, end in committed(env).values())  # every partition committed to its end
    before = env.store().count()
    prism(env)  # a restart: nothing to read, nothing made twice
    assert_complete(env, sessions) and env.store().count() == before
    tokens = np.frombuffer(env.store().records("s1")[0].tokens, "<f2").reshape(256, 384)
    assert np.isfinite(tokens).all() and tokens.astype(np.float32).std() > 0


def test_an_open_window_holds_the_commit_and_a_restart_resumes_it(env):
    producer = b"\x05" * 16  # a producer that stays on: the session is not closed yet
    x = np.random.default_rng(5).standard_normal((WINDOW + 800, 384)).astype(np.float32)
    _raw(env, [(b"open", _open("open", producer))] +
         [(b"open", _chunk(i, x[i:min(i + 700, WINDOW + 500)], producer)) for i in range(0, WINDOW + 500, 700)])
    prism(env)
    stored = env.store().records("open")
    assert [(r.seq_start, r.seq_end, r.cut) for r in stored] == [(0, WINDOW, "full")]
    # The 500 latents of the open window are not in a stored window: a restart must read them again.
    assert committed(env)[0][0] < committed(env)[0][1]
    _raw(env, [(b"open", _chunk(WINDOW + 500, x[WINDOW + 500:], producer)),
               (b"open", encode_event(SessionEvent(1, "close", "open", producer, None, None, WINDOW + 800, 9)))])
    prism(env)  # resumed from the stored head and from the committed offset
    assert_complete(env, {"open": WINDOW + 800})
    assert all(c == end for c, end in committed(env).values())
    tokens = env.store().records("open")[1].token_array()
    assert tokens.shape == (256, 384) and np.isfinite(tokens).all()


def test_s3_store(env, s3_config, s3_prefix):
    config = dataclasses.replace(env, store_uri=s3_config.uri(s3_prefix, "episodic"),
                                 storage_options=s3_config.storage_options())
    sessions = {"a": WINDOW + 10}
    publish(config, sessions)
    prism(config)
    assert_complete(config, sessions)


def test_the_horizon_keeps_the_latest_summaries(env):
    config = dataclasses.replace(env, horizon=2)
    sessions = {"long": 5 * WINDOW}
    publish(config, sessions, chunk=WINDOW)
    prism(config)
    stored = config.store().records("long")
    assert [r.window_index for r in stored] == [4, 5]  # window 5: the close, with no latents
    assert verify_chain("long", stored, keyring(config), anchored=False).ok
    whole = read_summaries(config.bootstrap, "long", topic=config.summaries_topic)  # the topic has them all
    assert [r.window_index for r in whole] == [0, 1, 2, 3, 4, 5] and verify_chain("long", whole, keyring(config)).ok


def test_a_replay_makes_byte_identical_summaries(env, tmp_path):
    sessions = {"d1": 2 * WINDOW + 77, "d2": 3000}
    publish(env, sessions)
    prism(env)
    again = dataclasses.replace(env, store_uri=str(tmp_path / "replayed"), group=env.group + ".replay",
                                summaries_topic=env.summaries_topic + ".replay")
    topics.create_topics(env.bootstrap, [again.summaries_topic], partitions=2)
    prism(again)  # the same input, another store and group: from the start of the topic
    for sid in sessions:
        first, second = env.store().records(sid), again.store().records(sid)
        assert first == second and len(first) == len(expected_windows(sessions[sid]))


# -- bad input ------------------------------------------------------------------------------------

def _raw(config: EpisodicConfig, records: list[tuple[bytes, bytes]]) -> None:
    producer = KafkaProducer(bootstrap_servers=config.bootstrap, max_request_size=16 << 20)
    for key, value in records:
        producer.send(config.latents_topic, key=key, value=value, partition=0)
    producer.flush()
    producer.close()


def _open(session: str, producer: bytes) -> bytes:
    return encode_event(SessionEvent(1, "open", session, producer, None, None, 0, 1))


def _chunk(first: int, x: np.ndarray, producer: bytes, dtype: DType = DType.fp32) -> bytes:
    raw = x.astype({DType.fp32: "<f4", DType.fp16: "<f2"}[dtype])
    return encode_chunk(producer_id=producer, dtype=dtype, dim=x.shape[1], count=len(x), first_seq=first,
                        event_time_us=1, payload=raw.tobytes())


def test_poison_sessions_go_to_the_dead_letters_and_the_others_complete(kafka_bootstrap, topic_name, tmp_path,
                                                                         checkpoint, key_file):
    env = make_config(kafka_bootstrap, topic_name, tmp_path / "episodic", checkpoint, key_file, partitions=1)
    rng = np.random.default_rng(3)
    p, other = b"\x01" * 16, b"\x02" * 16
    x = rng.standard_normal((700, 384)).astype(np.float32)
    poison = {
        "width": [_open("width", p), _chunk(0, rng.standard_normal((50, 17)).astype(np.float32), p)],
        "seq": [_open("seq", p), _chunk(0, x[:10], p), _chunk(2**63 - 5, x[:10], p)],
        "overflow": [_open("overflow", p), _chunk(0, np.full((10, 384), 3e30, np.float32), p)],
        "foreign": [_open("foreign", p), _chunk(0, x[:20], p), _chunk(20, x[:20], other)],
        "conflict": [_open("conflict", p), _chunk(0, x[:20], p), _chunk(0, x[20:40], p)],
        "wide": [_open("wide", p), _chunk(0, np.zeros((1, 120_000), np.float32), p, DType.fp16)],
    }
    reasons = {"width": "operator_width", "seq": "out_of_range", "overflow": "out_of_range",
               "foreign": "foreign_producer", "conflict": "conflicting_content", "wide": "window_too_large"}
    publish(env, {"good-a": WINDOW + 300})  # good sessions before and after the poison, same partition
    _raw(env, [(sid.encode(), v) for sid, values in poison.items() for v in values])
    _raw(env, [(b"\xff\xfe", b"MSLT whatever"), (b"ghost", b"not a memstream record")])
    publish(env, {"good-b": 2 * WINDOW})
    prism(env)
    assert_complete(env, {"good-a": WINDOW + 300, "good-b": 2 * WINDOW})
    letters = dead_letters(env)
    by_key = {}
    for d in letters:
        by_key.setdefault(d.key, []).append(d)
    for sid, reason in reasons.items():
        got = [d.reason.value for d in by_key.get(sid.encode(), [])]
        assert got == [reason], (sid, got)
        d = by_key[sid.encode()][0]
        assert d.value == poison[sid][-1] and d.message and d.topic == env.latents_topic  # the original bytes
    assert sorted(d.reason.value for d in letters if d.key in (b"\xff\xfe", b"ghost")) == ["bad_key", "bad_magic"]
    # The poison sessions stay open (nothing of them is stored), so a restart reads from their
    # open events again: it sends none of their dead letters twice, and makes nothing new.
    prism(env)
    assert sorted((d.key, d.offset) for d in dead_letters(env)) == sorted((d.key, d.offset) for d in letters)
    assert_complete(env, {"good-a": WINDOW + 300, "good-b": 2 * WINDOW})


# -- collected sessions, crashes, fencing ---------------------------------------------------------

def test_a_collected_session_is_never_summarised_again(env, tmp_path):
    from memstream.maintenance.episodic import collect_sessions

    publish(env, {"gone": WINDOW + 10, "kept": WINDOW})
    prism(env)
    key = SigningKey.generate()
    out = collect_sessions(env.store_uri, retention_s=3600 * 24 * 365 * 100, key=key, closed=["gone"],
                           require_consolidation=False)  # what GC does after consolidation is not this test's point
    assert out["collected"] == ["gone"] and env.store().records("gone") == []
    replay = dataclasses.replace(env, start="earliest")  # every record read again, from the start
    prism(replay)
    assert env.store().records("gone") == [] and len(env.store().records("kept")) == 2
    reasons = {d.reason.value for d in dead_letters(env) if d.key == b"gone"}
    assert reasons == {"collected_session"}


def _cli(config: EpisodicConfig, log: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "memstream.cli", "run", "--runner", "prism", "--bootstrap", config.bootstrap,
           "--episodic", config.store_uri, "--key-file", config.key_file, "--checkpoint", config.checkpoint,
           "--batch-size", str(config.batch_size), "--latents-topic", config.latents_topic,
           "--summaries-topic", config.summaries_topic, "--deadletter-topic", config.deadletter_topic,
           "--group", config.group, *extra]
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})


def _published(config: EpisodicConfig, sessions: dict[str, int]) -> bool:
    """Every window of every session stored, and marked as sent to Kafka."""
    store = config.store()
    return all(len(store.records(s)) == len(expected_windows(n)) and not store.unpublished(s)
               for s, n in sessions.items())


def _wait_for(config: EpisodicConfig, sessions: dict[str, int], proc: subprocess.Popen, log: Path,
              timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not _published(config, sessions):
        assert time.monotonic() < deadline, f"not stored and sent in {timeout}s:\n{process.tail(log, 30)}"
        assert proc.poll() is None, process.tail(log, 30)
        time.sleep(1)


def _kill9(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)  # the pipeline and its Prism runner, mid-whatever
    proc.wait(timeout=30)
    process.stop_pid(proc.pid, timeout=5)


def _stop(proc: subprocess.Popen) -> int:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    finally:
        process.stop_pid(proc.pid, timeout=5)


@pytest.mark.parametrize("crash_at", ["after-store", "after-transaction"])
def test_a_crash_between_the_store_and_kafka_publishes_after_the_restart(env, tmp_path, crash_at):
    """Killed after the store write (nothing sent) or after the transaction (sent, not marked
    in the store): either way the restart leaves every window on the topic exactly once."""
    publish(env, {"c": WINDOW + 5})
    log = tmp_path / "pipeline.log"
    crashed = _cli(env, log, "--until-idle", env={"MEMSTREAM_CRASH_AT": crash_at, "MEMSTREAM_CRASH_GROUP": "1"})
    assert crashed.wait(timeout=300) == -signal.SIGKILL, process.tail(log, 30)
    process.stop_pid(crashed.pid, timeout=5)
    stored = env.store().records("c")
    sent = [r for r in read_summaries(env.bootstrap, topic=env.summaries_topic) if r.session_id == "c"]
    assert stored and env.store().unpublished("c")
    assert env.store().unpublished_windows("c") == [r.window_index for r in env.store().unpublished("c")]
    assert len(sent) == (0 if crash_at == "after-store" else len(stored))
    drain = _cli(env, log, "--until-idle")
    assert drain.wait(timeout=300) == 0, process.tail(log, 30)
    assert_complete(env, {"c": WINDOW + 5})
    assert not env.store().unpublished("c")


def test_a_job_restored_in_place_publishes_what_its_killed_attempt_stored(env, tmp_path):
    """Flink restores a job in place when a worker dies, so run()'s start-up republish does not
    happen: the job itself must send what the dead attempt stored and never sent. The job here
    is built and run without run(), as a restored one runs (found by the Flink worker-kill test,
    where such summaries stayed unsent for good)."""
    from memstream.pipelines.episodic import build

    publish(env, {"r": WINDOW + 5})
    log = tmp_path / "pipeline.log"
    crashed = _cli(env, log, "--until-idle", env={"MEMSTREAM_CRASH_AT": "after-store", "MEMSTREAM_CRASH_GROUP": "1"})
    assert crashed.wait(timeout=300) == -signal.SIGKILL, process.tail(log, 30)
    process.stop_pid(crashed.pid, timeout=5)
    assert env.store().unpublished("r")
    restored = dataclasses.replace(env, epoch=env.store().current_epoch(env.group))  # the same job, not a newer one
    p = beam.Pipeline(options=beam.options.pipeline_options.PipelineOptions(runners.prism_options(streaming=False)))
    build(p, restored)
    assert "DONE" in str(p.run().wait_until_finish())
    assert not env.store().unpublished("r")
    assert_complete(env, {"r": WINDOW + 5})


def test_two_instances_at_once_never_fork_and_the_older_stops(env, tmp_path):
    log = tmp_path / "pipeline.log"
    first = _cli(env, log, "--discover-seconds", "2")
    publish(env, {"t1": WINDOW + 100})
    _wait_for(env, {"t1": WINDOW + 100}, first, log)
    second = _cli(env, log, "--discover-seconds", "2")  # takes over: a newer epoch, the same transactional ids
    time.sleep(10)
    publish(env, {"t2": 2 * WINDOW, "t3": 700})
    try:
        assert first.wait(timeout=240) != 0, "the older instance kept running"
        assert "FencedError" in log.read_text()
        _wait_for(env, {"t1": WINDOW + 100, "t2": 2 * WINDOW, "t3": 700}, second, log)
    finally:
        if first.poll() is None:
            _kill9(first)
        _stop(second)
    assert_complete(env, {"t1": WINDOW + 100, "t2": 2 * WINDOW, "t3": 700})


def test_an_idle_instance_stops_once_a_newer_one_claims_the_group(env, tmp_path):
    """Nothing left to commit, so no bundle reaches Commit's epoch check: the instance still stops
    (a newer one that starts after the older has drained its input)."""
    log = tmp_path / "pipeline.log"
    first = _cli(env, log, "--discover-seconds", "2")
    try:
        publish(env, {"i1": 700})
        _wait_for(env, {"i1": 700}, first, log)
        env.store().claim_epoch(env.group)  # what a newer instance does first at start-up
        assert first.wait(timeout=60) != 0, "the idle older instance kept running"
        assert "FencedError" in log.read_text()
    finally:
        if first.poll() is None:
            _kill9(first)
    assert_complete(env, {"i1": 700})


def _scrape(port: int) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        lines = r.read().decode().splitlines()
    return {name: float(value) for name, value in (ln.rsplit(" ", 1) for ln in lines if not ln.startswith("#"))}


def test_new_partitions_are_read_while_the_pipeline_runs_and_metrics_are_served(env, tmp_path):
    from memstream.infra.tools import free_port

    log, port = tmp_path / "pipeline.log", free_port()
    proc = _cli(env, log, "--discover-seconds", "2", "--metrics-port", str(port))
    try:
        admin = KafkaAdminClient(bootstrap_servers=env.bootstrap)
        admin.create_partitions({env.latents_topic: NewPartitions(total_count=4)})
        admin.close()
        time.sleep(6)
        sessions = {f"np{i}": 1000 for i in range(12)}  # hashed over four partitions now
        publish(env, sessions)
        _raw(env, [(b"np-bad", b"not a latent chunk")])
        _wait_for(env, sessions, proc, log)
        assert {p for p, (c, end) in committed(env).items() if end} >= {2, 3}  # the new ones were read
        deadline = time.monotonic() + 60
        while True:  # Beam reports metrics a little after the work; lag reaches 0 once offsets commit
            m = _scrape(port)
            lags = {k: v for k, v in m.items() if k.startswith("memstream_consumer_lag{")}
            if (len(lags) == 4 and not any(lags.values()) and m["memstream_windows_cut_total"] >= 12
                    and m.get('memstream_dead_letters_total{reason="bad_magic"}') == 1
                    and m["memstream_summaries_stored_total"] >= 12 and m["memstream_records_total"] >= 25):
                break
            assert time.monotonic() < deadline, json.dumps(m)
            time.sleep(2)
        assert m["memstream_operator_ms_count"] >= 1 and m["memstream_sink_ms_count"] >= 1
    finally:
        _stop(proc)
    assert_complete(env, sessions)


# -- verification ---------------------------------------------------------------------------------

def test_verify_catches_a_flipped_byte_in_any_field(env):
    publish(env, {"v": 2 * WINDOW + 1})
    prism(env)
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
    prism(env)
    records = env.store().records("c")
    cli = [sys.executable, "-m", "memstream.cli", "verify", "chain", "--session", "c",
           "--bootstrap", env.bootstrap, "--topic", env.summaries_topic, "--key-file", env.key_file, "--json"]
    ok = subprocess.run(cli, capture_output=True, text=True)
    assert ok.returncode == 0 and '"ok": true' in ok.stdout, ok.stderr
    at = (records[1].event_time_us + 0.5) / 1e6
    then = subprocess.run(cli + ["--at", str(at)], capture_output=True, text=True)
    assert then.returncode == 0, then.stderr
    assert json.loads(then.stdout)["head_at"]["window"] == 1
    other = tmp_path / "new.pem"
    new_key = SigningKey.generate()
    write_key_file(other, new_key, "validator")
    resigned = seal(dataclasses.replace(records[2], key_id=""), new_key)  # rotation: both verify by key id
    ring = KeyRing([env.signing_key(), new_key])
    assert verify_chain("c", records[:2] + [resigned], ring).ok
    assert not verify_chain("c", records[:2] + [resigned], KeyRing([env.signing_key()])).ok


def test_lost_keyed_state_is_detected_not_cut(env):
    """A session whose state is empty although this run already read its records: the step that
    cuts windows refuses (the bundle fails and runs again) rather than call it a gap."""
    from memstream.errors import StateLostError
    from memstream.pipelines.episodic import CutWindows, Entry
    from memstream.wire.codec import decode

    publish(env, {"lost": 2000})
    c = KafkaConsumer(bootstrap_servers=env.bootstrap, enable_auto_commit=False, consumer_timeout_ms=3000,
                      max_partition_fetch_bytes=16 << 20)
    parts = [TopicPartition(env.latents_topic, p) for p in sorted(c.partitions_for_topic(env.latents_topic))]
    c.assign(parts)
    c.seek_to_beginning(*parts)
    mine = [m for m in c if m.key == b"lost"]
    c.close()
    fn = CutWindows(env)
    fn.setup()
    later = mine[2]  # a chunk after the open event and the first chunk
    entry = Entry(later.partition, later.offset, later.offset, 0, later.timestamp,
                  decode(later.key, later.value).meta())
    with pytest.raises(StateLostError, match="lost or forked"):
        fn._check_not_lost("lost", entry)
    first = mine[0]  # the open event itself: nothing of the session came before it
    fn._check_not_lost("lost", Entry(first.partition, first.offset, first.offset, 0, first.timestamp,
                                     decode(first.key, first.value)))


class _Bag:
    """Beam's bag state, in memory: CutWindows' own logic, without a runner."""

    def __init__(self):
        self.items = []

    def add(self, x):
        self.items.append(x)

    def read(self):
        return list(self.items)

    def clear(self):
        self.items = []


class _Value:
    """Beam's value state and timer, in memory."""

    def __init__(self):
        self.value = self.at = None

    def read(self):
        return self.value

    def write(self, v):
        self.value = v

    def clear(self):
        self.value = None

    def set(self, ts):
        self.at = ts


def test_a_sessions_records_are_cut_in_offset_order_whatever_order_they_arrive_in(tmp_path, key_file):
    """Beam may hand a key's elements over in another order than the source read them: the
    records wait for the watermark, and the windows are those of the records in offset order."""
    from apache_beam.utils.timestamp import Timestamp

    from memstream.pipelines.episodic import CutWindows, Entry
    from memstream.wire.codec import decode

    config = EpisodicConfig(bootstrap="127.0.0.1:9", store_uri=str(tmp_path / "episodic"), key_file=key_file,
                            window=100, until_idle=True)
    producer = b"\x05" * 16
    values = [encode_event(SessionEvent(1, "open", "o", producer, None, None, 0, 1))]
    values += [encode_chunk(producer_id=producer, dtype=DType.fp32, dim=4, count=30, first_seq=i * 30,
                            event_time_us=2 + i, payload=np.zeros((30, 4), np.float32).tobytes()) for i in range(9)]
    entries = [(1000 + i, Entry(0, i, i, 0, 1000 + i, decode(b"o", v) if i == 0 else decode(b"o", v).meta()))
               for i, v in enumerate(values)]

    def cut(order: list[int], fire_every: int) -> list[tuple]:
        fn = CutWindows(config)
        fn.setup()
        cutter, start, pending, timer, idle = _Value(), _Value(), _Bag(), _Value(), _Value()
        out = []
        for n, i in enumerate(order, 1):
            ts, entry = entries[i]
            fn.process(("o", entry), Timestamp(micros=ts), pending, timer)
            if n % fire_every == 0 or n == len(order):
                # the watermark has passed only what every earlier offset's timestamp allows
                seen = sorted(order[:n])
                upto = next((k for k in range(len(entries)) if k not in seen), len(entries)) - 1
                out += fn.on_order("o", Timestamp(micros=entries[upto][0]) if upto >= 0 else Timestamp(0),
                                   cutter, start, pending, timer, idle)
        out += fn.on_order("o", Timestamp(micros=10**15), cutter, start, pending, timer, idle)  # end of input
        return [(w.window_index, w.seq_start, w.seq_end, w.cut) for w, _ in
                (o for o in out if not isinstance(o, beam.pvalue.TaggedOutput))]

    in_order = cut(list(range(len(entries))), 1)
    assert in_order == [(0, 0, 100, "full"), (1, 100, 200, "full")]
    rng = random.Random(5)
    for _ in range(5):
        shuffled = list(range(len(entries)))
        rng.shuffle(shuffled)
        assert cut(shuffled, 3) == in_order, shuffled


# -- faults ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_20_kills_and_a_broker_restart_lose_and_duplicate_nothing(env, stack, tmp_path):
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
                            handles[sid].publish(data[sid][offsets[sid]:offsets[sid] + 300])
                            offsets[sid] += 300
                    time.sleep(0.25)
                for h in handles.values():
                    h.close()
        except BaseException as e:  # surfaced in the test thread below
            publisher_error.append(e)

    log = tmp_path / "pipeline.log"
    publisher = threading.Thread(target=publish_slowly)
    publisher.start()
    rng = random.Random(3)
    pipeline = _cli(env, log)
    try:
        for round_ in range(20):
            time.sleep(rng.uniform(3, 9))  # start-up takes a few seconds: some kills land in it
            _kill9(pipeline)
            if round_ == 7:
                stack.restart("kafka")  # the broker goes away and comes back mid-stream
            pipeline = _cli(env, log)
        publisher.join(timeout=300)
        assert not publisher.is_alive() and not publisher_error, publisher_error
    finally:
        _kill9(pipeline)
    drain = _cli(env, log, "--until-idle")
    assert drain.wait(timeout=600) == 0, process.tail(log, 40)
    assert_complete(env, sessions)
    on_topic = [r for r in read_summaries(env.bootstrap, topic=env.summaries_topic)]
    assert len({(r.session_id, r.window_index) for r in on_topic}) == sum(len(expected_windows(n))
                                                                       for n in sessions.values())


@pytest.fixture
def private_flink(tmp_path):
    """A Flink job server of the test's own: the job whose worker it kills keeps restarting on
    the server after the test, and must not starve the next test's job of the cores."""
    svc = runners.start_flink(tmp_path / "flink")
    try:
        yield svc.endpoints["job_endpoint"]
    finally:
        process.stop_pid(svc.pid, timeout=30)


@pytest.mark.flink
def test_flink_parallelism_2_with_a_worker_killed(kafka_bootstrap, topic_name, tmp_path, checkpoint, key_file,
                                                  private_flink, worker_pool):
    flink_job_endpoint = private_flink
    env = make_config(kafka_bootstrap, topic_name, tmp_path / "episodic", checkpoint, key_file, partitions=8)
    sessions = {f"k{i}": WINDOW + 211 * i for i in range(16)}
    log = tmp_path / "pipeline.log"
    cmd = [sys.executable, "-m", "memstream.cli", "run", "--runner", "flink", "--job-endpoint", flink_job_endpoint,
           "--parallelism", "2", "--environment", f"EXTERNAL={worker_pool}", "--bootstrap", env.bootstrap,
           "--episodic", env.store_uri, "--key-file", env.key_file, "--checkpoint", env.checkpoint,
           "--latents-topic", env.latents_topic, "--summaries-topic", env.summaries_topic,
           "--deadletter-topic", env.deadletter_topic, "--group", env.group, "--discover-seconds", "5"]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        publish(env, dict(list(sessions.items())[:8]))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and env.store().count() < 4:
            assert proc.poll() is None, process.tail(log, 40)
            time.sleep(2)
        # Before any kill: a job that never got going is a different failure from a lost restore.
        assert env.store().count() >= 4, f"no summary stored before the kill: {_progress(env, sessions)}"
        workers = [p for p in process.descendants(_pool_pid(worker_pool)) if "SdkHarness" in _cmdline(p)]
        assert len(workers) >= 2, workers  # at least two SDK workers serve the job
        os.kill(workers[0], signal.SIGKILL)  # a worker dies mid-run; Flink restores from its checkpoint
        publish(env, dict(list(sessions.items())[8:]), seed=1)
        while time.monotonic() < deadline and not _published(env, sessions):
            assert proc.poll() is None, process.tail(log, 40)
            time.sleep(3)
        assert _published(env, sessions), _progress(env, sessions)
    finally:
        _stop(proc)
    assert_complete(env, sessions)


def _progress(config: EpisodicConfig, sessions: dict[str, int]) -> str:
    """Where each unfinished session stands: what a timed-out wait says."""
    store = config.store()
    return "; ".join(f"{s}: {len(store.records(s))}/{len(expected_windows(n))} stored, "
                     f"{len(store.unpublished(s))} unpublished" for s, n in sessions.items()
                     if len(store.records(s)) != len(expected_windows(n)) or store.unpublished(s))


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
    except OSError:
        return ""


def _pool_pid(endpoint: str) -> int:
    port = endpoint.rsplit(":", 1)[1]
    found = [int(p) for p in os.listdir("/proc") if p.isdigit() and "worker_pool_main" in _cmdline(int(p))
             and port in _cmdline(int(p))]
    assert found, f"no worker pool on {endpoint}"
    return found[0]
