"""Wire encoding of the latents topic: latent chunks and session events, both keyed by session id.

A value starts with a 4-byte magic: ``MSLT`` is a latent chunk (a fixed header, see
:class:`memstream.schemas.records.LatentChunkHeader`, then the raw little-endian payload, or,
in a *sealed* chunk (header version 2), the data key id and the payload sealed under the
session's data key, :mod:`memstream.crypto.datakeys`);
``MSSE`` is a session event (a version byte, then the JSON of :class:`SessionEvent`).
:func:`decode` is stateless and raises only :class:`memstream.errors.InvalidInputError`
subclasses, whatever bytes it is given.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from memstream.crypto.datakeys import (KEY_ID_BYTES, SEALED_OVERHEAD, encrypt, seal_deterministic, unseal,
                                       unseal_deterministic)

from memstream.errors import (BadEventError, BadKeyError, BadMagicError, ChecksumError, IntegrityError,
                              KeyUnavailableError, NonFiniteError, OutOfRangeError, OversizeError, ShapeError,
                              TruncatedError, UnknownVersionError, UnsupportedDTypeError)
from memstream.schemas.records import (CHUNK_MAGIC, CHUNK_VERSION, EVENT_MAGIC, HEADER, HEADER_SIZE,
                                       SEALED_CHUNK_VERSION, DType, LatentChunkHeader, SessionEvent, SummaryRecord)
from memstream.settings import MAX_MESSAGE_BYTES

# Wire dtype -> numpy dtype of the payload; numpy has no bfloat16, so bf16 travels as its bits.
NUMPY_DTYPES = {DType.fp32: np.dtype("<f4"), DType.fp16: np.dtype("<f2"), DType.bf16: np.dtype("<u2")}
_CRC_OFFSET = HEADER_SIZE - 4
# Sequence numbers and times are signed 64-bit everywhere downstream (Arrow, hashing).
INT64_END = 1 << 63
SEALED_EXTRA = KEY_ID_BYTES + SEALED_OVERHEAD  # bytes a sealed chunk has beyond a plain one


class DataKeys(Protocol):
    """Where a consumer gets data keys (:class:`memstream.storage.keytable.KeyTable`)."""

    def data_key(self, key_id: bytes) -> bytes:
        """The key; KeyDestroyedError once forgotten, KeyUnavailableError when unknown."""


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
                 event_time_us: int, payload: bytes | memoryview,
                 sealed_by: tuple[bytes, bytes, bytes] | None = None) -> bytes:
    """Header + payload; ``payload`` must already be ``count x dim`` little-endian ``dtype`` values.
    ``sealed_by`` (session key bytes, data key id, data key) seals the payload (version 2)."""
    version = CHUNK_VERSION if sealed_by is None else SEALED_CHUNK_VERSION
    prefix = HEADER.pack(CHUNK_MAGIC, version, dtype, 0, dim, count, first_seq, event_time_us,
                         producer_id, 0)[:_CRC_OFFSET]
    if sealed_by is None:
        return b"".join((prefix, chunk_crc(prefix, payload).to_bytes(4, "little"), payload))
    import crc32c

    session_key, key_id, data_key = sealed_by
    parts = (key_id, *encrypt(data_key, payload, _chunk_aad(session_key, prefix, key_id)))
    crc = crc32c.crc32c(prefix)
    for part in parts:  # the CRC of the parts, without joining them twice
        crc = crc32c.crc32c(part, crc)
    return b"".join((prefix, crc.to_bytes(4, "little"), *parts))


def _chunk_aad(session_key: bytes, prefix: bytes | memoryview, key_id: bytes) -> bytes:
    # The ciphertext is bound to its session and header: it cannot be replayed under another.
    return b"".join((b"memstream.chunk.v2", len(session_key).to_bytes(4, "little"), session_key, prefix, key_id))


def encode_event(event: SessionEvent) -> bytes:
    return EVENT_MAGIC + bytes([event.schema_version]) + event.to_json()


def decode_key(key: bytes | None) -> str:
    if not isinstance(key, (bytes, bytearray)) or not key:
        raise BadKeyError("record has no key; the key must be the session id (UTF-8)")
    try:
        return bytes(key).decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadKeyError(f"key is not UTF-8 ({e.reason} at byte {e.start}); the key must be the session id") from None


def decode(key: bytes | None, value: bytes | None, *, max_bytes: int = MAX_MESSAGE_BYTES,
           keys: DataKeys | None = None) -> LatentChunk | SessionEvent:
    """Decode one record of the latents topic, checking everything that needs no session state;
    a sealed chunk is opened with its data key from ``keys``."""
    session_id = decode_key(key)
    if value is None or len(value) < 5:
        raise TruncatedError(f"value of {0 if value is None else len(value)} bytes is too short for any record")
    if len(value) > max_bytes:
        raise OversizeError(f"value of {len(value)} bytes exceeds the limit of {max_bytes}")
    magic = bytes(value[:4])
    if magic == CHUNK_MAGIC:
        return _decode_chunk(session_id, bytes(value), keys)
    if magic == EVENT_MAGIC:
        return _decode_event(session_id, bytes(value))
    raise BadMagicError(f"value starts with {magic!r}, neither a latent chunk ({CHUNK_MAGIC!r}) "
                        f"nor a session event ({EVENT_MAGIC!r})")


def _decode_chunk(session_id: str, value: bytes, keys: DataKeys | None) -> LatentChunk:
    if value[4] not in (CHUNK_VERSION, SEALED_CHUNK_VERSION):
        raise UnknownVersionError(f"latent chunk version {value[4]}; this memstream reads versions "
                                  f"{CHUNK_VERSION} and {SEALED_CHUNK_VERSION}: upgrade the consumer")
    sealed = value[4] == SEALED_CHUNK_VERSION
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
    expected = HEADER_SIZE + header.count * header.dim * dtype.itemsize + (SEALED_EXTRA if sealed else 0)
    if len(value) < expected:
        raise TruncatedError(f"chunk of {header.count} x {header.dim} {dtype.name} needs {expected} bytes, "
                             f"got {len(value)}")
    if len(value) > expected:
        raise OversizeError(f"chunk of {header.count} x {header.dim} {dtype.name} needs {expected} bytes, "
                            f"got {len(value)}: trailing bytes")
    payload = memoryview(value)[HEADER_SIZE:] if sealed else value[HEADER_SIZE:]  # sealed: opened below
    if chunk_crc(value[:_CRC_OFFSET], payload) != header.crc32c:
        raise ChecksumError(f"CRC-32C mismatch in chunk at seq {header.first_seq}: the bytes were "
                            "corrupted after publishing")
    if sealed:
        payload = _open_payload(session_id, header, value, keys)
    chunk = LatentChunk(session_id, header, payload)
    if not all_finite(chunk.array(), dtype):
        raise NonFiniteError(f"chunk at seq {header.first_seq} holds NaN or Inf values")
    return chunk


def _open_payload(session_id: str, header: LatentChunkHeader, value: bytes, keys: DataKeys | None) -> bytes:
    key_id = value[HEADER_SIZE:HEADER_SIZE + KEY_ID_BYTES]
    if keys is None:
        raise KeyUnavailableError(f"chunk at seq {header.first_seq} of session {session_id!r} is sealed under data "
                                  f"key {key_id.hex()}, and this consumer has no key table: give it the master "
                                  "key file")
    data_key = keys.data_key(key_id)  # KeyDestroyedError once the session is forgotten
    try:
        return unseal(data_key, memoryview(value)[HEADER_SIZE + KEY_ID_BYTES:],
                      _chunk_aad(session_id.encode(), value[:_CRC_OFFSET], key_id))
    except IntegrityError:
        raise ChecksumError(f"sealed chunk at seq {header.first_seq} of session {session_id!r} does not "
                            "authenticate under its data key: it was altered, or sealed for another session") from None


# -- sealed summary tokens -------------------------------------------------------------------
# A summary's tokens sealed under its session's data key: magic, key id, then AES-GCM-SIV
# (nonce, ciphertext, tag) bound to the session and window. The record's hash and signature
# cover these bytes, so chains verify without any key, and a replay seals byte for byte.
TOKENS_MAGIC = b"MSTK"
TOKENS_EXTRA = len(TOKENS_MAGIC) + KEY_ID_BYTES + SEALED_OVERHEAD
_TOKEN_ITEMSIZE = {"fp16": 2, "bf16": 2, "fp32": 4}


def _tokens_context(session_id: str, window_index: int, key_id: bytes) -> bytes:
    sid = session_id.encode()
    return b"".join((b"memstream.tokens.v1", len(sid).to_bytes(4, "little"), sid,
                     window_index.to_bytes(8, "little", signed=True), key_id))


def seal_tokens(session_id: str, window_index: int, tokens: bytes, key_id: bytes, data_key: bytes) -> bytes:
    """A window's token bytes sealed under the session's data key (empty tokens stay empty)."""
    if not tokens:
        return tokens
    return b"".join((TOKENS_MAGIC, key_id,
                     seal_deterministic(data_key, tokens, _tokens_context(session_id, window_index, key_id))))


def tokens_sealed(record: SummaryRecord) -> bool:
    plain = record.token_count * record.dim * _TOKEN_ITEMSIZE.get(record.tokens_dtype, 0)
    return len(record.tokens) == plain + TOKENS_EXTRA and record.tokens[:len(TOKENS_MAGIC)] == TOKENS_MAGIC


def summary_tokens(record: SummaryRecord, keys: DataKeys | None):
    """The record's tokens as float32 [token_count, dim], opened with ``keys`` when sealed:
    KeyDestroyedError once its session is forgotten, KeyUnavailableError without keys."""
    if not tokens_sealed(record):
        return record.token_array()
    key_id = record.tokens[len(TOKENS_MAGIC):len(TOKENS_MAGIC) + KEY_ID_BYTES]
    if keys is None:
        raise KeyUnavailableError(f"summary {record.session_id}/{record.window_index} holds tokens sealed under data "
                                  f"key {key_id.hex()}: open the store with its key table (the master key file)")
    plain = unseal_deterministic(keys.data_key(key_id), record.tokens[len(TOKENS_MAGIC) + KEY_ID_BYTES:],
                                 _tokens_context(record.session_id, record.window_index, key_id))
    import dataclasses

    return dataclasses.replace(record, tokens=plain).token_array()


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

