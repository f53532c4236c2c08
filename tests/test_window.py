"""The window cutter and the partition's progress, alone: records in, windows and offsets out,
state a small value. No Kafka, no runner."""

from __future__ import annotations

import random

import numpy as np
import pytest

from memstream.episodic.progress import PartitionProgress
from memstream.episodic.window import CutterState, Piece, WindowCutter
from memstream.errors import ClosedSessionError, ConflictingContentError, ForeignProducerError, UnknownSessionError
from memstream.schemas.records import DType, SessionEvent, SummaryRecord
from memstream.wire.codec import decode, encode_chunk, encode_event
from memstream.wire.validation import Verdict

PRODUCER = b"\x07" * 16


def open_event(session: str = "s", producer: bytes = PRODUCER, t: int = 1):
    return decode(session.encode(), encode_event(SessionEvent(1, "open", session, producer, None, None, 0, t)))


def close_event(latents: int, session: str = "s", producer: bytes = PRODUCER, t: int = 9):
    return decode(session.encode(), encode_event(SessionEvent(1, "close", session, producer, None, None, latents, t)))


def chunk(first: int, count: int, dim: int = 4, session: str = "s", t: int = 5, producer: bytes = PRODUCER,
          value: float | None = None):
    x = np.arange(first, first + count, dtype=np.float32)[:, None].repeat(dim, 1)
    if value is not None:
        x[:] = value
    return decode(session.encode(), encode_chunk(producer_id=producer, dtype=DType.fp32, dim=dim, count=count,
                                                 first_seq=first, event_time_us=t, payload=x.tobytes()))


def feed_all(cutter: WindowCutter, records, base: int = 0) -> list:
    """Feed records, naming each by its position; return every window cut."""
    out = []
    for ref, rec in enumerate(records, base):
        out += cutter.feed(rec, ref).windows
    return out


def head_of(window) -> SummaryRecord:
    """The stored summary a window would become (what resuming reads back)."""
    return SummaryRecord(2, window.session_id, window.window_index, window.seq_start, window.seq_end, window.cut,
                         0, 4, "fp16", b"", "op", window.producer_id, window.latents_dtype, window.latent_dim,
                         window.event_time_us, b"", b"", b"", "")


def test_chunks_straddle_windows_and_every_latent_lands_once():
    cutter = WindowCutter(CutterState.new("s"), window=10)
    chunks = [chunk(0, 7), chunk(7, 7), chunk(14, 7)]  # 7 does not divide 10
    windows = feed_all(cutter, [open_event(), *chunks])
    assert [(w.window_index, w.seq_start, w.seq_end, w.cut) for w in windows] == [(0, 0, 10, "full"),
                                                                                  (1, 10, 20, "full")]
    assert windows[0].pieces == (Piece(1, 0, 7), Piece(2, 0, 3))
    assert windows[1].pieces == (Piece(2, 3, 4), Piece(3, 0, 6))
    assert (windows[0].producer_id, windows[0].latents_dtype, windows[0].latent_dim) == (PRODUCER, "fp32", 4)
    assert cutter.state.filled == 1 and cutter.referenced() == {3}  # latent 20 waits in the open window
    arrays = {ref + 1: c.to_float32() for ref, c in enumerate(chunks)}
    got = np.concatenate([arrays[p.ref][p.start:p.start + p.count] for w in windows for p in w.pieces])
    assert got[:, 0].tolist() == list(range(20))


def test_a_close_closes_the_open_window_and_the_chain_always_ends_in_a_close():
    cutter = WindowCutter(CutterState.new("s"), window=10)
    windows = feed_all(cutter, [open_event(), chunk(0, 13), close_event(13)])
    assert [(w.seq_start, w.seq_end, w.cut, w.partial) for w in windows] == [(0, 10, "full", False),
                                                                              (10, 13, "close", True)]
    assert windows[1].event_time_us == 9 and windows[1].last_ref == 2  # the close event's
    late = cutter.feed(chunk(13, 2), 99)
    assert late.verdict is Verdict.DEAD_LETTER and isinstance(late.error, ClosedSessionError) and not late.windows
    boundary = feed_all(WindowCutter(CutterState.new("s"), window=10), [open_event(), chunk(0, 10), close_event(10)])
    assert [(w.seq_start, w.seq_end, w.cut, w.pieces) for w in boundary] == [(0, 10, "full", boundary[0].pieces),
                                                                              (10, 10, "close", ())]


def test_latents_missing_before_a_chunk_close_the_window_and_the_chunk_is_kept():
    cutter = WindowCutter(CutterState.new("s"), window=10)
    feed_all(cutter, [open_event(), chunk(0, 4)])
    fed = cutter.feed(chunk(6, 3), 2)  # latents 4 and 5 never arrived
    assert fed.verdict is Verdict.GAP and fed.error is None
    assert [(w.seq_start, w.seq_end, w.cut) for w in fed.windows] == [(0, 4, "gap")]
    assert (cutter.state.window_start, cutter.state.filled, cutter.state.window_index) == (6, 3, 1)
    tail = cutter.feed(close_event(12), 3)  # the close says 12 were sent, 9 arrived
    assert tail.verdict is Verdict.GAP and [(w.seq_start, w.seq_end, w.cut) for w in tail.windows] == [(6, 9, "close")]


def test_duplicates_are_dropped_and_bad_records_change_nothing():
    cutter = WindowCutter(CutterState.new("s"), window=10)
    assert isinstance(cutter.feed(chunk(0, 3), 0).error, UnknownSessionError)  # before the open event
    feed_all(cutter, [open_event(), chunk(0, 3)])
    before = cutter.state.to_bytes()
    assert cutter.feed(chunk(0, 3), 7).verdict is Verdict.DUPLICATE  # a producer retry
    assert cutter.feed(open_event(), 8).verdict is Verdict.DUPLICATE
    assert isinstance(cutter.feed(chunk(3, 2, producer=b"\x01" * 16), 9).error, ForeignProducerError)
    assert isinstance(cutter.feed(chunk(0, 3, value=7.0), 10).error, ConflictingContentError)
    assert cutter.state.to_bytes() == before


def test_idle_windows_close_the_same_by_record_time_and_by_timer():
    records = [open_event(t=1), chunk(0, 4, t=10), chunk(4, 4, t=20), chunk(8, 4, t=500), close_event(12, t=510)]
    by_records = feed_all(WindowCutter(CutterState.new("s"), window=100, idle_us=100), records)
    timed = WindowCutter(CutterState.new("s"), window=100, idle_us=100)
    by_timer = feed_all(timed, records[:3])
    assert timed.idle(110) == ()  # not idle long enough yet
    by_timer += timed.idle(120)
    by_timer += feed_all(timed, records[3:], base=3)
    assert by_records == by_timer
    assert [(w.seq_start, w.seq_end, w.cut) for w in by_records] == [(0, 8, "idle"), (8, 12, "close")]


def test_state_is_a_small_serialisable_value_and_resumes_exactly():
    records = [open_event(), chunk(0, 7), chunk(7, 7), chunk(14, 7), chunk(21, 9), close_event(30)]
    whole = feed_all(WindowCutter(CutterState.new("s"), window=10), records)
    state, cut = CutterState.new("s"), []
    for ref, rec in enumerate(records):  # a new cutter for every record, state through bytes
        raw = state.to_bytes()
        assert len(raw) < 2000
        cutter = WindowCutter(CutterState.from_bytes(raw), window=10)
        cut += cutter.feed(rec, ("latents", 3, ref)).windows  # refs may be any JSON value
        state = cutter.state
    assert [w.pieces[0].ref[2] if w.pieces else None for w in cut] == [1, 2, 3, None]
    assert [(w.window_index, w.seq_start, w.seq_end, w.cut) for w in cut] == \
        [(w.window_index, w.seq_start, w.seq_end, w.cut) for w in whole]
    assert CutterState.from_bytes(state.to_bytes()) == state


def test_resuming_from_a_stored_head_cuts_what_the_first_run_cut():
    records = [open_event(), chunk(0, 7), chunk(7, 7), chunk(14, 7), chunk(21, 9), close_event(30)]
    whole = feed_all(WindowCutter(CutterState.new("s"), window=10), records)
    for stored in range(len(whole) - 1):  # the store holds windows 0..stored
        cutter = WindowCutter(CutterState.resume(head_of(whole[stored])), window=10)
        replayed = feed_all(cutter, records)  # a replay of everything: captured records are duplicates
        assert replayed == whole[stored + 1:], stored


def test_pins_name_the_first_record_each_window_needs():
    records = [open_event(), chunk(0, 7), chunk(7, 7), chunk(14, 6), chunk(20, 9), close_event(29)]
    cutter = WindowCutter(CutterState.new("s"), window=10)
    pins = [cutter.feed(rec, i).pin for i, rec in enumerate(records)]
    # the open event is needed by window 0; chunk 2 spills into window 1; chunk 3 ends window 1 exactly;
    # chunk 4 starts window 2, which the close closes
    assert pins == [0, None, 1, None, 2, None]
    assert WindowCutter(CutterState.new("s"), window=10).feed(chunk(0, 3), 0).pin is None  # rejected: no pin


def test_a_window_holds_at_least_one_latent():
    with pytest.raises(Exception, match="at least one"):
        WindowCutter(CutterState.new("s"), window=0)


# -- progress of a partition -------------------------------------------------------------------

def test_the_frontier_joins_acked_ranges_in_any_order():
    p = PartitionProgress(100)
    p.ack(105, 109)
    p.ack(102, 104)
    assert p.committable() == 100
    p.ack(100, 101)
    assert p.committable() == 110 and not p.spans
    p.ack(103, 103)  # again, after a retry
    assert p.committable() == 110


def test_pins_hold_the_commit_until_their_window_is_stored():
    p = PartitionProgress(0)
    p.pin("a", 0, 0)  # each pin just before the ack of its record
    p.ack(0, 3)
    p.pin("b", 0, 4)
    p.ack(4, 9)
    assert p.committable() == 0
    p.seal("a", 0, 6)
    assert p.committable() == 4
    p.seal("b", 0, 8)
    assert p.committable() == 10
    p.seal("b", 0, 8)  # a seal repeated
    p.pin("b", 0, 4)  # a pin that comes after its window was stored: stale, ignored
    assert p.committable() == 10 and "a" not in p.sealed  # forgotten: nothing about it can come now


def test_progress_survives_bytes_and_commutes():
    # (pin, ack) pairs travel together; seals come on their own path, in any order
    updates = [[("pin", "a", 0, 0), ("ack", 0, 3)], [("ack", 4, 4)], [("pin", "a", 1, 5), ("ack", 5, 5)],
               [("pin", "b", 0, 6), ("ack", 6, 7)], [("ack", 8, 8)], [("seal", "a", 0, 5)], [("seal", "b", 0, 8)]]
    results = set()
    for seed in range(20):
        order = updates[:]
        random.Random(seed).shuffle(order)
        p = PartitionProgress(0)
        for group in order:
            for u in group:
                getattr(p, u[0])(*u[1:])
            p = PartitionProgress.from_bytes(p.to_bytes())
        results.add(p.committable())
    assert results == {5}  # window 1 of a (from offset 5) is not stored yet


def test_a_restart_from_the_committable_offset_stores_what_one_run_stores():
    """The pipeline's recovery, without Kafka: three sessions interleaved in one partition, windows
    stored late and in any order, crashes at random points, each restart reading from the
    committable offset with every session resumed from its stored head."""
    rng = random.Random(1)
    log, sent = [], {s: 0 for s in "abc"}
    for s in "abc":
        log.append(open_event(s))
    while any(n < 60 for n in sent.values()):
        s = rng.choice([s for s, n in sent.items() if n < 60])
        count = min(rng.randint(1, 9), 60 - sent[s])
        log.append(chunk(sent[s], count, session=s, t=len(log)))
        sent[s] += count
    for s in "abc":
        log.append(close_event(60, session=s, t=len(log)))

    def run(crash_points):
        store: dict[tuple[str, int], object] = {}
        start = 0
        for crash in [*crash_points, len(log)]:
            progress, cutters, unstored = PartitionProgress(start), {}, []
            for offset in range(start, crash):
                rec = log[offset]
                cutter = cutters.get(rec.session_id)
                if cutter is None:
                    heads = [w for (s, _), w in store.items() if s == rec.session_id]
                    head = max(heads, key=lambda w: w.window_index, default=None)
                    state = CutterState.resume(head_of(head)) if head else CutterState.new(rec.session_id)
                    cutter = cutters[rec.session_id] = WindowCutter(state, window=16)
                fed = cutter.feed(rec, offset)
                if fed.pin is not None:
                    progress.pin(rec.session_id, fed.pin, offset)
                progress.ack(offset, offset)
                unstored += fed.windows
                while unstored and rng.random() < 0.5:  # stored late; a session's windows in order
                    ready = [w for w in unstored if w.window_index == 0 or (w.session_id, w.window_index - 1) in store]
                    if not ready:
                        break
                    w = rng.choice(ready)
                    unstored.remove(w)
                    store[(w.session_id, w.window_index)] = w
                    progress.seal(w.session_id, w.window_index, w.last_ref)
            if crash == len(log):  # the last run drains
                for w in sorted(unstored, key=lambda w: w.window_index):
                    store[(w.session_id, w.window_index)] = w
            start = progress.committable()  # a crash: only the store and this offset survive
        return store

    whole = run([])
    for trial in range(15):
        crashes = sorted(rng.sample(range(1, len(log)), rng.randint(1, 6)))
        got = run(crashes)
        assert sorted(got) == sorted(whole), crashes
        for k, w in whole.items():
            assert (got[k].seq_start, got[k].seq_end, got[k].cut) == (w.seq_start, w.seq_end, w.cut), (k, crashes)
