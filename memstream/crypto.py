"""Shared cryptography: Ed25519 keys, a key ring, canonical encoding, domain-separated
hashing and an RFC 6962 / RFC 9162 Merkle tree.

Nothing here is invented: signatures are Ed25519 (``cryptography``), hashes are SHA-256,
the Merkle tree follows RFC 9162 section 2.1 (leaf prefix 0x00, node prefix 0x01, the
inclusion and consistency algorithms of sections 2.1.3 and 2.1.4).

Canonical encoding (:func:`canonical_encode`): a record is a mapping of field name to
value; it is encoded as the domain string followed by its fields **sorted by name**, each
as ``u32 len(name) | name | u8 type | u64 len(value) | value`` (big-endian lengths). Types:
0 None, 1 bytes, 2 str (UTF-8), 3 int (signed 64-bit big-endian), 4 float32 array
(little-endian, C order), 5 bool. Every value is length-prefixed, so no two different
records share an encoding, and the domain string keeps an entry from ever verifying as a
tree head or a removal request.

Key ids (:attr:`VerifyKey.key_id`): the first 32 hex digits (128 bits) of SHA-256 over the
raw 32-byte Ed25519 public key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from memstream.errors import ConfigError, SignatureError, VerificationError

KEY_ID_HEX_CHARS = 32

# ---------------------------------------------------------------------------------- hashing


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def domain_hash(domain: str, *parts: bytes) -> bytes:
    """SHA-256 over a domain tag and length-prefixed parts, so a hash made for one purpose
    (an entry id, a query hash, a subject) never collides with one made for another."""
    h = hashlib.sha256()
    d = domain.encode()
    h.update(struct.pack(">I", len(d)) + d)
    for p in parts:
        h.update(struct.pack(">Q", len(p)))
        h.update(p)
    return h.digest()


def canonical_encode(domain: str, fields: Mapping[str, object]) -> bytes:
    """Deterministic bytes of a record; see the module docstring for the layout."""
    d = domain.encode()
    out = [b"MSCE1", struct.pack(">I", len(d)), d]
    for name in sorted(fields):
        value = fields[name]
        if value is None:
            tag, body = 0, b""
        elif isinstance(value, bool):
            tag, body = 5, b"\x01" if value else b"\x00"
        elif isinstance(value, (bytes, bytearray, memoryview)):
            tag, body = 1, bytes(value)
        elif isinstance(value, str):
            tag, body = 2, value.encode("utf-8")
        elif isinstance(value, (int, np.integer)):
            tag, body = 3, struct.pack(">q", int(value))
        elif isinstance(value, np.ndarray):
            tag, body = 4, np.ascontiguousarray(value, dtype="<f4").tobytes()
        else:
            raise TypeError(f"canonical_encode: field {name!r} has unsupported type {type(value).__name__}")
        n = name.encode()
        out += [struct.pack(">I", len(n)), n, struct.pack(">BQ", tag, len(body)), body]
    return b"".join(out)


# ---------------------------------------------------------------------------------- keys


class VerifyKey:
    """An Ed25519 public key."""

    __slots__ = ("_key", "raw", "key_id")

    def __init__(self, raw: bytes):
        if len(raw) != 32:
            raise ConfigError(f"an Ed25519 public key is 32 bytes, got {len(raw)}")
        self.raw = bytes(raw)
        self._key = Ed25519PublicKey.from_public_bytes(self.raw)
        self.key_id = hashlib.sha256(self.raw).hexdigest()[:KEY_ID_HEX_CHARS]

    @classmethod
    def parse(cls, text: str | bytes) -> "VerifyKey":
        """A public key as PEM, or as the raw 32 bytes in hex or base64."""
        data = text.encode() if isinstance(text, str) else bytes(text)
        if b"-----BEGIN" in data:
            key = serialization.load_pem_public_key(data)
            if not isinstance(key, Ed25519PublicKey):
                raise ConfigError("the PEM public key is not Ed25519")
            return cls(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
        return cls(_raw32(data.strip(), "public key"))

    def verify(self, signature: bytes, message: bytes) -> None:
        """Raise :class:`SignatureError` unless ``signature`` is this key's over ``message``."""
        try:
            self._key.verify(bytes(signature), message)
        except InvalidSignature:
            raise SignatureError(f"signature does not verify under key {self.key_id}") from None

    def hex(self) -> str:
        return self.raw.hex()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VerifyKey) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"VerifyKey(key_id={self.key_id!r})"


class SigningKey:
    """An Ed25519 private key. Its bytes never appear in ``repr``, ``str`` or logs."""

    __slots__ = ("_key", "verify_key")

    def __init__(self, key: Ed25519PrivateKey):
        self._key = key
        self.verify_key = VerifyKey(key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw))

    @classmethod
    def generate(cls) -> "SigningKey":
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def parse(cls, text: str | bytes) -> "SigningKey":
        """A private key as PKCS#8 PEM, or as the raw 32-byte seed in hex or base64."""
        data = text.encode() if isinstance(text, str) else bytes(text)
        if b"-----BEGIN" in data:
            try:
                key = serialization.load_pem_private_key(data, password=None)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"cannot read the PEM private key: {e}") from None
            if not isinstance(key, Ed25519PrivateKey):
                raise ConfigError("the PEM private key is not Ed25519: generate one with SigningKey.generate()")
            return cls(key)
        return cls(Ed25519PrivateKey.from_private_bytes(_raw32(data.strip(), "private key")))

    @classmethod
    def from_file(cls, path: str | Path) -> "SigningKey":
        try:
            return cls.parse(Path(path).read_bytes())
        except OSError as e:
            raise ConfigError(f"cannot read the signing key file {path}: {e.strerror}") from None

    @classmethod
    def from_env(cls, var: str) -> "SigningKey":
        value = os.environ.get(var)
        if not value:
            raise ConfigError(f"environment variable {var} is not set: put an Ed25519 key (PEM, hex or base64) in it")
        return cls.parse(value)

    @property
    def key_id(self) -> str:
        return self.verify_key.key_id

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def private_pem(self) -> bytes:
        """PKCS#8 PEM, for writing a key file (mode 0600 is the caller's job)."""
        return self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())

    def __repr__(self) -> str:
        return f"SigningKey(key_id={self.key_id!r}, private=<redacted>)"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("SigningKey is not picklable: load it from its file or env var in each process")


def _raw32(data: bytes, what: str) -> bytes:
    text = data.decode("ascii", errors="replace")
    if len(text) == 64:
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error:
        raw = b""
    if len(raw) != 32:
        raise ConfigError(f"an Ed25519 {what} must be PEM, or 32 bytes as 64 hex digits or base64")
    return raw


class KeyRing:
    """Public keys by key id. Rotation adds a key and keeps the old ones, so signatures made
    before a rotation still verify; retiring a key is removing it."""

    def __init__(self, keys: Iterable[VerifyKey | SigningKey] = ()):
        self._keys: dict[str, VerifyKey] = {}
        for k in keys:
            self.add(k)

    def add(self, key: VerifyKey | SigningKey) -> str:
        vk = key.verify_key if isinstance(key, SigningKey) else key
        self._keys[vk.key_id] = vk
        return vk.key_id

    def remove(self, key_id: str) -> None:
        self._keys.pop(key_id, None)

    def get(self, key_id: str) -> VerifyKey:
        try:
            return self._keys[key_id]
        except KeyError:
            raise SignatureError(f"unknown key id {key_id!r}: add its public key to the key ring") from None

    def verify(self, key_id: str, signature: bytes, message: bytes) -> None:
        self.get(key_id).verify(signature, message)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self):
        return iter(self._keys.values())

    def __repr__(self) -> str:
        return f"KeyRing({sorted(self._keys)})"


# ---------------------------------------------------------------------------------- Merkle

LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def root(entries: Sequence[bytes]) -> bytes:
    """MTH(D[n]) of RFC 9162 section 2.1.1 over the entries themselves."""
    tree = MerkleTree()
    tree.extend_hashes([leaf_hash(e) for e in entries])
    return tree.root()


class MerkleTree:
    """An append-only RFC 6962 tree kept as levels of complete subtree hashes.

    ``levels[k][i]`` is the hash of leaves ``[i*2^k, (i+1)*2^k)``, present once complete.
    Appending is amortised O(1), the root of any earlier size costs O(log n), and proofs
    are read from the levels without rehashing leaves.
    """

    def __init__(self, leaf_hashes: Iterable[bytes] = ()):
        self.levels: list[list[bytes]] = [[]]
        self.extend_hashes(leaf_hashes)

    @property
    def size(self) -> int:
        return len(self.levels[0])

    def __len__(self) -> int:
        return self.size

    def append(self, entry: bytes) -> int:
        """Append an entry (hashed as a leaf); return its index."""
        return self.append_hash(leaf_hash(entry))

    def append_hash(self, lh: bytes) -> int:
        levels = self.levels
        levels[0].append(lh)
        index = len(levels[0]) - 1
        k, i = 0, index
        while i & 1:  # the right child of a pair just completed: hash the parent
            if len(levels) == k + 1:
                levels.append([])
            levels[k + 1].append(node_hash(levels[k][i - 1], levels[k][i]))
            k, i = k + 1, i >> 1
        return index

    def extend_hashes(self, leaf_hashes: Iterable[bytes]) -> None:
        for lh in leaf_hashes:
            self.append_hash(lh)

    def leaf(self, index: int) -> bytes:
        return self.levels[0][index]

    def _check_size(self, size: int | None) -> int:
        n = self.size if size is None else size
        if not 0 <= n <= self.size:
            raise ValueError(f"tree size {n} is outside 0..{self.size}")
        return n

    def _mth(self, lo: int, hi: int) -> bytes:
        """MTH(D[lo:hi]); ranges produced by the RFC recursions are aligned, so complete
        subtrees come straight from the levels."""
        n = hi - lo
        if n == 0:
            return EMPTY_ROOT
        if n & (n - 1) == 0 and lo % n == 0:
            return self.levels[n.bit_length() - 1][lo // n]
        k = _split(n)
        return node_hash(self._mth(lo, lo + k), self._mth(lo + k, hi))

    def root(self, size: int | None = None) -> bytes:
        return self._mth(0, self._check_size(size))

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """PATH(m, D[n]) of RFC 9162 section 2.1.3.1."""
        n = self._check_size(size)
        if not 0 <= index < n:
            raise ValueError(f"leaf index {index} is outside a tree of size {n}")

        def path(m: int, lo: int, hi: int) -> list[bytes]:
            if hi - lo == 1:
                return []
            k = _split(hi - lo)
            if m < k:
                return path(m, lo, lo + k) + [self._mth(lo + k, hi)]
            return path(m - k, lo + k, hi) + [self._mth(lo, lo + k)]

        return path(index, 0, n)

    def consistency_proof(self, m: int, n: int | None = None) -> list[bytes]:
        """PROOF(m, D[n]) of RFC 9162 section 2.1.4.1."""
        n = self._check_size(n)
        if not 0 <= m <= n:
            raise ValueError(f"cannot prove consistency from size {m} to size {n}")
        if m == 0 or m == n:
            return []

        def subproof(m: int, lo: int, hi: int, b: bool) -> list[bytes]:
            if m == hi - lo:
                return [] if b else [self._mth(lo, hi)]
            k = _split(hi - lo)
            if m <= k:
                return subproof(m, lo, lo + k, b) + [self._mth(lo + k, hi)]
            return subproof(m - k, lo + k, hi, False) + [self._mth(lo, lo + k)]

        return subproof(m, 0, n, True)


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], expected_root: bytes) -> None:
    """RFC 9162 section 2.1.3.2, with ``leaf`` the leaf hash. Raises VerificationError."""
    if not 0 <= index < size:
        raise VerificationError(f"leaf index {index} is outside a tree of size {size}")
    fn, sn = index, size - 1
    r = leaf
    for p in proof:
        if sn == 0:
            raise VerificationError("inclusion proof is longer than the tree allows")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise VerificationError("inclusion proof is shorter than the tree requires")
    if r != expected_root:
        raise VerificationError(f"leaf {index} is not included in the tree of size {size} with that root")


def verify_consistency(m: int, n: int, root_m: bytes, root_n: bytes, proof: Sequence[bytes]) -> None:
    """RFC 9162 section 2.1.4.2. Raises VerificationError."""
    if not 0 <= m <= n:
        raise VerificationError(f"a tree cannot shrink from size {m} to {n}")
    if m == n:
        if proof or root_m != root_n:
            raise VerificationError("equal sizes need equal roots and an empty proof")
        return
    if m == 0:
        if proof:
            raise VerificationError("consistency from the empty tree needs an empty proof")
        return
    if not proof:
        raise VerificationError("consistency proof is empty")
    proof = list(proof)
    if m & (m - 1) == 0:  # m is a power of two: the old root is itself a node of the proof
        proof = [root_m] + proof
    fn, sn = m - 1, n - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = proof[0]
    for c in proof[1:]:
        if sn == 0:
            raise VerificationError("consistency proof is longer than the trees allow")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise VerificationError("consistency proof is shorter than the trees require")
    if fr != root_m or sr != root_n:
        raise VerificationError(f"the tree of size {n} is not an extension of the tree of size {m}")


@dataclass(frozen=True)
class SignedTreeHead:
    """A tree size and root, signed by a log key over its canonical encoding."""

    log_id: str
    tree_size: int
    root_hash: bytes
    timestamp_ns: int
    key_id: str
    signature: bytes

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

    def to_json(self) -> dict:
        return {"log_id": self.log_id, "tree_size": self.tree_size, "root_hash": self.root_hash.hex(),
                "timestamp_ns": self.timestamp_ns, "key_id": self.key_id, "signature": self.signature.hex()}

    @classmethod
    def from_json(cls, d: Mapping) -> "SignedTreeHead":
        return cls(d["log_id"], int(d["tree_size"]), bytes.fromhex(d["root_hash"]), int(d["timestamp_ns"]),
                   d["key_id"], bytes.fromhex(d["signature"]))


class MerkleFrontier:
    """The right edge of an RFC 6962 tree: the hashes of the perfect subtrees that make up
    its size (largest first). Enough to append leaves and compute the new root without
    reading the old leaves, so a log writer stores O(log n) hashes with each tree head."""

    def __init__(self, size: int = 0, hashes: Sequence[bytes] = ()):
        if bin(size).count("1") != len(hashes):
            raise VerificationError(f"a frontier of size {size} has {bin(size).count('1')} hashes, got {len(hashes)}")
        self.size = size
        self.hashes = list(hashes)

    def append_hash(self, lh: bytes) -> None:
        self.hashes.append(lh)
        s = self.size
        while s & 1:  # each trailing 1 bit is a perfect subtree the new leaf completes
            right = self.hashes.pop()
            self.hashes[-1] = node_hash(self.hashes[-1], right)
            s >>= 1
        self.size += 1

    def root(self) -> bytes:
        if not self.hashes:
            return EMPTY_ROOT
        r = self.hashes[-1]
        for h in reversed(self.hashes[:-1]):
            r = node_hash(h, r)
        return r
