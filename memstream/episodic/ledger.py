"""Read accounting of episodic memory: which summaries each query read, and their decay bias.

Every query of a session is one row of the ``reads`` table (the session, a random read id, the
reader's clock, the window indices it returned). Rows are only ever appended, so concurrent
readers never lose a count, and the signed summary records are never rewritten. A session's
queries are ordered by (ts_ns, read_id); from that order, each summary's *staleness* is the
number of the session's queries since it was last read, or since it was stored when it never
was. "Not read in the last K queries" is then exactly ``staleness > K``.

The maintenance DAG ``episodic_decay`` turns staleness into an additive attention bias
(:func:`decay_bias`) and stores it in the ``summary_bias`` table, which the read path adds to
the decoder's attention logits. Both tables live beside the summaries, in the episodic store's
database (a local folder or ``s3://``).
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Iterable, Mapping, Sequence

import pyarrow as pa

from memstream.episodic.decay import Staleness, staleness
from memstream.errors import ConfigError
from memstream.schemas.generate import arrow_schema
from memstream.schemas.records import ReadRecord, SummaryBias
from memstream.settings import LEDGER_FLUSH_EVERY
from memstream.storage.lance import connect, quote

READS = "reads"
BIASES = "summary_bias"
READS_SCHEMA = arrow_schema(ReadRecord)
BIAS_SCHEMA = arrow_schema(SummaryBias)


class ReadLedger:
    """``ReadLedger(uri, storage_options)``: the read accounting tables of an episodic store.

    ``record`` buffers in memory and appends in batches of ``flush_every`` queries (one
    LanceDB commit each, so accounting stays cheap); ``flush()`` or ``close()`` writes the rest.
    Safe to share between threads; several processes may each hold their own ledger.
    """

    def __init__(self, uri: str, storage_options: dict[str, str] | None = None, *, flush_every: int = LEDGER_FLUSH_EVERY):
        if flush_every < 1:
            raise ConfigError(f"flush_every must be at least 1, got {flush_every}")
        self.uri, self.flush_every = uri, flush_every
        self._db = connect(uri, storage_options)
        self._reads = self._db.create_table(READS, schema=READS_SCHEMA, exist_ok=True)
        self._biases = self._db.create_table(BIASES, schema=BIAS_SCHEMA, exist_ok=True)
        self._lock = threading.Lock()
        self._buffer: list[tuple[str, bytes, int, list[int]]] = []

    # -- accounting ----------------------------------------------------------------------
    def record(self, session_id: str, windows: Iterable[int], ts_ns: int | None = None) -> None:
        """Count one query of ``session_id`` that returned the summaries ``windows`` (possibly none)."""
        row = (session_id, uuid.uuid4().bytes, time.time_ns() if ts_ns is None else ts_ns,
               sorted({int(w) for w in windows}))
        with self._lock:
            self._buffer.append(row)
            full = len(self._buffer) >= self.flush_every
        if full:
            self.flush()

    def flush(self) -> int:
        """Append the buffered queries; returns how many."""
        with self._lock:
            rows, self._buffer = self._buffer, []
            if rows:
                sessions, ids, ts, windows = zip(*rows)
                self._reads.add(pa.table({"session_id": list(sessions), "read_id": list(ids),
                                          "ts_ns": list(ts), "windows": list(windows)}, schema=READS_SCHEMA))
        return len(rows)

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> "ReadLedger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- what the maintenance DAGs read ----------------------------------------------------
    def _session_reads(self, session_id: str) -> list[dict]:
        rows = (self._reads.search().where(f"session_id = {quote(session_id)}")
                .select(["read_id", "ts_ns", "windows"]).limit(None).to_arrow().to_pylist())
        rows.sort(key=lambda r: (r["ts_ns"], r["read_id"]))
        return rows

    def read_counts(self, session_id: str) -> dict[int, int]:
        """window index -> how many of the session's queries returned that summary."""
        counts: dict[int, int] = {}
        for r in self._session_reads(session_id):
            for w in r["windows"]:
                counts[w] = counts.get(w, 0) + 1
        return counts

    def query_count(self, session_id: str) -> int:
        """Queries of the session accounted so far (flushed ones)."""
        return self._reads.count_rows(f"session_id = {quote(session_id)}")

    def last_query_ns(self, session_id: str) -> int | None:
        """The reader's clock at the session's newest accounted query (None: no query)."""
        rows = self._session_reads(session_id)
        return rows[-1]["ts_ns"] if rows else None

    def sessions(self) -> list[str]:
        """Sessions with at least one accounted query."""
        col = self._reads.search().select(["session_id"]).limit(None).to_arrow()["session_id"]
        return sorted(set(col.to_pylist()))

    def staleness(self, session_id: str, stored_at_ns: Mapping[int, int]) -> Staleness:
        """Staleness of each summary in ``stored_at_ns`` (window index -> when it was stored):
        queries of the session since its last read, or since it was stored if never read."""
        rows = self._session_reads(session_id)
        return staleness([(r["ts_ns"], r["windows"]) for r in rows], stored_at_ns)

    # -- decay bias ----------------------------------------------------------------------
    def set_biases(self, session_id: str, biases: Mapping[int, float], staleness: Mapping[int, int],
                   queries: int) -> None:
        """Store the session's biases (replacing earlier ones of the same summaries)."""
        if not biases:
            return
        windows = sorted(biases)
        data = pa.table({"session_id": [session_id] * len(windows), "window_index": windows,
                         "bias": [float(biases[w]) for w in windows],
                         "staleness": [int(staleness[w]) for w in windows],
                         "queries": [queries] * len(windows)}, schema=BIAS_SCHEMA)
        (self._biases.merge_insert(["session_id", "window_index"]).when_matched_update_all()
         .when_not_matched_insert_all().execute(data))

    def biases_version(self) -> int:
        """The bias table's latest version: it changes whenever biases are stored or dropped."""
        return self._biases.version

    def biases(self, session_id: str, windows: Sequence[int] | None = None) -> dict[int, float]:
        """window index -> stored decay bias (summaries without one have bias 0)."""
        rows = (self._biases.search().where(f"session_id = {quote(session_id)}")
                .select(["window_index", "bias"]).limit(None).to_arrow().to_pylist())
        out = {r["window_index"]: r["bias"] for r in rows}
        if windows is not None:
            return {w: out.get(w, 0.0) for w in windows}
        return out

    def forget_windows(self, session_id: str, windows: Sequence[int]) -> None:
        """Drop the bias rows of evicted summaries (their reads stay: they are the query count)."""
        if windows:
            self._biases.delete(f"session_id = {quote(session_id)} AND window_index IN "
                                f"({', '.join(str(int(w)) for w in windows)})")

    def drop_session(self, session_id: str) -> None:
        """Session GC: remove every accounting row of the session."""
        self.flush()
        pred = f"session_id = {quote(session_id)}"
        self._reads.delete(pred)
        self._biases.delete(pred)
