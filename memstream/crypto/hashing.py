"""Hashing: SHA-256, domain-separated hashes, the canonical encoding of records, and the
RFC 6962 / RFC 9162 leaf and node hashes. Nothing here is invented: SHA-256 throughout,
leaf prefix 0x00 and node prefix 0x01 as RFC 9162 section 2.1 has them.

Canonical encoding (:func:`canonical_encode`): a record is a mapping of field name to
value; it is encoded as the domain string followed by its fields **sorted by name**, each
as ``u32 len(name) | name | u8 type | u64 len(value) | value`` (big-endian lengths). Types:
0 None, 1 bytes, 2 str (UTF-8), 3 int (signed 64-bit big-endian), 4 float32 array
(little-endian, C order), 5 bool. Every value is length-prefixed, so no two different
records share an encoding, and the domain string keeps an entry from ever verifying as a
tree head or a removal request.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Mapping

import numpy as np

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



LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(NODE_PREFIX + left + right).digest()
