"""Consolidation at session end, the "sleep" of the design: before session GC removes a
session's episodic memory, the summaries its reads drew on most (by the read ledger) move to
long-term memory, and the details fade with the rest of the window.

For each session that session GC would collect (closed, or idle past the retention) and that
has no consolidation record for its current chain head, the ``top`` summaries with the most
reads (at least ``min_reads``) become signed long-term entries (:func:`distill`): the vector is
the unit mean of the summary's tokens, the payload the tokens themselves (fp16), and the
provenance query is the summary's hash and window. The entry's timestamp is the window's event
time, so a retry signs byte-identical entries and ``append(if_absent=True)`` writes each once.
A signed :class:`ConsolidationRecord` in the episodic store closes the step; session GC
collects only sessions that have one.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from memstream.crypto.hashing import canonical_encode
from memstream.crypto.keys import SigningKey, check_distinct_roles
from memstream.crypto.signed import sign_record
from memstream.errors import ConfigError
from memstream.longterm.entry import Entry, session_subject
from memstream.longterm.store import LongTermStore
from memstream.maintenance.episodic import _open, gc_candidates
from memstream.schemas.records import ConsolidationRecord, SummaryRecord
from memstream.settings import CONSOLIDATE_MIN_READS, CONSOLIDATE_TOP
from memstream.wire.codec import DataKeys, summary_tokens

log = logging.getLogger(__name__)

CONSOLIDATION_DOMAIN = "memstream.longterm.consolidation.v1"


def consolidation_query(record: SummaryRecord) -> bytes:
    """The provenance "query" of a consolidated entry: the summary it was distilled from."""
    return canonical_encode(CONSOLIDATION_DOMAIN, {"session_id": record.session_id,
                                                   "window_index": record.window_index, "summary_hash": record.hash,
                                                   "seq_start": record.seq_start, "seq_end": record.seq_end})


def distill(longterm: LongTermStore, record: SummaryRecord, keys: DataKeys | None = None) -> Entry:
    """One summary as a signed long-term entry (deterministic: same summary, same entry),
    bound to its session's forget subject; ``keys`` open sealed tokens."""
    tokens = summary_tokens(record, keys)
    if tokens.shape[1] != longterm.dim:
        raise ConfigError(f"summary {record.session_id}/{record.window_index} has {tokens.shape[1]}-d tokens, the "
                          f"long-term store holds {longterm.dim}-d vectors")
    centre = tokens.mean(axis=0)
    centre = centre / max(float(np.linalg.norm(centre)), 1e-12)
    return longterm.new_entry(centre, tokens.astype(np.float16).tobytes(), query=consolidation_query(record),
                              payload_kind="summary_tokens", timestamp_ns=record.event_time_us * 1000,
                              forget_subject=session_subject(record.session_id))


def consolidate_sessions(uri: str, storage_options: dict[str, str] | None, longterm: LongTermStore, *,
                         key: SigningKey | None, retention_s: float, closed=None, top: int = CONSOLIDATE_TOP,
                         min_reads: int = CONSOLIDATE_MIN_READS,
                         now_ns: int | None = None, dry_run: bool = False, keys: DataKeys | None = None) -> dict:
    """Consolidate every session session GC would collect; returns counts and, per session,
    the entries written. ``key`` signs the consolidation records (the maintenance key);
    ``keys`` (the store's key table) opens sealed summary tokens."""
    if top < 1 or min_reads < 1:
        raise ConfigError(f"consolidation needs top >= 1 and min_reads >= 1, got {top}, {min_reads}")
    if key is None and not dry_run:
        raise ConfigError("consolidation signs a record per session: pass the maintenance key")
    if key is not None and longterm.signer is not None:
        # Entries are the validator's to sign, records the maintenance key's: never one key for both.
        check_distinct_roles({"validator": [longterm.signer], "maintenance": [key]})
    store, ledger = _open(uri, storage_options)
    out = {"candidates": 0, "consolidated": 0, "already": 0, "entries": 0, "skipped_existing": 0,
           "sessions": {}, "dry_run": dry_run}
    for session, _, stored, _ in gc_candidates(store, ledger, retention_s=retention_s, closed=closed, now_ns=now_ns):
        head = store.heads([session]).get(session)
        if head is None:
            continue  # accounting only: nothing stored to distil
        out["candidates"] += 1
        if store.consolidation(session, head.hash) is not None:
            out["already"] += 1
            continue
        counts = {w: c for w, c in ledger.read_counts(session).items() if w in stored and c >= min_reads}
        chosen = sorted(counts, key=lambda w: (-counts[w], w))[:top]
        out["sessions"][session] = {"windows": chosen, "reads": [counts[w] for w in chosen]}
        if dry_run:
            continue
        records = {r.window_index: r for r in store.records(session, since_window=min(chosen))} if chosen else {}
        entries = [distill(longterm, records[w], keys) for w in chosen]
        if entries:
            result = longterm.append(entries, if_absent=True)
            out["skipped_existing"] += len(result.skipped)
            tree_size = result.tree_head.tree_size
        else:
            head_now = longterm.latest_tree_head()
            tree_size = head_now.tree_size if head_now else 0
        record = ConsolidationRecord(
            schema_version=1, session_id=session, head_hash=head.hash,
            summaries=[f"{w}:{records[w].hash.hex()}" for w in chosen], reads=[counts[w] for w in chosen],
            entry_ids=[e.entry_id for e in entries], longterm_store_id=longterm.store_id, tree_size=tree_size,
            consolidated_at_us=(time.time_ns() if now_ns is None else now_ns) // 1000, signature=b"", key_id="")
        # Entries first, then the record: a crash in between re-signs the same entries, which
        # the store skips, and writes the record on the retry.
        store.record_consolidation(sign_record(record, key))
        out["consolidated"] += 1
        out["entries"] += len(entries)
        out["sessions"][session]["entry_ids"] = record.entry_ids
        log.info("session %s consolidated: windows %s (reads %s) -> %d long-term entries", session, chosen,
                 record.reads, len(entries))
    log.info("consolidation: %s", {k: v for k, v in out.items() if k != "sessions"})
    return out
