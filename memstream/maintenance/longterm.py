"""Long-term store maintenance: cold demotion, compaction and index upkeep, anchoring.

* **Cold demotion** folds the access log into the retrieval statistics, then moves every hot
  entry neither written nor retrieved within ``older_than_s`` to the cold tier through
  :meth:`LongTermStore.demote` (copy, verify the cold copy's signatures, remove from hot).
  Rows are moved byte for byte, so their Merkle leaves and attestations stay valid.
* **Compaction** compacts every table and drops versions older than the retention (under the
  maintenance lease), and keeps the hot tier's vector index: built once the tier is large
  enough, rebuilt when too many rows are outside it.
* **Anchoring** has a witness (:mod:`memstream.witness`, storage and key of its own) cosign
  the latest signed tree head, with a consistency proof from the last head it cosigned, and
  publishes the head to the attestations topic; ``memstream verify longterm --witness``
  then checks the store against every cosigned head.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta

from memstream.errors import ConfigError
from memstream.longterm.entry import GovernancePolicy
from memstream.longterm.store import LongTermStore
from memstream.maintenance import keyring
from memstream.settings import LEASE_TTL_S
from memstream.storage.lance import connect

log = logging.getLogger(__name__)


def open_store(uri: str, storage_options: dict[str, str] | None = None, *, validator_keys=(), signer=None,
               cold_uri: str | None = None, cold_storage_options: dict[str, str] | None = None,
               kafka_bootstrap: str | None = None, lease_ttl_s: float = LEASE_TTL_S, governance_keys=(),
               governance_threshold: int | None = None, **kw):
    """A :class:`LongTermStore` for maintenance: ``validator_keys`` are the validator public keys,
    ``governance_keys`` (with an M-of-N threshold, default N) those of the governance policy."""
    if governance_keys:
        gk = keyring(governance_keys)
        kw["governance"] = GovernancePolicy(gk, governance_threshold or len(gk))
    return LongTermStore(uri, keyring=keyring(validator_keys, signer), signer=signer, storage_options=storage_options,
                         cold_uri=cold_uri or None, cold_storage_options=cold_storage_options,
                         kafka_bootstrap=kafka_bootstrap or None, lease_ttl_s=lease_ttl_s, **kw)


def demote_stale(store, *, older_than_s: float, now_ns: int | None = None, batch: int = 10_000,
                 dry_run: bool = False) -> dict:
    """Demote hot entries not written or retrieved in the last ``older_than_s`` seconds."""
    if older_than_s <= 0 or batch < 1:
        raise ConfigError(f"demotion needs older_than_s > 0 and batch >= 1, got {older_than_s}, {batch}")
    merged = 0 if dry_run else store.merge_access_log()
    last = store.last_retrieved()
    hot = store.rows(["entry_id", "timestamp_ns"])
    cutoff = (time.time_ns() if now_ns is None else now_ns) - int(older_than_s * 1e9)
    stale = [eid for eid, ts in zip(hot["entry_id"].to_pylist(), hot["timestamp_ns"].to_pylist())
             if max(ts, last.get(eid, 0)) < cutoff]
    demoted = 0
    if not dry_run:
        for start in range(0, len(stale), batch):
            demoted += len(store.demote(stale[start:start + batch]))
    out = {"hot_entries": hot.num_rows, "stale": len(stale), "demoted": demoted, "access_rows_merged": merged,
           "cold_entries": store.count("cold"), "dry_run": dry_run}
    log.info("cold demotion (not retrieved in %.0f days): %s", older_than_s / 86400, out)
    return out


def compact(store, *, cleanup_older_than_s: float = 7 * 86400, index_min_rows: int = 10_000,
            reindex_unindexed_fraction: float = 0.2) -> dict:
    """Compact and clean up every table of the store; build or rebuild the hot vector index."""
    if cleanup_older_than_s < 0:
        raise ConfigError(f"cleanup_older_than_s must be >= 0, got {cleanup_older_than_s}")
    store.compact(timedelta(seconds=cleanup_older_than_s))
    hot = store.table("entries")
    rows = hot.count_rows()
    vector = [i for i in hot.list_indices() if i.columns == ["vector"]]
    unindexed = rows - (vector[0].num_indexed_rows if vector else 0)
    action = "none"
    if rows >= index_min_rows and (not vector or unindexed > reindex_unindexed_fraction * rows):
        store.build_index("hot", replace=True)
        action = "rebuilt" if vector else "built"
    out = {"hot_entries": rows, "cold_entries": store.count("cold"), "unindexed_before": unindexed,
           "index": action}
    log.info("long-term compaction: %s", out)
    return out


def compact_episodic(uri: str, storage_options: dict[str, str] | None = None, *,
                     cleanup_older_than_s: float = 7 * 86400) -> dict:
    """Compact the episodic database's tables. The pipeline and readers append without a
    lease, so unverified files are never deleted here (that corrupts a table being appended)."""
    db = connect(uri, storage_options)
    names, token = [], None
    while True:
        page = db.list_tables(page_token=token)
        names += page.tables
        token = page.page_token
        if not token:
            break
    for name in names:
        db.open_table(name).optimize(cleanup_older_than=timedelta(seconds=cleanup_older_than_s),
                                     delete_unverified=False)
    log.info("episodic compaction: %d tables (%s)", len(names), ", ".join(names))
    return {"tables": len(names)}


def anchor(store, witness=None) -> dict:
    """Publish the latest signed tree head: to ``witness`` (default: the store's) for its
    cosignature, and to Kafka when the store has a bootstrap. A witness refusal (the store was
    rolled back, truncated or forked since the witness last cosigned) raises WitnessRefusal."""
    witness = witness if witness is not None else store.witness
    cosigned = store.witness_tree_head(witness) if witness is not None else None
    sth = store.publish_tree_head() if store.kafka_bootstrap else store.latest_tree_head()
    out = {"tree_size": sth.tree_size if sth else 0, "root_hash": sth.root_hash.hex() if sth else None,
           "published": bool(sth is not None and store.kafka_bootstrap), "topic": store.tree_head_topic,
           "witnessed": cosigned is not None, "witness": witness.uri if witness is not None else None}
    log.info("anchoring: %s", out)
    return out
