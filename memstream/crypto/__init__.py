"""Cryptography of memstream, in the manner of Certificate Transparency: hashing
(:mod:`~memstream.crypto.hashing`), keys (:mod:`~memstream.crypto.keys`), the Merkle tree and its
proofs (:mod:`~memstream.crypto.merkle`), pure proof verification (:mod:`~memstream.crypto.proof`)
and signed statements (:mod:`~memstream.crypto.signed`). Nothing is invented: SHA-256, Ed25519,
RFC 6962 / 9162."""

from memstream.crypto.hashing import EMPTY_ROOT, canonical_encode, domain_hash, leaf_hash, node_hash, sha256
from memstream.crypto.keys import KeyRing, SigningKey, VerifyKey
from memstream.crypto.merkle import MerkleFrontier, MerkleTree, root
from memstream.crypto.proof import verify_consistency, verify_inclusion
from memstream.crypto.signed import SignedTreeHead, record_message, sign_record, verify_record

__all__ = ["EMPTY_ROOT", "KeyRing", "MerkleFrontier", "MerkleTree", "SignedTreeHead", "SigningKey", "VerifyKey",
           "canonical_encode", "domain_hash", "leaf_hash", "node_hash", "record_message", "root", "sha256",
           "sign_record", "verify_consistency", "verify_inclusion", "verify_record"]
