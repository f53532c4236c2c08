"""Cutting one session's latent stream into windows of exactly 4,096 latents.

:class:`WindowCutter` is fed the session's decoded records in order (latent chunks and session
events) and returns the windows it closes. It holds no latents: a chunk is named by a
reference the caller chooses (a Kafka position, say), and a window is a list of pieces of
chunks, so the caller keeps the bytes wherever it likes and the cutter's state
(:class:`CutterState`) stays a small value that serialises to a few hundred bytes.

Rules, on top of the per-session validation of :class:`~memstream.wire.validation.SessionValidator`:

* chunks may straddle windows: a window takes exactly ``window`` latents, the rest of the chunk
  starts the next one;
* a close event turns the open window into a partial one (``cut="close"``), so no latent is lost;
* when the stream resumes after a sequence gap (the chunk that revealed it is a dead letter), the
  open window is closed as partial (``cut="gap"``) and the next one starts where the stream
  resumed;
* windows the store already holds (``stored_through``) are cut but not returned: a replay from
  the start of the topic skips them without keeping their latents.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Hashable, Literal

from memstream.errors import ConfigError, InvalidInputError, SequenceGapError
from memstream.schemas.records import DType, SessionEvent
from memstream.settings import WINDOW
from memstream.wire.codec import LatentChunk
from memstream.wire.validation import SessionValidator, Verdict

Cut = Literal["full", "close", "gap"]


@dataclass(frozen=True)
class Piece:
    """``count`` latents of the chunk ``ref``, from its ``start``-th latent on."""

    ref: Hashable
    start: int
    count: int


@dataclass(frozen=True)
class Window:
    """A window the cutter closed: latents ``seq_start .. seq_end - 1`` of the session, made of
    ``pieces`` of chunks in sequence order."""

    session_id: str
    window_index: int
    seq_start: int
    seq_end: int
    cut: Cut
    pieces: tuple[Piece, ...]
    event_time_us: int  # event time of the record that closed the window

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
    event_time_us: int = 0
    pieces: list[Piece] = field(default_factory=list)
    stored_through: int = -1  # windows up to this index are stored: cut, never returned

    @classmethod
    def new(cls, session_id: str, stored_through: int = -1) -> "CutterState":
        return cls(SessionValidator(session_id), stored_through=stored_through)

    @property
    def session_id(self) -> str:
        return self.validator.session_id

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
        pieces = [Piece(_hashable(p["ref"]), p["start"], p["count"]) for p in d.pop("pieces")]
        return cls(SessionValidator(**v), pieces=pieces, **d)


def _hashable(ref):
    return tuple(_hashable(r) for r in ref) if isinstance(ref, list) else ref


@dataclass(frozen=True)
class Fed:
    """What one record did: its verdict, the windows it closed, and the error of a record that
    must go to the dead letters (``verdict`` is then DEAD_LETTER)."""

    verdict: Verdict
    windows: tuple[Window, ...] = ()
    error: InvalidInputError | None = None


class WindowCutter:
    """``WindowCutter(state).feed(record, ref)``: validate one record of the session and cut
    the windows it completes. ``state`` is changed in place; keep it between records."""

    def __init__(self, state: CutterState, window: int = WINDOW):
        if window < 1:
            raise ConfigError(f"a window holds at least one latent, got {window}")
        self.state, self.window = state, window

    def feed(self, record: LatentChunk | SessionEvent, ref: Hashable = None) -> Fed:
        s = self.state
        windows: list[Window] = []
        try:
            verdict = s.validator.check(record)
        except SequenceGapError as e:
            if isinstance(record, SessionEvent):  # closed with latents missing: still closed
                self._close(windows, record.event_time_us)
            return Fed(Verdict.DEAD_LETTER, tuple(windows), e)
        except InvalidInputError as e:
            return Fed(Verdict.DEAD_LETTER, (), e)
        if verdict is not Verdict.ACCEPTED:
            return Fed(verdict)
        if isinstance(record, SessionEvent):
            if record.kind == "close":
                self._close(windows, record.event_time_us)
            return Fed(verdict, tuple(windows))
        first, left, taken = record.first_seq, record.count, 0
        if s.filled and first != s.window_start + s.filled:
            # The stream resumed after a gap: the window so far closes, the next starts here.
            self._cut(windows, "gap")
        if s.filled == 0:
            s.window_start = first
        s.event_time_us = record.header.event_time_us
        while left:
            take = min(self.window - s.filled, left)
            if s.window_index > s.stored_through:  # a replay keeps nothing of stored windows
                s.pieces.append(Piece(ref, taken, take))
            taken, left, s.filled = taken + take, left - take, s.filled + take
            if s.filled == self.window:
                self._cut(windows, "full")
        return Fed(verdict, tuple(windows))

    def _close(self, windows: list[Window], event_time_us: int) -> None:
        self.state.event_time_us = event_time_us
        if self.state.filled:
            self._cut(windows, "close")

    def _cut(self, windows: list[Window], cut: Cut) -> None:
        s = self.state
        if s.window_index > s.stored_through:
            windows.append(Window(s.session_id, s.window_index, s.window_start, s.window_start + s.filled, cut,
                                  tuple(s.pieces), s.event_time_us))
        s.window_start += s.filled
        s.window_index, s.filled, s.pieces = s.window_index + 1, 0, []

    def referenced(self) -> set:
        """References of the chunks the open window still needs."""
        return {p.ref for p in self.state.pieces}
