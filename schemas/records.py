"""The records memstream writes to Kafka and storage, as dataclasses: the source of truth.

JSON Schema files (``schemas/*.json``) and Arrow schemas are generated from these classes by
:mod:`memstream.schemas.generate`; a test fails when a checked-in file drifts from them.
Field metadata ``doc`` becomes the description, ``arrow`` overrides the Arrow type name.
Bytes travel as base64 strings in JSON. Canonical encodings for hashing and signing are
defined elsewhere; here every field that takes part in them is explicit.

The latent chunk is binary, not JSON: :class:`LatentChunkHeader` declares the fixed header,
each field's ``struct`` code in order, and :data:`HEADER` is built from it.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import json
import struct
import types
import typing
from dataclasses import dataclass, field
from typing import Literal

import crc32c


def _f(doc: str, **meta) -> typing.Any:
    return field(metadata={"doc": doc, **meta})


# -- latent chunk (binary) -----------------------------------------------------------------

CHUNK_MAGIC = b"MSLT"
EVENT_MAGIC = b"MSSE"  # session lifecycle event: magic, version byte, then a JSON body
CHUNK_VERSION = 1


class DType(enum.IntEnum):
    """Wire dtype codes of the latent payload (little-endian)."""

    fp32 = 1
    fp16 = 2
    bf16 = 3

    @property
    def itemsize(self) -> int:
        return 4 if self is DType.fp32 else 2


@dataclass(frozen=True)
class LatentChunkHeader:
    """Fixed 52-byte little-endian header of a latent chunk; the raw payload follows it.

    Kafka key: the session id (UTF-8). The payload is ``count x dim`` values of ``dtype``,
    row-major, and holds the latents numbered ``first_seq .. first_seq + count - 1`` of the
    session. ``crc32c`` covers the header bytes before it and the whole payload.
    """

    magic: bytes = _f("b'MSLT'", struct="4s")
    version: int = _f("header layout version, 1", struct="B")
    dtype: int = _f("DType code: 1 fp32, 2 fp16, 3 bf16", struct="B")
    reserved: int = _f("zero", struct="H")
    dim: int = _f("latent width d", struct="I")
    count: int = _f("latents in this chunk, >= 1", struct="I")
    first_seq: int = _f("per-session sequence number of the first latent (from 0)", struct="Q")
    event_time_us: int = _f("producer wall clock at publish, microseconds since the epoch", struct="q")
    producer_id: bytes = _f("16-byte UUID of the publishing producer", struct="16s")
    crc32c: int = _f("CRC-32C of the preceding header bytes and the payload", struct="I")


HEADER = struct.Struct("<" + "".join(f.metadata["struct"] for f in dataclasses.fields(LatentChunkHeader)))
HEADER_SIZE = HEADER.size
_CRC_OFFSET = HEADER_SIZE - 4


def chunk_crc(header_prefix: bytes | memoryview, payload: bytes | memoryview) -> int:
    return crc32c.crc32c(payload, crc32c.crc32c(header_prefix))


# -- JSON records --------------------------------------------------------------------------

class JsonRecord:
    """Mixin: JSON encoding that follows the dataclass fields (bytes as base64)."""

    SCHEMA_NAME: typing.ClassVar[str]
    SCHEMA_VERSION: typing.ClassVar[int] = 1

    def to_dict(self) -> dict:
        return _to_jsonable(self)

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def from_dict(cls, data: dict):
        return _from_jsonable(cls, data)

    @classmethod
    def from_json(cls, raw: bytes | str):
        return cls.from_dict(json.loads(raw))


def _to_jsonable(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    return value


def _from_jsonable(tp, value):
    """Rebuild ``tp`` from JSON data; raises TypeError/ValueError on a mismatch."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _from_jsonable(inner, value)
    if origin is list:
        if not isinstance(value, list):
            raise TypeError(f"expected a list, got {type(value).__name__}")
        return [_from_jsonable(args[0], v) for v in value]
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{value!r} is not one of {args}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise TypeError(f"expected an object for {tp.__name__}")
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        if set(value) != names:
            raise ValueError(f"{tp.__name__} fields differ: missing {sorted(names - set(value))}, "
                             f"unknown {sorted(set(value) - names)}")
        return tp(**{n: _from_jsonable(hints[n], value[n]) for n in names})
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(value)
    if tp is bytes:
        if not isinstance(value, str):
            raise TypeError("expected a base64 string")
        return base64.b64decode(value, validate=True)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise TypeError(f"expected {tp.__name__}, got {type(value).__name__}")
    return value


class DeadLetterReason(str, enum.Enum):
    """Why a record went to the dead-letter topic; each has one error class in memstream.errors."""

    bad_key = "bad_key"
    truncated = "truncated"
    oversize = "oversize"
    bad_magic = "bad_magic"
    unknown_version = "unknown_version"
    unsupported_dtype = "unsupported_dtype"
    bad_shape = "bad_shape"
    checksum = "checksum"
    bad_event = "bad_event"
    non_finite = "non_finite"
    dtype_mismatch = "dtype_mismatch"
    dim_mismatch = "dim_mismatch"
    sequence_gap = "sequence_gap"
    reordered = "reordered"
    unknown_session = "unknown_session"
    closed_session = "closed_session"


@dataclass(frozen=True)
class SessionEvent(JsonRecord):
    """Session lifecycle event, on the latents topic with the session id as key, so it is
    ordered with the session's chunks (one partition per session)."""

    SCHEMA_NAME: typing.ClassVar[str] = "session_event"

    schema_version: int = _f("1")
    kind: Literal["open", "close"] = _f("open: the session starts; close: no latents follow")
    session_id: str = _f("equals the Kafka key")
    producer_id: bytes = _f("16-byte UUID of the publishing producer")
    dtype: str | None = _f("fp32, fp16 or bf16 when known at open; else the first chunk sets it")
    dim: int | None = _f("latent width when known at open; else the first chunk sets it")
    latents: int = _f("open: 0; close: number of latents published in the session")
    event_time_us: int = _f("producer wall clock, microseconds since the epoch")


@dataclass(frozen=True)
class SummaryRecord(JsonRecord):
    """One window's summary tokens, chained by hash per session."""

    SCHEMA_NAME: typing.ClassVar[str] = "summary_record"

    schema_version: int = _f("1")
    session_id: str = _f("session the window belongs to")
    window_index: int = _f("0-based window number within the session")
    seq_start: int = _f("first latent sequence number summarized (inclusive)")
    seq_end: int = _f("last latent sequence number summarized (exclusive)")
    partial: bool = _f("true when the window closed early (session close or timeout)")
    token_count: int = _f("summary tokens, 256 for a full window")
    dim: int = _f("width of each summary token")
    tokens_dtype: str = _f("fp32, fp16 or bf16")
    tokens: bytes = _f("token_count x dim little-endian values of tokens_dtype")
    operator_version: str = _f("summarizer operator and checkpoint version")
    event_time_us: int = _f("event time of the window's last latent, microseconds")
    processing_time_us: int = _f("wall clock when the summary was produced, microseconds")
    prev_hash: bytes = _f("hash of the previous summary of the session; empty for the first")
    hash: bytes = _f("hash of this record's canonical encoding")
    signature: bytes = _f("Ed25519 signature over hash")
    key_id: str = _f("identifier of the signing key")


@dataclass(frozen=True)
class Provenance:
    validator_key_hash: bytes = _f("hash of the validator's public key")
    query_hash: bytes = _f("hash of the query that produced the entry")
    timestamp_us: int = _f("when the entry was validated, microseconds since the epoch")


@dataclass(frozen=True)
class LongTermEntry(JsonRecord):
    """An entry of long-term memory."""

    SCHEMA_NAME: typing.ClassVar[str] = "long_term_entry"

    schema_version: int = _f("1")
    entry_id: str = _f("content-derived identifier (hash of the canonical encoding)")
    vector: list[float] = _f("embedding used for retrieval", arrow="list<float32>")
    payload: bytes = _f("the stored content")
    provenance: Provenance = _f("who validated the entry, for which query, when")
    signature: bytes = _f("Ed25519 signature")
    key_id: str = _f("identifier of the signing key")
    forget_tag: str | None = _f("tag that forget requests match, if any")
    subject: str | None = _f("data subject the entry is about, if any")
    supersedes: str | None = _f("entry_id this entry replaces, if any")


@dataclass(frozen=True)
class Attestation(JsonRecord):
    """Signed tree head of the transparency log."""

    SCHEMA_NAME: typing.ClassVar[str] = "attestation"

    schema_version: int = _f("1")
    tree_size: int = _f("number of leaves in the log")
    root_hash: bytes = _f("Merkle root over the leaves")
    timestamp_us: int = _f("when the head was signed, microseconds since the epoch")
    signature: bytes = _f("Ed25519 signature over the head")
    key_id: str = _f("identifier of the signing key")


@dataclass(frozen=True)
class ForgetRequest(JsonRecord):
    SCHEMA_NAME: typing.ClassVar[str] = "forget_request"

    schema_version: int = _f("1")
    subject: str = _f("data subject whose entries are to be forgotten")
    entry_ids: list[str] = _f("entries to forget; empty means every entry of the subject")
    requested_at_us: int = _f("when the request was made, microseconds since the epoch")
    signature: bytes = _f("Ed25519 signature of the requester")
    key_id: str = _f("identifier of the requester's key")


@dataclass(frozen=True)
class GcRecord(JsonRecord):
    """What session_gc removed of one session's episodic memory (window, accounting, chain
    head), signed by the maintenance key; kept in the episodic store's ``gc_records`` table."""

    SCHEMA_NAME: typing.ClassVar[str] = "gc_record"

    schema_version: int = _f("1")
    session_id: str = _f("the collected session")
    reason: Literal["closed", "idle"] = _f("closed: a close event was seen; idle: no activity for the retention")
    summaries_removed: int = _f("summaries removed from the session's window, chain head included")
    reads_removed: int = _f("query accounting rows removed")
    biases_removed: int = _f("decay bias rows removed")
    head_window_index: int | None = _f("window index of the removed chain head; null when none was stored")
    head_hash: bytes = _f("hash of the removed chain head (empty when none): the topic keeps the chain")
    last_activity_us: int = _f("newest summary or query of the session, microseconds since the epoch")
    collected_at_us: int = _f("when the session was collected, microseconds since the epoch")
    signature: bytes = _f("Ed25519 signature over the canonical encoding of the other fields")
    key_id: str = _f("identifier of the signing key")


@dataclass(frozen=True)
class PurgeAttestation(JsonRecord):
    """Signed proof of a forget purge: which entries were erased, by hash, never by content,
    and the storage scan that found none of their bytes left."""

    SCHEMA_NAME: typing.ClassVar[str] = "purge_attestation"

    schema_version: int = _f("1")
    store_id: str = _f("the long-term store purged")
    purge_id: str = _f("32 hex digits naming this purge")
    request_ids: list[str] = _f("the signed forget requests this purge carried out")
    entry_ids: list[str] = _f("ids (content hashes) of the erased entries, sorted")
    removed_hot: int = _f("entries erased from the hot tier")
    removed_cold: int = _f("entries erased from the cold tier")
    tree_size: int = _f("size of the latest signed tree head at the purge (its leaves stay logged)")
    root_hash: bytes = _f("root hash of that tree head")
    files_scanned: int = _f("storage objects scanned for the erased bytes after the purge")
    bytes_scanned: int = _f("bytes scanned")
    markers: int = _f("fingerprints of erased byte windows looked for; none was found")
    purged_at_us: int = _f("when the scan passed, microseconds since the epoch")
    signature: bytes = _f("Ed25519 signature over the canonical encoding of the other fields")
    key_id: str = _f("identifier of the signing key")


@dataclass(frozen=True)
class DeadLetterRecord(JsonRecord):
    """A record the consumer rejected, with everything needed to replay or inspect it."""

    SCHEMA_NAME: typing.ClassVar[str] = "dead_letter_record"

    schema_version: int = _f("1")
    reason: DeadLetterReason = _f("reason code")
    message: str = _f("what was wrong and what to do")
    topic: str = _f("topic of the original record")
    partition: int = _f("partition of the original record")
    offset: int = _f("offset of the original record")
    key: bytes | None = _f("original key bytes")
    value: bytes | None = _f("original value bytes; only the first ones when the whole would not fit in a "
                             "dead-letter message (then shorter than value_size)")
    value_size: int = _f("length of the original value in bytes (0 for none)")
    timestamp_ms: int = _f("timestamp of the original record, milliseconds since the epoch")
    detected_at_us: int = _f("when the consumer rejected it, microseconds since the epoch")


@dataclass(frozen=True)
class ReadDivergence(JsonRecord):
    """A sampled read whose second execution (against a replica store or a second validator)
    did not return what the first did; published to ``memstream.read-divergence``."""

    SCHEMA_NAME: typing.ClassVar[str] = "read_divergence"

    schema_version: int = _f("1")
    read_id: str = _f("id of the read (32 hex digits), as returned to the caller")
    session_id: str = _f("session the query was read against")
    route: Literal["episodic", "longterm", "both"] = _f("stores consulted, the same for both executions")
    primary: str = _f("what executed the read first: its episodic store URI")
    replica: str = _f("what executed it again: its episodic store URI")
    primary_fragments: list[str] = _f("fragments returned first: episodic:<window>:<hash hex> or longterm:<entry id>")
    replica_fragments: list[str] = _f("fragments the replica returned, same notation")
    max_score_delta: float = _f("largest score difference over fragments both returned (0 when none)")
    reasons: list[str] = _f("each difference found, in words")
    detected_at_us: int = _f("when the divergence was found, microseconds since the epoch")


JSON_RECORDS: tuple[type[JsonRecord], ...] = (SessionEvent, SummaryRecord, LongTermEntry, Attestation,
                                             ForgetRequest, GcRecord, PurgeAttestation, DeadLetterRecord,
                                             ReadDivergence)
