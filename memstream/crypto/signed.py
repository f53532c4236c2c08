"""Signed statements: a record signed over its canonical encoding, and the signed tree head of
a Merkle log. Signing is Ed25519 (:mod:`memstream.crypto.keys`); each kind of statement has its
own domain, so a signature made for one can never verify as another."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from memstream.crypto.hashing import canonical_encode
from memstream.crypto.keys import KeyRing, SigningKey
from memstream.errors import SignatureError
from memstream.schemas.records import CosignedChainHead as CosignedChainHeadRecord
from memstream.schemas.records import CosignedTreeHead as CosignedTreeHeadRecord
from memstream.schemas.records import JsonRecord, TreeHead


# What a validator signs of an episodic summary: this prefix, then the summary's hash
# (memstream.episodic.chain); a witness checks a chain head's signature with it.
SUMMARY_SIGNING_DOMAIN = b"memstream.summary.signature.v1\x00"


def record_message(record: JsonRecord) -> bytes:
    """The canonical encoding of every field of ``record`` but its signature (lists of strings
    or integers joined by newlines), under the domain ``memstream.<schema name>.v<version>``."""
    fields = {}
    for f in dataclasses.fields(record):
        if f.name == "signature":
            continue
        value = getattr(record, f.name)
        fields[f.name] = "\n".join(map(str, value)) if isinstance(value, list) else value
    return canonical_encode(f"memstream.{record.SCHEMA_NAME}.v{record.SCHEMA_VERSION}", fields)


def sign_record(record: JsonRecord, key: SigningKey) -> JsonRecord:
    """``record`` with ``key_id`` and ``signature`` set (Ed25519 over its canonical encoding)."""
    unsigned = dataclasses.replace(record, key_id=key.key_id, signature=b"")
    return dataclasses.replace(unsigned, signature=key.sign(record_message(unsigned)))


def verify_record(record: JsonRecord, ring: KeyRing) -> None:
    """SignatureError unless ``record`` was signed by a key of ``ring``."""
    if record.key_id not in ring:
        raise SignatureError(f"{record.SCHEMA_NAME} signed by unknown key {record.key_id}")
    ring.verify(record.key_id, record.signature, record_message(dataclasses.replace(record, signature=b"")))


@dataclasses.dataclass(frozen=True)
class SignedTreeHead(TreeHead):
    """A :class:`~memstream.schemas.records.TreeHead` with its signing and checking."""

    DOMAIN = "memstream.merkle.tree-head.v1"

    @staticmethod
    def message(log_id: str, tree_size: int, root_hash: bytes, timestamp_ns: int) -> bytes:
        return canonical_encode(SignedTreeHead.DOMAIN, {
            "log_id": log_id, "tree_size": tree_size, "root_hash": root_hash, "timestamp_ns": timestamp_ns})

    @classmethod
    def create(cls, key: SigningKey, log_id: str, tree_size: int, root_hash: bytes,
               timestamp_ns: int) -> "SignedTreeHead":
        sig = key.sign(cls.message(log_id, tree_size, root_hash, timestamp_ns))
        return cls(log_id, tree_size, root_hash, timestamp_ns, key.key_id, sig)

    def verify(self, keyring: KeyRing) -> None:
        keyring.verify(self.key_id, self.signature,
                       self.message(self.log_id, self.tree_size, self.root_hash, self.timestamp_ns))


def _cosigned_message(domain: str, record) -> bytes:
    return canonical_encode(domain, {f.name: getattr(record, f.name) for f in dataclasses.fields(record)
                                     if f.name != "cosignature"})


@dataclass(frozen=True)
class CosignedTreeHead(CosignedTreeHeadRecord):
    """A :class:`~memstream.schemas.records.CosignedTreeHead` with the witness's signing and
    checking. The cosignature covers the log's head and signature, so it vouches for exactly
    the head the log signed."""

    DOMAIN = "memstream.witness.tree-head.v1"

    @classmethod
    def cosign(cls, sth: SignedTreeHead, key: SigningKey, witnessed_at_ns: int) -> "CosignedTreeHead":
        unsigned = cls(sth.log_id, sth.tree_size, sth.root_hash, sth.timestamp_ns, sth.key_id, sth.signature,
                       key.key_id, witnessed_at_ns, b"")
        return dataclasses.replace(unsigned, cosignature=key.sign(_cosigned_message(cls.DOMAIN, unsigned)))

    def tree_head(self) -> SignedTreeHead:
        return SignedTreeHead(self.log_id, self.tree_size, self.root_hash, self.timestamp_ns, self.key_id,
                              self.signature)

    def verify(self, witness_keys: KeyRing, log_keys: KeyRing | None = None) -> None:
        """SignatureError unless a key of ``witness_keys`` cosigned it (and, given
        ``log_keys``, a log key signed the head)."""
        if self.witness_key_id not in witness_keys:
            raise SignatureError(f"tree head {self.tree_size} cosigned by unknown witness key {self.witness_key_id}")
        witness_keys.verify(self.witness_key_id, self.cosignature, _cosigned_message(self.DOMAIN, self))
        if log_keys is not None:
            self.tree_head().verify(log_keys)


@dataclass(frozen=True)
class CosignedChainHead(CosignedChainHeadRecord):
    """A :class:`~memstream.schemas.records.CosignedChainHead` with the witness's signing and
    checking; the validator's own signature of the head summary is over its hash, with the
    summaries' signing domain."""

    DOMAIN = "memstream.witness.chain-head.v1"

    @classmethod
    def cosign(cls, session_id: str, window_index: int, head_hash: bytes, seq_end: int, key_id: str,
               signature: bytes, key: SigningKey, witnessed_at_ns: int) -> "CosignedChainHead":
        unsigned = cls(session_id, window_index, head_hash, seq_end, key_id, signature, key.key_id,
                       witnessed_at_ns, b"")
        return dataclasses.replace(unsigned, cosignature=key.sign(_cosigned_message(cls.DOMAIN, unsigned)))

    def verify(self, witness_keys: KeyRing, log_keys: KeyRing | None = None) -> None:
        if self.witness_key_id not in witness_keys:
            raise SignatureError(f"chain head {self.session_id}/{self.window_index} cosigned by unknown witness "
                                 f"key {self.witness_key_id}")
        witness_keys.verify(self.witness_key_id, self.cosignature, _cosigned_message(self.DOMAIN, self))
        if log_keys is not None:
            log_keys.verify(self.key_id, self.signature, SUMMARY_SIGNING_DOMAIN + self.head_hash)
