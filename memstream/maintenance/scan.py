"""Proof of erasure: scan every stored object for shingles of forgotten bytes.

The scan must run after the bytes are gone, so it cannot carry them: it carries salted
fingerprints instead. Each forgotten value (a payload, a vector's float32 bytes, a
signature) contributes shingles of :data:`SHINGLE` bytes (its start, middle and end;
shorter values are too short to tell apart from other data and are counted as skipped).
One shingle length means one pass over the bytes. A shingle is kept as

* a 32-bit polynomial fingerprint under a random odd base ``q`` (mod 2**32), which
  :meth:`Markers.scan_buffer` computes for every offset of an object at once with numpy
  (``sum b[i+t] * q**t``, from a cumulative sum and powers of ``q``), first filtered by a
  table of its top 20 bits (1 MiB: it stays in cache, where a larger one made every lookup
  a cache miss), and
* SHA-256 of a random salt and the shingle, which confirms a fingerprint hit exactly.

Bytes that JSON records carry (summary tokens, dead-letter values) are on disk in base64:
:meth:`Markers.add_with_base64` marks those forms too.

Neither reveals the content. Objects are read from a local folder (memory-mapped) or an S3
listing (ListObjectsV2, paginated), every object under the prefix: data, deletion, index,
manifest and transaction files alike, several at a time (numpy releases the GIL).
"""

from __future__ import annotations

import base64
import hashlib
import json
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from memstream.storage.objects import iter_objects, read_object

SHINGLE = 16  # bytes in a shingle: a run of bytes looked for at every offset
_CHUNK = 1 << 22  # bytes per numpy pass
_BITS = 32
_DT = np.uint32  # 32-bit arithmetic: half the memory traffic of 64, and hits are confirmed anyway
_MOD = 1 << _BITS
_LUT_BITS = 20
SCAN_THREADS = 2  # objects scanned at once


def _powers(q: int, n: int) -> np.ndarray:
    p = np.full(n, q, dtype=_DT)
    p[0] = 1
    return np.cumprod(p, dtype=_DT)  # wraps mod 2**32


def fingerprint(shingle: bytes, q: int) -> int:
    return sum(b * pow(q, t, _MOD) for t, b in enumerate(shingle)) % _MOD


@dataclass
class Markers:
    """Salted fingerprints of forgotten byte shingles; see the module docstring."""

    q: int = field(default_factory=lambda: int.from_bytes(os.urandom(_BITS // 8), "little") | 1)
    salt: bytes = field(default_factory=lambda: os.urandom(16))
    # shingle length -> fingerprint -> salted SHA-256 digests
    shingles: dict[int, dict[int, set[bytes]]] = field(default_factory=dict)
    skipped: int = 0

    def _digest(self, shingle: bytes) -> bytes:
        return hashlib.sha256(self.salt + shingle).digest()

    def add(self, value: bytes | str) -> None:
        data = value.encode() if isinstance(value, str) else bytes(value)
        if len(data) < SHINGLE:
            self.skipped += 1
            return
        for start in sorted({0, (len(data) - SHINGLE) // 2, len(data) - SHINGLE}):
            w = data[start:start + SHINGLE]
            self.shingles.setdefault(SHINGLE, {}).setdefault(fingerprint(w, self.q), set()).add(self._digest(w))

    def add_with_base64(self, value: bytes) -> None:
        """The value, and its base64 forms at each of the 3 offsets it may have in a larger
        encoded value (JSON records carry bytes as base64: summaries, dead letters)."""
        self.add(value)
        for k in range(3):
            self.add(base64.b64encode(value[k:]).rstrip(b"="))

    def __len__(self) -> int:
        return sum(len(d) for by_fp in self.shingles.values() for d in by_fp.values())

    def to_bytes(self) -> bytes:
        return json.dumps({"q": self.q, "salt": self.salt.hex(), "skipped": self.skipped, "shingles": {
            str(n): {str(fp): sorted(d.hex() for d in ds) for fp, ds in by_fp.items()}
            for n, by_fp in self.shingles.items()}}).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> "Markers":
        d = json.loads(raw)
        return cls(int(d["q"]), bytes.fromhex(d["salt"]), {
            int(n): {int(fp): {bytes.fromhex(x) for x in ds} for fp, ds in by_fp.items()}
            for n, by_fp in d["shingles"].items()}, int(d["skipped"]))

    def _powers(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Powers of q and of its inverse mod 2**32, computed once per Markers object."""
        cached = getattr(self, "_pow_cache", None)
        if cached is None or len(cached[0]) < n:
            size = max(n, 1 << 16)
            cached = (_powers(self.q, size), _powers(pow(self.q, -1, _MOD), size))
            self._pow_cache = cached
        return cached[0][:n], cached[1][:n]

    def _tables(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Per shingle length: the sorted fingerprints, and a bitmap of their top bits (the
        best mixed bits of a polynomial hash) as a first filter; built once."""
        if getattr(self, "_table_cache", None) is None:
            self._table_cache = {}
            for n, by_fp in self.shingles.items():
                fps = np.array(sorted(by_fp), dtype=_DT)
                lut = np.zeros(1 << _LUT_BITS, dtype=bool)
                lut[fps >> _DT(_BITS - _LUT_BITS)] = True
                self._table_cache[n] = (fps, lut)
        return self._table_cache

    def scan_buffer(self, buf: bytes | memoryview) -> list[int]:
        """Offsets in ``buf`` where a forgotten shingle starts."""
        hits = []
        data = np.frombuffer(buf, dtype=np.uint8)
        longest = max(self.shingles, default=0)
        if not longest or len(data) < min(self.shingles):
            return hits
        tables = self._tables()
        step = min(_CHUNK, len(data))
        qpow, ipow = self._powers(step + longest)
        # Buffers reused across chunks: fresh arrays of this size cost more in page faults
        # than the arithmetic.
        c = np.zeros(step + longest, dtype=_DT)
        f_all, top_all = np.empty(step, dtype=_DT), np.empty(step, dtype=np.intp)
        shift = _DT(_BITS - _LUT_BITS)
        for base in range(0, len(data), step):
            piece = data[base:base + step + longest - 1]
            m = len(piece)
            np.multiply(piece, qpow[:m], out=c[1:m + 1], dtype=_DT)
            np.cumsum(c[1:m + 1], dtype=_DT, out=c[1:m + 1])
            for n, (fps, lut) in tables.items():
                count = min(m - n + 1, step)
                if count <= 0:
                    continue
                f, top = f_all[:count], top_all[:count]
                np.subtract(c[n:n + count], c[:count], out=f)
                np.multiply(f, ipow[:count], out=f)  # normalised to start at power 0
                np.right_shift(f, shift, out=top, casting="unsafe")  # intp indices: take() needs no copy
                cand = np.flatnonzero(lut.take(top))
                for i in cand[np.isin(f[cand], fps)]:
                    off = base + int(i)
                    shingle = bytes(data[off:off + n])
                    if self._digest(shingle) in self.shingles[n][int(f[i])]:
                        hits.append(off)
        return sorted(hits)


@dataclass
class ScanReport:
    files: int = 0
    bytes: int = 0
    hits: list[tuple[str, int]] = field(default_factory=list)  # (object, offset)

    def to_json(self) -> dict:
        return {"files": self.files, "bytes": self.bytes, "hits": len(self.hits),
                "objects_with_hits": sorted({h[0] for h in self.hits})[:20]}


def scan_storage(markers: Markers, locations: list[tuple[str, dict[str, str] | None]],
                 threads: int = SCAN_THREADS) -> ScanReport:
    """Scan every object under each (uri, storage_options) for the markers' shingles."""
    report = ScanReport()
    seen, todo = set(), []
    for uri, options in locations:
        for key, size in iter_objects(uri, options):
            if key not in seen:  # the cold tier may live under the store root
                seen.add(key)
                todo.append((uri, key, options))
    markers._tables()  # built once, before the threads share them
    markers._powers(_CHUNK + max(markers.shingles, default=0))

    def scan_one(item) -> tuple[str, int, list[int]]:
        uri, key, options = item
        if uri.startswith("s3://"):
            data = read_object(uri, key, options)
            return key, len(data), markers.scan_buffer(data)
        with open(key, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if not size:
                return key, 0, []
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
                return key, size, markers.scan_buffer(memoryview(view))

    with ThreadPoolExecutor(max(1, threads)) as pool:
        for key, size, hits in pool.map(scan_one, todo):
            report.files += 1
            report.bytes += size
            report.hits.extend((key, off) for off in hits)
    return report
