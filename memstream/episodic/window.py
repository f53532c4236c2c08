"""Cutting one session's latent stream into windows of exactly 4,096 latents.

:class:`WindowCutter` is fed the session's records in order (latent chunks, or just their
headers as :class:`~memstream.wire.codec.ChunkMeta`, and session events) and returns the windows
it closes. It holds no latents: a chunk is named by a reference the caller chooses (a Kafka
position, say), and a window is a list of pieces of chunks, so the caller keeps the bytes where
it likes and the cutter's state (:class:`CutterState`) is a small value that serialises to a
few hundred bytes.

Rules, on top of the per-session validation of :class:`~memstream.wire.validation.SessionValidator`:

* chunks may straddle windows: a window takes exactly ``window`` latents, the rest of the chunk
  starts the next one;
* a close event closes the open window (``cut="close"``), so no latent is lost; a close on a
  window boundary closes an empty one, so the session's chain always ends in a close;
* latents missing before a chunk close the open window (``cut="gap"``), and the chunk starts
  the next one;
* ``idle_us`` of event time without a record closes the open window (``cut="idle"``), decided
  from the records' own times, so a replay cuts where the first run did.

**Resuming.** :meth:`CutterState.resume` rebuilds a session's state from its stored chain head:
every record the head's windows captured is then a duplicate, and the chunk the head's last
window ended in is taken from the head's end on. **Pins.** Each record that changes the state
reports (:attr:`Fed.pin`) the window that will capture it, the first time that window is
named: until that window is stored, the record is needed to rebuild the state, so the caller
must be able to read it again (a pipeline keeps its Kafka offset uncommitted).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Hashable, Literal

from memstream.errors import ConfigError, InvalidInputError
from memstream.schemas.records import DType, SessionEvent, SummaryRecord
from memstream.settings import WINDOW
from memstream.wire.codec import ChunkMeta, LatentChunk
from memstream.wire.validation import SessionValidator, Verdict

Cut = Literal["full", "close", "idle", "gap"]


@dataclass(frozen=True)
class Piece:
    """``count`` latents of the chunk ``ref``, from its ``start``-th latent on."""

    ref: Hashable
    start: int
    count: int


@dataclass(frozen=True)
class Window:
    """A window the cutter closed: latents ``seq_start .. seq_end - 1`` of the session, made of
    ``pieces`` of chunks in sequence order, with what the session's chain records of its input."""

    session_id: str
    window_index: int
    seq_start: int
    seq_end: int
    cut: Cut
    pieces: tuple[Piece, ...]
    event_time_us: int  # event time of the record that closed the window (producer clock)
    producer_id: bytes
    latents_dtype: str  # "" while no chunk fixed it
    latent_dim: int  # 0 while no chunk fixed it
    last_ref: Hashable = None  # the last record the window captured

    @property
    def partial(self) -> bool:
        return self.cut != "full"

    @property
    def size(self) -> int:
        return self.seq_end - self.seq_start


@dataclass
class CutterState:
    """Everything the cutter remembers of one session."""

    validator: SessionValidator
    window_index: int = 0  # index of the open window
    window_start: int = 0  # sequence number of its first latent
    filled: int = 0  # latents in it so far
    event_time_us: int = 0  # of the last record applied
    pieces: list[Piece] = field(default_factory=list)
    pinned_through: int = -1  # the highest window a pin was reported for (stored windows count)
    last_ref: Hashable = None  # the last record applied

    @classmethod
    def new(cls, session_id: str) -> "CutterState":
        return cls(SessionValidator(session_id))

    @classmethod
    def resume(cls, head: SummaryRecord) -> "CutterState":
        """The state of a session whose newest stored summary is ``head``."""
        validator = SessionValidator.resume(
            head.session_id, producer_id=head.producer_id, dtype=DType[head.latents_dtype] if head.latents_dtype
            else None, dim=head.latent_dim or None, next_seq=head.seq_end, closed=head.cut == "close")
        return cls(validator, window_index=head.window_index + 1, window_start=head.seq_end,
                   event_time_us=head.event_time_us, pinned_through=head.window_index)

    @property
    def session_id(self) -> str:
        return self.validator.session_id

    @property
    def closed(self) -> bool:
        return self.validator.state == "closed"

    def to_bytes(self) -> bytes:
        """The state as JSON (piece references must be JSON values: numbers, strings, lists)."""
        v = dataclasses.asdict(self.validator)
        v["producer_id"] = v["producer_id"].hex() if v["producer_id"] is not None else None
        v["dtype"] = v["dtype"].name if v["dtype"] is not None else None
        d = dataclasses.asdict(self)
        d["validator"] = v
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> "CutterState":
        d = json.loads(raw)
        v = d.pop("validator")
        v["producer_id"] = bytes.fromhex(v["producer_id"]) if v["producer_id"] is not None else None
        v["dtype"] = DType[v["dtype"]] if v["dtype"] is not None else None
        v["holes"] = [tuple(h) for h in v["holes"]]
        v["accepted"] = [tuple(a) for a in v["accepted"]]
        pieces = [Piece(_hashable(p["ref"]), p["start"], p["count"]) for p in d.pop("pieces")]
        d["last_ref"] = _hashable(d["last_ref"])
        return cls(SessionValidator(**v), pieces=pieces, **d)


def _hashable(ref):
    return tuple(_hashable(r) for r in ref) if isinstance(ref, list) else ref


@dataclass(frozen=True)
class Fed:
    """What one record did: its verdict, the windows it closed, the error of a record that
    must go to the dead letters (``verdict`` is then DEAD_LETTER), and the window that
    captures this record when it is the first record that window needs (see the module)."""

    verdict: Verdict
    windows: tuple[Window, ...] = ()
    error: InvalidInputError | None = None
    pin: int | None = None


class WindowCutter:
    """``WindowCutter(state).feed(record, ref)``: validate one record of the session and cut
    the windows it completes. ``state`` is changed in place; keep it between records."""

    def __init__(self, state: CutterState, window: int = WINDOW, idle_us: int | None = None):
        if window < 1:
            raise ConfigError(f"a window holds at least one latent, got {window}")
        if idle_us is not None and idle_us <= 0:
            raise ConfigError(f"the idle timeout must be positive, got {idle_us} us")
        self.state, self.window, self.idle_us = state, window, idle_us

    def feed(self, record: LatentChunk | ChunkMeta | SessionEvent, ref: Hashable = None) -> Fed:
        s = self.state
        windows: list[Window] = []
        event_time = record.event_time_us
        next_before = s.validator.next_seq
        try:
            verdict = s.validator.check(record)
        except InvalidInputError as e:
            return Fed(Verdict.DEAD_LETTER, (), e)
        if not verdict.accepted:
            return Fed(verdict)
        if self.idle_us is not None and (s.filled or self._uncaptured()) and \
                event_time - s.event_time_us >= self.idle_us:
            self._cut(windows, "idle")  # decided by the records' times, as a timer would have
        s.last_ref = ref
        if isinstance(record, SessionEvent):
            s.event_time_us = max(s.event_time_us, event_time)
            if record.kind == "close":
                self._cut(windows, "close")
        else:
            skip = max(0, next_before - record.first_seq)  # resumed: the head summarised these already
            first, left, taken = record.first_seq + skip, record.count - skip, skip
            if verdict is Verdict.GAP and s.filled:
                self._cut(windows, "gap")  # latents before this chunk never arrived
            if s.filled == 0:
                s.window_start = first
            s.event_time_us = max(s.event_time_us, event_time)
            while left:
                take = min(self.window - s.filled, left)
                s.pieces.append(Piece(ref, taken, take))
                taken, left, s.filled = taken + take, left - take, s.filled + take
                if s.filled == self.window:
                    self._cut(windows, "full")
        capture = s.window_index - 1 if windows and s.filled == 0 else s.window_index
        pin = capture if capture > s.pinned_through else None
        s.pinned_through = max(s.pinned_through, capture)
        return Fed(verdict, tuple(windows), pin=pin)

    def idle(self, now_us: int) -> tuple[Window, ...]:
        """Close the open window if no record came for the idle timeout by event time ``now_us``
        (what an event-time timer calls); a state with nothing uncaptured is left alone."""
        s, windows = self.state, []
        if self.idle_us is not None and (s.filled or self._uncaptured()) and not s.closed and \
                now_us - s.event_time_us >= self.idle_us:
            self._cut(windows, "idle")
        return tuple(windows)

    def _uncaptured(self) -> bool:
        """Records were applied that no window captures yet (an open event, say)."""
        return self.state.pinned_through >= self.state.window_index

    def _cut(self, windows: list[Window], cut: Cut) -> None:
        s, v = self.state, self.state.validator
        windows.append(Window(s.session_id, s.window_index, s.window_start, s.window_start + s.filled, cut,
                              tuple(s.pieces), s.event_time_us, v.producer_id or b"", v.dtype.name if v.dtype else "",
                              v.dim or 0, s.last_ref))
        s.window_start += s.filled
        s.window_index, s.filled, s.pieces = s.window_index + 1, 0, []

    def referenced(self) -> set:
        """References of the chunks the open window still needs."""
        return {p.ref for p in self.state.pieces}
