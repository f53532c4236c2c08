"""Consumer-side validation of the latents topic, and dead-letter records.

:class:`SessionValidator` holds the state of one session (small and picklable, so a Beam
pipeline keeps one per key in its state); :class:`StreamValidator` holds one per session for
a plain consumer loop. Rules, per session, in partition order:

* an ``open`` event starts the session; chunks or a ``close`` before it are
  :class:`UnknownSessionError`, anything after ``close`` is :class:`ClosedSessionError`;
* dtype and dim are fixed by the open event, or by the first chunk when the event has none;
* latents are numbered from 0. A chunk whose range was already accepted is a producer retry:
  it is dropped (:attr:`Verdict.DUPLICATE`), not dead-lettered. A chunk ahead of the expected
  number is accepted with :attr:`Verdict.GAP`: the latents between were lost before they
  reached the topic, nothing of this chunk is wrong, and the missing range is remembered, so
  if it arrives later it is a :class:`ReorderedError`;
* a ``close`` whose latent count exceeds what arrived closes the session with
  :attr:`Verdict.GAP` (the tail was lost);
* chunks and the close come from the producer that opened the session, else they are a
  :class:`ForeignProducerError`;
* a range sent again must be sent exactly as before (the last :data:`MAX_ACCEPTED` chunks are
  remembered by a CRC-32C of their payload): other bytes, or other chunk boundaries, are a
  :class:`ConflictingContentError`.

A validator can be *resumed* from a session's stored chain head (:meth:`SessionValidator.resume`):
it then knows the producer, dtype, width and next sequence number the head recorded, and the
first chunk may straddle that number (a replay from a committed offset re-reads the chunk that
the head's window ended in).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal

from memstream.errors import (BadEventError, ClosedSessionError, ConflictingContentError, DimMismatchError,
                              DTypeMismatchError, ForeignProducerError, InvalidInputError, ReorderedError,
                              UnknownSessionError)
from memstream.schemas.records import DeadLetterRecord, DType, SessionEvent
from memstream.settings import MAX_MESSAGE_BYTES
from memstream.wire.codec import ChunkMeta, LatentChunk, decode
from memstream.wire.deadletter import KafkaRecord, dead_letter

MAX_HOLES = 256  # missing ranges remembered per session; older ones are forgotten
MAX_ACCEPTED = 256  # accepted chunks whose payload CRC is remembered, to tell a retry from a conflict


class Verdict(enum.Enum):
    ACCEPTED = "accepted"
    GAP = "gap"  # accepted, and latents before it (or before the close) never arrived
    DUPLICATE = "duplicate"  # a producer retry of something already accepted: drop it
    DEAD_LETTER = "dead_letter"

    @property
    def accepted(self) -> bool:
        return self in (Verdict.ACCEPTED, Verdict.GAP)


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
    accepted: list[tuple[int, int, int]] = field(default_factory=list)  # (first, end, payload CRC), oldest first
    resumed_at: int | None = None  # the next sequence number of a stored head this state resumed from

    @classmethod
    def resume(cls, session_id: str, *, producer_id: bytes, dtype: DType, dim: int, next_seq: int,
               closed: bool) -> "SessionValidator":
        """The state of a session whose stored chain head recorded these values."""
        # A resumed closed session does not know the count its close said: any close is its own.
        return cls(session_id, "closed" if closed else "open", producer_id, dtype, dim, next_seq, None,
                   resumed_at=next_seq)

    def check(self, record: LatentChunk | ChunkMeta | SessionEvent) -> Verdict:
        if isinstance(record, SessionEvent):
            return self._open(record) if record.kind == "open" else self._close(record)
        return self._chunk(record)

    def _open(self, event: SessionEvent) -> Verdict:
        if self.state == "closed" and self.resumed_at is not None and event.producer_id == self.producer_id:
            return Verdict.DUPLICATE  # a replay of the open of a session resumed closed
        if self.state == "closed":
            raise ClosedSessionError(f"open event for session {self.session_id!r}, which is closed: "
                                     "use a new session id")
        dtype = DType[event.dtype] if event.dtype else None
        if self.state == "open":
            if event.producer_id == self.producer_id:  # the producer's retry of its open event
                return Verdict.DUPLICATE
            raise ForeignProducerError(f"second open event for session {self.session_id!r} from producer "
                                       f"{event.producer_id.hex()}; producer {self._producer()} opened it")
        self.state, self.producer_id, self.dtype, self.dim = "open", event.producer_id, dtype, event.dim
        return Verdict.ACCEPTED

    def _close(self, event: SessionEvent) -> Verdict:
        if self.state == "new":
            raise UnknownSessionError(f"close event for session {self.session_id!r}, which was never opened")
        if event.producer_id != self.producer_id:
            raise ForeignProducerError(f"close event for session {self.session_id!r} from producer "
                                       f"{event.producer_id.hex()}; producer {self._producer()} opened it")
        if self.state == "closed":
            if event.latents == self.latents_at_close or self.latents_at_close is None:
                return Verdict.DUPLICATE
            raise ClosedSessionError(f"second close of session {self.session_id!r} with latents="
                                     f"{event.latents} (first said {self.latents_at_close})")
        if event.latents < self.next_seq:
            raise BadEventError(f"session {self.session_id!r} closed with {event.latents} latents "
                                f"published, but {self.next_seq} arrived")
        self.state, self.latents_at_close = "closed", event.latents
        return Verdict.GAP if event.latents > self.next_seq else Verdict.ACCEPTED

    def _chunk(self, chunk: LatentChunk | ChunkMeta) -> Verdict:
        where = f"chunk {chunk.first_seq}..{chunk.end_seq - 1} of session {self.session_id!r}"
        if self.state == "new":
            raise UnknownSessionError(f"{where}: the session was never opened (publish its open event first)")
        if chunk.producer_id != self.producer_id:
            raise ForeignProducerError(f"{where} comes from producer {chunk.producer_id.hex()}; producer "
                                       f"{self._producer()} opened the session")
        if self.state == "closed":
            if chunk.end_seq <= self.next_seq and not self._in_hole(chunk):
                return self._repeat(chunk, where)
            raise ClosedSessionError(f"{where} arrived after the session was closed")
        if self.dtype is not None and chunk.dtype is not self.dtype:
            raise DTypeMismatchError(f"{where} is {chunk.dtype.name}; the session is {self.dtype.name}")
        if self.dim is not None and chunk.dim != self.dim:
            raise DimMismatchError(f"{where} has dim {chunk.dim}; the session has dim {self.dim}")
        start, end = chunk.first_seq, chunk.end_seq
        resumed = self.resumed_at is not None and start < self.resumed_at == self.next_seq < end
        if start == self.next_seq or resumed:  # resumed: the tail of a chunk the stored head ended in
            self._accept(chunk)
            return Verdict.ACCEPTED
        if start > self.next_seq:
            self.holes = (self.holes + [(self.next_seq, start)])[-MAX_HOLES:]
            self._accept(chunk)
            return Verdict.GAP
        if end <= self.next_seq and not self._in_hole(chunk):
            return self._repeat(chunk, where)
        raise ReorderedError(f"{where} arrived after latent {self.next_seq - 1} and is not a retry of a "
                             "chunk seen before")

    def _in_hole(self, chunk: LatentChunk | ChunkMeta) -> bool:
        return any(lo < chunk.end_seq and chunk.first_seq < hi for lo, hi in self.holes)

    def _accept(self, chunk: LatentChunk | ChunkMeta) -> None:
        crc = chunk.payload_crc if isinstance(chunk, ChunkMeta) else chunk.meta().payload_crc
        self.dtype, self.dim, self.next_seq = chunk.dtype, chunk.dim, chunk.end_seq
        self.accepted = (self.accepted + [(chunk.first_seq, chunk.end_seq, crc)])[-MAX_ACCEPTED:]
        self.resumed_at = None

    def _repeat(self, chunk: LatentChunk | ChunkMeta, where: str) -> Verdict:
        """A range accepted before: the producer's retry when its bytes are the same."""
        start, end = chunk.first_seq, chunk.end_seq
        if not self.accepted or start < self.accepted[0][0]:
            return Verdict.DUPLICATE  # older than what is remembered (or resumed from a head): not checkable
        crc = chunk.payload_crc if isinstance(chunk, ChunkMeta) else chunk.meta().payload_crc
        for first, last, known in self.accepted:
            if (first, last) == (start, end):
                if known == crc:
                    return Verdict.DUPLICATE
                raise ConflictingContentError(f"{where} was accepted before with other bytes (CRC "
                                              f"{known:08x}, now {crc:08x})")
        raise ConflictingContentError(f"{where} re-sends latents accepted before with other chunk boundaries: "
                                      "a retry must send the same chunks")

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

    def process(self, msg: KafkaRecord) -> Outcome:  # noqa: D102
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
