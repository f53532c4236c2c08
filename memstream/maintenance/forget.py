"""Forgetting a session everywhere: crypto-shredding plus physical erasure, and its proof.

Kafka cannot delete single records, and backups and old file versions outlive any delete, so
a session's latents are sealed under its own data key before they leave the producer
(:mod:`memstream.sdk`), and its summary tokens under the same key before they are stored or
published (:func:`memstream.wire.codec.seal_tokens`). :func:`forget_session`:

1. keeps a signed :class:`~memstream.schemas.records.GcRecord` with reason ``forgotten``
   first: the pipeline treats the session as collected from then on, so a replay of its
   events never makes a summary again;
2. destroys the session's data key (:meth:`KeyTable.destroy`): every sealed copy, on any
   topic's log or in any backup, can no longer be opened; a replay dead-letters the chunks
   as ``key_destroyed``; and the data key of the session's long-term subject, which sealed
   the payloads of what retention and consolidation wrote of it;
3. deletes the session's rows from the episodic store (summaries, publish marks) and the
   read ledger (reads, biases), and makes the deletes physical (:func:`erase_deleted`);
4. with a long-term store, forgets the session's subject there
   (:func:`~memstream.longterm.entry.session_subject`: what query-time retention and
   consolidation wrote of it) by a signed forget request and the forget purge
   (:mod:`memstream.maintenance.purge`), whose attestation it returns; without the governance
   approvers at hand it plans the purge, which the ``forget_purge`` DAG runs once M of N approved.

Every step is idempotent, so a retry after a crash finishes the job. :func:`scan_locations`
then proves it: every file of the Kafka log directories, the stores, the ledger and the key
table is searched for fingerprints of the forgotten bytes (:mod:`memstream.maintenance.scan`).
:func:`session_markers` takes those fingerprints before forgetting and :func:`prove_forgotten`
scans with them after: this is what ``memstream forget session`` and the ``session_forget``
DAG run.
"""

from __future__ import annotations

import base64
import logging
import time
from dataclasses import dataclass

from memstream.crypto.datakeys import session_key_id, subject_key_id
from memstream.crypto.keys import SigningKey
from memstream.crypto.signed import sign_record
from memstream.episodic.ledger import BIASES, READS, ReadLedger
from memstream.episodic.store import PUBLISHED, TABLE, EpisodicStore
from memstream.errors import ConfigError, KeyDestroyedError, KeyUnavailableError
from memstream.longterm.entry import ForgetRequest, session_subject, subject_hash
from memstream.maintenance import purge
from memstream.maintenance.scan import Markers, ScanReport, scan_storage
from memstream.schemas.records import GcRecord
from memstream.storage.keytable import KeyTable
from memstream.storage.lance import connect, erase_deleted

log = logging.getLogger(__name__)


def forget_session(uri: str, storage_options: dict[str, str] | None, session_id: str, *, keys: KeyTable,
                   key: SigningKey, longterm=None, longterm_key: SigningKey | None = None, approvers=(),
                   now_ns: int | None = None) -> dict:
    """Forget one session (see the module docstring); returns what was removed, the signed
    record and, with ``longterm`` (a LongTermStore; ``longterm_key``, a validator or governance
    key of it, signs the forget request, ``key`` the purge attestation; ``approvers``: the
    governance keys whose M-of-N approval the purge needs), the purge attestation. The erasure uses
    no ``delete_unverified``, which is what keeps it safe beside a running pipeline."""
    if key is None:
        raise ConfigError("forgetting signs a record of it: pass the maintenance key")
    now_ns = time.time_ns() if now_ns is None else now_ns
    store, ledger = EpisodicStore(uri, storage_options), ReadLedger(uri, storage_options)
    stored = store.stored_at_ns(session_id)
    head = store.heads([session_id]).get(session_id)
    record = next((r for r in store.gc_records() if r.session_id == session_id and r.reason == "forgotten"), None)
    if record is None:
        record = sign_record(GcRecord(
            schema_version=1, session_id=session_id, reason="forgotten", summaries_removed=len(stored),
            reads_removed=ledger.query_count(session_id), biases_removed=len(ledger.biases(session_id)),
            head_window_index=head.window_index if head else None, head_hash=head.hash if head else b"",
            last_activity_us=max(stored.values(), default=0) // 1000, collected_at_us=now_ns // 1000,
            signature=b"", key_id=""), key)
        store.record_gc(record)
    key_was_there = keys.destroy(session_key_id(session_id))
    # What long-term memory sealed of the session (under its subject's key) goes unreadable now,
    # before and whatever the approval of the purge that erases the rows.
    keys.destroy(subject_key_id(subject_hash(session_subject(session_id))))
    summaries = store.drop_session(session_id)
    ledger.drop_session(session_id)
    db = connect(uri, storage_options)
    for name in (TABLE, PUBLISHED, READS, BIASES):
        erase_deleted(db.open_table(name))
    out = {"session_id": session_id, "key_destroyed": key_was_there, "summaries_removed": summaries,
           "reads_removed": record.reads_removed, "record": record.to_dict()}
    if longterm is not None:
        if longterm_key is None:
            raise ConfigError("forgetting in the long-term store signs a forget request: pass longterm_key")
        subject = session_subject(session_id)
        ticket = longterm.request_forget(subject, ForgetRequest.create(longterm_key, longterm.store_id, subject))
        if approvers:
            out["longterm"] = purge.run(longterm, key, approvers=approvers)
        else:  # governance approves apart from here; the forget_purge DAG erases once M of N have
            planned = purge.plan(longterm)
            out["longterm"] = {**planned, "request_id": ticket.request_id, "matched": ticket.matched,
                               "awaits_approval": planned["entries"] > 0}
    log.info("session %s forgotten: %s", session_id, {k: v for k, v in out.items() if k != "record"})
    return out


def scan_locations(markers: Markers, *, kafka_log_dirs: list[str], stores: list[tuple[str, dict | None]]) -> ScanReport:
    """Scan every file of the Kafka log directories and every object of the stores (the
    episodic store holds the ledger and the key table too) for the markers."""
    return scan_storage(markers, [(d, None) for d in kafka_log_dirs] + list(stores))


@dataclass
class SessionMarkers:
    """Fingerprints of what forgetting a session must leave nowhere, taken before it forgets.

    ``keys``: its data key and its long-term subject's, in the clear and wrapped; no file may
    hold them, Kafka's logs included.
    ``rows``: its stored summaries' tokens and signatures; no file of the stores may hold them
    (the summaries topic still does, sealed under the destroyed key, which is the point).
    ``sealed``: whether the session had a data key at all; without one its Kafka records were
    never sealed and stay readable until the topics' retention drops them."""

    keys: Markers
    rows: Markers
    sealed: bool

    def to_json(self) -> dict:
        return {"keys": base64.b64encode(self.keys.to_bytes()).decode(),
                "rows": base64.b64encode(self.rows.to_bytes()).decode(), "sealed": self.sealed}

    @classmethod
    def from_json(cls, d: dict) -> "SessionMarkers":
        return cls(Markers.from_bytes(base64.b64decode(d["keys"])), Markers.from_bytes(base64.b64decode(d["rows"])),
                   bool(d["sealed"]))


def session_markers(uri: str, storage_options: dict[str, str] | None, session_id: str, *,
                    keys: KeyTable) -> SessionMarkers:
    """The fingerprints :func:`prove_forgotten` looks for, read before :func:`forget_session`."""
    key_id = session_key_id(session_id)
    key_markers, row_markers, sealed = Markers(), Markers(), False
    try:
        key_markers.add_with_base64(keys.data_key(key_id))
        sealed = True
    except KeyDestroyedError:
        sealed = True  # forgotten before (this is a retry): the key is gone already
    except KeyUnavailableError:
        pass  # the session never had one
    wrapped = keys.wrapped(key_id)
    if wrapped:
        key_markers.add_with_base64(wrapped)
    subject_key = subject_key_id(subject_hash(session_subject(session_id)))  # long-term payloads' key
    try:
        key_markers.add_with_base64(keys.data_key(subject_key))
    except (KeyDestroyedError, KeyUnavailableError):
        pass
    wrapped = keys.wrapped(subject_key)
    if wrapped:
        key_markers.add_with_base64(wrapped)
    for r in EpisodicStore(uri, storage_options).records(session_id):
        if r.tokens:
            row_markers.add_with_base64(r.tokens)
        row_markers.add_with_base64(r.signature)
    return SessionMarkers(key_markers, row_markers, sealed)


def prove_forgotten(markers: SessionMarkers, *, kafka_log_dirs: list[str],
                    stores: list[tuple[str, dict | None]]) -> dict:
    """Scan for the markers after forgetting: the key's everywhere, the rows' in the stores.
    ``ok`` only when nothing was found."""
    key_scan = scan_locations(markers.keys, kafka_log_dirs=kafka_log_dirs, stores=stores)
    row_scan = scan_storage(markers.rows, list(stores))
    return {"ok": not key_scan.hits and not row_scan.hits, "sealed": markers.sealed,
            "fingerprints": {"keys": len(markers.keys), "rows": len(markers.rows)},
            "kafka_log_dirs": list(kafka_log_dirs), "stores": [uri for uri, _ in stores],
            "key_scan": key_scan.to_json(), "row_scan": row_scan.to_json()}
