"""Signed statements: a record signed over its canonical encoding, and the signed tree head of
a Merkle log. Signing is Ed25519 (:mod:`memstream.crypto.keys`); each kind of statement has its
own domain, so a signature made for one can never verify as another."""

from __future__ import annotations

import dataclasses

from memstream.crypto.hashing import canonical_encode
from memstream.crypto.keys import KeyRing, SigningKey
from memstream.errors import SignatureError
from memstream.schemas.records import JsonRecord, TreeHead


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
