"""The forget purge: erase what signed forget requests name, prove it, attest it.

1. :func:`plan` takes every stored forget request not yet carried out, checks its signature
   and matches the entries bound to its subject (and tag) in both tiers: the user-bound
   writes. It stores the plan in the ``purges`` table: entry ids (content hashes, which the
   Merkle log keeps anyway) and salted fingerprints of their payload, vector and signature
   bytes (:mod:`memstream.maintenance.scan`), never the bytes themselves. An unfinished
   plan is resumed rather than replaced, so a crash at any step is retried safely.
2. :func:`approve`: governance keys review the plan (:func:`review` checks that its entry
   ids are exactly the entries bound to the requests' subjects and tags) and sign it
   (:func:`~memstream.longterm.entry.purge_message`); nothing is erased before M of N did.
   :func:`erase` then runs :meth:`LongTermStore.erase` under the maintenance lease (writers wait):
   delete, rewrite only the fragments that held the rows (the same commit remaps the
   indexes without them; a vector index whose centroid copies an erased vector is rebuilt),
   drop every old version with ``delete_unverified=True``.
3. :func:`check` scans every object of the store (hot root and cold tier; local files or
   the S3 listing) for the fingerprints and fails if any window is found, or if a row of
   an erased entry is still readable.
4. :func:`attest` signs a :class:`PurgeAttestation` (entry ids, request ids and their
   subject hashes, the governance approvals, scan counts, the tree head at the purge) and
   stores it in the plan's row; :meth:`LongTermStore.verify` accepts the erased leaves on
   its strength only with the M-of-N approvals of exactly those requests and entries.
"""

from __future__ import annotations

import json
import logging
import time
import uuid

import numpy as np

from memstream.crypto.datakeys import subject_key_id
from memstream.crypto.keys import KeyRing
from memstream.crypto.signed import sign_record
from memstream.errors import ConfigError, GovernanceError, IntegrityError, VerificationError
from memstream.longterm.entry import Approval, ForgetRequest, purge_message
from memstream.maintenance.scan import Markers, scan_storage
from memstream.schemas.generate import to_arrow
from memstream.schemas.records import PurgeAttestation, PurgeRecord

log = logging.getLogger(__name__)

_MATCH_COLUMNS = ["entry_id", "forget_subject", "forget_tag", "payload", "vector", "signature"]


def _rows(table, where: str | None = None) -> list[dict]:
    return table.to_lance().to_table(filter=where).to_pylist()


def _open_plan(store) -> dict | None:
    pending = _rows(store.table("purges"), "attestation IS NULL")
    return min(pending, key=lambda r: r["planned_ns"]) if pending else None


def _plan_row(store, purge_id: str) -> dict:
    if not purge_id or not all(c in "0123456789abcdef" for c in purge_id) or len(purge_id) != 32:
        raise ConfigError(f"not a purge id: {purge_id!r}")
    rows = _rows(store.table("purges"), f"purge_id = '{purge_id}'")
    if not rows:
        raise ConfigError(f"no purge {purge_id} in the store")
    return rows[0]


def plan(store) -> dict:
    """Plan (or resume) a purge of the pending forget requests; returns its id and counts,
    with ``purge_id`` None when nothing is pending."""
    current = _open_plan(store)
    if current is not None:
        out = {"purge_id": current["purge_id"], "requests": len(current["request_ids"]),
               "entries": len(current["entry_ids"]), "resumed": True}
        log.info("forget purge: resuming unfinished plan %s", out)
        return out
    done = {rid for r in _rows(store.table("purges")) for rid in r["request_ids"]}
    # request_forget accepts requests signed by validator or governance keys
    ring = KeyRing([*store.keyring, *(store.governance.keys if store.governance else ())])
    requests = []
    for r in _rows(store.table("forget_requests")):
        if r["request_id"] in done:
            continue
        req = ForgetRequest(r["store_id"], r["subject_hash"], r["tag"], r["key_id"], r["signature"],
                            r["request_id"], r["issued_at_ns"])
        try:
            req.verify(ring)
        except IntegrityError as e:
            raise VerificationError(f"stored forget request {req.request_id} does not verify ({e}): "
                                    "investigate before purging anything") from e
        requests.append(req)
    if not requests:
        log.info("forget purge: no pending forget request")
        return {"purge_id": None, "requests": 0, "entries": 0, "resumed": False}
    markers, ids, counts = Markers(), set(), {"hot": 0, "cold": 0}
    for tier in ("hot", "cold"):
        for row in store.rows(_MATCH_COLUMNS, "forget_subject IS NOT NULL", tier=tier).to_pylist():
            if row["entry_id"] in ids or not any(row["forget_subject"] == q.subject_hash
                                                 and (q.tag is None or row["forget_tag"] == q.tag) for q in requests):
                continue
            ids.add(row["entry_id"])
            counts[tier] += 1
            markers.add(row["payload"])
            markers.add(np.asarray(row["vector"], dtype="<f4").tobytes())
            markers.add(row["signature"])
    purge_id = uuid.uuid4().hex
    store.table("purges").add(to_arrow([PurgeRecord(
        purge_id, sorted(q.request_id for q in requests), sorted(ids), counts["hot"], counts["cold"],
        markers.to_bytes(), time.time_ns(), None)], PurgeRecord))
    out = {"purge_id": purge_id, "requests": len(requests), "entries": len(ids), "hot": counts["hot"],
           "cold": counts["cold"], "markers": len(markers), "resumed": False}
    log.info("forget purge planned: %s", out)
    return out


def _requests(store, row: dict) -> list[tuple[str, str, str | None]]:
    """(request id, subject hash, tag) of each forget request the plan carries out."""
    stored = {r["request_id"]: r for r in _rows(store.table("forget_requests"))}
    missing = [rid for rid in row["request_ids"] if rid not in stored]
    if missing:
        raise VerificationError(f"purge {row['purge_id']} names forget requests that are not stored: {missing[:3]}")
    return [(rid, stored[rid]["subject_hash"], stored[rid]["tag"]) for rid in row["request_ids"]]


def approval_message(store, purge_id: str) -> bytes:
    """What each governance key signs to approve the planned purge."""
    row = _plan_row(store, purge_id)
    return purge_message(store.store_id, purge_id, _requests(store, row), row["entry_ids"])


def review(store, purge_id: str) -> dict:
    """Check a plan before approving it (before its erase): every entry id it names must be
    a stored entry (either tier) bound to one of its requests' subjects and tags;
    VerificationError otherwise. Entries of those subjects written after the plan are counted
    in ``bound_not_planned`` (a later request and purge takes them)."""
    row = _plan_row(store, purge_id)
    requests = _requests(store, row)
    bound = set()
    for tier in ("hot", "cold"):
        for r in store.rows(["entry_id", "forget_subject", "forget_tag"], "forget_subject IS NOT NULL",
                            tier=tier).to_pylist():
            if any(r["forget_subject"] == sh and (tag is None or r["forget_tag"] == tag) for _, sh, tag in requests):
                bound.add(r["entry_id"])
    planned = set(row["entry_ids"])
    if planned - bound:
        raise VerificationError(f"purge {purge_id} names {len(planned - bound)} entr(y/ies) that are not stored "
                                "entries of its requests' subjects: do not approve it")
    return {"purge_id": purge_id, "requests": [{"request_id": rid, "subject_hash": sh, "tag": tag}
                                              for rid, sh, tag in requests], "entries": len(planned),
            "bound_not_planned": len(bound - planned)}


def approve(store, purge_id: str, key) -> dict:
    """Review the plan and add ``key``'s approval (a governance key of the store's policy)."""
    if store.governance is None or key.key_id not in store.governance.keys:
        raise GovernanceError(f"key {key.key_id} is not a governance key of this store: approvals of a purge come "
                              "from the governance keys of its M-of-N policy")
    out = review(store, purge_id)
    added = store.add_purge_approval(purge_id, Approval(key.key_id, key.sign(approval_message(store, purge_id))))
    out.update(approved_by=key.key_id, added=added, approvals=len(store.purge_approvals(purge_id)))
    log.info("forget purge approved: %s", out)
    return out


def approved(store, purge_id: str) -> list[str]:
    """The governance keys whose approvals of the plan are valid; GovernanceError below M."""
    row = _plan_row(store, purge_id)
    if not row["entry_ids"]:
        return []  # a plan that erases nothing needs no approval
    if store.governance is None:
        raise GovernanceError("this store has no governance policy, so no purge can be approved: open it with "
                              "governance_keys (and a threshold)")
    return store.governance.check(approval_message(store, purge_id), store.purge_approvals(purge_id))


def erase(store, purge_id: str, lease_timeout_s: float = 300.0, rebuild_indexes: bool = False) -> dict:
    """The destructive step of a planned purge (writers excluded); retry-safe. Refused
    (GovernanceError) until M of N governance keys approved the plan (:func:`approve`).
    ``rebuild_indexes`` rebuilds every index instead of remapping it (for a retry after a
    crash between the delete and a rebuild, when the erased vectors can no longer be read)."""
    row = _plan_row(store, purge_id)
    approved(store, purge_id)
    started = time.monotonic()
    removed = (store.erase(row["entry_ids"], lease_timeout_s=lease_timeout_s, rebuild_indexes=rebuild_indexes)
               if row["entry_ids"] else {})
    if store.keys is not None:  # a whole subject forgotten: its key goes, and every sealed copy with it
        for _, subject, tag in _requests(store, row):
            if tag is None:
                store.keys.destroy(subject_key_id(subject))
    out = {"purge_id": purge_id, "entries": len(row["entry_ids"]), "removed_now": removed,
           "seconds": round(time.monotonic() - started, 3)}
    log.info("forget purge erased: %s", out)
    return out


def locations(store) -> list[tuple[str, dict[str, str] | None]]:
    """Every storage root of the store: the hot root and, when elsewhere, the cold tier."""
    out = [(store.uri, store.storage_options or None)]
    if not store.cold_uri.startswith(store.uri + "/"):
        out.append((store.cold_uri, store.cold_storage_options or None))
    return out


def check(store, purge_id: str) -> dict:
    """Scan all storage of the store for the plan's fingerprints; VerificationError if any
    forgotten window, or any row of an erased entry, is left."""
    row = _plan_row(store, purge_id)
    markers = Markers.from_bytes(row["markers"])
    report = scan_storage(markers, locations(store))
    readable = sum(len(store.get(row["entry_ids"][i:i + 10_000]))
                   for i in range(0, len(row["entry_ids"]), 10_000))
    out = {"purge_id": purge_id, "markers": len(markers), "skipped_short_values": markers.skipped, **report.to_json(),
           "rows_left": readable}
    if report.hits or readable:
        raise VerificationError(f"forgotten bytes remain after purge {purge_id}: {out}")
    log.info("forget purge scan clean: %s", out)
    return out


def attest(store, purge_id: str, key, scan: dict) -> dict:
    """Sign and store the purge attestation (once; a retry returns the stored one)."""
    row = _plan_row(store, purge_id)
    if row["attestation"] is not None:
        return json.loads(row["attestation"])
    sth = store.latest_tree_head()
    approved(store, purge_id)
    requests = _requests(store, row)
    approvals = json.dumps([{"key_id": a.key_id, "signature": a.signature.hex()}
                            for a in store.purge_approvals(purge_id)])
    att = sign_record(PurgeAttestation(
        schema_version=2, store_id=store.store_id, purge_id=purge_id, request_ids=[r[0] for r in requests],
        subject_hashes=[r[1] for r in requests], approvals=approvals, entry_ids=list(row["entry_ids"]),
        removed_hot=row["removed_hot"], removed_cold=row["removed_cold"],
        tree_size=sth.tree_size if sth else 0, root_hash=sth.root_hash if sth else b"",
        files_scanned=int(scan["files"]), bytes_scanned=int(scan["bytes"]), markers=int(scan["markers"]),
        purged_at_us=time.time_ns() // 1000, signature=b"", key_id=""), key)
    store.table("purges").update(where=f"purge_id = '{purge_id}'", values={"attestation": att.to_json().decode()})
    out = {k: v for k, v in att.to_dict().items() if k != "entry_ids"} | {"entries": len(att.entry_ids)}
    log.info("forget purge attested: %s", out)
    return out


def attestations(store) -> list[PurgeAttestation]:
    return [PurgeAttestation.from_json(r["attestation"])
            for r in _rows(store.table("purges"), "attestation IS NOT NULL")]


def run(store, key, lease_timeout_s: float = 300.0, approvers=()) -> dict:
    """Every step in one call (what the DAG does task by task), ``approvers`` being the
    governance keys that approve the plan here."""
    p = plan(store)
    if p["purge_id"] is None:
        return p
    for approver in approvers:
        approve(store, p["purge_id"], approver)
    erase(store, p["purge_id"], lease_timeout_s)
    return attest(store, p["purge_id"], key, check(store, p["purge_id"]))

