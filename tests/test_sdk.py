"""Publisher, CLI and dead-letter handling against the real broker (tests/conftest.py starts it)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import torch
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType
from kafka.partitioner.default import murmur2

from memstream import Publisher, errors
from memstream.cli import main
from memstream.wire.codec import LatentChunk, encode_chunk
from memstream.schemas.records import DeadLetterReason, DeadLetterRecord, DType, SessionEvent
from memstream.topics import create_topics
from memstream.topics import write_dead_letters
from memstream.wire.validation import StreamValidator, Verdict

PARTITIONS = 4


@pytest.fixture
def topic(kafka_bootstrap, topic_name) -> str:
    create_topics(kafka_bootstrap, [topic_name], partitions=PARTITIONS)
    return topic_name


def read_all(bootstrap: str, topic: str) -> list:
    """Every record of the topic, in partition order, up to the end offsets at call time."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             max_partition_fetch_bytes=32 << 20, fetch_max_bytes=64 << 20)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        ends = consumer.end_offsets(parts)
        out = []
        while any(consumer.position(tp) < ends[tp] for tp in parts):
            for batch in consumer.poll(timeout_ms=1000).values():
                out.extend(batch)
        return sorted(out, key=lambda m: (m.partition, m.offset))
    finally:
        consumer.close()


def validated(bootstrap: str, topic: str) -> tuple[dict[str, list], list]:
    """Records of each session in order after validation, and the dead-letter records."""
    sv, sessions, dead = StreamValidator(), defaultdict(list), []
    for msg in read_all(bootstrap, topic):
        outcome = sv.process(msg)
        if outcome.verdict is Verdict.ACCEPTED:
            sessions[outcome.record.session_id].append(outcome.record)
        elif outcome.verdict is Verdict.DEAD_LETTER:
            dead.append(outcome.dead_letter)
    return sessions, dead


def latents_of(records) -> np.ndarray:
    return np.concatenate([r.to_float32() for r in records if isinstance(r, LatentChunk)])


def test_round_trip_every_dtype(kafka_bootstrap, topic):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 384)).astype(np.float32)
    bf = torch.from_numpy(x).to(torch.bfloat16)
    # session: (what is published, session dtype, wire dtype expected, float32 values expected)
    cases = {"fp32": (x, None, DType.fp32, x),
             "fp16": (x.astype(np.float16), None, DType.fp16, x.astype(np.float16).astype(np.float32)),
             "bf16": (bf, None, DType.bf16, bf.float().numpy()),
             "fp32-as-bf16": (x, "bf16", DType.bf16, bf.float().numpy()),
             "fp32-torch": (torch.from_numpy(x), None, DType.fp32, x)}
    with Publisher(kafka_bootstrap, topic=topic, max_chunk_bytes=64 << 10) as pub:
        for name, (data, dtype, _, _) in cases.items():
            with pub.session(name, dtype=dtype) as s:
                s.publish(data[:100])
                s.publish(data[100:])
    sessions, dead = validated(kafka_bootstrap, topic)
    assert not dead
    for name, (_, _, wire, want) in cases.items():
        records = sessions[name]
        assert [r.kind for r in records if isinstance(r, SessionEvent)] == ["open", "close"]
        chunks = [r for r in records if isinstance(r, LatentChunk)]
        assert all(c.dtype is wire for c in chunks)
        assert all(len(c.payload) + 52 <= 64 << 10 for c in chunks) and len(chunks) > 2
        np.testing.assert_array_equal(latents_of(records), want)  # bit-exact, bf16 included
        assert records[-1].latents == 300


def test_per_session_order_and_partition_stability(kafka_bootstrap, topic):
    ids = [f"user-{i}" for i in range(8)]
    rng = np.random.default_rng(1)
    sent = defaultdict(list)
    for round_ in range(2):  # two publishers: the same key lands in the same partition
        with Publisher(kafka_bootstrap, topic=topic, max_chunk_bytes=8 << 10) as pub:
            sessions = {i: pub.session(f"{i}/{round_}") for i in ids}
            for _ in range(5):  # interleave the sessions
                for i in ids:
                    x = rng.standard_normal((int(rng.integers(1, 30)), 64)).astype(np.float32)
                    sessions[i].publish(x)
                    sent[f"{i}/{round_}"].append(x)
    msgs = read_all(kafka_bootstrap, topic)
    partitions = defaultdict(set)
    for m in msgs:
        partitions[m.key.decode()].add(m.partition)
    for sid in sent:
        assert partitions[sid] == {(murmur2(sid.encode()) & 0x7FFFFFFF) % PARTITIONS}
    sessions, dead = validated(kafka_bootstrap, topic)
    assert not dead
    for sid, parts in sent.items():
        chunks = [r for r in sessions[sid] if isinstance(r, LatentChunk)]
        assert [c.first_seq for c in chunks] == sorted(c.first_seq for c in chunks)
        np.testing.assert_array_equal(latents_of(chunks), np.concatenate(parts))


def test_session_lifecycle_and_user_errors(kafka_bootstrap, topic):
    x = np.ones((4, 16), np.float32)
    with Publisher(kafka_bootstrap, topic=topic) as pub:
        empty = pub.session("empty")
        empty.close()
        empty.close()  # idempotent
        with pytest.raises(errors.ClosedSessionError):
            empty.publish(x)
        with pytest.raises(errors.ClosedSessionError):
            pub.session("empty")
        s = pub.session("s", dim=16)
        with pytest.raises(errors.SessionInUseError):
            pub.session("s")
        cases = [(x[0], errors.ShapeError), (x[:, :0], errors.ShapeError),
                 (x.astype(np.float64), errors.UnsupportedDTypeError),
                 (torch.ones(2, 16, dtype=torch.int32), errors.UnsupportedDTypeError),
                 ([[1.0]], errors.UnsupportedDTypeError), (np.ones((2, 8), np.float32), errors.DimMismatchError)]
        for bad, error in cases:
            with pytest.raises(error):
                s.publish(bad)
        s.publish(x)
        with pytest.raises(errors.DTypeMismatchError):
            s.publish(x.astype(np.float16))
        nan = x.copy()
        nan[3, 5] = np.nan
        with pytest.raises(errors.NonFiniteError):
            s.publish(nan)
        assert s.publish(np.zeros((0, 16), np.float32)).count == 0
        with pytest.raises(errors.ChunkLimitError):
            pub.session("wide").publish(np.ones((1, 300_000), np.float32))
        with pytest.raises(errors.UnsupportedDTypeError):
            pub.session("x", dtype="int8")
        with pytest.raises(errors.BadKeyError):
            pub.session("")
        assert pub.stats.latents == 4
    with pytest.raises(errors.ClosedSessionError):
        pub.session("after")
    with pytest.raises(errors.ChunkLimitError):
        Publisher(kafka_bootstrap, topic=topic, max_chunk_bytes=16 << 20)
    with pytest.raises(errors.ConfigError, match="delivery_timeout_ms"):
        Publisher(kafka_bootstrap, topic=topic, delivery_timeout_ms=10)
    with pytest.raises(errors.TopicMissingError, match="memstream topics create"):
        Publisher(kafka_bootstrap, topic=topic + "-missing", metadata_timeout_ms=1500)
    sessions, dead = validated(kafka_bootstrap, topic)
    assert not dead  # nothing invalid reached the broker
    assert [(type(r).__name__, getattr(r, "kind", None)) for r in sessions["empty"]] == [
        ("SessionEvent", "open"), ("SessionEvent", "close")]
    assert [getattr(r, "kind", "chunk") for r in sessions["s"]] == ["open", "chunk", "close"]
    assert sessions["s"][-1].latents == 4 and sessions["wide"][-1].latents == 0


def test_back_pressure_bounds_bytes_in_flight(kafka_bootstrap, topic):
    chunk_bytes = 32 << 10
    with Publisher(kafka_bootstrap, topic=topic, max_chunk_bytes=chunk_bytes,
                   max_in_flight_bytes=3 * chunk_bytes, linger_ms=50) as pub:
        with pub.session("bp") as s:
            peak = 0
            for _ in range(40):
                s.publish(np.ones((40, 384), np.float32))  # about two chunks per call
                peak = max(peak, pub.in_flight_bytes)
                assert pub.in_flight_bytes <= 3 * chunk_bytes
        pub.flush()
        assert pub.in_flight_bytes == 0 and peak > chunk_bytes
    sessions, dead = validated(kafka_bootstrap, topic)
    assert not dead and sessions["bp"][-1].latents == 1600


def _chunk(first_seq: int, dim: int = 8, dtype: DType = DType.fp32, fill: float = 1.0, count: int = 2,
           producer: bytes = b"p" * 16) -> bytes:
    raw = np.full((count, dim), fill, np.float32)
    payload = raw.astype("<f2").tobytes() if dtype is DType.fp16 else raw.tobytes()
    return encode_chunk(producer_id=producer, dtype=dtype, dim=dim, count=count, first_seq=first_seq,
                        event_time_us=1, payload=payload)


def _event(sid: str, kind: str = "open", latents: int = 0) -> bytes:
    from memstream.wire.codec import encode_event

    return encode_event(SessionEvent(1, kind, sid, b"p" * 16, None, None, latents, 1))


# Every bad-input class as (key, value) records written straight to the broker, after setup records.
BAD_INPUTS = {
    DeadLetterReason.bad_key: [(b"\xc3\x28", _chunk(0))],
    DeadLetterReason.truncated: [(b"t", _chunk(0)[:-5])],
    DeadLetterReason.oversize: [(b"o", _chunk(0) + b"\0\0")],
    DeadLetterReason.bad_magic: [(b"m", b"hello world")],
    DeadLetterReason.unknown_version: [(b"v", b"MSLT\x07" + _chunk(0)[5:])],
    DeadLetterReason.unsupported_dtype: [(b"u", _chunk(0)[:5] + b"\x0c" + _chunk(0)[6:])],
    DeadLetterReason.bad_shape: [(b"z", encode_chunk(producer_id=b"p" * 16, dtype=DType.fp32, dim=0, count=2,
                                                     first_seq=0, event_time_us=1, payload=b""))],
    DeadLetterReason.checksum: [(b"c", _chunk(0)[:-1] + b"\x01")],
    DeadLetterReason.bad_event: [(b"e", b"MSSE\x01{}")],
    DeadLetterReason.non_finite: [(b"n", _event("n")), (b"n", _chunk(0, fill=float("inf")))],
    DeadLetterReason.dtype_mismatch: [(b"d", _event("d")), (b"d", _chunk(0)), (b"d", _chunk(2, dtype=DType.fp16))],
    DeadLetterReason.dim_mismatch: [(b"w", _event("w")), (b"w", _chunk(0)), (b"w", _chunk(2, dim=4))],
    DeadLetterReason.out_of_range: [(b"q", _event("q")), (b"q", _chunk(2**63 - 1))],
    DeadLetterReason.foreign_producer: [(b"f", _event("f")), (b"f", _chunk(0, producer=b"P" * 16))],
    DeadLetterReason.conflicting_content: [(b"c2", _event("c2")), (b"c2", _chunk(0)), (b"c2", _chunk(0, fill=2.0))],
    DeadLetterReason.reordered: [(b"r", _event("r")), (b"r", _chunk(0)), (b"r", _chunk(4)), (b"r", _chunk(2))],
    DeadLetterReason.unknown_session: [(b"k", _chunk(0))],
    DeadLetterReason.closed_session: [(b"x", _event("x")), (b"x", _event("x", "close")), (b"x", _chunk(0))],
    # Sealed under a data key this consumer has no key table for.
    DeadLetterReason.key_unavailable: [(b"s", _event("s")), (b"s", encode_chunk(
        producer_id=b"p" * 16, dtype=DType.fp32, dim=8, count=2, first_seq=0, event_time_us=1, payload=bytes(64),
        sealed_by=(b"s", b"k" * 16, b"K" * 32)))],
    # A gap is accepted (the latents were lost upstream), never dead-lettered.
    None: [(b"g", _event("g")), (b"g", _chunk(0)), (b"g", _chunk(6))],
}
# Found only by the pipeline, which knows the operator, the window and the store (tests/test_episodic.py,
# tests/test_forget.py).
PIPELINE_REASONS = {DeadLetterReason.operator_width, DeadLetterReason.window_too_large,
                    DeadLetterReason.collected_session, DeadLetterReason.key_destroyed}


def test_every_bad_input_is_dead_lettered(kafka_bootstrap, topic, topic_name):
    dlq = topic_name + "-dlq"
    create_topics(kafka_bootstrap, [dlq], partitions=1)
    raw = KafkaProducer(bootstrap_servers=kafka_bootstrap, max_request_size=1 << 20)
    for records in BAD_INPUTS.values():
        for key, value in records:
            raw.send(topic, key=key, value=value)
    # A producer retry that reached the broker twice: dropped, never dead-lettered.
    for value in [_event("ok"), _chunk(0), _chunk(0), _event("ok", "close", 2)]:
        raw.send(topic, key=b"ok", value=value)
    raw.flush()
    sv, dead, verdicts = StreamValidator(), [], defaultdict(list)
    for msg in read_all(kafka_bootstrap, topic):
        outcome = sv.process(msg)
        verdicts[msg.key].append(outcome.verdict)
        if outcome.dead_letter:
            dead.append((msg, outcome.dead_letter))
    assert verdicts[b"ok"] == [Verdict.ACCEPTED, Verdict.ACCEPTED, Verdict.DUPLICATE, Verdict.ACCEPTED]
    # Each class once: nothing else, and not the gap.
    assert verdicts[b"g"] == [Verdict.ACCEPTED, Verdict.ACCEPTED, Verdict.GAP]
    expected = sorted(set(DeadLetterReason) - PIPELINE_REASONS)
    assert sorted(d.reason for _, d in dead) == expected
    for msg, d in dead:
        assert (d.topic, d.partition, d.offset, d.key, d.value) == (msg.topic, msg.partition, msg.offset,
                                                                     msg.key, msg.value)
        assert d.message and d.timestamp_ms == msg.timestamp and d.value_size == len(msg.value)
    assert write_dead_letters(raw, [d for _, d in dead], topic=dlq) == len(expected)
    raw.close()
    stored = [DeadLetterRecord.from_json(m.value) for m in read_all(kafka_bootstrap, dlq)]
    assert sorted(stored, key=lambda d: d.offset) == sorted((d for _, d in dead), key=lambda d: d.offset)


def test_cli_topics_create_and_publish(kafka_bootstrap, topic_name, tmp_path, capsys):
    from safetensors.torch import save_file

    assert main(["topics", "create", topic_name, "--bootstrap", kafka_bootstrap, "--partitions", "2",
                 "--retention-hours", "1", "--max-message-bytes", str(4 << 20)]) == 0
    assert main(["topics", "create", topic_name, "--bootstrap", kafka_bootstrap]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{topic_name}: created", f"{topic_name}: exists"]
    x = np.random.default_rng(2).standard_normal((5000, 384)).astype(np.float32)
    np.save(tmp_path / "a.npy", x)
    save_file({"b": torch.from_numpy(x[:10]).to(torch.bfloat16)}, str(tmp_path / "b.safetensors"))
    text = tmp_path / "some.txt"
    text.write_text("Streams of memory carry the latents of a model, chunk by chunk, in order. " * 20)
    base = ["--bootstrap", kafka_bootstrap, "--topic", topic_name, "--no-progress"]
    assert main(["publish", str(tmp_path / "a.npy"), "--session", "npy", *base]) == 0
    assert "5000 latents" in capsys.readouterr().out
    assert main(["publish", str(tmp_path / "b.safetensors"), "--session", "st", *base]) == 0
    assert main(["publish", "--text", str(text), "--session", "s1", *base]) == 0
    summary = capsys.readouterr().out.splitlines()[-1]
    assert summary.startswith("session 's1'") and "latents/s" in summary
    assert main(["publish", str(tmp_path / "a.npy"), "--text", str(text), "--session", "z", *base]) == 2
    sessions, dead = validated(kafka_bootstrap, topic_name)
    assert not dead
    np.testing.assert_array_equal(latents_of(sessions["npy"]), x)
    assert sessions["st"][1].dtype is DType.bf16
    text_latents = latents_of(sessions["s1"])
    assert text_latents.shape[1] == 384 and text_latents.shape[0] == sessions["s1"][-1].latents > 100
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        configs = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic_name)])["topic"][topic_name]
    finally:
        admin.close()
    assert (configs["retention.ms"]["value"], configs["max.message.bytes"]["value"]) == ("3600000", str(4 << 20))


def test_rejected_delivery_raises_publish_error_and_stops_the_publisher(kafka_bootstrap, topic_name):
    create_topics(kafka_bootstrap, [topic_name], partitions=1, max_message_bytes=20_000)
    with pytest.raises(errors.PublishError, match="new session ids"):
        with Publisher(kafka_bootstrap, topic=topic_name, max_chunk_bytes=64 << 10) as pub:
            s = pub.session("big")
            s.publish(np.ones((40, 384), np.float32))  # one 61 KB chunk: the topic takes 20 KB
            with pytest.raises(errors.PublishError):
                pub.flush()
            with pytest.raises(errors.PublishError):  # later sends would leave a hole in the session
                s.publish(np.ones((1, 384), np.float32))
    assert pub.in_flight_bytes == 0  # leaving the `with` closed the publisher and reported the failure
