"""The window cutter alone: records in, windows out, state a small value. No Kafka, no runner."""

from __future__ import annotations

import numpy as np
import pytest

from memstream.episodic.window import CutterState, Piece, WindowCutter
from memstream.errors import ClosedSessionError, SequenceGapError, UnknownSessionError
from memstream.schemas.records import DType, SessionEvent
from memstream.wire.codec import decode, encode_chunk, encode_event
from memstream.wire.validation import Verdict

PRODUCER = b"\x07" * 16


def open_event(session: str = "s", producer: bytes = PRODUCER):
    return decode(session.encode(), encode_event(SessionEvent(1, "open", session, producer, None, None, 0, 1)))


def close_event(latents: int, session: str = "s", producer: bytes = PRODUCER):
    return decode(session.encode(), encode_event(SessionEvent(1, "close", session, producer, None, None, latents, 9)))


def chunk(first: int, count: int, dim: int = 4, session: str = "s", t: int = 5):
    x = np.arange(first, first + count, dtype=np.float32)[:, None].repeat(dim, 1)
    return decode(session.encode(), encode_chunk(producer_id=PRODUCER, dtype=DType.fp32, dim=dim, count=count,
                                                 first_seq=first, event_time_us=t, payload=x.tobytes()))


def feed_all(cutter: WindowCutter, records) -> list:
    """Feed records, naming each chunk by its position; return every window cut."""
    out = []
    for ref, rec in enumerate(records):
        out += cutter.feed(rec, ref).windows
    return out


def test_chunks_straddle_windows_and_every_latent_lands_once():
    cutter = WindowCutter(CutterState.new("s"), window=10)
    chunks = [chunk(0, 7), chunk(7, 7), chunk(14, 7)]  # 7 does not divide 10
    windows = feed_all(cutter, [open_event(), *chunks])
    assert [(w.window_index, w.seq_start, w.seq_end, w.cut) for w in windows] == [(0, 0, 10, "full"),
                                                                                  (1, 10, 20, "full")]
    assert windows[0].pieces == (Piece(1, 0, 7), Piece(2, 0, 3))
    assert windows[1].pieces == (Piece(2, 3, 4), Piece(3, 0, 6))
    assert cutter.state.filled == 1 and cutter.referenced() == {3}  # latent 20 waits in the open window
    # Reassembled from the pieces, the windows hold latents 0..19 in order, each once.
    arrays = {ref + 1: c.to_float32() for ref, c in enumerate(chunks)}
    got = np.concatenate([arrays[p.ref][p.start:p.start + p.count] for w in windows for p in w.pieces])
    assert got[:, 0].tolist() == list(range(20))


def test_close_turns_the_open_window_into_a_partial_one():
    cutter = WindowCutter(CutterState.new("s"), window=10)
    windows = feed_all(cutter, [open_event(), chunk(0, 13), close_event(13)])
    assert [(w.seq_start, w.seq_end, w.cut, w.partial) for w in windows] == [(0, 10, "full", False),
                                                                              (10, 13, "close", True)]
    assert windows[1].event_time_us == 9  # the close event's time
    late = cutter.feed(chunk(13, 2), 99)
    assert late.verdict is Verdict.DEAD_LETTER and isinstance(late.error, ClosedSessionError) and not late.windows


def test_a_close_on_a_window_boundary_cuts_nothing_more():
    cutter = WindowCutter(CutterState.new("s"), window=10)
    windows = feed_all(cutter, [open_event(), chunk(0, 10), close_event(10)])
    assert [w.cut for w in windows] == ["full"]


def test_a_sequence_gap_closes_the_window_and_the_stream_resumes_after_it():
    cutter = WindowCutter(CutterState.new("s"), window=10)
    assert not feed_all(cutter, [open_event(), chunk(0, 4)])
    gap = cutter.feed(chunk(6, 3), 2)  # latents 4 and 5 never arrived: this chunk is the dead letter
    assert gap.verdict is Verdict.DEAD_LETTER and isinstance(gap.error, SequenceGapError) and not gap.windows
    resumed = cutter.feed(chunk(9, 5), 3)
    assert [(w.seq_start, w.seq_end, w.cut) for w in resumed.windows] == [(0, 4, "gap")]
    assert cutter.state.window_start == 9 and cutter.state.filled == 5 and cutter.state.window_index == 1


def test_a_close_that_reports_missing_latents_still_flushes_the_window():
    cutter = WindowCutter(CutterState.new("s"), window=10)
    feed_all(cutter, [open_event(), chunk(0, 4)])
    fed = cutter.feed(close_event(6), 2)  # says 6 were published, 4 arrived
    assert isinstance(fed.error, SequenceGapError)
    assert [(w.seq_start, w.seq_end, w.cut) for w in fed.windows] == [(0, 4, "close")]


def test_duplicates_are_dropped_and_bad_records_change_nothing():
    cutter = WindowCutter(CutterState.new("s"), window=10)
    assert isinstance(cutter.feed(chunk(0, 3), 0).error, UnknownSessionError)  # before the open event
    feed_all(cutter, [open_event(), chunk(0, 3)])
    before = cutter.state.to_bytes()
    assert cutter.feed(chunk(0, 3), 7).verdict is Verdict.DUPLICATE  # a producer retry
    assert cutter.feed(open_event(), 8).verdict is Verdict.DUPLICATE
    assert cutter.state.to_bytes() == before


def test_a_replay_skips_stored_windows_without_keeping_their_latents():
    records = [open_event(), chunk(0, 7), chunk(7, 7), chunk(14, 7), chunk(21, 4), close_event(25)]
    fresh = feed_all(WindowCutter(CutterState.new("s"), window=10), records)
    cutter = WindowCutter(CutterState.new("s", stored_through=1), window=10)  # windows 0 and 1 are stored
    replayed = []
    for ref, rec in enumerate(records):
        replayed += cutter.feed(rec, ref).windows
        if cutter.state.window_index <= 1:
            assert not cutter.state.pieces  # nothing of a stored window is kept
    assert replayed == [w for w in fresh if w.window_index == 2]


def test_state_is_a_small_serialisable_value_and_resumes_exactly():
    records = [open_event(), chunk(0, 7), chunk(7, 7), chunk(14, 7), chunk(21, 9), close_event(30)]
    whole = feed_all(WindowCutter(CutterState.new("s"), window=10), records)
    state, cut = CutterState.new("s"), []
    for ref, rec in enumerate(records):  # a new cutter for every record, state through bytes
        raw = state.to_bytes()
        assert len(raw) < 1000
        cutter = WindowCutter(CutterState.from_bytes(raw), window=10)
        cut += cutter.feed(rec, ref).windows
        state = cutter.state
    assert cut == whole
    assert CutterState.from_bytes(state.to_bytes()) == state


def test_pieces_may_name_chunks_by_any_json_value():
    cutter = WindowCutter(CutterState.new("s"), window=4)
    cutter.feed(open_event(), None)
    cutter.feed(chunk(0, 2), ["latents", 3, 17])  # e.g. topic, partition, offset
    again = CutterState.from_bytes(cutter.state.to_bytes())
    assert again.pieces == [Piece(("latents", 3, 17), 0, 2)]


def test_a_window_holds_at_least_one_latent():
    with pytest.raises(Exception, match="at least one"):
        WindowCutter(CutterState.new("s"), window=0)
