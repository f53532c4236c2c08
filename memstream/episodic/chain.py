"""Per-session hash chains of summary records: hashing, signing and verification.

A summary's hash is SHA-256 over the canonical encoding (:func:`memstream.crypto.canonical_encode`)
of every field except ``hash`` and ``signature``, under the domain ``memstream.summary.v1``;
``prev_hash`` is one of the encoded fields, so each hash commits to the whole chain before it.
The first summary of a session has an empty ``prev_hash``. The signature is Ed25519 by the
validator key over ``SIGNING_DOMAIN || hash``, so a summary signature can never be replayed as
a tree-head or entry signature (distinct domains, as RFC 6962 keeps leaves and nodes apart).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Iterable

from memstream.crypto.hashing import canonical_encode, sha256
from memstream.crypto.keys import KeyRing, SigningKey
from memstream.crypto.signed import SUMMARY_SIGNING_DOMAIN
from memstream.errors import IntegrityError, SignatureError
from memstream.schemas.records import SummaryRecord

HASH_DOMAIN = "memstream.summary.v1"
SIGNING_DOMAIN = SUMMARY_SIGNING_DOMAIN
_UNHASHED = ("hash", "signature")


def summary_hash(record: SummaryRecord) -> bytes:
    fields = {f.name: getattr(record, f.name) for f in dataclasses.fields(record) if f.name not in _UNHASHED}
    return sha256(canonical_encode(HASH_DOMAIN, fields))


def check_summary(record: SummaryRecord, keyring: KeyRing | None) -> bool:
    """Recompute the record's hash (always) and check its signature (with a key ring): True
    when the signature was checked. Raises IntegrityError on a mismatch."""
    if summary_hash(record) != record.hash:
        raise IntegrityError(f"summary {record.session_id}/{record.window_index}: its fields do not hash to the "
                             "stored hash (altered in storage); run `memstream verify chain --from store`")
    if keyring is None:
        return False
    keyring.verify(record.key_id, record.signature, SIGNING_DOMAIN + record.hash)
    return True


def seal(record: SummaryRecord, key: SigningKey) -> SummaryRecord:
    """The record with its ``hash``, ``signature`` and ``key_id`` filled in."""
    unsigned = dataclasses.replace(record, key_id=key.key_id, hash=b"", signature=b"")
    digest = summary_hash(unsigned)
    return dataclasses.replace(unsigned, hash=digest, signature=key.sign(SIGNING_DOMAIN + digest))


@dataclass
class ChainFault:
    """The first thing wrong with a chain, precisely: which record and what."""

    session_id: str
    window_index: int
    position: int  # index of the record in the sequence that was checked
    problem: str

    def __str__(self) -> str:
        return f"session {self.session_id!r} window {self.window_index} (record #{self.position}): {self.problem}"


@dataclass
class ChainReport:
    session_id: str
    records: int = 0
    duplicates: int = 0  # byte-identical re-deliveries (at-least-once Kafka writes): harmless
    head_index: int | None = None
    head_hash: bytes = b""
    first_index: int | None = None
    fault: ChainFault | None = None
    key_ids: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return self.fault is None


def verify_chain(session_id: str, records: Iterable[SummaryRecord], keyring: KeyRing,
                 anchored: bool = True) -> ChainReport:
    """Check every link and signature of one session's summaries, in window order.

    ``anchored``: the chain must start at window 0 with an empty ``prev_hash``; when the
    oldest windows were evicted (the store keeps a sliding window), pass False and the first
    record present is trusted as the anchor for its ``prev_hash`` only.
    """
    report = ChainReport(session_id)
    prev: SummaryRecord | None = None
    for position, rec in enumerate(records):
        def fail(problem: str) -> ChainReport:
            report.fault = ChainFault(session_id, rec.window_index, position, problem)
            return report

        if rec.session_id != session_id:
            return fail(f"belongs to session {rec.session_id!r}")
        if prev is not None and rec.window_index == prev.window_index and rec == prev:
            report.duplicates += 1
            continue
        expected_index = (prev.window_index + 1) if prev is not None else (0 if anchored else rec.window_index)
        if rec.window_index != expected_index:
            return fail(f"window index {rec.window_index}, expected {expected_index}")
        if prev is not None:
            if rec.prev_hash != prev.hash:
                return fail(f"prev_hash {rec.prev_hash.hex()[:16]}… does not match the hash of window "
                            f"{prev.window_index} ({prev.hash.hex()[:16]}…)")
            if rec.seq_start < prev.seq_end:  # greater is a sequence gap, whose chunks are dead letters
                return fail(f"starts at latent {rec.seq_start}, inside window {prev.window_index} "
                            f"(which ended at {prev.seq_end})")
        elif anchored and rec.prev_hash != b"":
            return fail("the first window of a session must have an empty prev_hash")
        digest = summary_hash(rec)
        if digest != rec.hash:
            return fail(f"hash mismatch: the record's fields hash to {digest.hex()[:16]}…, "
                        f"it claims {rec.hash.hex()[:16]}… (a field was altered)")
        try:
            keyring.verify(rec.key_id, rec.signature, SIGNING_DOMAIN + rec.hash)
        except SignatureError as e:
            return fail(f"bad signature: {e}")
        report.records += 1
        report.key_ids.add(rec.key_id)
        if report.first_index is None:
            report.first_index = rec.window_index
        report.head_index, report.head_hash = rec.window_index, rec.hash
        prev = rec
    return report


def head_at(records: Iterable[SummaryRecord], time_us: int) -> SummaryRecord | None:
    """The chain head as it was at ``time_us`` (event time): the last window closed by then."""
    head = None
    for rec in records:
        if rec.event_time_us <= time_us and (head is None or rec.window_index > head.window_index):
            head = rec
    return head


def check_witnessed_chain(session_id: str, records: Iterable[SummaryRecord], witnessed: Iterable,
                          collected: tuple[int | None, bytes] | None = None) -> list[str]:
    """What is wrong with a session's stored summaries (``records``, any order) against the
    chain heads a witness cosigned for it (:class:`~memstream.crypto.signed.CosignedChainHead`,
    cosignatures already checked). Rollback: the stored head is behind a witnessed head (or
    nothing is stored and no GC record, ``collected`` = (head window, head hash), covers it).
    Fork: the witnessed window is stored with another hash, or the window after it does not
    link to it. A witnessed window evicted together with its successor cannot be checked."""
    by_window = {r.window_index: r for r in records}
    head = max(by_window, default=None)
    problems, behind = [], None
    for w in sorted(witnessed, key=lambda w: w.window_index):
        if w.session_id != session_id:
            continue
        if head is None:
            if collected is not None and collected[0] is not None and (
                    collected[0] > w.window_index or (collected[0] == w.window_index and collected[1] == w.head_hash)):
                continue
            behind = (f"rollback: session {session_id!r} has no stored summary and no GC record covers window "
                      f"{w.window_index}, which the witness cosigned")
            continue
        if head < w.window_index:
            behind = (f"rollback: session {session_id!r}'s stored chain head is window {head}, behind window "
                      f"{w.window_index}, which the witness cosigned")
        elif w.window_index in by_window and by_window[w.window_index].hash != w.head_hash:
            problems.append(f"fork: session {session_id!r} window {w.window_index} is stored with another hash than "
                            "the witness cosigned")
        elif (w.window_index not in by_window and w.window_index + 1 in by_window
              and by_window[w.window_index + 1].prev_hash != w.head_hash):
            problems.append(f"fork: session {session_id!r} window {w.window_index + 1} does not link to window "
                            f"{w.window_index} as the witness cosigned it")
    return problems + ([behind] if behind else [])
