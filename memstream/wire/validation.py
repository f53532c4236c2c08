"""Consumer-side validation of the latents topic, and dead-letter records.

:class:`SessionValidator` holds the state of one session (small and picklable, so a Beam
pipeline keeps one per key in its state); :class:`StreamValidator` holds one per session for
a plain consumer loop. Rules, per session, in partition order:

* an ``open`` event starts the session; chunks or a ``close`` before it are
  :class:`UnknownSessionError`, anything after ``close`` is :class:`ClosedSessionError`;
* dtype and dim are fixed by the open event, or by the first chunk when the event has none;
* latents are numbered from 0 without holes. A chunk whose range was already accepted is a
  producer retry: it is dropped (:attr:`Verdict.DUPLICATE`), not dead-lettered. A chunk ahead
  of the expected number is a :class:`SequenceGapError`; the session resumes after it, and
  the missing range is remembered, so if it arrives later it is a :class:`ReorderedError`;
* a ``close`` whose latent count exceeds what arrived is a :class:`SequenceGapError`, and the
  session is closed all the same.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal

from memstream.errors import (BadEventError, ClosedSessionError, DimMismatchError, DTypeMismatchError,
                              InvalidInputError, ReorderedError, SequenceGapError, UnknownSessionError)
from memstream.schemas.records import DeadLetterRecord, DType, SessionEvent
from memstream.settings import MAX_MESSAGE_BYTES
from memstream.wire.codec import LatentChunk, decode
from memstream.wire.deadletter import KafkaRecord, dead_letter

MAX_HOLES = 256  # missing ranges remembered per session; older ones are forgotten


class Verdict(enum.Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"  # a producer retry of something already accepted: drop it
    DEAD_LETTER = "dead_letter"


@dataclass
class SessionValidator:
    """The state of one session and the rules above; ``check`` raises the typed error of a bad record."""

    session_id: str
    state: Literal["new", "open", "closed"] = "new"
    producer_id: bytes | None = None
    dtype: DType | None = None
    dim: int | None = None
    next_seq: int = 0
    latents_at_close: int | None = None
    holes: list[tuple[int, int]] = field(default_factory=list)

    def check(self, record: LatentChunk | SessionEvent) -> Verdict:
        if isinstance(record, SessionEvent):
            return self._open(record) if record.kind == "open" else self._close(record)
        return self._chunk(record)

    def _open(self, event: SessionEvent) -> Verdict:
        if self.state == "closed":
            raise ClosedSessionError(f"open event for session {self.session_id!r}, which is closed: "
                                     "use a new session id")
        dtype = DType[event.dtype] if event.dtype else None
        if self.state == "open":
            if event.producer_id == self.producer_id:  # the producer's retry of its open event
                return Verdict.DUPLICATE
            raise BadEventError(f"second open event for session {self.session_id!r} from producer "
                                f"{event.producer_id.hex()}; producer {self._producer()} opened it")
        self.state, self.producer_id, self.dtype, self.dim = "open", event.producer_id, dtype, event.dim
        return Verdict.ACCEPTED

    def _close(self, event: SessionEvent) -> Verdict:
        if self.state == "new":
            raise UnknownSessionError(f"close event for session {self.session_id!r}, which was never opened")
        if self.state == "closed":
            if event.latents == self.latents_at_close:
                return Verdict.DUPLICATE
            raise ClosedSessionError(f"second close of session {self.session_id!r} with latents="
                                     f"{event.latents} (first said {self.latents_at_close})")
        self.state, self.latents_at_close = "closed", event.latents
        if event.latents > self.next_seq:
            raise SequenceGapError(f"session {self.session_id!r} closed with {event.latents} latents "
                                   f"published, but only {self.next_seq} arrived: "
                                   f"{self.next_seq}..{event.latents - 1} are missing")
        if event.latents < self.next_seq:
            raise BadEventError(f"session {self.session_id!r} closed with {event.latents} latents "
                                f"published, but {self.next_seq} arrived")
        return Verdict.ACCEPTED

    def _chunk(self, chunk: LatentChunk) -> Verdict:
        where = f"chunk {chunk.first_seq}..{chunk.end_seq - 1} of session {self.session_id!r}"
        if self.state == "new":
            raise UnknownSessionError(f"{where}: the session was never opened (publish its open event first)")
        if self.state == "closed":
            raise ClosedSessionError(f"{where} arrived after the session was closed")
        if self.dtype is not None and chunk.dtype is not self.dtype:
            raise DTypeMismatchError(f"{where} is {chunk.dtype.name}; the session is {self.dtype.name}")
        if self.dim is not None and chunk.dim != self.dim:
            raise DimMismatchError(f"{where} has dim {chunk.dim}; the session has dim {self.dim}")
        start, end = chunk.first_seq, chunk.end_seq
        if start == self.next_seq:
            self.dtype, self.dim, self.next_seq = chunk.dtype, chunk.dim, end
            return Verdict.ACCEPTED
        if start > self.next_seq:
            self.holes = (self.holes + [(self.next_seq, start)])[-MAX_HOLES:]
            missing = f"{self.next_seq}..{start - 1}"
            self.dtype, self.dim, self.next_seq = chunk.dtype, chunk.dim, end
            raise SequenceGapError(f"{where}: latents {missing} are missing before it")
        if end <= self.next_seq and not any(lo < end and start < hi for lo, hi in self.holes):
            return Verdict.DUPLICATE
        raise ReorderedError(f"{where} arrived after latent {self.next_seq - 1} and is not a retry of a "
                             "chunk seen before")

    def _producer(self) -> str:
        return self.producer_id.hex() if self.producer_id else "unknown"


@dataclass(frozen=True)
class Outcome:
    verdict: Verdict
    record: LatentChunk | SessionEvent | None  # None when dead-lettered
    dead_letter: DeadLetterRecord | None = None


class StreamValidator:
    """Decodes and validates records of the latents topic, holding one SessionValidator per session."""

    def __init__(self, max_bytes: int = MAX_MESSAGE_BYTES):
        self.max_bytes = max_bytes
        self.sessions: dict[str, SessionValidator] = {}

    def process(self, msg: KafkaRecord) -> Outcome:
        try:
            record = decode(msg.key, msg.value, max_bytes=self.max_bytes)
            validator = self.sessions.get(record.session_id)
            if validator is None:
                validator = self.sessions[record.session_id] = SessionValidator(record.session_id)
            return Outcome(validator.check(record), record)
        except InvalidInputError as e:
            return Outcome(Verdict.DEAD_LETTER, None, dead_letter(
                e, topic=msg.topic, partition=msg.partition, offset=msg.offset, key=msg.key, value=msg.value,
                timestamp_ms=msg.timestamp))
