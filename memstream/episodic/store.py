"""The episodic store: each session's horizon of signed summary records, in LanceDB.

One table, ``summaries``, whose Arrow schema is generated from
:class:`memstream.schemas.records.SummaryRecord` (one source of truth). Writes are
insert-if-absent on (session_id, window_index), so a replay after a crash never duplicates a
record, and the newest stored record of a session is its chain head: the pipeline continues
every chain from what the store holds, which is why the head survives restarts.

The store keeps a session's latest ``horizon`` summaries (:data:`memstream.settings.HORIZON`:
about 5M latents of effective context); older ones are evicted from the store. The summaries
topic holds them for its retention, and each record's hash chains it to all before it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pyarrow as pa

import json
import os
import time

from memstream.errors import ConfigError, FencedError
from memstream.schemas.generate import arrow_schema, to_arrow
from memstream.schemas.records import ConsolidationRecord, GcRecord, PublishMark, SummaryRecord
from memstream.settings import HORIZON
from memstream.storage.lance import connect, quote
from memstream.storage.objects import object_store

TABLE = "summaries"
PUBLISHED = "published"  # (session_id, window_index) of summaries Kafka acknowledged
GC_RECORDS = "gc_records"  # signed records of collected sessions: they are never made again
SCHEMA = arrow_schema(SummaryRecord)
PUBLISHED_SCHEMA = arrow_schema(PublishMark)
GC_SCHEMA = arrow_schema(GcRecord)
CONSOLIDATIONS = "consolidations"  # signed records of what "sleep" moved to long-term memory
CONSOLIDATION_SCHEMA = arrow_schema(ConsolidationRecord)
_FENCE = "_pipelines"  # <store>/_pipelines/<group>/<epoch>: who may write, newest first
_FIELDS = [f.name for f in dataclasses.fields(SummaryRecord)]


@dataclass(frozen=True)
class ChainHead:
    window_index: int
    hash: bytes
    seq_end: int
    cut: str = "full"


class EpisodicStore:
    """``EpisodicStore(uri, storage_options)``: a local folder or ``s3://bucket/prefix``."""

    def __init__(self, uri: str, storage_options: dict[str, str] | None = None, horizon: int = HORIZON):
        if horizon < 1:
            raise ConfigError(f"the horizon must hold at least one summary, got {horizon}")
        self.uri, self.horizon, self.storage_options = uri, horizon, storage_options
        # Every read sees the latest committed version: a chain continues from what is stored.
        self._db = connect(uri, storage_options)
        self._table = None

    @property
    def table(self):
        if self._table is None:
            self._table = self._db.create_table(TABLE, schema=SCHEMA, exist_ok=True)
        return self._table

    @property
    def gc_table(self):
        if getattr(self, "_gc", None) is None:
            self._gc = self._db.create_table(GC_RECORDS, schema=GC_SCHEMA, exist_ok=True)
        return self._gc

    # -- fencing -------------------------------------------------------------------------
    def claim_epoch(self, group: str) -> int:
        """Take the next epoch of pipeline ``group`` (a conditional put: two starting instances
        get two epochs). The instance with the highest epoch is the one that may write."""
        objects = object_store(self.uri, self.storage_options)
        while True:
            epoch = self.current_epoch(group) + 1
            body = json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "at_ns": time.time_ns()}).encode()
            if objects.put_if_absent(f"{_FENCE}/{group}/{epoch:012d}", body):
                return epoch

    def current_epoch(self, group: str) -> int:
        names = object_store(self.uri, self.storage_options).list(f"{_FENCE}/{group}")
        return max((int(n.rsplit("/", 1)[1]) for n in names), default=0)

    def check_epoch(self, group: str, epoch: int) -> None:
        """FencedError when a newer instance of ``group`` has started."""
        current = self.current_epoch(group)
        if current > epoch:
            raise FencedError(f"pipeline {group!r}: instance {current} started after this one ({epoch}) on "
                              f"{self.uri}; this one stops so that only one writes")

    # -- writes --------------------------------------------------------------------------
    def append(self, records: list[SummaryRecord]) -> int:
        """Insert the records not stored yet (by session and window index); returns how many were new."""
        if not records:
            return 0
        data = pa.Table.from_pylist([{k: getattr(r, k) for k in _FIELDS} for r in records], schema=SCHEMA)
        result = (self.table.merge_insert(["session_id", "window_index"])
                  .when_not_matched_insert_all().execute(data))
        return int(getattr(result, "num_inserted_rows", len(records)))

    def evict_beyond_horizon(self, heads: dict[str, int]) -> None:
        """Drop the summaries that fell beyond their session's horizon, given each session's
        head index; one delete for all the sessions."""
        beyond = [f"(session_id = {quote(sid)} AND window_index <= {head - self.horizon})"
                  for sid, head in sorted(heads.items()) if head >= self.horizon]
        if beyond:
            self.table.delete(" OR ".join(beyond))

    def evict_windows(self, session_id: str, windows: list[int]) -> list[int]:
        """Evict chosen summaries of a session (decay). The newest stored
        summary is the chain head the pipeline continues from, so it is never evicted here;
        returns the windows actually evicted."""
        head = self.heads([session_id]).get(session_id)
        chosen = sorted({int(w) for w in windows if head is None or int(w) != head.window_index})
        if chosen:
            self.table.delete(f"session_id = {quote(session_id)} AND window_index IN "
                              f"({', '.join(str(w) for w in chosen)})")
        return chosen

    def drop_session(self, session_id: str) -> int:
        """Session GC: remove every summary of the session, its head included, and its publish
        marks. Returns the number of summaries removed."""
        pred = f"session_id = {quote(session_id)}"
        n = self.table.count_rows(pred)
        self.table.delete(pred)
        self.published_table.delete(pred)
        return n

    def closed_sessions(self) -> list[str]:
        """Sessions whose stored head closes them (``cut`` close)."""
        return sorted(sid for sid, h in self.heads(self.sessions()).items() if h.cut == "close")

    @property
    def published_table(self):
        if getattr(self, "_published", None) is None:
            self._published = self._db.create_table(PUBLISHED, schema=PUBLISHED_SCHEMA, exist_ok=True)
        return self._published

    def mark_published(self, records: list[SummaryRecord]) -> None:
        """Remember that Kafka acknowledged these summaries (idempotent)."""
        data = pa.table({"session_id": [r.session_id for r in records],
                         "window_index": [r.window_index for r in records]}, schema=PUBLISHED_SCHEMA)
        (self.published_table.merge_insert(["session_id", "window_index"])
         .when_not_matched_insert_all().execute(data))

    def _newest_published(self, session_id: str) -> int:
        rows = (self.published_table.search().where(f"session_id = {quote(session_id)}")
                .select(["window_index"]).limit(None).to_arrow()["window_index"].to_pylist())
        return max(rows, default=-1)

    def unpublished(self, session_id: str) -> list[SummaryRecord]:
        """Stored summaries of the session newer than the newest one Kafka acknowledged."""
        return self.records(session_id, since_window=self._newest_published(session_id) + 1)

    def unpublished_windows(self, session_id: str) -> list[int]:
        """The window indexes of ``unpublished(session_id)``, in order, without reading their tokens."""
        newest = self._newest_published(session_id)
        rows = (self.table.search().where(f"session_id = {quote(session_id)} AND window_index > {newest}")
                .select(["window_index"]).limit(None).to_arrow()["window_index"].to_pylist())
        return sorted(rows)

    def unpublished_all(self) -> list[SummaryRecord]:
        """Every stored summary Kafka has not acknowledged, of every session, in window order."""
        marked = self.published_table.search().select(["session_id", "window_index"]).limit(None).to_arrow()
        newest: dict[str, int] = {}
        for sid, w in zip(marked["session_id"].to_pylist(), marked["window_index"].to_pylist()):
            newest[sid] = max(w, newest.get(sid, -1))
        stored = self.table.search().select(["session_id", "window_index"]).limit(None).to_arrow()
        behind = sorted({sid for sid, w in zip(stored["session_id"].to_pylist(), stored["window_index"].to_pylist())
                         if w > newest.get(sid, -1)})
        return [r for sid in behind for r in self.unpublished(sid)]

    def published(self, session_id: str, windows: list[int]) -> set[int]:
        """Which of these windows of the session Kafka acknowledged."""
        if not windows:
            return set()
        rows = (self.published_table.search().where(
            f"session_id = {quote(session_id)} AND window_index IN ({', '.join(str(int(w)) for w in windows)})")
            .select(["window_index"]).limit(None).to_arrow()["window_index"].to_pylist())
        return set(rows)

    # -- collected sessions --------------------------------------------------------------
    def record_gc(self, record: GcRecord) -> None:
        """Keep a session's signed GC record (insert-if-absent on the session and its head)."""
        (self.gc_table.merge_insert(["session_id", "head_hash"]).when_not_matched_insert_all()
         .execute(to_arrow([record], GcRecord)))

    def gc_records(self) -> list[GcRecord]:
        rows = self.gc_table.search().limit(None).to_arrow().to_pylist()
        return [GcRecord(**r) for r in sorted(rows, key=lambda r: (r["collected_at_us"], r["session_id"]))]

    def collected(self, session_id: str) -> bool:
        """Whether session GC collected this session: its memory is not made again."""
        return self.gc_table.count_rows(f"session_id = {quote(session_id)}") > 0

    # -- consolidation -------------------------------------------------------------------
    @property
    def consolidation_table(self):
        if getattr(self, "_consolidations", None) is None:
            self._consolidations = self._db.create_table(CONSOLIDATIONS, schema=CONSOLIDATION_SCHEMA, exist_ok=True)
        return self._consolidations

    def record_consolidation(self, record: ConsolidationRecord) -> None:
        """Keep a session's signed consolidation record (insert-if-absent on the session and its head)."""
        (self.consolidation_table.merge_insert(["session_id", "head_hash"]).when_not_matched_insert_all()
         .execute(to_arrow([record], ConsolidationRecord)))

    def consolidation(self, session_id: str, head_hash: bytes | None = None) -> ConsolidationRecord | None:
        """The session's consolidation record (for the chain head ``head_hash`` when given)."""
        rows = (self.consolidation_table.search().where(f"session_id = {quote(session_id)}").limit(None)
                .to_arrow().to_pylist())
        rows = [r for r in rows if head_hash is None or r["head_hash"] == head_hash]
        return ConsolidationRecord(**max(rows, key=lambda r: r["consolidated_at_us"])) if rows else None

    # -- reads ---------------------------------------------------------------------------
    def head_record(self, session_id: str) -> SummaryRecord | None:
        """The session's newest stored summary, whole."""
        head = self.heads([session_id]).get(session_id)
        if head is None:
            return None
        found = self.records(session_id, since_window=head.window_index)
        return found[-1] if found else None

    def heads(self, session_ids: list[str]) -> dict[str, ChainHead]:
        """The newest stored summary of each session that has one."""
        if not session_ids:
            return {}
        where = f"session_id IN ({', '.join(quote(s) for s in session_ids)})"
        rows = (self.table.search().where(where).select(["session_id", "window_index", "hash", "seq_end", "cut"])
                .limit(None).to_arrow().to_pylist())
        heads: dict[str, ChainHead] = {}
        for row in rows:
            cur = heads.get(row["session_id"])
            if cur is None or row["window_index"] > cur.window_index:
                heads[row["session_id"]] = ChainHead(row["window_index"], row["hash"], row["seq_end"], row["cut"])
        return heads

    def records(self, session_id: str, since_window: int = 0) -> list[SummaryRecord]:
        """The session's stored summaries in window order."""
        rows = (self.table.search().where(f"session_id = {quote(session_id)} AND window_index >= {since_window}")
                .limit(None).to_arrow().to_pylist())
        rows.sort(key=lambda r: r["window_index"])
        return [SummaryRecord(**{k: r[k] for k in _FIELDS}) for r in rows]

    def version(self) -> int:
        """The summaries table's latest version: it changes with every append and eviction, so
        a reader can tell in one small read whether anything it holds may have changed."""
        return self.table.version

    def hashes(self, session_id: str, since_window: int = 0) -> dict[int, bytes]:
        """window_index -> hash of the session's stored summaries (no tokens read)."""
        rows = (self.table.search().where(f"session_id = {quote(session_id)} AND window_index >= {since_window}")
                .select(["window_index", "hash"]).limit(None).to_arrow().to_pylist())
        return {r["window_index"]: r["hash"] for r in rows}

    def stored_hashes(self, keys: list[tuple[str, int]]) -> dict[tuple[str, int], bytes]:
        """(session, window) -> hash of the stored summary, for these keys, in one query."""
        by_session: dict[str, list[int]] = {}
        for sid, w in keys:
            by_session.setdefault(sid, []).append(int(w))
        if not by_session:
            return {}
        pred = " OR ".join(f"(session_id = {quote(sid)} AND window_index IN ({', '.join(map(str, sorted(ws)))}))"
                           for sid, ws in sorted(by_session.items()))
        rows = (self.table.search().where(pred).select(["session_id", "window_index", "hash"]).limit(None)
                .to_arrow().to_pylist())
        return {(r["session_id"], r["window_index"]): r["hash"] for r in rows}

    def stored_at_ns(self, session_id: str) -> dict[int, int]:
        """window_index -> the event time of the summary's window (ns), for read accounting: the
        records carry no machine's clock, so that a replay makes them byte for byte."""
        rows = (self.table.search().where(f"session_id = {quote(session_id)}")
                .select(["window_index", "event_time_us"]).limit(None).to_arrow().to_pylist())
        return {r["window_index"]: r["event_time_us"] * 1000 for r in rows}

    def sessions(self) -> list[str]:
        """Sessions with at least one stored summary."""
        col = self.table.search().select(["session_id"]).limit(None).to_arrow()["session_id"]
        return sorted(set(col.to_pylist()))

    def count(self) -> int:
        return self.table.count_rows()
