"""Signed long-term memory entries, governance removal requests and forget requests.

An entry's **message** is the canonical encoding (``memstream.crypto.canonical_encode``,
domain ``memstream.longterm.entry.v1``) of every content field plus the id of the store it
is written to; its **id** is a domain-separated SHA-256 of that message, so the same
content signed for another store (or resent to this one) is recognised; its **signature**
is Ed25519 over the message by the validator whose key hash is in the provenance. The
**Merkle leaf** is the canonical encoding of (message, key id, signature), so changing any
stored byte of a row, the signature included, changes its leaf.

A payload bound to a forget subject is **sealed** under the subject's data key before it is
signed (:func:`seal_payload`), so the signature, the id and the leaf cover the sealed bytes and
verify without any key; destroying the key (forgetting) leaves every copy unreadable, in old
versions and backups too. The vector stays in the clear (the ANN index reads it): the forget
purge erases it.
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
import uuid
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

from memstream.crypto.datakeys import KEY_ID_BYTES, seal_deterministic, subject_key_id, unseal_deterministic
from memstream.crypto.hashing import canonical_encode, domain_hash, leaf_hash
from memstream.crypto.keys import KeyRing, SigningKey
from memstream.errors import (ConfigError, GovernanceError, KeyDestroyedError, KeyUnavailableError, SignatureError,
                              VerificationError)
from memstream.schemas.records import ForgetRequest as ForgetRequestRecord
from memstream.schemas.records import LongTermEntry
from memstream.schemas.records import RemovalRequest as RemovalRequestRecord

ENTRY_DOMAIN = "memstream.longterm.entry.v1"
PAYLOAD_KINDS = ("summary_tokens", "episodic_ref")


def query_hash(query: str | bytes) -> str:
    """Provenance hash of the query that triggered a write (the query itself is not stored)."""
    q = query.encode() if isinstance(query, str) else bytes(query)
    return domain_hash("memstream.longterm.query.v1", q).hex()


def session_subject(session_id: str) -> str:
    """The forget subject of what an episodic session leaves in long-term memory (retained
    reads, consolidated summaries): forgetting the session reaches them too."""
    return f"memstream.session:{session_id}"


def subject_hash(subject: str) -> str:
    """What an entry stores for the subject its forget tag is bound to."""
    return domain_hash("memstream.longterm.subject.v1", subject.encode()).hex()


PAYLOAD_MAGIC = b"MSLP"


def _payload_context(key_id: bytes) -> bytes:
    return b"memstream.longterm.payload.v1" + key_id


def seal_payload(payload: bytes, key_id: bytes, data_key: bytes) -> bytes:
    """A payload sealed under its subject's data key (AES-GCM-SIV: the same payload seals to the
    same bytes, so a retried write makes the same entry id; equal payloads of one subject are
    the only thing it shows)."""
    return b"".join((PAYLOAD_MAGIC, key_id, seal_deterministic(data_key, bytes(payload), _payload_context(key_id))))


def payload_sealed(payload: bytes, forget_subject: str | None) -> bool:
    """Whether a stored payload is sealed: it names its subject's key id after the magic."""
    return (forget_subject is not None and payload[:len(PAYLOAD_MAGIC)] == PAYLOAD_MAGIC
            and payload[len(PAYLOAD_MAGIC):len(PAYLOAD_MAGIC) + KEY_ID_BYTES] == subject_key_id(forget_subject))


def open_payload(payload: bytes, forget_subject: str | None, keys) -> bytes | None:
    """The plaintext of a stored payload; None once its subject's key is destroyed, or when
    it is sealed and ``keys`` (a key table) is None or does not hold its key."""
    if not payload_sealed(payload, forget_subject):
        return payload
    if keys is None:
        return None
    key_id = payload[len(PAYLOAD_MAGIC):len(PAYLOAD_MAGIC) + KEY_ID_BYTES]
    try:
        key = keys.data_key(key_id)
    except (KeyDestroyedError, KeyUnavailableError):
        return None
    return unseal_deterministic(key, payload[len(PAYLOAD_MAGIC) + KEY_ID_BYTES:], _payload_context(key_id))


@dataclass(frozen=True)
class Entry(LongTermEntry):
    """A :class:`~memstream.schemas.records.LongTermEntry` with its signing and checking."""

    @staticmethod
    def message(store_id: str, fields: Mapping[str, object]) -> bytes:
        return canonical_encode(ENTRY_DOMAIN, {**{k: fields[k] for k in LongTermEntry.CONTENT}, "store_id": store_id})

    @staticmethod
    def id_of(message: bytes) -> str:
        return domain_hash("memstream.longterm.entry-id.v1", message).hex()

    @classmethod
    def create(cls, key: SigningKey, store_id: str, vector, payload: bytes, *, query: str | bytes,
               payload_kind: str = "summary_tokens", forget_tag: str | None = None,
               forget_subject: str | None = None, supersedes: str | None = None,
               timestamp_ns: int | None = None) -> "Entry":
        """Sign a new entry for the store ``store_id``. ``forget_subject`` is the raw subject
        (a user id); only its hash is kept. A forget tag on a user-bound write needs a subject."""
        if payload_kind not in PAYLOAD_KINDS:
            raise ConfigError(f"payload_kind must be one of {PAYLOAD_KINDS}, got {payload_kind!r}")
        if forget_tag is not None and forget_subject is None:
            raise ConfigError("a forget tag must be bound to a subject: pass forget_subject")
        fields = {
            "vector": np.ascontiguousarray(vector, dtype=np.float32).reshape(-1),
            "payload": bytes(payload),
            "payload_kind": payload_kind,
            "validator_key_hash": domain_hash("memstream.key.v1", key.verify_key.raw).hex(),
            "query_hash": query_hash(query),
            "timestamp_ns": time.time_ns() if timestamp_ns is None else int(timestamp_ns),
            "forget_tag": forget_tag,
            "forget_subject": subject_hash(forget_subject) if forget_subject is not None else None,
            "supersedes": supersedes,
        }
        msg = cls.message(store_id, fields)
        return cls(entry_id=cls.id_of(msg), key_id=key.key_id, signature=key.sign(msg), **fields)

    def fields(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in self.CONTENT}

    def leaf(self, store_id: str) -> bytes:
        """The Merkle leaf hash of this entry as stored."""
        return entry_leaf_hash(self.message(store_id, self.fields()), self.key_id, self.signature)

    def verify(self, store_id: str, keyring: KeyRing) -> bytes:
        """Check the id, the key binding and the signature; return the leaf hash."""
        msg = self.message(store_id, self.fields())
        return check_row(msg, self.entry_id, self.key_id, self.validator_key_hash, self.signature, keyring)


def entry_leaf_hash(message: bytes, key_id: str, signature: bytes) -> bytes:
    return leaf_hash(canonical_encode("memstream.longterm.leaf.v1",
                                      {"message": message, "key_id": key_id, "signature": signature}))


def _name(name: str) -> bytes:
    n = name.encode()
    return struct.pack(">I", len(n)) + n


def _str_or_none(name: str):
    head, none = _name(name), _name(name) + struct.pack(">BQ", 0, 0)

    def enc(v) -> bytes:
        if v is None:
            return none
        b = v.encode()
        return head + b"\x02" + struct.pack(">Q", len(b)) + b
    return enc


def _hash_heads(mlen: int, key_id: bytes):
    """The hash states of an entry id and of a Merkle leaf after everything that precedes a
    message of ``mlen`` bytes: copy them and feed the message (then the signature's field)."""
    id_base = hashlib.sha256(struct.pack(">I", len("memstream.longterm.entry-id.v1"))
                             + b"memstream.longterm.entry-id.v1" + struct.pack(">Q", mlen))
    leaf_base = hashlib.sha256(b"\x00MSCE1" + struct.pack(">I", len("memstream.longterm.leaf.v1"))
                               + b"memstream.longterm.leaf.v1" + _name("key_id") + b"\x02"
                               + struct.pack(">Q", len(key_id)) + key_id + _name("message") + b"\x01"
                               + struct.pack(">Q", mlen))
    return id_base, leaf_base


def table_leaves(store_id: str, cols: Mapping[str, Sequence], vectors) -> list[tuple[str, bytes]]:
    """(entry id recomputed from the content, Merkle leaf hash) of each row of an entries
    table, for verification at scale: the same bytes as :meth:`Entry.message`,
    :meth:`Entry.id_of` and :func:`entry_leaf_hash` (canonical_encode). ``cols`` maps each
    content column (and ``key_id``, ``signature``) to its values; ``vectors`` is float32
    [n, dim]. Rows of one shape (no forget tag, subject or supersedes; the same payload length,
    kind and key) have their messages assembled as one byte matrix, and the hashes of the
    constant prefixes are computed once per shape; other rows go one by one."""
    vec = np.ascontiguousarray(vectors, dtype="<f4")
    n = len(cols["payload"])
    groups: dict[tuple, list[int]] = {}
    odd: list[int] = []
    for i in range(n):
        if (cols["forget_subject"][i] is None and cols["forget_tag"][i] is None and cols["supersedes"][i] is None
                and isinstance(cols["payload"][i], bytes) and isinstance(cols["query_hash"][i], str)
                and isinstance(cols["validator_key_hash"][i], str) and isinstance(cols["timestamp_ns"][i], int)
                and len(cols["query_hash"][i]) == 64 and len(cols["validator_key_hash"][i]) == 64
                and cols["query_hash"][i].isascii() and cols["validator_key_hash"][i].isascii()):
            groups.setdefault((len(cols["payload"][i]), cols["payload_kind"][i], cols["key_id"][i],
                               len(cols["signature"][i])), []).append(i)
        else:
            odd.append(i)
    out: dict[int, tuple[str, bytes]] = _table_leaves_rows(store_id, cols, vec, odd) if odd else {}
    none = {c: _name(c) + struct.pack(">BQ", 0, 0) for c in ("forget_subject", "forget_tag", "supersedes")}
    for (plen, kind, kid, slen), rows in groups.items():
        m = len(rows)
        k = kid.encode()

        def const(b: bytes) -> np.ndarray:
            return np.broadcast_to(np.frombuffer(b, np.uint8), (m, len(b)))

        def fixed(values, width: int) -> np.ndarray:
            return np.frombuffer(b"".join(values), np.uint8).reshape(m, width)

        parts = [
            const(b"MSCE1" + struct.pack(">I", len(ENTRY_DOMAIN)) + ENTRY_DOMAIN.encode() + none["forget_subject"]
                  + none["forget_tag"] + _name("payload") + b"\x01" + struct.pack(">Q", plen)),
            fixed([cols["payload"][i] for i in rows], plen),
            const(_str_or_none("payload_kind")(kind) + _name("query_hash") + b"\x02" + struct.pack(">Q", 64)),
            fixed([cols["query_hash"][i].encode() for i in rows], 64),
            const(_str_or_none("store_id")(store_id) + none["supersedes"] + _name("timestamp_ns")
                  + struct.pack(">BQ", 3, 8)),
            np.array([cols["timestamp_ns"][i] for i in rows], ">i8").view(np.uint8).reshape(m, 8),
            const(_name("validator_key_hash") + b"\x02" + struct.pack(">Q", 64)),
            fixed([cols["validator_key_hash"][i].encode() for i in rows], 64),
            const(_name("vector") + struct.pack(">BQ", 4, vec.shape[1] * 4)),
            vec[rows].view(np.uint8),
        ]
        msgs = np.ascontiguousarray(np.concatenate(parts, axis=1))
        mlen = msgs.shape[1]
        id_base, leaf_base = _hash_heads(mlen, k)
        sig_head = _name("signature") + b"\x01" + struct.pack(">Q", slen)
        for j, i in enumerate(rows):
            msg = msgs[j].data
            h = id_base.copy()
            h.update(msg)
            lh = leaf_base.copy()
            lh.update(msg)
            lh.update(sig_head)
            lh.update(cols["signature"][i])
            out[i] = (h.hexdigest(), lh.digest())
    return [out[i] for i in range(n)]


_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)


def hex_rows(digests: np.ndarray) -> np.ndarray:
    """[n, k] bytes as [n, 2k] lower-case hex characters (uint8), as ``bytes.hex()`` writes them."""
    d = np.asarray(digests, np.uint8)
    out = np.empty((len(d), 2 * d.shape[1]), np.uint8)
    out[:, 0::2], out[:, 1::2] = _HEX[d >> 4], _HEX[d & 15]
    return out


def fixed_width(arr, width: int) -> np.ndarray | None:
    """The values of a binary or string Arrow array whose every value is ``width`` bytes long,
    as an [n, width] uint8 matrix (no copy); None if one is null or of another length."""
    import pyarrow as pa

    if len(arr) == 0:
        return np.zeros((0, width), np.uint8)
    if arr.null_count:
        return None
    if pa.types.is_large_binary(arr.type) or pa.types.is_large_string(arr.type):
        odt = np.int64
    elif pa.types.is_binary(arr.type) or pa.types.is_string(arr.type):
        odt = np.int32
    else:
        return None
    _, offsets, data = arr.buffers()
    off = np.frombuffer(offsets, odt, len(arr) + 1, arr.offset * np.dtype(odt).itemsize)
    if not (np.diff(off) == width).all():
        return None
    return np.frombuffer(data, np.uint8, len(arr) * width, int(off[0])).reshape(len(arr), width)


def arrow_leaves(store_id: str, rows, vectors) -> tuple[np.ndarray, np.ndarray]:
    """(entry id digest, Merkle leaf hash) of each row of an Arrow table of entries, as two
    [n, 32] uint8 matrices: the bytes of :func:`table_leaves`, without a Python object per
    field. Rows of one shape are assembled as one byte matrix straight from the Arrow
    buffers and hashed with two hashlib calls a row; other rows go through
    :func:`table_leaves` one by one."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = rows.num_rows
    ids, leaves = np.zeros((n, 32), np.uint8), np.zeros((n, 32), np.uint8)
    if not n:
        return ids, leaves
    vec = np.ascontiguousarray(vectors, dtype="<f4")
    col = {c: rows.column(c).combine_chunks() if isinstance(rows, pa.Table) else rows.column(c)
           for c in ("forget_subject", "forget_tag", "supersedes", "payload", "payload_kind", "query_hash",
                     "validator_key_hash", "timestamp_ns", "key_id", "signature")}
    regular = pc.and_(pc.and_(col["forget_subject"].is_null(), col["forget_tag"].is_null()),
                      col["supersedes"].is_null())
    for c in ("payload", "payload_kind", "timestamp_ns", "key_id", "signature"):
        regular = pc.and_(regular, col[c].is_valid())
    for c in ("query_hash", "validator_key_hash"):
        regular = pc.and_(regular, pc.and_(pc.equal(pc.binary_length(col[c]), 64), pc.string_is_ascii(col[c])))
    regular = regular.fill_null(False).to_numpy(zero_copy_only=False)
    odd = np.flatnonzero(~regular)
    if len(odd):
        sub = {c: pc.take(a, pa.array(odd)).to_pylist() for c, a in col.items()}
        got = table_leaves(store_id, sub, vec[odd])
        ids[odd] = np.frombuffer(b"".join(bytes.fromhex(e) for e, _ in got), np.uint8).reshape(-1, 32)
        leaves[odd] = np.frombuffer(b"".join(lh for _, lh in got), np.uint8).reshape(-1, 32)
    good = np.flatnonzero(regular)
    if not len(good):
        return ids, leaves
    plen = pc.binary_length(col["payload"]).to_numpy(zero_copy_only=False)[good]
    slen = pc.binary_length(col["signature"]).to_numpy(zero_copy_only=False)[good]
    kind = pc.take(col["payload_kind"], pa.array(good)).dictionary_encode()
    kid = pc.take(col["key_id"], pa.array(good)).dictionary_encode()
    kcode, kdcode = kind.indices.to_numpy(zero_copy_only=False), kid.indices.to_numpy(zero_copy_only=False)
    order = np.lexsort((kdcode, kcode, slen, plen))
    keys = np.stack([plen, slen, kcode, kdcode], 1)[order]
    cuts = np.flatnonzero((np.diff(keys, axis=0) != 0).any(1)) + 1
    none = {c: _name(c) + struct.pack(">BQ", 0, 0) for c in ("forget_subject", "forget_tag", "supersedes")}
    for run in np.split(np.arange(len(good)), cuts):
        first = order[run[0]]
        p, sl = int(plen[first]), int(slen[first])
        kd, k = kind.dictionary[int(kcode[first])].as_py(), kid.dictionary[int(kdcode[first])].as_py().encode()
        at = good[order[run]]
        m, take = len(at), pa.array(at)

        def const(b: bytes) -> np.ndarray:
            return np.broadcast_to(np.frombuffer(b, np.uint8), (m, len(b)))

        def fixed(c: str, width: int) -> np.ndarray:
            return fixed_width(pc.take(col[c], take), width)

        parts = [
            const(b"MSCE1" + struct.pack(">I", len(ENTRY_DOMAIN)) + ENTRY_DOMAIN.encode() + none["forget_subject"]
                  + none["forget_tag"] + _name("payload") + b"\x01" + struct.pack(">Q", p)),
            fixed("payload", p),
            const(_str_or_none("payload_kind")(kd) + _name("query_hash") + b"\x02" + struct.pack(">Q", 64)),
            fixed("query_hash", 64),
            const(_str_or_none("store_id")(store_id) + none["supersedes"] + _name("timestamp_ns")
                  + struct.pack(">BQ", 3, 8)),
            pc.take(col["timestamp_ns"], take).to_numpy().astype(">i8").view(np.uint8).reshape(m, 8),
            const(_name("validator_key_hash") + b"\x02" + struct.pack(">Q", 64)),
            fixed("validator_key_hash", 64),
            const(_name("vector") + struct.pack(">BQ", 4, vec.shape[1] * 4)),
            vec[at].view(np.uint8).reshape(m, -1),
        ]
        mlen = sum(x.shape[1] for x in parts)
        # The leaf hashes the message, then the signature: one row of this matrix each.
        rows_ = np.ascontiguousarray(np.concatenate(
            parts + [const(_name("signature") + b"\x01" + struct.pack(">Q", sl)), fixed("signature", sl)], axis=1))
        w = rows_.shape[1]
        id_base, leaf_base = _hash_heads(mlen, k)
        flat = memoryview(rows_.reshape(-1))
        id_out, leaf_out = bytearray(), bytearray()
        for o in range(0, m * w, w):
            h = id_base.copy()
            h.update(flat[o:o + mlen])
            id_out += h.digest()
            h = leaf_base.copy()
            h.update(flat[o:o + w])
            leaf_out += h.digest()
        ids[at] = np.frombuffer(id_out, np.uint8).reshape(m, 32)
        leaves[at] = np.frombuffer(leaf_out, np.uint8).reshape(m, 32)
    return ids, leaves


def _table_leaves_rows(store_id: str, cols: Mapping[str, Sequence], vectors, rows=None) -> dict[int, tuple[str, bytes]]:
    """Row by row (the rows ``rows``, default all): the general case of :func:`table_leaves`."""
    prefix = b"MSCE1" + struct.pack(">I", len(ENTRY_DOMAIN)) + ENTRY_DOMAIN.encode()
    vec = np.ascontiguousarray(vectors, dtype="<f4")
    vec_head = _name("vector") + struct.pack(">BQ", 4, vec.shape[1] * 4 if vec.ndim == 2 else 0)
    payload_head = _name("payload") + b"\x01"
    ts_head = _name("timestamp_ns") + struct.pack(">BQ", 3, 8)
    store = _str_or_none("store_id")(store_id)
    s = {c: _str_or_none(c) for c in ("forget_subject", "forget_tag", "payload_kind", "query_hash", "supersedes",
                                      "validator_key_hash")}
    leaf_prefix = (b"MSCE1" + struct.pack(">I", len("memstream.longterm.leaf.v1")) + b"memstream.longterm.leaf.v1")
    key_head, msg_head, sig_head = _name("key_id") + b"\x02", _name("message") + b"\x01", _name("signature") + b"\x01"
    id_prefix = struct.pack(">I", len("memstream.longterm.entry-id.v1")) + b"memstream.longterm.entry-id.v1"
    pack_q, pack_qs, sha = struct.Struct(">Q").pack, struct.Struct(">q").pack, hashlib.sha256
    fs, ft, pk, qh, sup, vkh = (s[c] for c in ("forget_subject", "forget_tag", "payload_kind", "query_hash",
                                               "supersedes", "validator_key_hash"))
    out = {}
    names = ("forget_subject", "forget_tag", "payload", "payload_kind", "query_hash", "supersedes", "timestamp_ns",
             "validator_key_hash", "key_id", "signature")
    for i in (range(len(cols["payload"])) if rows is None else rows):
        f_s, f_t, pay, kind, q, sup_id, ts, v, kid, sig = (cols[c][i] for c in names)
        # fields in name order, as canonical_encode sorts them
        msg = b"".join((prefix, fs(f_s), ft(f_t), payload_head, pack_q(len(pay)), pay, pk(kind), qh(q), store,
                        sup(sup_id),
                        ts_head, pack_qs(ts), vkh(v), vec_head, vec[i].tobytes()))
        eid = sha(id_prefix + pack_q(len(msg)) + msg).hexdigest()
        k = kid.encode()
        leaf = b"".join((leaf_prefix, key_head, pack_q(len(k)), k, msg_head, pack_q(len(msg)), msg, sig_head,
                         pack_q(len(sig)), sig))
        out[i] = (eid, sha(b"\x00" + leaf).digest())
    return out


def check_row(msg: bytes, entry_id: str, key_id: str, validator_key_hash: str, signature: bytes,
              keyring: KeyRing) -> bytes:
    if Entry.id_of(msg) != entry_id:
        raise VerificationError("entry id does not match the entry's content")
    vk = keyring.get(key_id)
    if domain_hash("memstream.key.v1", vk.raw).hex() != validator_key_hash:
        raise SignatureError(f"provenance names another validator than key {key_id}")
    vk.verify(signature, msg)
    return entry_leaf_hash(msg, key_id, signature)


@dataclass(frozen=True)
class Approval:
    key_id: str
    signature: bytes


@dataclass(frozen=True)
class GovernancePolicy:
    """M of N: ``threshold`` distinct keys of ``keys`` must approve a removal."""

    keys: KeyRing
    threshold: int

    def __post_init__(self):
        if not 1 <= self.threshold <= len(self.keys):
            raise ConfigError(f"governance threshold {self.threshold} must be between 1 and {len(self.keys)} "
                              f"(the number of governance keys)")

    def check(self, message: bytes, approvals: Iterable[Approval]) -> list[str]:
        """The key ids whose approvals are valid; GovernanceError if fewer than threshold."""
        valid, problems = [], []
        for a in approvals:
            if a.key_id in valid:
                continue  # one key counts once
            if a.key_id not in self.keys:
                problems.append(f"{a.key_id}: not a governance key")
                continue
            try:
                self.keys.verify(a.key_id, a.signature, message)
            except SignatureError:
                problems.append(f"{a.key_id}: bad signature")
                continue
            valid.append(a.key_id)
        if len(valid) < self.threshold:
            detail = f" (rejected: {'; '.join(problems)})" if problems else ""
            raise GovernanceError(f"{len(valid)} valid governance approval(s), {self.threshold} required{detail}: "
                                  f"collect signatures from {self.threshold} distinct governance keys")
        return valid


@dataclass(frozen=True)
class RemovalRequest(RemovalRequestRecord):
    """A :class:`~memstream.schemas.records.RemovalRequest` with its approval."""

    def message(self) -> bytes:
        return canonical_encode("memstream.longterm.removal.v1", {
            "store_id": self.store_id, "entry_ids": "\n".join(sorted(self.entry_ids)), "reason": self.reason,
            "request_id": self.request_id, "issued_at_ns": self.issued_at_ns})

    def approve(self, key: SigningKey) -> Approval:
        return Approval(key.key_id, key.sign(self.message()))


def purge_message(store_id: str, purge_id: str, requests: Iterable[tuple[str, str, str | None]],
                  entry_ids: Iterable[str]) -> bytes:
    """What governance keys sign to approve a forget purge: the store, the purge, each forget
    request it carries out (request id, subject hash, tag) and the exact entries it erases."""
    return canonical_encode("memstream.longterm.purge.v1", {
        "store_id": store_id, "purge_id": purge_id,
        "requests": "\n".join(json.dumps([rid, sh, tag]) for rid, sh, tag in sorted(requests, key=lambda r: r[0])),
        "entry_ids": "\n".join(sorted(entry_ids))})


@dataclass(frozen=True)
class ForgetRequest(ForgetRequestRecord):
    """A :class:`~memstream.schemas.records.ForgetRequest` with its signing and checking."""

    @staticmethod
    def message(store_id: str, subject_hash_: str, tag: str | None, request_id: str, issued_at_ns: int) -> bytes:
        return canonical_encode("memstream.longterm.forget.v1", {
            "store_id": store_id, "subject_hash": subject_hash_, "tag": tag, "request_id": request_id,
            "issued_at_ns": issued_at_ns})

    @classmethod
    def create(cls, key: SigningKey, store_id: str, subject: str, tag: str | None = None) -> "ForgetRequest":
        sh, rid, ts = subject_hash(subject), uuid.uuid4().hex, time.time_ns()
        return cls(store_id, sh, tag, key.key_id, key.sign(cls.message(store_id, sh, tag, rid, ts)), rid, ts)

    def verify(self, keyring: KeyRing) -> None:
        keyring.verify(self.key_id, self.signature,
                       self.message(self.store_id, self.subject_hash, self.tag, self.request_id, self.issued_at_ns))
