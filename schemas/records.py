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
import time
import types
import typing
import uuid
from dataclasses import dataclass, field
from typing import Literal


def _f(doc: str, **meta) -> typing.Any:
    return field(metadata={"doc": doc, **meta})


# -- latent chunk (binary) -----------------------------------------------------------------

CHUNK_MAGIC = b"MSLT"
EVENT_MAGIC = b"MSSE"  # session lifecycle event: magic, version byte, then a JSON body
CHUNK_VERSION = 1
# A sealed chunk: the same header with version 2, then the data key id (16 bytes), and the
# payload sealed by AES-256-GCM (nonce, ciphertext, tag); the CRC covers all that follows it.
SEALED_CHUNK_VERSION = 2


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


class Vector:
    """The type of an embedding field: a float32 numpy array in memory, a list of numbers in
    JSON, a fixed-size list in Arrow. (numpy is imported only where a vector is built, so
    importing the records stays light.)"""


def _to_jsonable(value):
    if type(value).__module__ == "numpy" and hasattr(value, "reshape"):
        return [float(v) for v in value.reshape(-1)]
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
    if tp is Vector:
        if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  for v in value):
            raise TypeError("expected a list of numbers")
        import numpy as np

        return np.asarray(value, dtype=np.float32)
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
    reordered = "reordered"
    unknown_session = "unknown_session"
    closed_session = "closed_session"
    operator_width = "operator_width"
    out_of_range = "out_of_range"
    window_too_large = "window_too_large"
    foreign_producer = "foreign_producer"
    conflicting_content = "conflicting_content"
    collected_session = "collected_session"
    key_destroyed = "key_destroyed"
    key_unavailable = "key_unavailable"


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
    """One window's summary tokens, chained by hash per session. Every field comes from the
    input and the operator, none from the clock of the machine that made it: the same input
    replayed gives the same record, byte for byte. A session's last record has ``cut`` close
    (with no tokens when the close came on a window boundary), so the chain says it ended."""

    SCHEMA_NAME: typing.ClassVar[str] = "summary_record"
    SCHEMA_VERSION: typing.ClassVar[int] = 2

    schema_version: int = _f("2")
    session_id: str = _f("session the window belongs to")
    window_index: int = _f("0-based window number within the session")
    seq_start: int = _f("first latent sequence number summarized (inclusive)")
    seq_end: int = _f("last latent sequence number summarized (exclusive)")
    cut: Literal["full", "close", "idle", "gap"] = _f(
        "why the window ended: full (4,096 latents), close (the session closed), idle (no latent for the idle "
        "timeout), gap (latents were missing)")
    token_count: int = _f("summary tokens: 256, or 0 for a close on a window boundary")
    dim: int = _f("width of each summary token")
    tokens_dtype: str = _f("fp32, fp16 or bf16")
    tokens: bytes = _f("token_count x dim little-endian values of tokens_dtype")
    operator_version: str = _f("summarizer operator and checkpoint version")
    producer_id: bytes = _f("16-byte id of the producer that opened the session")
    latents_dtype: str = _f("wire dtype of the session's latents: fp32, fp16 or bf16")
    latent_dim: int = _f("width of the session's latents")
    event_time_us: int = _f("event time of the record that closed the window, microseconds (producer clock)")
    prev_hash: bytes = _f("hash of the previous summary of the session; empty for the first")
    hash: bytes = _f("hash of this record's canonical encoding")
    signature: bytes = _f("Ed25519 signature over hash")
    key_id: str = _f("identifier of the signing key")

    @property
    def partial(self) -> bool:
        """The window ended before it held 4,096 latents."""
        return self.cut != "full"

    def token_array(self):
        """The tokens as a float32 numpy array [token_count, dim]; ValueError when they do not fit the header."""
        import numpy as np

        code = {"fp16": "<f2", "fp32": "<f4", "bf16": "<u2"}.get(self.tokens_dtype)
        if code is None:
            raise ValueError(f"summary {self.session_id}/{self.window_index}: unknown tokens dtype {self.tokens_dtype!r}")
        raw = np.frombuffer(self.tokens, code)
        if raw.size != self.token_count * self.dim:
            raise ValueError(f"summary {self.session_id}/{self.window_index}: {raw.size} token values, "
                             f"header says {self.token_count} x {self.dim}")
        x = (raw.astype(np.uint32) << 16).view(np.float32) if self.tokens_dtype == "bf16" else raw.astype(np.float32)
        return x.reshape(self.token_count, self.dim)


@dataclass(frozen=True)
class LongTermEntry(JsonRecord):
    """One signed, immutable entry of long-term memory: a row of the ``entries`` table (hot
    tier) or of the cold tier's ``entries``. The signature is Ed25519 over the canonical
    encoding of the content fields and the store id; ``entry_id`` is a hash of the same."""

    SCHEMA_NAME: typing.ClassVar[str] = "long_term_entry"
    CONTENT: typing.ClassVar[tuple[str, ...]] = (
        "vector", "payload", "payload_kind", "validator_key_hash", "query_hash", "timestamp_ns", "forget_tag",
        "forget_subject", "supersedes")

    entry_id: str = _f("64 hex digits: domain-separated SHA-256 of the signed message")
    vector: Vector = _f("the embedding searched by ANN (float32)", arrow="vector")
    payload: bytes = _f("the stored content")
    payload_kind: str = _f("summary_tokens or episodic_ref")
    validator_key_hash: str = _f("hash of the public key of the validator that wrote the entry")
    query_hash: str = _f("hash of the query that triggered the write")
    timestamp_ns: int = _f("when the entry was written, nanoseconds since the epoch")
    key_id: str = _f("identifier of the signing key")
    signature: bytes = _f("Ed25519 signature over the entry's message")
    forget_tag: str | None = _f("tag that forget requests match, if any")
    forget_subject: str | None = _f("hash of the data subject the forget tag is bound to, if any")
    supersedes: str | None = _f("entry_id of the entry this one edits, if any")

    def __eq__(self, other) -> bool:  # the vector is an array: compare the records as JSON values
        return isinstance(other, LongTermEntry) and self.to_dict() == other.to_dict()

    __hash__ = None


@dataclass(frozen=True)
class TreeHead(JsonRecord):
    """A signed tree head of an RFC 6962 Merkle log: its size and root, signed by a log key
    over the canonical encoding of the other fields. Published to ``memstream.attestations``."""

    SCHEMA_NAME: typing.ClassVar[str] = "tree_head"

    log_id: str = _f("the log (a long-term store id)")
    tree_size: int = _f("number of leaves")
    root_hash: bytes = _f("Merkle tree hash over the leaves (RFC 9162 section 2.1.1)")
    timestamp_ns: int = _f("when the head was signed, nanoseconds since the epoch")
    key_id: str = _f("identifier of the signing key")
    signature: bytes = _f("Ed25519 signature over the head")


@dataclass(frozen=True)
class TreeHeadRow(TreeHead):
    """A row of the ``tree_heads`` table: the signed head and the frontier that extends it."""

    SCHEMA_NAME: typing.ClassVar[str] = "tree_head_row"

    frontier: list[bytes] = _f("hashes of the perfect subtrees that make up the tree, largest first")


@dataclass(frozen=True)
class CosignedTreeHead(TreeHead):
    """A signed tree head as a witness keeps it: the log's head, and the witness's Ed25519
    cosignature over it, made only after the witness checked that the head extends every head
    it cosigned before (RFC 9162 consistency proof). Kept in the witness's own storage."""

    SCHEMA_NAME: typing.ClassVar[str] = "cosigned_tree_head"

    witness_key_id: str = _f("identifier of the witness key")
    witnessed_at_ns: int = _f("when the witness cosigned, nanoseconds since the epoch")
    cosignature: bytes = _f("the witness's Ed25519 signature over the canonical encoding of the other fields")


@dataclass(frozen=True)
class CosignedChainHead(JsonRecord):
    """An episodic chain head as a witness keeps it: a session's newest summary (window index
    and hash, with the validator's signature over that hash), cosigned by the witness after it
    checked that the chain links it to the head it cosigned before."""

    SCHEMA_NAME: typing.ClassVar[str] = "cosigned_chain_head"

    session_id: str = _f("the session")
    window_index: int = _f("window index of the chain head")
    head_hash: bytes = _f("hash of the chain head summary")
    seq_end: int = _f("last latent sequence number the head summarises (exclusive)")
    key_id: str = _f("identifier of the validator key that signed the head summary")
    signature: bytes = _f("the validator's signature of the head summary (over its hash)")
    witness_key_id: str = _f("identifier of the witness key")
    witnessed_at_ns: int = _f("when the witness cosigned, nanoseconds since the epoch")
    cosignature: bytes = _f("the witness's Ed25519 signature over the canonical encoding of the other fields")


@dataclass(frozen=True)
class MerkleLeaf(JsonRecord):
    """A row of the ``merkle_log`` table: the log's leaves in order."""

    SCHEMA_NAME: typing.ClassVar[str] = "merkle_leaf"

    leaf_index: int = _f("0-based position in the log")
    entry_id: str = _f("the entry logged")
    leaf_hash: bytes = _f("RFC 6962 leaf hash of the entry as stored")


@dataclass(frozen=True)
class AccessRecord(JsonRecord):
    """A row of ``access_log``: one retrieval of a long-term entry."""

    SCHEMA_NAME: typing.ClassVar[str] = "access_record"

    entry_id: str = _f("the entry retrieved")
    ts_ns: int = _f("when, nanoseconds since the epoch")
    tier: str = _f("hot or cold")


@dataclass(frozen=True)
class AccessStats(JsonRecord):
    """A row of ``access_stats``: the access log of one entry, merged by maintenance."""

    SCHEMA_NAME: typing.ClassVar[str] = "access_stats"

    entry_id: str = _f("the entry")
    count: int = _f("retrievals merged so far")
    last_ns: int = _f("the latest of them, nanoseconds since the epoch")


@dataclass(frozen=True)
class RemovalRequest(JsonRecord):
    """A governance removal of specific entries, to be approved by M of N governance keys.
    ``request_id`` makes each request single-use, so a set of approvals cannot be replayed."""

    SCHEMA_NAME: typing.ClassVar[str] = "removal_request"

    store_id: str = _f("the long-term store")
    entry_ids: list[str] = _f("entries to remove")
    reason: str = _f("why, in words")
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex, metadata={"doc": "32 hex digits"})
    issued_at_ns: int = field(default_factory=time.time_ns, metadata={
        "doc": "when the request was made, nanoseconds since the epoch"})


@dataclass(frozen=True)
class RemovalRecord(JsonRecord):
    """A row of ``removals``: an applied removal with its approvals."""

    SCHEMA_NAME: typing.ClassVar[str] = "removal_record"

    request_id: str = _f("the removal request")
    request: str = _f("the request as JSON")
    approvals: str = _f("the approvals as JSON: [{key_id, signature (hex)}]")
    applied_ns: int = _f("when it was applied, nanoseconds since the epoch")


@dataclass(frozen=True)
class ForgetRequest(JsonRecord):
    """A signed request to forget everything bound to a subject (optionally one forget tag)."""

    SCHEMA_NAME: typing.ClassVar[str] = "forget_request"

    store_id: str = _f("the long-term store")
    subject_hash: str = _f("hash of the data subject")
    tag: str | None = _f("only entries with this forget tag; null: every entry of the subject")
    key_id: str = _f("identifier of the requester's key")
    signature: bytes = _f("Ed25519 signature of the requester")
    request_id: str = _f("32 hex digits")
    issued_at_ns: int = _f("when the request was made, nanoseconds since the epoch")


@dataclass(frozen=True)
class ForgetRequestRow(ForgetRequest):
    """A row of ``forget_requests``: a stored request and how many entries it matched."""

    SCHEMA_NAME: typing.ClassVar[str] = "forget_request_row"

    matched: int = _f("entries bound to the subject when the request was stored")


@dataclass(frozen=True)
class PurgeRecord(JsonRecord):
    """A row of ``purges``: a planned forget purge, and its attestation once the scan passed."""

    SCHEMA_NAME: typing.ClassVar[str] = "purge_record"

    purge_id: str = _f("32 hex digits")
    request_ids: list[str] = _f("the forget requests carried out")
    entry_ids: list[str] = _f("the entries erased")
    removed_hot: int = _f("entries erased from the hot tier")
    removed_cold: int = _f("entries erased from the cold tier")
    markers: bytes = _f("salted fingerprints of the erased bytes (JSON), never the bytes")
    planned_ns: int = _f("when the purge was planned, nanoseconds since the epoch")
    attestation: str | None = _f("the signed PurgeAttestation as JSON; null until the scan passed")


@dataclass(frozen=True)
class PurgeApprovalRecord(JsonRecord):
    """A row of ``purge_approvals``: one governance key's approval of a planned forget purge
    (its signature over the plan: requests, subjects and entry ids)."""

    SCHEMA_NAME: typing.ClassVar[str] = "purge_approval_record"

    purge_id: str = _f("the planned purge")
    key_id: str = _f("identifier of the governance key")
    signature: bytes = _f("Ed25519 signature over the purge plan's approval message")
    approved_ns: int = _f("when the approval was stored, nanoseconds since the epoch")


@dataclass(frozen=True)
class PublishMark(JsonRecord):
    """A row of the episodic store's ``published`` table: Kafka acknowledged this summary."""

    SCHEMA_NAME: typing.ClassVar[str] = "publish_mark"

    session_id: str = _f("the session")
    window_index: int = _f("the summary's window")


@dataclass(frozen=True)
class ReadRecord(JsonRecord):
    """A row of the read ledger (``reads``): one query of a session and what it returned."""

    SCHEMA_NAME: typing.ClassVar[str] = "read_record"

    session_id: str = _f("the session read")
    read_id: bytes = _f("16 random bytes", arrow="binary16")
    ts_ns: int = _f("the reader's clock, nanoseconds since the epoch")
    windows: list[int] = _f("window indices of the summaries the read returned")


@dataclass(frozen=True)
class SummaryBias(JsonRecord):
    """A row of ``summary_bias``: the decay bias the read path adds to a summary's attention."""

    SCHEMA_NAME: typing.ClassVar[str] = "summary_bias"

    session_id: str = _f("the session")
    window_index: int = _f("the summary's window")
    bias: float = _f("additive attention bias (0 or negative)", arrow="float32")
    staleness: int = _f("the session's queries since the summary was last read")
    queries: int = _f("the session's query count the bias was computed at")


@dataclass(frozen=True)
class GcRecord(JsonRecord):
    """What session_gc removed of one session's episodic memory (window, accounting, chain
    head), signed by the maintenance key; kept in the episodic store's ``gc_records`` table."""

    SCHEMA_NAME: typing.ClassVar[str] = "gc_record"

    schema_version: int = _f("1")
    session_id: str = _f("the collected session")
    reason: Literal["closed", "idle", "forgotten"] = _f(
        "closed: a close event was seen; idle: no activity for the retention; forgotten: a forget request (its data "
        "key is destroyed)")
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
class ConsolidationRecord(JsonRecord):
    """What consolidation ("sleep") moved of one session's episodic memory into long-term
    memory before session GC, signed by the maintenance key; kept in the episodic store's
    ``consolidations`` table. Session GC collects only sessions with one for their head."""

    SCHEMA_NAME: typing.ClassVar[str] = "consolidation_record"

    schema_version: int = _f("1")
    session_id: str = _f("the consolidated session")
    head_hash: bytes = _f("hash of the session's chain head when it was consolidated (empty when none)")
    summaries: list[str] = _f("<window>:<hash hex> of each summary distilled, most read first")
    reads: list[int] = _f("the read ledger's count of each of those summaries, same order")
    entry_ids: list[str] = _f("the long-term entries written, same order")
    longterm_store_id: str = _f("the long-term store the entries are in")
    tree_size: int = _f("size of the long-term log's signed tree head that covers the entries")
    consolidated_at_us: int = _f("when, microseconds since the epoch")
    signature: bytes = _f("Ed25519 signature over the canonical encoding of the other fields")
    key_id: str = _f("identifier of the signing key")


@dataclass(frozen=True)
class PurgeAttestation(JsonRecord):
    """Signed proof of a forget purge: which entries were erased, by hash, never by content,
    and the storage scan that found none of their bytes left."""

    SCHEMA_NAME: typing.ClassVar[str] = "purge_attestation"
    SCHEMA_VERSION: typing.ClassVar[int] = 2

    schema_version: int = _f("2")
    store_id: str = _f("the long-term store purged")
    purge_id: str = _f("32 hex digits naming this purge")
    request_ids: list[str] = _f("the signed forget requests this purge carried out")
    subject_hashes: list[str] = _f("the subject hash of each forget request, in the order of request_ids")
    approvals: str = _f("the M-of-N governance approvals of the plan as JSON: [{key_id, signature (hex)}]")
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


JSON_RECORDS: tuple[type[JsonRecord], ...] = (
    SessionEvent, SummaryRecord, DeadLetterRecord, GcRecord, ConsolidationRecord, ReadDivergence, PublishMark, ReadRecord, SummaryBias,
    LongTermEntry, TreeHead, TreeHeadRow, CosignedTreeHead, CosignedChainHead, MerkleLeaf, AccessRecord, AccessStats, RemovalRequest, RemovalRecord,
    ForgetRequest, ForgetRequestRow, PurgeRecord, PurgeApprovalRecord, PurgeAttestation)
