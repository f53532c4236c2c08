"""Proof of erasure: scan every stored object for windows of forgotten bytes.

The scan must run after the bytes are gone, so it cannot carry them: it carries salted
fingerprints instead. Each forgotten value (a payload, a vector's float32 bytes, a
signature) contributes byte windows of :data:`WINDOW` bytes (its start, middle and end;
shorter values are too short to tell apart from other data and are counted as skipped).
One window length means one pass over the bytes. A window is kept as

* a 32-bit polynomial fingerprint under a random odd base ``q`` (mod 2**32), which
  :meth:`Markers.scan_buffer` computes for every offset of an object at once with numpy
  (``sum b[i+t] * q**t``, from a cumulative sum and powers of ``q``), first filtered by a
  bitmap of its top 24 bits, and
* SHA-256 of a random salt and the window, which confirms a fingerprint hit exactly.

Neither reveals the content. Objects are read from a local folder or an S3 listing
(ListObjectsV2, paginated), every object under the prefix: data, deletion, index,
manifest and transaction files alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

import numpy as np

from memstream.errors import ConfigError, ServiceError

WINDOW = 16
_CHUNK = 1 << 22  # bytes per numpy pass
_BITS = 32
_DT = np.uint32  # 32-bit arithmetic: half the memory traffic of 64, and hits are confirmed anyway
_MOD = 1 << _BITS
_LUT_BITS = 24


def _powers(q: int, n: int) -> np.ndarray:
    p = np.full(n, q, dtype=_DT)
    p[0] = 1
    return np.cumprod(p, dtype=_DT)  # wraps mod 2**32


def fingerprint(window: bytes, q: int) -> int:
    return sum(b * pow(q, t, _MOD) for t, b in enumerate(window)) % _MOD


@dataclass
class Markers:
    """Salted fingerprints of forgotten byte windows; see the module docstring."""

    q: int = field(default_factory=lambda: int.from_bytes(os.urandom(_BITS // 8), "little") | 1)
    salt: bytes = field(default_factory=lambda: os.urandom(16))
    # window length -> fingerprint -> salted SHA-256 digests
    windows: dict[int, dict[int, set[bytes]]] = field(default_factory=dict)
    skipped: int = 0

    def _digest(self, window: bytes) -> bytes:
        return hashlib.sha256(self.salt + window).digest()

    def add(self, value: bytes | str) -> None:
        data = value.encode() if isinstance(value, str) else bytes(value)
        if len(data) < WINDOW:
            self.skipped += 1
            return
        for start in sorted({0, (len(data) - WINDOW) // 2, len(data) - WINDOW}):
            w = data[start:start + WINDOW]
            self.windows.setdefault(WINDOW, {}).setdefault(fingerprint(w, self.q), set()).add(self._digest(w))

    def __len__(self) -> int:
        return sum(len(d) for by_fp in self.windows.values() for d in by_fp.values())

    def to_bytes(self) -> bytes:
        return json.dumps({"q": self.q, "salt": self.salt.hex(), "skipped": self.skipped, "windows": {
            str(n): {str(fp): sorted(d.hex() for d in ds) for fp, ds in by_fp.items()}
            for n, by_fp in self.windows.items()}}).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> "Markers":
        d = json.loads(raw)
        return cls(int(d["q"]), bytes.fromhex(d["salt"]), {
            int(n): {int(fp): {bytes.fromhex(x) for x in ds} for fp, ds in by_fp.items()}
            for n, by_fp in d["windows"].items()}, int(d["skipped"]))

    def _powers(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Powers of q and of its inverse mod 2**32, computed once per Markers object."""
        cached = getattr(self, "_pow_cache", None)
        if cached is None or len(cached[0]) < n:
            size = max(n, 1 << 16)
            cached = (_powers(self.q, size), _powers(pow(self.q, -1, _MOD), size))
            self._pow_cache = cached
        return cached[0][:n], cached[1][:n]

    def _tables(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Per window length: the sorted fingerprints, and a bitmap of their top bits (the
        best mixed bits of a polynomial hash) as a first filter; built once."""
        if getattr(self, "_table_cache", None) is None:
            self._table_cache = {}
            for n, by_fp in self.windows.items():
                fps = np.array(sorted(by_fp), dtype=_DT)
                lut = np.zeros(1 << _LUT_BITS, dtype=bool)
                lut[fps >> _DT(_BITS - _LUT_BITS)] = True
                self._table_cache[n] = (fps, lut)
        return self._table_cache

    def scan_buffer(self, buf: bytes | memoryview) -> list[int]:
        """Offsets in ``buf`` where a forgotten window starts."""
        hits = []
        data = np.frombuffer(buf, dtype=np.uint8)
        longest = max(self.windows, default=0)
        if not longest or len(data) < min(self.windows):
            return hits
        tables = self._tables()
        step = min(_CHUNK, len(data))
        qpow, ipow = self._powers(step + longest)
        # Buffers reused across chunks: fresh arrays of this size cost more in page faults
        # than the arithmetic.
        c = np.zeros(step + longest, dtype=_DT)
        f_all, top_all = np.empty(step, dtype=_DT), np.empty(step, dtype=_DT)
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
                np.right_shift(f, shift, out=top)
                cand = np.flatnonzero(lut[top])
                for i in cand[np.isin(f[cand], fps)]:
                    off = base + int(i)
                    window = bytes(data[off:off + n])
                    if self._digest(window) in self.windows[n][int(f[i])]:
                        hits.append(off)
        return sorted(hits)


# -- storage listing -----------------------------------------------------------------------

def iter_objects(uri: str, storage_options: dict[str, str] | None = None) -> Iterator[tuple[str, int]]:
    """(path or key, size) of every object under ``uri``: a local folder or s3://bucket/prefix."""
    if uri.startswith("s3://"):
        yield from _s3_objects(uri, storage_options or {})
        return
    if "://" in uri and not uri.startswith("file://"):
        raise ConfigError(f"unsupported storage URI {uri!r}: use a local folder or s3://bucket/prefix")
    root = Path(uri.removeprefix("file://"))
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            yield str(p), p.stat().st_size


def read_object(uri: str, key: str, storage_options: dict[str, str] | None = None) -> bytes:
    if not uri.startswith("s3://"):
        return Path(key).read_bytes()
    from memstream.infra.s3 import s3_request

    bucket = uri[len("s3://"):].partition("/")[0]
    status, body = s3_request(_s3_config(storage_options or {}, bucket), "GET",
                              f"/{bucket}/{quote(key, safe='/-_.~')}")
    if status != 200:
        raise ServiceError(f"S3 GET {key} answered {status}: {body[:200]!r}")
    return body


def _s3_config(options: dict[str, str], bucket: str):
    from memstream.infra.s3 import REGION, S3Config

    try:
        return S3Config(options["aws_endpoint"], bucket, options["aws_access_key_id"],
                        options["aws_secret_access_key"], options.get("aws_region", REGION))
    except KeyError as e:
        raise ConfigError(f"storage options lack {e}: pass S3Config.storage_options()") from None


def _s3_objects(uri: str, options: dict[str, str]) -> Iterator[tuple[str, int]]:
    from urllib.parse import urlencode

    from memstream.infra.s3 import s3_request

    bucket, _, prefix = uri[len("s3://"):].partition("/")
    cfg = _s3_config(options, bucket)
    prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
    token = None
    while True:
        query = {"list-type": "2", "prefix": prefix, **({"continuation-token": token} if token else {})}
        status, body = s3_request(cfg, "GET", f"/{bucket}?{urlencode(query)}")
        if status != 200:
            raise ServiceError(f"S3 LIST {uri} answered {status}: {body[:200]!r}")
        for block in re.findall(rb"<Contents>(.*?)</Contents>", body, re.S):
            key = re.search(rb"<Key>([^<]+)</Key>", block).group(1).decode()
            size = int(re.search(rb"<Size>(\d+)</Size>", block).group(1))
            yield key.replace("&amp;", "&"), size
        m = re.search(rb"<NextContinuationToken>([^<]+)</NextContinuationToken>", body)
        if not re.search(rb"<IsTruncated>true</IsTruncated>", body) or not m:
            return
        token = m.group(1).decode()


@dataclass
class ScanReport:
    files: int = 0
    bytes: int = 0
    hits: list[tuple[str, int]] = field(default_factory=list)  # (object, offset)

    def to_json(self) -> dict:
        return {"files": self.files, "bytes": self.bytes, "hits": len(self.hits),
                "objects_with_hits": sorted({h[0] for h in self.hits})[:20]}


def scan_storage(markers: Markers, locations: list[tuple[str, dict[str, str] | None]]) -> ScanReport:
    """Scan every object under each (uri, storage_options) for the markers' windows."""
    report = ScanReport()
    seen = set()
    for uri, options in locations:
        for key, size in iter_objects(uri, options):
            if key in seen:
                continue  # the cold tier may live under the store root
            seen.add(key)
            data = read_object(uri, key, options)
            report.files += 1
            report.bytes += len(data)
            report.hits.extend((key, off) for off in markers.scan_buffer(data))
    return report

