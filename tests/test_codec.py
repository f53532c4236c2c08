"""Decoder and validator without a broker: every bad-input class, idempotent duplicates, fuzzing."""

from __future__ import annotations

import dataclasses
import pickle
import struct

import numpy as np
import pytest

from memstream import errors
from memstream.wire.codec import LatentChunk, decode, encode_chunk, encode_event, float32_to_bf16_bits, to_float32
from memstream.schemas.records import HEADER_SIZE, DeadLetterReason, DType, SessionEvent
from memstream.wire.validation import SessionValidator, StreamValidator, Verdict

PID = bytes(range(16))
KEY = b"s1"


def chunk(first_seq=0, count=2, dim=4, dtype=DType.fp32, values=None, producer_id=PID, event_time_us=1) -> bytes:
    if values is None:
        values = np.arange(first_seq * dim, (first_seq + count) * dim, dtype=np.float32).reshape(count, dim)
    with np.errstate(over="ignore"):  # some cases want Inf on purpose
        raw = float32_to_bf16_bits(values) if dtype is DType.bf16 else values.astype(
            {DType.fp32: "<f4", DType.fp16: "<f2"}[dtype])
    return encode_chunk(producer_id=producer_id, dtype=dtype, dim=dim, count=count, first_seq=first_seq,
                        event_time_us=event_time_us, payload=raw.tobytes())


def event(kind="open", latents=0, session_id="s1", dtype=None, dim=None, producer_id=PID) -> bytes:
    return encode_event(SessionEvent(1, kind, session_id, producer_id, dtype, dim, latents, 5))


def patched(value: bytes, offset: int, fmt: str, number: int) -> bytes:
    out = bytearray(value)
    struct.pack_into(fmt, out, offset, number)
    return bytes(out)


@pytest.mark.parametrize("dtype", list(DType))
def test_chunk_round_trip(dtype):
    values = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    got = decode(KEY, chunk(7, 3, 5, dtype, values))
    assert isinstance(got, LatentChunk)
    assert (got.session_id, got.first_seq, got.end_seq, got.dtype) == ("s1", 7, 10, dtype)
    tol = {DType.fp32: 0, DType.fp16: 1e-3, DType.bf16: 1e-2}[dtype]
    np.testing.assert_allclose(got.to_float32(), values, rtol=tol, atol=tol)


def test_bf16_rounds_to_nearest_even():
    x = np.array([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -2.5], np.float32)
    assert to_float32(float32_to_bf16_bits(x), DType.bf16).tolist() == [1.0, 1.0, 1.0 + 2**-6, -2.5]


GOOD = chunk()
STATELESS_CASES = {
    "no key": (None, GOOD, errors.BadKeyError),
    "key not utf-8": (b"\xff\xfes1", GOOD, errors.BadKeyError),
    "empty value": (KEY, b"", errors.TruncatedError),
    "header cut": (KEY, GOOD[:30], errors.TruncatedError),
    "payload cut": (KEY, GOOD[:-1], errors.TruncatedError),
    "trailing bytes": (KEY, GOOD + b"\0", errors.OversizeError),
    "not memstream": (KEY, b'{"hello": 1}', errors.BadMagicError),
    "chunk version 3": (KEY, patched(GOOD, 4, "<B", 3), errors.UnknownVersionError),
    "sealed chunk, no key table": (KEY, encode_chunk(producer_id=PID, dtype=DType.fp32, dim=4, count=2, first_seq=0,
                                                     event_time_us=1, payload=bytes(32),
                                                     sealed_by=(KEY, b"k" * 16, b"K" * 32)),
                                   errors.KeyUnavailableError),
    "reserved set": (KEY, patched(GOOD, 6, "<H", 1), errors.UnknownVersionError),
    "event version 2": (KEY, patched(event(), 4, "<B", 2), errors.UnknownVersionError),
    "dtype code 9": (KEY, patched(GOOD, 5, "<B", 9), errors.UnsupportedDTypeError),
    "count 0": (KEY, encode_chunk(producer_id=PID, dtype=DType.fp32, dim=4, count=0, first_seq=0,
                                  event_time_us=0, payload=b""), errors.ShapeError),
    "payload bit flip": (KEY, GOOD[:-1] + bytes([GOOD[-1] ^ 1]), errors.ChecksumError),
    "seq changed": (KEY, patched(GOOD, 16, "<Q", 9), errors.ChecksumError),
    "event not json": (KEY, b"MSSE\x01{not json", errors.BadEventError),
    "event missing field": (KEY, b'MSSE\x01{"schema_version": 1}', errors.BadEventError),
    "event for another key": (b"s2", event(), errors.BadEventError),
    "event bad dtype": (KEY, event(dtype="int8"), errors.UnsupportedDTypeError),
    "event dim 0": (KEY, event(dim=0), errors.ShapeError),
    "event short producer": (KEY, event(producer_id=b"x"), errors.BadEventError),
    "seq past 2**63": (KEY, chunk(first_seq=2**63 - 1, values=np.zeros((2, 4), np.float32)), errors.OutOfRangeError),
    "negative event time": (KEY, chunk(event_time_us=-5), errors.OutOfRangeError),
    "event latents past 2**63": (KEY, event("close", latents=2**64), errors.OutOfRangeError),
    "nan fp32": (KEY, chunk(values=np.array([[0, np.nan, 0, 0]] * 2, np.float32)), errors.NonFiniteError),
    "inf fp16": (KEY, chunk(dtype=DType.fp16, values=np.full((2, 4), 1e6, np.float32)), errors.NonFiniteError),
    "inf bf16": (KEY, chunk(dtype=DType.bf16, values=np.full((2, 4), -np.inf, np.float32)), errors.NonFiniteError),
}


@pytest.mark.parametrize("case", list(STATELESS_CASES))
def test_decoder_rejects_with_its_typed_error(case):
    key, value, error = STATELESS_CASES[case]
    with pytest.raises(error) as info:
        decode(key, value)
    assert type(info.value) is error and info.value.reason is error.reason


def test_oversize_against_the_limit():
    with pytest.raises(errors.OversizeError):
        decode(KEY, chunk(count=100, dim=100), max_bytes=10_000)


def feed(validator: SessionValidator, *values: bytes) -> list:
    out = []
    for v in values:
        try:
            out.append(validator.check(decode(KEY, v)))
        except errors.InvalidInputError as e:
            out.append(type(e))
    return out


def test_validator_accepts_a_session_and_drops_retries():
    v = SessionValidator("s1")
    got = feed(v, event(), chunk(0), chunk(2), chunk(2), chunk(0), event(), chunk(4, 3), event("close", 7),
               event("close", 7))
    A, D = Verdict.ACCEPTED, Verdict.DUPLICATE
    assert got == [A, A, A, D, D, D, A, A, D]
    assert (v.state, v.next_seq, v.dtype, v.dim) == ("closed", 7, DType.fp32, 4)


def test_gaps_are_accepted_and_remembered():
    v = SessionValidator("s1")
    got = feed(v, event(), chunk(0), chunk(5), event("close", 9))
    assert got == [Verdict.ACCEPTED, Verdict.ACCEPTED, Verdict.GAP, Verdict.GAP]  # 2..4 and 7..8 never came
    assert (v.state, v.next_seq, v.latents_at_close) == ("closed", 7, 9)
    assert feed(v, chunk(2)) == [errors.ClosedSessionError]


SESSION_CASES = {
    "chunk before open": ([chunk(0)], errors.UnknownSessionError),
    "close before open": ([event("close", 0)], errors.UnknownSessionError),
    "chunk after close": ([event(), chunk(0), event("close", 2), chunk(2)], errors.ClosedSessionError),
    "reopen after close": ([event(), event("close", 0), event()], errors.ClosedSessionError),
    "second close, other count": ([event(), event("close", 0), event("close", 3)], errors.ClosedSessionError),
    "dtype changes": ([event(), chunk(0), chunk(2, dtype=DType.fp16)], errors.DTypeMismatchError),
    "dtype differs from open": ([event(dtype="bf16", dim=4), chunk(0)], errors.DTypeMismatchError),
    "dim changes": ([event(), chunk(0), chunk(2, dim=8)], errors.DimMismatchError),
    "close counts fewer": ([event(), chunk(0), event("close", 1)], errors.BadEventError),
    "late chunk after a gap": ([event(), chunk(0), chunk(4), chunk(2)], errors.ReorderedError),
    "overlaps the expected number": ([event(), chunk(0), chunk(2), chunk(3)], errors.ReorderedError),
    "open by another producer": ([event(), event(producer_id=b"\x09" * 16)], errors.ForeignProducerError),
    "chunk by another producer": ([event(), chunk(0, producer_id=b"\x09" * 16)], errors.ForeignProducerError),
    "close by another producer": ([event(), chunk(0), event("close", 2, producer_id=b"\x09" * 16)],
                                  errors.ForeignProducerError),
    "same range, other bytes": ([event(), chunk(0), chunk(2), chunk(0, values=np.ones((2, 4), np.float32))],
                                errors.ConflictingContentError),
    "same latents, other chunk boundaries": ([event(), chunk(0), chunk(2), chunk(0, count=4)],
                                             errors.ConflictingContentError),
}


@pytest.mark.parametrize("case", list(SESSION_CASES))
def test_validator_rejects_with_its_typed_error(case):
    values, error = SESSION_CASES[case]
    got = feed(SessionValidator("s1"), *values)
    assert got[-1] is error, got


def test_session_resumes_after_a_gap_and_state_pickles():
    v = SessionValidator("s1")
    feed(v, event(), chunk(0), chunk(4))
    v = pickle.loads(pickle.dumps(v))  # Beam keeps it in per-key state
    assert feed(v, chunk(6), chunk(4), chunk(2)) == [Verdict.ACCEPTED, Verdict.DUPLICATE, errors.ReorderedError]


@dataclasses.dataclass
class Msg:
    key: bytes | None
    value: bytes | None
    offset: int = 0
    topic: str = "memstream.latents"
    partition: int = 3
    timestamp: int = 1_700_000_000_000


def test_stream_validator_dead_letters_with_the_original_bytes():
    sv = StreamValidator()
    bad = chunk(0)[:-3]
    outcomes = [sv.process(Msg(KEY, event())), sv.process(Msg(KEY, bad, offset=1)), sv.process(Msg(b"s2", chunk(0)))]
    assert [o.verdict for o in outcomes] == [Verdict.ACCEPTED, Verdict.DEAD_LETTER, Verdict.DEAD_LETTER]
    dl = outcomes[1].dead_letter
    assert (dl.reason, dl.topic, dl.partition, dl.offset, dl.key, dl.value) == (
        DeadLetterReason.truncated, "memstream.latents", 3, 1, KEY, bad)
    assert outcomes[2].dead_letter.reason is DeadLetterReason.unknown_session
    assert type(dl).from_json(dl.to_json()) == dl


def test_fuzz_decoder_raises_only_typed_errors():
    """20k arbitrary and mutated records: decode + validate raise nothing but InvalidInputError."""
    rng = np.random.default_rng(1234)
    seeds = [chunk(), chunk(dtype=DType.fp16), chunk(dtype=DType.bf16), chunk(3, 1, 1), event(),
             event("close", 2, dtype="fp16", dim=4)]
    ok, seen = 0, set()
    for i in range(20_000):
        mode = i % 4
        base = bytearray(seeds[i % len(seeds)])
        if mode == 0:  # flip a few bytes anywhere
            for pos in rng.integers(0, len(base), rng.integers(1, 4)):
                base[pos] = rng.integers(0, 256)
        elif mode == 1:  # cut or extend
            base = base[:rng.integers(0, len(base))] if rng.random() < 0.5 else base + rng.bytes(rng.integers(1, 9))
        elif mode == 2:  # random bytes behind a valid magic (and version)
            base = base[:rng.integers(4, 6)] + rng.bytes(rng.integers(0, 80))
        else:  # a header field rewritten to an extreme value
            off, fmt = [(5, "<B"), (8, "<I"), (12, "<I"), (16, "<Q"), (24, "<q")][i % 5]
            if len(base) >= HEADER_SIZE and base[:4] == b"MSLT":
                struct.pack_into(fmt, base, off, int(rng.integers(0, 256 if fmt == "<B" else 2**31)))
        key = KEY if rng.random() < 0.95 else rng.bytes(int(rng.integers(0, 4)))
        try:
            record = decode(key, bytes(base))
            SessionValidator(record.session_id).check(record)
            ok += 1
        except errors.InvalidInputError as e:
            seen.add(type(e))
    assert 0 < ok < 20_000 and len(seen) >= 8, (ok, seen)  # the mutations reached most error paths


def test_dead_letter_of_a_large_record_keeps_a_prefix_within_the_limit():
    from memstream.schemas.records import DeadLetterRecord
    from memstream.wire.deadletter import fit_dead_letter

    value = chunk(count=100, dim=10)  # 4052 bytes, 5404 in base64
    sv = StreamValidator()
    dl = sv.process(Msg(KEY, value)).dead_letter  # no open event: unknown session
    assert dl.value == value and dl.value_size == len(value)
    assert fit_dead_letter(dl) == dl.to_json()
    data = fit_dead_letter(dl, max_bytes=3000)
    cut = DeadLetterRecord.from_json(data)
    assert len(data) <= 3000 and len(cut.value) > 1000 and value.startswith(cut.value)
    assert cut.value_size == len(value) and cut.reason is DeadLetterReason.unknown_session
