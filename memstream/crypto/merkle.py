"""An append-only RFC 6962 Merkle tree and its compact frontier: tree hashes and the
construction of inclusion and consistency proofs (RFC 9162 sections 2.1.1-2.1.4). Checking a
proof is :mod:`memstream.crypto.proof`, which needs none of this."""

from __future__ import annotations

from hashlib import sha256
from typing import Iterable, Sequence

from memstream.crypto.hashing import EMPTY_ROOT, NODE_PREFIX, leaf_hash, node_hash
from memstream.errors import VerificationError


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
        if self.size == 0:
            self._build(list(leaf_hashes))
            return
        for lh in leaf_hashes:
            self.append_hash(lh)

    def _build(self, leaves: list[bytes]) -> None:
        """All levels at once, a level per comprehension: the same hashes as appending one
        by one, without the per-leaf loop (verification builds trees of millions)."""
        self.levels = [leaves]
        level = leaves
        while len(level) > 1:
            level = [sha256(NODE_PREFIX + a + b).digest() for a, b in zip(level[0::2], level[1::2])]
            self.levels.append(level)

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
        return _consistency_path(m, self._check_size(n), self._mth)


def _consistency_path(m: int, n: int, mth) -> list[bytes]:
    """PROOF(m, D[n]) of RFC 9162 section 2.1.4.1, with ``mth(lo, hi)`` giving MTH(D[lo:hi])."""
    if not 0 <= m <= n:
        raise ValueError(f"cannot prove consistency from size {m} to size {n}")
    if m == 0 or m == n:
        return []

    def subproof(m: int, lo: int, hi: int, b: bool) -> list[bytes]:
        if m == hi - lo:
            return [] if b else [mth(lo, hi)]
        k = _split(hi - lo)
        if m <= k:
            return subproof(m, lo, lo + k, b) + [mth(lo + k, hi)]
        return subproof(m - k, lo + k, hi, False) + [mth(lo, lo + k)]

    return subproof(m, 0, n, True)


def consistency_proof_from(old: "MerkleFrontier", new_leaf_hashes: Sequence[bytes]) -> list[bytes]:
    """PROOF(m, D[n]) from the frontier of the tree of size m and the leaf hashes appended
    since, without the old leaves: every node the proof takes from the old tree is one of the
    perfect subtrees of its frontier, every other node covers new leaves only."""
    m, n = old.size, old.size + len(new_leaf_hashes)
    subtrees, lo = {}, 0
    for bit, h in zip((b for b in range(m.bit_length() - 1, -1, -1) if m >> b & 1), old.hashes):
        subtrees[(lo, lo + (1 << bit))] = h
        lo += 1 << bit
    new = MerkleTree(new_leaf_hashes)

    def mth(lo: int, hi: int) -> bytes:
        if lo >= m:
            return new._mth(lo - m, hi - m)
        try:
            return subtrees[(lo, hi)]
        except KeyError:
            raise VerificationError(f"MTH(D[{lo}:{hi}]) is not a subtree of the frontier of size {m}") from None

    return _consistency_path(m, n, mth)



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
