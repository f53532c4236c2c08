"""Episodic maintenance: decay of summaries nobody reads, and garbage collection of sessions.

**Decay.** For each session, the read ledger gives every stored summary's staleness (the
session's queries since the summary was last read, or since it was stored). Its attention
bias is :func:`memstream.episodic.decay.decay_bias` (0 within the last ``k`` queries, then ``-slope``
per query); summaries whose bias falls below ``cutoff`` are evicted from the window. The
chain head is never evicted (the pipeline continues the chain from it); the summaries topic
keeps the records for its retention.

**Session GC.** A session is collected when it closed (its stored chain ends in a summary cut
by the session's close) or when it was idle (no summary produced and no query) for longer than
the retention. Collecting removes its whole window, its chain head, its publish marks and its
read accounting, and leaves a signed :class:`GcRecord` in the ``gc_records`` table of the
episodic database. A session whose newest summaries Kafka has not acknowledged is skipped:
the store still holds the only copy.
"""

from __future__ import annotations

import logging
import time

from memstream.crypto.keys import SigningKey
from memstream.crypto.signed import sign_record
from memstream.episodic.decay import decay_bias
from memstream.episodic.ledger import ReadLedger
from memstream.episodic.store import EpisodicStore
from memstream.errors import ConfigError, WitnessRefusal
from memstream.schemas.records import GcRecord
from memstream.settings import DECAY_CUTOFF, DECAY_K, DECAY_SLOPE

log = logging.getLogger(__name__)



def _open(uri: str, storage_options: dict[str, str] | None):
    return EpisodicStore(uri, storage_options), ReadLedger(uri, storage_options)


def decay(uri: str, storage_options: dict[str, str] | None = None, *, k: int = DECAY_K, slope: float = DECAY_SLOPE,
          cutoff: float = DECAY_CUTOFF, dry_run: bool = False) -> dict:
    """Store each summary's decay bias and evict those below ``cutoff``; returns counts."""
    if cutoff >= 0:
        raise ConfigError(f"the eviction cutoff is a negative bias, got {cutoff}")
    store, ledger = _open(uri, storage_options)
    out = {"sessions": 0, "summaries": 0, "decayed": 0, "evicted": 0, "head_kept": 0, "dry_run": dry_run}
    for session in store.sessions():
        stored = store.stored_at_ns(session)
        st = ledger.staleness(session, stored)
        biases = {w: decay_bias(st.by_window[w], k, slope) for w in stored}
        below = sorted(w for w, b in biases.items() if b < cutoff)
        head = max(stored)
        out["sessions"] += 1
        out["summaries"] += len(stored)
        out["decayed"] += sum(1 for b in biases.values() if b < 0)
        out["head_kept"] += int(head in below)
        if dry_run:
            out["evicted"] += len([w for w in below if w != head])
            continue
        # Bias rows of summaries evicted by an earlier, interrupted run.
        orphans = sorted(set(ledger.biases(session)) - set(stored))
        ledger.forget_windows(session, orphans)
        ledger.set_biases(session, biases, st.by_window, st.queries)
        evicted = store.evict_windows(session, below)
        ledger.forget_windows(session, evicted)
        out["evicted"] += len(evicted)
        if evicted:
            log.info("session %s: %d queries, evicted windows %s", session, st.queries, evicted)
    log.info("episodic decay (k=%d, slope=%g, cutoff=%g): %s", k, slope, cutoff, out)
    return out


def closed_sessions(uri: str, storage_options: dict[str, str] | None = None) -> list[str]:
    """Sessions whose stored chain ends in their close."""
    return EpisodicStore(uri, storage_options).closed_sessions()


def gc_records(uri: str, storage_options: dict[str, str] | None = None) -> list[GcRecord]:
    return EpisodicStore(uri, storage_options).gc_records()


def gc_candidates(store: EpisodicStore, ledger: ReadLedger, *, retention_s: float, closed=None,
                  now_ns: int | None = None):
    """(session, reason, stored_at_ns, last activity ns) of every session session GC would
    collect: closed ones and those idle past ``retention_s``, in session order."""
    if retention_s <= 0:
        raise ConfigError(f"the retention must be positive, got {retention_s}s")
    now_ns = time.time_ns() if now_ns is None else now_ns
    closed = set(store.closed_sessions() if closed is None else closed)
    for session in sorted(set(store.sessions()) | set(ledger.sessions())):
        stored = store.stored_at_ns(session)
        last_read = ledger.last_query_ns(session)
        last_ns = max([*stored.values(), last_read or 0])
        if session in closed:
            yield session, "closed", stored, last_ns
        elif now_ns - last_ns > retention_s * 1e9:
            yield session, "idle", stored, last_ns


def collect_sessions(uri: str, storage_options: dict[str, str] | None = None, *, retention_s: float,
                     key: SigningKey | None, closed=None, now_ns: int | None = None,
                     dry_run: bool = False, require_consolidation: bool = True) -> dict:
    """Garbage-collect closed sessions and those idle past ``retention_s``; returns counts
    and the collected session ids. ``closed``: the closed sessions (default: those whose stored
    chain ends in their close, :func:`closed_sessions`). A session with stored summaries but
    no consolidation record for its chain head is skipped (``require_consolidation``): its
    most-read summaries have not been moved to long-term memory yet."""
    if retention_s <= 0:
        raise ConfigError(f"the retention must be positive, got {retention_s}s")
    if key is None and not dry_run:
        raise ConfigError("session GC signs a GC record per session: pass the maintenance key")
    now_ns = time.time_ns() if now_ns is None else now_ns
    store, ledger = _open(uri, storage_options)
    out = {"sessions": len(set(store.sessions()) | set(ledger.sessions())), "collected_closed": 0,
           "collected_idle": 0, "skipped_unpublished": 0, "skipped_unconsolidated": 0,
           "summaries_removed": 0, "reads_removed": 0, "collected": [], "dry_run": dry_run}
    for session, reason, stored, last_ns in gc_candidates(store, ledger, retention_s=retention_s, closed=closed,
                                                          now_ns=now_ns):
        if stored and store.unpublished_windows(session):
            out["skipped_unpublished"] += 1
            log.warning("session %s is %s but Kafka has not acknowledged all its summaries: kept", session, reason)
            continue
        head = store.heads([session]).get(session)
        if require_consolidation and head is not None and store.consolidation(session, head.hash) is None:
            out["skipped_unconsolidated"] += 1
            log.warning("session %s is %s but not consolidated (run session_consolidation first): kept",
                        session, reason)
            continue
        record = GcRecord(
            schema_version=1, session_id=session, reason=reason, summaries_removed=len(stored),
            reads_removed=ledger.query_count(session), biases_removed=len(ledger.biases(session)),
            head_window_index=head.window_index if head else None, head_hash=head.hash if head else b"",
            last_activity_us=last_ns // 1000, collected_at_us=now_ns // 1000, signature=b"", key_id="")
        out[f"collected_{reason}"] += 1
        out["summaries_removed"] += record.summaries_removed
        out["reads_removed"] += record.reads_removed
        out["collected"].append(session)
        if dry_run:
            continue
        # The record first (insert-if-absent on the session and its head), then the removal:
        # a retry after a crash in between finds the record and finishes the removal. The
        # pipeline reads the record too: a collected session is never summarised again.
        store.record_gc(sign_record(record, key))
        store.drop_session(session)
        ledger.drop_session(session)
        log.info("session %s collected (%s): %d summaries, %d reads", session, reason,
                 record.summaries_removed, record.reads_removed)
    log.info("session GC (retention %gs): %s", retention_s, {k: v for k, v in out.items() if k != "collected"})
    return out


def anchor_chains(uri: str, storage_options: dict[str, str] | None = None, *, witness) -> dict:
    """Have ``witness`` cosign each stored session's chain head, with the stored summaries that
    link it to the head it cosigned before. A session whose link was evicted (decay removed a
    window after the cosigned one) is reported as ``unlinked``: anchor more often than decay
    runs. A refusal for a rollback or fork raises WitnessRefusal once every session was tried."""
    store = EpisodicStore(uri, storage_options)
    out = {"sessions": 0, "cosigned": 0, "unchanged": 0, "unlinked": []}
    refused = []
    sessions = store.sessions()
    heads = store.heads(sessions)
    for sid in sessions:
        head = heads[sid]
        out["sessions"] += 1
        last = witness.latest_chain_head(sid)
        if last is not None and (last.window_index, last.head_hash) == (head.window_index, head.hash):
            out["unchanged"] += 1
            continue
        since = head.window_index if last is None or last.window_index > head.window_index else last.window_index
        try:
            witness.cosign_chain_head(store.records(sid, since_window=since))
            out["cosigned"] += 1
        except WitnessRefusal as e:
            if e.kind != "unlinked":
                refused.append(e)
                continue
            out["unlinked"].append(sid)
            log.warning("chain anchoring: %s", e)
    log.info("chain anchoring: %s", {**out, "refused": len(refused)})
    if refused:
        raise WitnessRefusal(refused[0].kind, f"the witness refused {len(refused)} chain head(s): "
                                              + "; ".join(map(str, refused[:5])))
    return out
