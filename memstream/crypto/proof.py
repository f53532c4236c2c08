"""Pure verification of RFC 9162 inclusion and consistency proofs: hashing only, no tree."""

from __future__ import annotations

from typing import Sequence

from memstream.crypto.hashing import node_hash
from memstream.errors import VerificationError


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
