"""Wire encoding of the latents topic: latent chunks and session events, both keyed by session id.

A value starts with a 4-byte magic: ``MSLT`` is a latent chunk (a fixed header, see
:class:`memstream.schemas.records.LatentChunkHeader`, then the raw little-endian payload);
``MSSE`` is a session event (a version byte, then the JSON of :class:`SessionEvent`).
:func:`decode` is stateless and raises only :class:`memstream.errors.InvalidInputError`
subclasses, whatever bytes it is given.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass

import numpy as np

from memstream.errors import (BadEventError, BadKeyError, BadMagicError, ChecksumError, NonFiniteError,
                              OutOfRangeError, OversizeError, ShapeError, TruncatedError, UnknownVersionError,
                              UnsupportedDTypeError)
from memstream.schemas.records import (CHUNK_MAGIC, CHUNK_VERSION, EVENT_MAGIC, HEADER, HEADER_SIZE, DType,
                                       LatentChunkHeader, SessionEvent)
from memstream.settings import MAX_MESSAGE_BYTES

# Wire dtype -> numpy dtype of the payload; numpy has no bfloat16, so bf16 travels as its bits.
NUMPY_DTYPES = {DType.fp32: np.dtype("<f4"), DType.fp16: np.dtype("<f2"), DType.bf16: np.dtype("<u2")}
_CRC_OFFSET = HEADER_SIZE - 4
# Sequence numbers and times are signed 64-bit everywhere downstream (Arrow, hashing).
INT64_END = 1 << 63


def chunk_crc(header_prefix: bytes | memoryview, payload: bytes | memoryview) -> int:
    """CRC-32C of a chunk's header bytes before the CRC field, then of its payload."""
    import crc32c  # here, not at the top: the schemas and errors import without it

    return crc32c.crc32c(payload, crc32c.crc32c(header_prefix))


class _ChunkHeaderView:
    """What a chunk's header says, for :class:`LatentChunk` and :class:`ChunkMeta` alike."""

    header: LatentChunkHeader

    @property
    def dtype(self) -> DType:
        return DType(self.header.dtype)

    @property
    def dim(self) -> int:
        return self.header.dim

    @property
    def count(self) -> int:
        return self.header.count

    @property
    def first_seq(self) -> int:
        return self.header.first_seq

    @property
    def end_seq(self) -> int:
        """One past the last latent's sequence number."""
        return self.header.first_seq + self.header.count

    @property
    def producer_id(self) -> bytes:
        return self.header.producer_id

    @property
    def event_time_us(self) -> int:
        return self.header.event_time_us


@dataclass(frozen=True)
class ChunkMeta(_ChunkHeaderView):
    """A chunk without its latents: its header and a CRC-32C of its payload, all that the
    per-session rules need (a pipeline moves this, and reads the latents where it compresses)."""

    session_id: str
    header: LatentChunkHeader
    payload_crc: int


@dataclass(frozen=True)
class LatentChunk(_ChunkHeaderView):
    """A decoded chunk: ``count`` latents of ``dim`` values, numbered from ``first_seq``."""

    session_id: str
    header: LatentChunkHeader
    payload: bytes

    def array(self) -> np.ndarray:
        """The payload as [count, dim] in its wire dtype (bf16 as uint16 bits), without a copy."""
        return np.frombuffer(self.payload, NUMPY_DTYPES[self.dtype]).reshape(self.count, self.dim)

    def to_float32(self) -> np.ndarray:
        return to_float32(self.array(), self.dtype)

    def meta(self) -> ChunkMeta:
        import crc32c

        return ChunkMeta(self.session_id, self.header, crc32c.crc32c(self.payload))


def to_float32(raw: np.ndarray, dtype: DType) -> np.ndarray:
    if dtype is DType.bf16:
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


def write_float32(raw: np.ndarray, dtype: DType, out: np.ndarray) -> None:
    """:func:`to_float32` into ``out`` (float32, the shape of ``raw``), with no array between."""
    if dtype is DType.bf16:
        bits = out.view(np.uint32)
        bits[...] = raw
        bits <<= 16
    else:
        out[...] = raw


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even) and return the 16-bit patterns."""
    u = np.ascontiguousarray(x, dtype="<f4").view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")


# Exponent bits of the 16-bit formats: all ones is Inf or NaN. Testing the bits is four times
# faster than np.isfinite on float16, which numpy does not vectorise.
_EXPONENT_16 = {DType.bf16: 0x7F80, DType.fp16: 0x7C00}


def all_finite(raw: np.ndarray, dtype: DType) -> bool:
    mask = _EXPONENT_16.get(dtype)
    if mask is not None:
        bits = raw.view(np.uint16)
        return not bool(((bits & mask) == mask).any())
    return bool(np.isfinite(raw).all())


def encode_chunk(*, producer_id: bytes, dtype: DType, dim: int, count: int, first_seq: int,
                 event_time_us: int, payload: bytes | memoryview) -> bytes:
    """Header + payload; ``payload`` must already be ``count x dim`` little-endian ``dtype`` values."""
    prefix = HEADER.pack(CHUNK_MAGIC, CHUNK_VERSION, dtype, 0, dim, count, first_seq, event_time_us,
                         producer_id, 0)[:_CRC_OFFSET]
    return b"".join((prefix, chunk_crc(prefix, payload).to_bytes(4, "little"), payload))


def encode_event(event: SessionEvent) -> bytes:
    return EVENT_MAGIC + bytes([event.schema_version]) + event.to_json()


def decode_key(key: bytes | None) -> str:
    if not isinstance(key, (bytes, bytearray)) or not key:
        raise BadKeyError("record has no key; the key must be the session id (UTF-8)")
    try:
        return bytes(key).decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadKeyError(f"key is not UTF-8 ({e.reason} at byte {e.start}); the key must be the session id") from None


def decode(key: bytes | None, value: bytes | None, *,
           max_bytes: int = MAX_MESSAGE_BYTES) -> LatentChunk | SessionEvent:
    """Decode one record of the latents topic, checking everything that needs no session state."""
    session_id = decode_key(key)
    if value is None or len(value) < 5:
        raise TruncatedError(f"value of {0 if value is None else len(value)} bytes is too short for any record")
    if len(value) > max_bytes:
        raise OversizeError(f"value of {len(value)} bytes exceeds the limit of {max_bytes}")
    magic = bytes(value[:4])
    if magic == CHUNK_MAGIC:
        return _decode_chunk(session_id, bytes(value))
    if magic == EVENT_MAGIC:
        return _decode_event(session_id, bytes(value))
    raise BadMagicError(f"value starts with {magic!r}, neither a latent chunk ({CHUNK_MAGIC!r}) "
                        f"nor a session event ({EVENT_MAGIC!r})")


def _decode_chunk(session_id: str, value: bytes) -> LatentChunk:
    if value[4] != CHUNK_VERSION:
        raise UnknownVersionError(f"latent chunk version {value[4]}; this memstream reads version "
                                  f"{CHUNK_VERSION}: upgrade the consumer")
    if len(value) < HEADER_SIZE:
        raise TruncatedError(f"latent chunk of {len(value)} bytes is shorter than its {HEADER_SIZE}-byte header")
    header = LatentChunkHeader(*HEADER.unpack_from(value))
    if header.reserved != 0:
        raise UnknownVersionError(f"reserved header field is {header.reserved}, not 0: the chunk comes "
                                  "from a newer layout; upgrade the consumer")
    try:
        dtype = DType(header.dtype)
    except ValueError:
        raise UnsupportedDTypeError(f"dtype code {header.dtype} is none of "
                                    f"{', '.join(f'{d.value} ({d.name})' for d in DType)}") from None
    if header.dim == 0 or header.count == 0:
        raise ShapeError(f"chunk header says {header.count} latents of dim {header.dim}; both must be >= 1")
    if header.first_seq + header.count >= INT64_END:
        raise OutOfRangeError(f"chunk at seq {header.first_seq} (+{header.count}) runs past 2**63 - 1, the "
                              "largest sequence number")
    if header.event_time_us < 0:
        raise OutOfRangeError(f"chunk at seq {header.first_seq} has a negative event time {header.event_time_us}")
    expected = HEADER_SIZE + header.count * header.dim * dtype.itemsize
    if len(value) < expected:
        raise TruncatedError(f"chunk of {header.count} x {header.dim} {dtype.name} needs {expected} bytes, "
                             f"got {len(value)}")
    if len(value) > expected:
        raise OversizeError(f"chunk of {header.count} x {header.dim} {dtype.name} needs {expected} bytes, "
                            f"got {len(value)}: trailing bytes")
    payload = value[HEADER_SIZE:]
    if chunk_crc(value[:_CRC_OFFSET], payload) != header.crc32c:
        raise ChecksumError(f"CRC-32C mismatch in chunk at seq {header.first_seq}: the bytes were "
                            "corrupted after publishing")
    chunk = LatentChunk(session_id, header, payload)
    if not all_finite(chunk.array(), dtype):
        raise NonFiniteError(f"chunk at seq {header.first_seq} holds NaN or Inf values")
    return chunk


def _decode_event(session_id: str, value: bytes) -> SessionEvent:
    if value[4] != SessionEvent.SCHEMA_VERSION:
        raise UnknownVersionError(f"session event version {value[4]}; this memstream reads version "
                                  f"{SessionEvent.SCHEMA_VERSION}: upgrade the consumer")
    try:
        event = SessionEvent.from_json(value[5:])
    except (ValueError, TypeError, RecursionError, binascii.Error) as e:  # JSON, UTF-8, base64, fields
        raise BadEventError(f"session event body does not match the session_event schema: {e}") from None
    if event.schema_version != SessionEvent.SCHEMA_VERSION:
        raise UnknownVersionError(f"session event schema_version {event.schema_version} differs from "
                                  f"its frame version {value[4]}")
    if event.session_id != session_id:
        raise BadEventError(f"session event for {event.session_id!r} carries key {session_id!r}; "
                            "the key must be the session id")
    if len(event.producer_id) != 16:
        raise BadEventError(f"producer_id has {len(event.producer_id)} bytes, not 16")
    if event.dtype is not None and event.dtype not in DType.__members__:
        raise UnsupportedDTypeError(f"session event dtype {event.dtype!r} is none of {', '.join(DType.__members__)}")
    for name in ("latents", "event_time_us"):
        if not -INT64_END <= getattr(event, name) < INT64_END:
            raise OutOfRangeError(f"session event {name}={getattr(event, name)} does not fit 64 bits")
    if event.dim is not None and not 1 <= event.dim < 1 << 32:
        raise ShapeError(f"session event dim {event.dim} must be in 1..2**32 - 1")
    if event.latents < 0 or (event.kind == "open" and event.latents != 0):
        raise BadEventError(f"{event.kind} event with latents={event.latents}; open has 0, close >= 0")
    if event.event_time_us < 0:
        raise BadEventError(f"event_time_us {event.event_time_us} is negative")
    return event

