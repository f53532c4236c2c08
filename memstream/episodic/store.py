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

from memstream.errors import ConfigError
from memstream.storage.lance import connect, quote
from memstream.schemas.generate import arrow_schema
from memstream.schemas.records import PublishMark, SummaryRecord
from memstream.settings import HORIZON

TABLE = "summaries"
PUBLISHED = "published"  # (session_id, window_index) of summaries Kafka acknowledged
SCHEMA = arrow_schema(SummaryRecord)
PUBLISHED_SCHEMA = arrow_schema(PublishMark)
_FIELDS = [f.name for f in dataclasses.fields(SummaryRecord)]


@dataclass(frozen=True)
class ChainHead:
    window_index: int
    hash: bytes
    seq_end: int


class EpisodicStore:
    """``EpisodicStore(uri, storage_options)``: a local folder or ``s3://bucket/prefix``."""

    def __init__(self, uri: str, storage_options: dict[str, str] | None = None, horizon: int = HORIZON):
        if horizon < 1:
            raise ConfigError(f"the horizon must hold at least one summary, got {horizon}")
        self.uri, self.horizon = uri, horizon
        # Every read sees the latest committed version: a chain continues from what is stored.
        self._db = connect(uri, storage_options)
        self._table = None

    @property
    def table(self):
        if self._table is None:
            self._table = self._db.create_table(TABLE, schema=SCHEMA, exist_ok=True)
        return self._table

    # -- writes --------------------------------------------------------------------------
    def append(self, records: list[SummaryRecord]) -> int:
        """Insert the records not stored yet (by session and window index); returns how many were new."""
        if not records:
            return 0
        data = pa.Table.from_pylist([{k: getattr(r, k) for k in _FIELDS} for r in records], schema=SCHEMA)
        result = (self.table.merge_insert(["session_id", "window_index"])
                  .when_not_matched_insert_all().execute(data))
        return int(getattr(result, "num_inserted_rows", len(records)))

    def evict(self, session_id: str, head_index: int) -> None:
        """Drop the session's summaries that fell beyond its horizon, given its head."""
        if head_index >= self.horizon:
            self.table.delete(f"session_id = {quote(session_id)} AND window_index <= "
                              f"{head_index - self.horizon}")

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

    def unpublished(self, session_id: str) -> list[SummaryRecord]:
        """Stored summaries of the session newer than the newest one Kafka acknowledged."""
        rows = (self.published_table.search().where(f"session_id = {quote(session_id)}")
                .select(["window_index"]).limit(None).to_arrow()["window_index"].to_pylist())
        return self.records(session_id, since_window=max(rows, default=-1) + 1)

    # -- reads ---------------------------------------------------------------------------
    def heads(self, session_ids: list[str]) -> dict[str, ChainHead]:
        """The newest stored summary of each session that has one."""
        if not session_ids:
            return {}
        where = f"session_id IN ({', '.join(quote(s) for s in session_ids)})"
        rows = (self.table.search().where(where).select(["session_id", "window_index", "hash", "seq_end"])
                .limit(None).to_arrow().to_pylist())
        heads: dict[str, ChainHead] = {}
        for row in rows:
            cur = heads.get(row["session_id"])
            if cur is None or row["window_index"] > cur.window_index:
                heads[row["session_id"]] = ChainHead(row["window_index"], row["hash"], row["seq_end"])
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

    def stored_at_ns(self, session_id: str) -> dict[int, int]:
        """window_index -> when the summary was produced (ns), for read accounting."""
        rows = (self.table.search().where(f"session_id = {quote(session_id)}")
                .select(["window_index", "processing_time_us"]).limit(None).to_arrow().to_pylist())
        return {r["window_index"]: r["processing_time_us"] * 1000 for r in rows}

    def sessions(self) -> list[str]:
        """Sessions with at least one stored summary."""
        col = self.table.search().select(["session_id"]).limit(None).to_arrow()["session_id"]
        return sorted(set(col.to_pylist()))

    def count(self) -> int:
        return self.table.count_rows()
