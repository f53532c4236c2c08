"""The long-term memory store: signed, append-only entries in LanceDB, attested by an
RFC 6962 Merkle log whose signed tree heads go to storage, to a Kafka topic and to a witness
(:mod:`memstream.witness`) that cosigns each head only if it extends the heads it cosigned before.

Layout under the store root (a local folder or ``s3://bucket/prefix``)::

    _store.json                 store id, dimension, metric (created once, conditional put)
    _leases/                    writer, maintenance and sequencer leases (see lease.py)
    _heads/<size>.json          each signed tree head with its frontier, named by tree size (read by appends)
    _purges/<purge>/approvals/  governance approvals of a planned forget purge, one object per key
    _appends/pending.json       the append in progress: its entry ids, leaves and pre-signed tree head
    entries.lance               hot tier: signed entries, never rewritten
    merkle_log.lance            leaf_index, entry_id, leaf_hash: the log's leaves in order
    tree_heads.lance            every signed tree head, with the frontier that extends it
    access_log.lance            one row per retrieval hit (appended on read)
    access_stats.lance          access_log merged by maintenance (count, last retrieved)
    removals.lance              governance-approved removals, with their approvals
    forget_requests.lance       signed forget requests (the forget_purge DAG erases their bytes)
    purges.lance                forget purges: plan (entry ids, salted fingerprints), signed attestation

The cold tier is its own LanceDB folder (``cold_uri``, default ``<root>/cold``), which can
live on cheaper storage. Entries move there only through :meth:`LongTermStore.demote`.

The public API has no update and no delete. A change is a new entry that ``supersedes`` the
old one; removal is :meth:`remove` with M-of-N governance approvals, or the forget protocol.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing import get_context
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from memstream.crypto.keys import KeyRing, SigningKey, VerifyKey, check_distinct_roles
from memstream.crypto.merkle import MerkleFrontier, MerkleTree, consistency_proof_from
from memstream.crypto.hashing import domain_hash
from memstream.crypto.proof import verify_inclusion
from memstream.crypto.signed import CosignedTreeHead, SignedTreeHead, verify_record
from memstream.errors import (AppendOnlyViolation, ConfigError, GovernanceError, IntegrityError, KeyRoleError,
                              LeaseError, ReplayError, ServiceError, SignatureError, VerificationError)
from memstream.faults import crash_point
from memstream.longterm.entry import (Approval, Entry, ForgetRequest, GovernancePolicy, RemovalRequest, check_row,
                                      arrow_leaves, entry_leaf_hash, fixed_width, hex_rows, open_payload,
                                      purge_message, seal_payload, subject_hash)
from memstream.longterm.policy import K, WriteDecision, WritePolicy
from memstream.schemas.generate import arrow_schema, to_arrow
from memstream.schemas.records import (AccessRecord, AccessStats, ForgetRequestRow, LongTermEntry, MerkleLeaf,
                                       PurgeApprovalRecord, PurgeAttestation, PurgeRecord, RemovalRecord, TreeHeadRow)
from memstream.settings import (ATTESTATIONS_TOPIC, HNSW_ROWS, LATENT_DIM, LEASE_TTL_S, LONGTERM_EF, LONGTERM_INDEX,
                                LONGTERM_METRIC, LONGTERM_REFINE, NPROBES, KafkaSecurity)
from memstream.storage.lance import connect
from memstream.topics import kafka_python
from memstream.storage.lease import Leases
from memstream.storage.objects import object_store

log = logging.getLogger(__name__)

_ID = re.compile(r"[0-9a-f]{64}")
# Rows a writer lets pile up outside the lookup indexes (entry ids, tree sizes) before it folds
# them in: lookups then cost an index probe plus a scan of at most this many rows.
LOOKUP_INDEX_EVERY = 20_000
LOOKUP_INDEXES = (("merkle_log", "entry_id"), ("entries", "entry_id"), ("entries", "supersedes"),
                  ("tree_heads", "tree_size"))
ROW_COLUMNS = [f.name for f in dataclasses.fields(LongTermEntry)]
# What a search hit carries (Hit), besides its distance.
_HIT_COLUMNS = ["entry_id", "payload", "payload_kind", "supersedes", "timestamp_ns", "validator_key_hash",
                "query_hash", "key_id", "forget_subject"]


def entries_schema(dim: int) -> pa.Schema:
    return arrow_schema(LongTermEntry, dim)


# The bookkeeping tables, their rows defined in memstream.schemas.records.
SCHEMAS = {name: arrow_schema(cls) for name, cls in (
    ("merkle_log", MerkleLeaf), ("tree_heads", TreeHeadRow), ("access_log", AccessRecord),
    ("access_stats", AccessStats), ("removals", RemovalRecord), ("forget_requests", ForgetRequestRow),
    ("purges", PurgeRecord))}


@dataclass(frozen=True)
class Hit:
    entry_id: str
    distance: float
    tier: str  # "hot" or "cold"
    payload: bytes | None  # opened; None when sealed under a subject key that is destroyed or not at hand
    payload_kind: str
    supersedes: str | None
    timestamp_ns: int
    # provenance, so a reader needs no second lookup by id
    validator_key_hash: str = ""
    query_hash: str = ""
    key_id: str = ""


@dataclass(frozen=True)
class AppendResult:
    entry_ids: list[str]
    first_index: int
    tree_head: SignedTreeHead
    skipped: list[str] = field(default_factory=list)  # already logged (append(if_absent=True))


@dataclass(frozen=True)
class RetrievalStats:
    count: int
    last_ns: int | None


@dataclass(frozen=True)
class RemovalReceipt:
    request_id: str
    removed: int
    approved_by: list[str]


@dataclass(frozen=True)
class ForgetTicket:
    request_id: str
    matched: int


@dataclass(frozen=True)
class InclusionProof:
    entry_id: str
    leaf_index: int
    leaf_hash: bytes
    path: list[bytes]
    tree_head: SignedTreeHead

    def verify(self, keyring: KeyRing) -> None:
        self.tree_head.verify(keyring)
        verify_inclusion(self.leaf_hash, self.leaf_index, self.tree_head.tree_size, self.path,
                         self.tree_head.root_hash)


@dataclass(frozen=True)
class RowFailure:
    entry_id: str
    tier: str  # hot, cold, or "missing" for a logged entry with no row and no approved removal
    reason: str


@dataclass
class VerifyReport:
    rows_checked: int = 0
    tree_size: int = 0
    tree_head: SignedTreeHead | None = None
    failures: list[RowFailure] = field(default_factory=list)
    log_failures: list[str] = field(default_factory=list)
    # Checks against the heads a witness cosigned: how many, and each one the store does not extend.
    witnessed_heads: int = 0
    witness_failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures and not self.log_failures and not self.witness_failures

    def to_json(self) -> dict:
        return {"ok": self.ok, "rows_checked": self.rows_checked, "tree_size": self.tree_size,
                "tree_head": self.tree_head.to_dict() if self.tree_head else None,
                "failures": [f.__dict__ for f in self.failures], "log_failures": self.log_failures,
                "witnessed_heads": self.witnessed_heads, "witness_failures": self.witness_failures,
                "seconds": round(self.seconds, 3)}


def _head_key(size: int) -> str:
    return f"_heads/{size:020d}.json"


# The intent of the append in progress (one at a time: appends hold the sequencer).
_INTENT = "_appends/pending.json"


def head_size(head: SignedTreeHead | None) -> int:
    return head.tree_size if head is not None else 0


def _ids_predicate(ids: Iterable[str], column: str = "entry_id") -> str:
    ids = list(ids)
    for i in ids:
        if not isinstance(i, str) or not _ID.fullmatch(i):
            raise ConfigError(f"not an entry id: {i!r} (64 lower-case hex digits)")
    return f"{column} IN (" + ",".join(f"'{i}'" for i in ids) + ")"


class LongTermStore:
    """Open (creating if needed) a long-term store.

    ``keyring`` holds the validator keys whose signatures the store accepts (old keys stay
    after a rotation); ``signer`` is this process's validator key, needed to write: entries
    and tree heads are a validator's to sign, never a maintenance or governance key's.
    ``governance`` enables :meth:`remove`. ``maintenance_keys`` are the public keys of the
    maintenance key that signs purge attestations. One key never serves two roles. With
    ``kafka_bootstrap`` (and ``kafka_security``) every new signed tree head is also published to
    ``tree_head_topic``; with ``keys`` (a :class:`memstream.storage.keytable.KeyTable`) the
    payloads of entries bound to a forget subject are sealed under the subject's data key when
    written and opened when read;
    with ``witness`` (a :class:`memstream.witness.Witness`, with its own storage and key) it is
    also cosigned.

    Opening finishes, or undoes, an append that a crash interrupted (see :meth:`append`).
    """

    def __init__(self, uri: str, *, keyring: KeyRing, signer: SigningKey | None = None,
                 storage_options: dict[str, str] | None = None, cold_uri: str | None = None,
                 cold_storage_options: dict[str, str] | None = None, governance: GovernancePolicy | None = None,
                 dim: int = LATENT_DIM, metric: str = LONGTERM_METRIC, kafka_bootstrap: str | None = None,
                 kafka_security: KafkaSecurity | None = None, tree_head_topic: str = ATTESTATIONS_TOPIC,
                 lease_ttl_s: float = LEASE_TTL_S,
                 access_flush_every: int = 256, maintenance_keys: Iterable[VerifyKey | SigningKey] = (),
                 witness=None, keys=None):
        self.uri = uri.rstrip("/")
        self.keys = keys
        self.keyring = keyring
        self.signer = signer
        self.governance = governance
        self.storage_options = dict(storage_options or {})
        self.cold_uri = (cold_uri or f"{self.uri}/cold").rstrip("/")
        self.cold_storage_options = dict(cold_storage_options if cold_storage_options is not None
                                         else self.storage_options)
        self.kafka_bootstrap, self.kafka_security = kafka_bootstrap, kafka_security
        self.tree_head_topic = tree_head_topic
        self.access_flush_every = access_flush_every
        self.witness = witness
        if signer is not None and signer.role not in (None, "validator"):
            raise KeyRoleError(f"the long-term store signs entries and tree heads with a validator key, and "
                               f"key {signer.key_id} is a {signer.role} key: pass the validator's key as signer "
                               "(make one with `memstream keys new --role validator`)")
        if signer is not None and signer.key_id not in keyring:
            keyring.add(signer)
        self.maintenance_keys = KeyRing(maintenance_keys)
        check_distinct_roles({"validator": keyring, "governance": governance.keys if governance else None,
                              "maintenance": self.maintenance_keys,
                              "witness": witness.witness_keys if witness is not None else None})
        objects = object_store(self.uri, self.storage_options)
        self._objects = objects
        self.leases = Leases(objects, ttl_s=lease_ttl_s)
        meta = {"store_id": os.urandom(16).hex(), "dim": dim, "metric": metric}
        objects.put_if_absent("_store.json", json.dumps(meta).encode())  # first opener wins
        stored = json.loads(objects.get("_store.json") or b"{}")
        self.store_id, self.dim, self.metric = stored["store_id"], int(stored["dim"]), stored["metric"]
        self._db = connect(self.uri, self.storage_options)
        self._cold_db = connect(self.cold_uri, self.cold_storage_options)
        self._tables = {name: self._ensure(self._db, name, schema) for name, schema in SCHEMAS.items()}
        self._tables["entries"] = self._ensure(self._db, "entries", entries_schema(self.dim))
        self._cold = self._ensure(self._cold_db, "entries", entries_schema(self.dim))
        self._access: list[tuple[str, int, str]] = []
        self._access_lock = threading.Lock()  # readers share a store across threads
        self._producer = None
        self._unindexed = LOOKUP_INDEX_EVERY  # unknown at open: check the lookup indexes on the first append
        self._lookup: dict[str, object] = {}  # table name -> lance dataset kept open: its index cache stays warm
        # Searches read a tier through one lance dataset per version, shared by reader threads:
        # one version check a search, and the edit lookup reads the version the search read.
        self._search_ds: dict[str, object] = {}
        self._search_lock = threading.Lock()
        self._has_edits: dict[str, tuple[int, set[int], bool]] = {}  # tier -> what _edits_in last found
        self.recover()

    # ------------------------------------------------------------------ plumbing

    @staticmethod
    def _ensure(db, name: str, schema: pa.Schema):
        for attempt in range(5):
            try:
                return db.open_table(name)
            except (ValueError, FileNotFoundError, RuntimeError, OSError):
                pass
            try:
                return db.create_table(name, schema=schema, exist_ok=True)
            except (ValueError, RuntimeError, OSError) as e:  # another process created it first
                if attempt == 4:
                    raise ServiceError(f"cannot open or create table {name}: {e}") from e
                time.sleep(0.1 * (attempt + 1))

    def _read(self, table, columns: list[str] | None = None, where: str | None = None) -> pa.Table:
        ds = table.to_lance()
        return ds.to_table(columns=columns, filter=where)

    def _tier_tables(self, include_cold: bool = True):
        yield "hot", self._tables["entries"]
        if include_cold:
            yield "cold", self._cold

    def close(self) -> None:
        self.flush_access_log()
        if self._producer is not None:
            self._producer.close(timeout=5)
            self._producer = None

    def __enter__(self) -> "LongTermStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ writes

    def new_entry(self, vector, payload: bytes, *, query: str | bytes, **kw) -> Entry:
        """Sign an entry with this store's validator key (see :meth:`Entry.create`)."""
        if self.signer is None:
            raise ConfigError("this store was opened without a signer: pass signer=SigningKey.from_file(...)")
        subject = kw.get("forget_subject")
        if self.keys is not None and subject is not None:
            payload = seal_payload(payload, *self.keys.subject_key(subject_hash(subject)))
        return Entry.create(self.signer, self.store_id, vector, payload, query=query, **kw)

    def payload(self, entry: Entry) -> bytes | None:
        """An entry's payload opened (see :class:`Hit`): entries keep the stored, signed bytes."""
        return open_payload(entry.payload, entry.forget_subject, self.keys)

    def _hit(self, r: dict, distance: float, tier: str) -> Hit:
        return Hit(r["entry_id"], distance, tier, open_payload(r["payload"], r["forget_subject"], self.keys),
                   r["payload_kind"], r["supersedes"], r["timestamp_ns"], r["validator_key_hash"], r["query_hash"],
                   r["key_id"])

    def append(self, entries: Sequence[Entry], *, if_absent: bool = False) -> AppendResult:
        """Append signed entries as one batch: verify each, reject replays, write the rows,
        log one Merkle leaf per entry and publish a new signed tree head.

        ``if_absent=True`` makes a retried batch harmless: entries already logged are skipped
        (``AppendResult.skipped``) instead of refused.

        The batch is all or nothing. Under the writer and sequencer leases it first stores its
        intent (entry ids, leaves, and the tree head that will cover them, signed in advance),
        then commits rows, leaves and head, checking its fencing tokens before each commit. A
        crash or a fenced writer leaves the intent behind, and the next append or open of the
        store resolves it (:meth:`recover`): the batch is finished from the intent if its rows
        were committed, and otherwise dropped, so a crash at any point leaves a store that
        verifies, with each entry written once or not at all."""
        entries = list(entries)
        if not entries:
            raise ConfigError("append() needs at least one entry")
        if self.signer is None:
            raise ConfigError("signing tree heads needs a signer: open the store with signer=...")
        leaves = []
        for e in entries:
            if np.asarray(e.vector).shape != (self.dim,):
                raise ConfigError(f"entry vector has shape {np.asarray(e.vector).shape}, the store holds ({self.dim},)")
            leaves.append(e.verify(self.store_id, self.keyring))  # SignatureError on a forgery
        ids = [e.entry_id for e in entries]
        if len(set(ids)) != len(ids):
            raise ReplayError("the batch holds the same entry twice: each entry is written once")
        with self.leases.writer() as writer, self.leases.sequencer() as sequencer:
            def fence() -> None:
                writer.check()
                sequencer.check()

            self._resolve_intent(fence)
            head, frontier = self._finish_logged(*self._latest_head(), fence)
            # Under the sequencer no other batch can log these ids between check and append.
            seen = self._present(self._tables["merkle_log"], ids)
            if seen and not if_absent:
                raise ReplayError(f"{len(seen)} entr(y/ies) already written, e.g. {sorted(seen)[0]}: "
                                  "a replayed write is refused; sign a new entry to write again")
            todo = [(e, lh) for e, lh in zip(entries, leaves) if e.entry_id not in seen]
            skipped = [i for i in ids if i in seen]
            if not todo:
                # A retry of a batch whose tree head was stored but perhaps never published.
                self._publish(head)
                return AppendResult([], frontier.size, head, skipped)
            targets = {e.supersedes for e, _ in todo if e.supersedes}
            if targets:
                known = self._present(self._tables["merkle_log"], targets) | set(ids)
                missing = targets - known
                if missing:
                    raise ConfigError(f"superseded entr(y/ies) not in this store: {sorted(missing)[:3]}")
            # Rows written but never logged (by a store older than intents) are not written again.
            written = self._present(self._tables["entries"], [e.entry_id for e, _ in todo])
            fresh = [e for e, _ in todo if e.entry_id not in written]
            first = frontier.size
            for _, lh in todo:
                frontier.append_hash(lh)
            row = self._head_row(frontier)
            intent = {"first": first, "entry_ids": [e.entry_id for e, _ in todo],
                      "leaf_hashes": [lh.hex() for _, lh in todo], "head": json.loads(row.to_json()),
                      "token": sequencer.token}
            fence()
            if not self._objects.put_if_absent(_INTENT, json.dumps(intent).encode()):
                raise VerificationError(f"{_INTENT} appeared while this append held the sequencer: another "
                                        "process writes without it; stop it and run `memstream verify longterm`")
            crash_point("longterm.append.intent")
            if fresh:
                fence()
                self._tables["entries"].add(self._rows(fresh))
            crash_point("longterm.append.rows")
            fence()
            self._log_leaves(first, intent["entry_ids"], [lh for _, lh in todo])
            crash_point("longterm.append.leaves")
            fence()
            self._store_head(row)
            crash_point("longterm.append.head")
            self._objects.delete(_INTENT)
            sth = self._head_of(dataclasses.asdict(row))
            self._keep_lookup_indexes(len(todo))
        self._publish(sth)
        return AppendResult([e.entry_id for e, _ in todo], first, sth, skipped)

    def _log_leaves(self, first: int, entry_ids: list[str], leaf_hashes: list[bytes]) -> None:
        self._tables["merkle_log"].add(pa.table({
            "leaf_index": pa.array(range(first, first + len(entry_ids)), pa.int64()),
            "entry_id": pa.array(entry_ids, pa.string()),
            "leaf_hash": pa.array(leaf_hashes, pa.binary())}, schema=SCHEMAS["merkle_log"]))

    def _head_row(self, frontier: MerkleFrontier) -> TreeHeadRow:
        sth = SignedTreeHead.create(self.signer, self.store_id, frontier.size, frontier.root(), time.time_ns())
        return TreeHeadRow(**dataclasses.asdict(sth), frontier=frontier.hashes)

    def _store_head(self, row: TreeHeadRow) -> None:
        self._tables["tree_heads"].add(to_arrow([row], TreeHeadRow))
        # Also as an object named by its size: the next append reads the head it extends with
        # one GET instead of a scan of tree_heads (one fragment per append until compacted).
        self._objects.put_if_absent(_head_key(row.tree_size), row.to_json())

    def recover(self, timeout_s: float = 0.0, strict: bool = False) -> bool:
        """Resolve an append that a crash (or a fenced writer) left unfinished: finish it when
        its rows were committed, drop it when they were not. Opening the store and
        :meth:`verify` call this; an append in progress elsewhere is left alone (its leases
        are live). Returns whether an interrupted append was resolved. An intent that does
        not check out is logged and left for :meth:`verify` to report, unless ``strict``."""
        if self._objects.get(_INTENT) is None:
            return False
        try:
            with self.leases.writer(timeout_s) as writer, self.leases.sequencer(timeout_s) as sequencer:
                def fence() -> None:
                    writer.check()
                    sequencer.check()
                return self._resolve_intent(fence)
        except LeaseError:
            log.info("an append is in progress in another process: it finishes its own batch")
            return False
        except IntegrityError as e:
            if strict:
                raise
            log.error("the interrupted append in %s/%s was left as it is: %s", self.uri, _INTENT, e)
            return False

    def _resolve_intent(self, fence) -> bool:
        """Under the sequencer: finish or drop the batch of a stored intent."""
        body = self._objects.get(_INTENT)
        if body is None:
            return False
        try:
            intent = json.loads(body)
            row = TreeHeadRow.from_json(json.dumps(intent["head"]).encode())
            ids, hashes, first = intent["entry_ids"], [bytes.fromhex(h) for h in intent["leaf_hashes"]], intent["first"]
        except (ValueError, KeyError, TypeError) as e:
            raise VerificationError(f"{_INTENT} is unreadable ({e}): run `memstream verify longterm` and "
                                    "investigate") from None
        sth = self._head_of(dataclasses.asdict(row))
        sth.verify(self.keyring)
        if row.tree_size != first + len(ids) or len(hashes) != len(ids):
            raise VerificationError(f"{_INTENT} does not describe one batch: investigate")
        present: set[str] = set()
        for _, table in self._tier_tables(True):  # a demotion may have moved them since
            for start in range(0, len(ids), 1000):
                present.update(self._read(table, ["entry_id"], _ids_predicate(ids[start:start + 1000]))["entry_id"]
                               .to_pylist())
        if len(present) < len(ids):
            # The rows commit never happened: nothing of the batch was logged. Drop it.
            fence()
            self._objects.delete(_INTENT)
            log.warning("dropped an interrupted append of %d entries whose rows were never committed", len(ids))
            return True
        logged = self._tables["merkle_log"].count_rows()
        if logged == first:
            prev = self._latest_head()[1]
            if prev.size != first:
                raise VerificationError(f"the interrupted append extends a log of {first} leaves; the latest "
                                        f"signed tree head covers {prev.size}: investigate")
            for lh in hashes:
                prev.append_hash(lh)
            if prev.root() != row.root_hash:
                raise VerificationError(f"the leaves of {_INTENT} do not match its signed tree head: investigate")
            fence()
            self._log_leaves(first, ids, hashes)
        elif logged != first + len(ids):
            raise VerificationError(f"the merkle_log holds {logged} leaves; the interrupted append logs "
                                    f"{first}..{first + len(ids)}: run `memstream verify longterm` and investigate")
        stored = self._read(self._tables["tree_heads"], ["signature"], f"tree_size = {row.tree_size}")
        if row.signature not in stored["signature"].to_pylist():
            fence()
            self._store_head(row)
        else:
            self._objects.put_if_absent(_head_key(row.tree_size), row.to_json())
        fence()
        self._objects.delete(_INTENT)
        log.warning("finished an interrupted append of %d entries (tree size %d)", len(ids), row.tree_size)
        return True

    def _lookup_ds(self, name: str):
        """The table as a lance dataset at its latest version, kept open between calls so that
        index pages and fragment metadata are read once, not at every append."""
        ds = self._lookup.get(name)
        if ds is None:
            ds = self._lookup[name] = self._tables[name].to_lance()
        else:
            ds.checkout_latest()
        return ds

    def _present(self, table, ids: Iterable[str]) -> set[str]:
        """Which of ``ids`` ``table`` holds: an index probe plus the rows not yet indexed."""
        ids = list(ids)
        name = next(n for n, t in self._tables.items() if t is table)
        found: set[str] = set()
        for start in range(0, len(ids), 1000):
            found.update(self._lookup_ds(name).to_table(columns=["entry_id"],
                                                        filter=_ids_predicate(ids[start:start + 1000]))["entry_id"]
                         .to_pylist())
        return found

    def _finish_logged(self, head: SignedTreeHead | None, frontier: MerkleFrontier,
                       fence) -> tuple[SignedTreeHead | None, MerkleFrontier]:
        """Leaves logged under no tree head and no intent (by a store older than intents):
        sign a head that covers them, so they are never logged twice."""
        logged = self._tables["merkle_log"].count_rows()
        if logged == frontier.size:
            return head, frontier
        if logged < frontier.size:
            raise VerificationError(f"the merkle_log holds {logged} leaves, the latest signed tree head covers "
                                    f"{frontier.size}: run `memstream verify longterm` and investigate")
        tail = self._read(self._tables["merkle_log"], None, f"leaf_index >= {frontier.size}").sort_by("leaf_index")
        if tail["leaf_index"].to_pylist() != list(range(frontier.size, logged)):
            raise VerificationError(f"the merkle_log leaves after {frontier.size} are not contiguous")
        for lh in tail["leaf_hash"].to_pylist():
            frontier.append_hash(lh)
        log.warning("signing a tree head for %d leaves an interrupted append logged", logged - head_size(head))
        row = self._head_row(frontier)
        fence()
        self._store_head(row)
        return self._head_of(dataclasses.asdict(row)), frontier

    def _keep_lookup_indexes(self, added: int) -> None:
        """Keep the id, edit and tree-size lookups of :meth:`append` and :meth:`search`
        independent of the log's size: a BTREE per lookup column, folded forward every
        LOOKUP_INDEX_EVERY rows (amortised)."""
        self._unindexed += added
        if self._unindexed < LOOKUP_INDEX_EVERY:
            return
        self._unindexed = 0
        for name in dict.fromkeys(n for n, _ in LOOKUP_INDEXES):
            table = self._tables[name]
            columns = [c for n, c in LOOKUP_INDEXES if n == name]
            have = {tuple(idx.columns): idx.name for idx in table.list_indices()}
            present = [have[(c,)] for c in columns if (c,) in have]
            if present:  # only these: the vector index is maintenance's
                table.to_lance().optimize.optimize_indices(index_names=present)
                table.checkout_latest()
            if table.count_rows() >= LOOKUP_INDEX_EVERY:
                for c in columns:
                    if (c,) not in have:
                        table.create_scalar_index(c, index_type="BTREE")

    def consider(self, vector, payload: bytes, *, query: str | bytes, policy: WritePolicy | None = None, **kw):
        """Ask the learned write policy whether ``vector`` is worth keeping beyond the
        session; write it if so. Returns (WriteDecision, AppendResult or None)."""
        decision = self.decide(vector, policy)
        if not decision.keep:
            return decision, None
        return decision, self.append([self.new_entry(vector, payload, query=query, **kw)])

    def decide(self, vector, policy: WritePolicy | None = None, include_cold: bool = True) -> WriteDecision:
        """The write policy's decision on ``vector``, given its nearest entries in this store."""
        if self.metric != "cosine":
            raise ConfigError("the write policy reads cosine similarities: open the store with metric='cosine'")
        latent = np.asarray(vector, np.float32)
        hits = self.search(latent, K, include_cold=include_cold, record_access=False)
        return (policy or WritePolicy.load()).decide(latent, [1.0 - h.distance for h in hits])

    def supersede(self, original_id: str, vector, payload: bytes, *, query: str | bytes, **kw) -> AppendResult:
        """Write a modification: a new entry linked to ``original_id``, which stays as it was."""
        return self.append([self.new_entry(vector, payload, query=query, supersedes=original_id, **kw)])

    def update(self, *args, **kwargs):
        raise AppendOnlyViolation("long-term entries are never updated: write a new entry with "
                                  "supersede(original_id, ...) instead")

    def delete(self, *args, **kwargs):
        raise AppendOnlyViolation("long-term entries are never deleted directly: use remove() with M-of-N "
                                  "governance approvals, or request_forget() for a subject's entries")

    def _rows(self, entries: Sequence[Entry]) -> pa.Table:
        return to_arrow(entries, LongTermEntry, self.dim)

    def _tree_heads(self) -> list[tuple[SignedTreeHead, list[bytes]]]:
        t = self._read(self._tables["tree_heads"]).to_pylist()
        heads = [(self._head_of(r), r["frontier"]) for r in t]
        return sorted(heads, key=lambda h: (h[0].tree_size, h[0].timestamp_ns))

    def _latest_head(self) -> tuple[SignedTreeHead | None, MerkleFrontier]:
        # The newest head covers the whole log, so look it up by the log's size (metadata)
        # rather than reading every head; after an interrupted append, fall back to the scan.
        size = self._tables["merkle_log"].count_rows()
        body = self._objects.get(_head_key(size)) if size else None
        if body is not None:
            r = dataclasses.asdict(TreeHeadRow.from_json(body))
            rows = [r]
        else:  # stores written before head objects, or an interrupted append
            rows = self._lookup_ds("tree_heads").to_table(filter=f"tree_size = {size}").to_pylist() if size else []
        heads = sorted(((self._head_of(r), r["frontier"]) for r in rows), key=lambda h: h[0].timestamp_ns)
        if not heads:
            heads = self._tree_heads()
        if not heads:
            return None, MerkleFrontier()
        sth, hashes = heads[-1]
        sth.verify(self.keyring)
        frontier = MerkleFrontier(sth.tree_size, hashes)
        if frontier.root() != sth.root_hash:
            raise VerificationError(f"the stored frontier of tree head {sth.tree_size} does not match its "
                                    "signed root: run `memstream verify longterm` and investigate")
        return sth, frontier

    @staticmethod
    def _head_of(r: dict) -> SignedTreeHead:
        return SignedTreeHead(r["log_id"], r["tree_size"], r["root_hash"], r["timestamp_ns"], r["key_id"],
                              r["signature"])

    def latest_tree_head(self) -> SignedTreeHead | None:
        return self._latest_head()[0]

    def _publish(self, sth: SignedTreeHead) -> None:
        if self.witness is not None:
            self.witness_tree_head(sth=sth)
        if not self.kafka_bootstrap:
            return
        from kafka.errors import KafkaError

        try:
            if self._producer is None:
                self._producer = kafka_python("producer", self.kafka_bootstrap, self.kafka_security, acks="all")
            self._producer.send(self.tree_head_topic, key=self.store_id.encode(), value=sth.to_json()).get(timeout=30)
        except KafkaError as e:
            raise ServiceError(f"publishing tree head {sth.tree_size} to {self.tree_head_topic} at "
                               f"{self.kafka_bootstrap} failed ({e}); it is kept in storage, publish it again "
                               "with publish_tree_head()") from e

    def witness_tree_head(self, witness=None, sth: SignedTreeHead | None = None) -> CosignedTreeHead | None:
        """Have ``witness`` (default: the store's) cosign ``sth`` (default: the latest head),
        with a consistency proof from the last head it cosigned for this store. WitnessRefusal
        when the store does not extend that head (rolled back, truncated or forked)."""
        witness = witness if witness is not None else self.witness
        if witness is None:
            raise ConfigError("no witness: open the store with witness=Witness(...) or pass one")
        sth = sth if sth is not None else self.latest_tree_head()
        if sth is None:
            return None
        last = witness.latest_tree_head(self.store_id)
        m = last.tree_size if last is not None else 0
        if m > sth.tree_size and last.root_hash in self._read(self._tables["tree_heads"], ["root_hash"],
                                                              f"tree_size = {m}")["root_hash"].to_pylist():
            return last  # another writer's newer head of this log was cosigned first: it covers this one
        proof = self._consistency_from(m, sth.tree_size) if 0 < m < sth.tree_size else []
        return witness.cosign_tree_head(sth, proof)

    def _consistency_from(self, m: int, n: int) -> list[bytes]:
        """PROOF(m, D[n]) from the stored frontier of the head of size m and the leaves logged
        since (no read of the whole log); the whole log when no head of size m is stored."""
        body = self._objects.get(_head_key(m))
        if body is not None:
            hashes = TreeHeadRow.from_json(body).frontier
        else:
            rows = self._read(self._tables["tree_heads"], ["frontier"], f"tree_size = {m}").to_pylist()
            if not rows:
                return self.consistency_proof(m, n)
            hashes = rows[0]["frontier"]
        tail = self._read(self._tables["merkle_log"], None,
                          f"leaf_index >= {m} AND leaf_index < {n}").sort_by("leaf_index")
        if tail["leaf_index"].to_pylist() != list(range(m, n)):
            raise VerificationError(f"the merkle_log does not hold leaves {m}..{n - 1} in order: "
                                    "run `memstream verify longterm`")
        return consistency_proof_from(MerkleFrontier(m, hashes), tail["leaf_hash"].to_pylist())

    def publish_tree_head(self) -> SignedTreeHead | None:
        sth = self.latest_tree_head()
        if sth is not None:
            self._publish(sth)
        return sth

    # ------------------------------------------------------------------ reads

    def build_index(self, tier: str = "hot", kind: str = LONGTERM_INDEX, num_partitions: int | None = None,
                    replace: bool = True) -> None:
        """A vector index over the tier: ``kind`` "ivf_hnsw_sq" (an HNSW graph over 8-bit
        scalar-quantized vectors in each IVF partition; searches refine on the stored vectors),
        "ivf_pq" (product quantization, 4 dimensions a code) or "ivf_flat" (exact distances in
        the probed partitions, quick to build). See docs/longterm.md for what each costs."""
        from lancedb.index import HnswSq, IvfFlat, IvfPq, IvfSq

        table = self._tables["entries"] if tier == "hot" else self._cold
        n = table.count_rows()
        if kind == "ivf_flat":
            config = IvfFlat(distance_type=self.metric, num_partitions=num_partitions or max(1, round(n ** 0.5)))
        elif kind == "ivf_pq":
            config = IvfPq(distance_type=self.metric, num_partitions=num_partitions or max(1, round(n ** 0.5)),
                           num_sub_vectors=max(1, self.dim // 4))
        elif kind == "ivf_sq":
            config = IvfSq(distance_type=self.metric, num_partitions=num_partitions or max(1, round(n ** 0.5)))
        elif kind == "ivf_hnsw_sq":
            # Few, large partitions: the graph does the narrowing within one.
            config = HnswSq(distance_type=self.metric, num_partitions=num_partitions or max(1, round(n / HNSW_ROWS)))
        else:
            raise ConfigError(f"index kind must be ivf_hnsw_sq, ivf_sq, ivf_pq or ivf_flat, got {kind!r}")
        table.create_index("vector", config=config, replace=replace)

    def search(self, vector, k: int = 10, *, include_cold: bool = False, nprobes: int = NPROBES,
               ef: int = LONGTERM_EF, refine: int = LONGTERM_REFINE, record_access: bool = True,
               subjects: frozenset[str] | None = None, history: bool = False) -> list[Hit]:
        """The ``k`` nearest entries; cold entries only with ``include_cold`` (slower: the
        cold tier is usually unindexed). Each hit names its tier. ``nprobes`` IVF partitions
        are searched; with an HNSW index ``ef`` candidates each; ``refine`` > 0 re-ranks
        ``refine * k`` candidates by their stored vectors (quantized indexes only).
        ``subjects``: only entries bound to one of these subject hashes (a tenant's scope;
        an empty set finds nothing); None: every entry. A superseded entry is replaced by the
        newest version of its edit chain (at that version's own distance); ``history=True``
        returns the versions as stored."""
        q = np.asarray(vector, np.float32).reshape(-1)
        ef = max(ef, k * max(1, refine))  # lance refuses an HNSW search with fewer candidates than it returns
        hits: list[Hit] = []
        if subjects is not None and not subjects:
            return hits
        where = None
        if subjects is not None:
            bad = [h for h in subjects if not (len(h) == 64 and all(c in "0123456789abcdef" for c in h))]
            if bad:  # hashes only: nothing a caller controls reaches the predicate
                raise ConfigError(f"subjects must be subject hashes (64 hex digits, subject_hash()), got {bad[0]!r}")
            where = f"forget_subject IN ({', '.join(repr(h) for h in sorted(subjects))})"
        tiers = [(tier, self._tier_ds(tier, table)) for tier, table in self._tier_tables(include_cold)]
        for tier, ds in tiers:
            if not ds.count_rows():
                continue
            nearest = {"column": "vector", "q": q, "k": k, "metric": self.metric, "nprobes": nprobes, "ef": ef}
            if refine:
                nearest["refine_factor"] = refine
            # Before the vector search: a post-filter would return fewer than k.
            found = ds.to_table(columns=["_distance"], with_row_id=True, nearest=nearest, filter=where, prefilter=True)
            if not found.num_rows:
                continue
            # The hits' columns by row id, in the order given: cheaper than the scanner's own
            # late materialization of the same rows (dictionary-encoded columns cost a decode each).
            rows = ds._take_rows(found["_rowid"].to_pylist(), columns=_HIT_COLUMNS)
            hits += [self._hit(r, float(d), tier) for r, d in zip(rows.to_pylist(), found["_distance"].to_pylist())]
        if not history:
            hits = self._newest(q, hits, tiers)
        hits.sort(key=lambda h: h.distance)
        hits = hits[:k]
        if record_access:
            self.record_access(hits)
        return hits

    def neighbor_sims(self, vectors, k: int = K, *, nprobes: int = NPROBES, ef: int = LONGTERM_EF) -> np.ndarray:
        """[n, k] cosine similarities of each of ``vectors`` [n, d] to its ``k`` nearest hot
        entries as stored (no edit chains followed), NaN where the store holds fewer: the write
        policy's neighbourhood. One query for all vectors, so a retention batch costs one search."""
        if self.metric != "cosine":
            raise ConfigError("neighbor_sims reads cosine similarities: open the store with metric='cosine'")
        q = np.atleast_2d(np.asarray(vectors, np.float32))
        out = np.full((len(q), k), np.nan, np.float32)
        if not len(q):
            return out
        res = (self._tables["entries"].search(q if len(q) > 1 else q[0], vector_column_name="vector")
               .distance_type("cosine").nprobes(nprobes).ef(max(ef, k)).limit(k).select(["_distance"]).to_arrow())
        rows = res["query_index"].to_numpy() if "query_index" in res.schema.names else np.zeros(res.num_rows, int)
        dist = res["_distance"].to_numpy()
        for i in range(len(q)):  # each query's hits come nearest first
            d = dist[rows == i][:k]
            out[i, :len(d)] = 1.0 - d
        return out

    def _tier_ds(self, tier: str, table):
        """The tier's lance dataset at its latest version (a version check; reopened only when
        a writer committed). Each version's object is shared and never moved to another."""
        with self._search_lock:
            ds = self._search_ds.get(tier)
            if ds is None:
                ds = self._search_ds[tier] = table.to_lance()
            else:
                latest = ds.latest_version
                if latest != ds.version:
                    ds = self._search_ds[tier] = ds.checkout_version(latest)
            return ds

    def _edits_in(self, tier: str, ds) -> bool:
        """Whether any row of this version may supersede another: if none does, a search
        needs no edit lookup. Rows are only appended (in new fragments) or deleted, so a new
        version is checked in the fragments the last one checked did not have; once an edit
        is seen the answer stays yes."""
        with self._search_lock:
            seen = self._has_edits.get(tier)  # (version, fragment ids, found)
        if seen is not None and (seen[0] == ds.version or seen[2]):
            return seen[2]
        fragments = ds.get_fragments()
        new = [f for f in fragments if seen is None or f.fragment_id not in seen[1]]
        found = bool(new) and ds.scanner(columns=[], with_row_id=True, filter="supersedes IS NOT NULL",
                                         fragments=new, limit=1).to_table().num_rows > 0
        with self._search_lock:
            self._has_edits[tier] = (ds.version, {f.fragment_id for f in fragments}, found)
        return found

    def _newest(self, q: np.ndarray, hits: list[Hit], tiers: list) -> list[Hit]:
        """Follow each hit's ``supersedes`` links forward to the newest version, in the
        versions of the tiers the search read."""
        tiers = [(tier, ds) for tier, ds in tiers if self._edits_in(tier, ds)]
        successor: dict[str, tuple[str, dict]] = {}  # entry id -> (tier, row of its newest direct edit)
        frontier = [h.entry_id for h in hits] if tiers else []
        while frontier:
            found = []
            for tier, ds in tiers:
                for r in ds.to_table(columns=_HIT_COLUMNS + ["vector"],
                                     filter=_ids_predicate(frontier, "supersedes")).to_pylist():
                    old = successor.get(r["supersedes"])
                    if old is None or (r["timestamp_ns"], r["entry_id"]) > (old[1]["timestamp_ns"], old[1]["entry_id"]):
                        successor[r["supersedes"]] = (tier, r)
                    found.append(r["entry_id"])
            frontier = [i for i in found if i not in successor]
        if not successor:
            return hits
        out: dict[str, Hit] = {}
        for h in hits:
            eid, tier, row = h.entry_id, h.tier, None
            while eid in successor:
                tier, row = successor[eid]
                eid = row["entry_id"]
            if row is not None:
                h = self._hit(row, self._distance(q, np.asarray(row["vector"], np.float32)), tier)
            if eid not in out or h.distance < out[eid].distance:
                out[eid] = h
        return list(out.values())

    def _distance(self, q: np.ndarray, v: np.ndarray) -> float:
        """The distance LanceDB reports for ``self.metric``."""
        if self.metric == "cosine":
            return float(1.0 - q @ v / max(float(np.linalg.norm(q) * np.linalg.norm(v)), 1e-12))
        if self.metric == "dot":
            return float(1.0 - q @ v)
        return float(((q - v) ** 2).sum())  # l2: squared, as LanceDB returns it

    def record_access(self, hits: Sequence[Hit]) -> None:
        """Account retrievals: what ``search(record_access=True)`` does, for hits of a search
        made with ``record_access=False`` that were then returned after all."""
        if hits:
            now = time.time_ns()
            with self._access_lock:
                self._access.extend((h.entry_id, now, h.tier) for h in hits)
                full = len(self._access) >= self.access_flush_every
            if full:
                self.flush_access_log()

    def flush_access_log(self) -> None:
        """Append buffered retrievals to the access log (the signed rows are never touched).
        Thread-safe: each buffered retrieval is written once, outside the lock."""
        with self._access_lock:
            rows, self._access = self._access, []
        if rows:
            self._tables["access_log"].add(to_arrow([AccessRecord(*a) for a in rows], AccessRecord))

    def retrieval_stats(self, entry_ids: Sequence[str]) -> dict[str, RetrievalStats]:
        self.flush_access_log()
        pred = _ids_predicate(entry_ids)
        out = {i: [0, None] for i in entry_ids}
        for r in self._read(self._tables["access_stats"], None, pred).to_pylist():
            out[r["entry_id"]] = [r["count"], r["last_ns"]]
        for r in self._read(self._tables["access_log"], None, pred).to_pylist():
            s = out[r["entry_id"]]
            s[0] += 1
            s[1] = max(s[1] or 0, r["ts_ns"])
        return {i: RetrievalStats(c, last) for i, (c, last) in out.items()}

    def merge_access_log(self) -> int:
        """Maintenance: fold the access log into access_stats and empty it. Returns the
        number of log rows merged."""
        self.flush_access_log()
        with self.leases.maintenance() as lease:
            logged = self._read(self._tables["access_log"])
            if not logged.num_rows:
                return 0
            stats = {r["entry_id"]: [r["count"], r["last_ns"]] for r in self._read(self._tables["access_stats"]).to_pylist()}
            for r in logged.to_pylist():
                s = stats.setdefault(r["entry_id"], [0, 0])
                s[0] += 1
                s[1] = max(s[1], r["ts_ns"])
            lease.check()
            self._tables["access_stats"].add(pa.table({
                "entry_id": list(stats), "count": [s[0] for s in stats.values()],
                "last_ns": [s[1] for s in stats.values()]}, schema=SCHEMAS["access_stats"]), mode="overwrite")
            self._tables["access_log"].delete("true")
            return logged.num_rows

    def get(self, entry_ids: Sequence[str], include_cold: bool = True) -> dict[str, tuple[str, Entry]]:
        """Entries by id, as (tier, Entry)."""
        pred = _ids_predicate(entry_ids)
        out = {}
        for tier, table in self._tier_tables(include_cold):
            for r in self._read(table, ROW_COLUMNS, pred).to_pylist():
                r["vector"] = np.asarray(r["vector"], np.float32)
                out[r["entry_id"]] = (tier, Entry(**r))
        return out

    def count(self, tier: str = "hot") -> int:
        return (self._tables["entries"] if tier == "hot" else self._cold).count_rows()

    def table(self, name: str):
        """The LanceDB table ``name`` for maintenance jobs: ``entries`` (hot), ``cold``, or one
        of the bookkeeping tables (:data:`SCHEMAS`)."""
        if name == "cold":
            return self._cold
        if name == "entries" or name in SCHEMAS:
            return self._tables[name]
        raise ConfigError(f"no table {name!r}: choose entries, cold or one of {', '.join(SCHEMAS)}")

    def rows(self, columns: list[str] | None = None, where: str | None = None, tier: str = "hot") -> pa.Table:
        """Columns of a tier's rows (all of them when ``where`` is None)."""
        return self._read(self.table("entries" if tier == "hot" else "cold"), columns, where)

    def last_retrieved(self) -> dict[str, int]:
        """Entry id -> when it was last retrieved (ns), for every entry retrieved at least once."""
        self.flush_access_log()
        out: dict[str, int] = {}
        for name, col in (("access_stats", "last_ns"), ("access_log", "ts_ns")):
            t = self._read(self._tables[name], ["entry_id", col])
            for eid, ts in zip(t["entry_id"].to_pylist(), t[col].to_pylist()):
                if ts is not None and ts > out.get(eid, -1):
                    out[eid] = ts
        return out

    # ------------------------------------------------------------------ maintenance

    def demote(self, entry_ids: Sequence[str]) -> list[str]:
        """Move entries to the cold tier: copy, verify the signatures of the cold copy,
        then remove them from the hot tier. Excludes writers while it runs."""
        pred = _ids_predicate(entry_ids)
        with self.leases.maintenance() as lease:
            rows = self._read(self._tables["entries"], None, pred)
            if not rows.num_rows:
                return []
            bad = [f.entry_id for f in self._check_rows(rows, "hot")[1]]
            if bad:
                raise VerificationError(f"refusing to demote rows that fail verification: {bad[:5]}")
            ids = rows["entry_id"].to_pylist()
            already = set(self._read(self._cold, ["entry_id"], _ids_predicate(ids))["entry_id"].to_pylist())
            fresh = rows.filter(pa.array([i not in already for i in ids]))
            if fresh.num_rows:
                lease.check()
                self._cold.add(fresh)
            copied = self._read(self._cold, None, _ids_predicate(ids))
            ok, failed = self._check_rows(copied, "cold")
            if failed or set(copied["entry_id"].to_pylist()) != set(ids):
                raise VerificationError("the cold copy does not verify; the hot rows were kept: "
                                        f"{[f.entry_id for f in failed][:5]}")
            lease.check()
            self._tables["entries"].delete(_ids_predicate(ids))
            return ids

    def compact(self, cleanup_older_than: timedelta = timedelta(days=7)) -> None:
        """Compact files and drop old versions of every table. It deletes storage objects,
        so it holds the maintenance lease: no writer runs meanwhile."""
        with self.leases.maintenance() as lease:
            for table in [*self._tables.values(), self._cold]:
                lease.check()  # deleting unreferenced files is safe only while writers are kept out
                table.optimize(cleanup_older_than=cleanup_older_than, delete_unverified=True)

    def erase(self, entry_ids: Sequence[str], lease_timeout_s: float = 300.0,
              rebuild_indexes: bool = False) -> dict[str, int]:
        """Forget purge of ``entry_ids`` from both tiers, so that no data, deletion, index,
        old-version or transaction file keeps their bytes: delete; rewrite the fragments that
        held them, and only those (the same commit remaps every index to the rewritten rows,
        without the erased ones); rebuild a vector index outright only when one of its
        centroids is a copy of an erased vector (or with ``rebuild_indexes``); drop every old
        version, unverified files included. Deleting unreferenced files corrupts a table that
        a writer is appending to, so the whole step holds the maintenance lease. The delete
        predicate names entry ids only, which the Merkle log keeps anyway. Retry-safe: ids
        already gone are skipped, and the rest of the sequence runs again. Returns the rows
        erased per tier, the fragments rewritten (of all) and the index rebuilds."""
        ids = sorted(set(entry_ids))
        removed = {"hot": 0, "cold": 0, "fragments_rewritten": 0, "fragments": 0, "index_rebuilds": 0}
        with self.leases.maintenance(lease_timeout_s) as lease:
            for tier, table in self._tier_tables(True):
                n, vectors, held = 0, [], set()
                for start in range(0, len(ids), 10_000):
                    pred = _ids_predicate(ids[start:start + 10_000])
                    rows = table.to_lance().to_table(columns=["vector"], filter=pred, with_row_address=True)
                    if rows.num_rows:
                        vectors.append(rows["vector"].combine_chunks().values.to_numpy(zero_copy_only=False))
                        held |= {a >> 32 for a in rows["_rowaddr"].to_pylist()}  # the fragment of each row
                        lease.check()
                        table.delete(pred)
                    n += rows.num_rows
                removed[tier] = n
                forgotten = (np.concatenate(vectors).reshape(-1, self.dim) if vectors
                             else np.zeros((0, self.dim), np.float32))
                done = self._rewrite_without_deleted(table, tier, held, forgotten, rebuild_indexes, lease)
                for key in ("fragments_rewritten", "fragments", "index_rebuilds"):
                    removed[key] += done[key]
            # Retrieval records of the erased entries hold only their ids; readers append to the
            # access log without a lease, so these two tables get a logical delete, no cleanup.
            for name in ("access_log", "access_stats"):
                for start in range(0, len(ids), 10_000):
                    self._tables[name].delete(_ids_predicate(ids[start:start + 10_000]))
        return removed

    def _rewrite_without_deleted(self, table, tier: str, held: set[int], forgotten: np.ndarray,
                                 rebuild: bool, lease) -> dict[str, int]:
        """Rewrite the fragments ``held`` (those that held erased rows; on a retry, every fragment
        that still has deletions), then clean up."""
        from lancedb.index import Bitmap, BTree, LabelList

        ds = table.to_lance()
        fragments = ds.get_fragments()
        if not held:  # a retry after the delete committed: the rows are gone, their fragments unknown
            held = {f.fragment_id for f in fragments if f.metadata.deletion_file is not None}
        touched = sorted(held & {f.fragment_id for f in fragments})
        out = {"fragments": len(fragments), "fragments_rewritten": len(touched), "index_rebuilds": 0}
        if touched:
            lease.check()
            # Other fragments stay as they are (deletions of demoted rows included) and bound the
            # groups compaction merges; the same commit remaps every index to the rewritten rows.
            ds.optimize.compact_files(materialize_deletions_threshold=0.0, excluded_fragment_ids=sorted(
                {f.fragment_id for f in fragments} - set(touched)))
            table.checkout_latest()
        for idx in table.list_indices():
            if not table.count_rows():
                table.drop_index(idx.name)
            elif idx.columns == ["vector"]:
                if rebuild or _centroid_copies(table.to_lance(), idx.name, forgotten):
                    self.build_index(tier, _INDEX_KINDS.get(idx.index_type, "ivf_flat"), replace=True)
                    out["index_rebuilds"] += 1
            elif rebuild:
                scalar = {"BTree": BTree, "Bitmap": Bitmap, "LabelList": LabelList}.get(idx.index_type)
                if scalar is None:
                    raise ConfigError(f"cannot rebuild index {idx.name} of type {idx.index_type}")
                table.create_index(idx.columns[0], config=scalar(), replace=True)
        table.checkout_latest()
        lease.check()
        table.to_lance().cleanup_old_versions(older_than=timedelta(0), delete_unverified=True)
        table.checkout_latest()
        return out

    def remove(self, request: RemovalRequest, approvals: Sequence[Approval]) -> RemovalReceipt:
        """Remove entries under an M-of-N governance-approved request."""
        if self.governance is None:
            raise GovernanceError("this store has no governance policy: open it with governance="
                                  "GovernancePolicy(KeyRing(keys), threshold)")
        if request.store_id != self.store_id:
            raise GovernanceError(f"the removal request is for store {request.store_id}, not {self.store_id}")
        if not re.fullmatch(r"[0-9a-f]{32}", request.request_id):
            raise ConfigError("removal request ids are 32 hex digits: let RemovalRequest generate it")
        approved_by = self.governance.check(request.message(), approvals)
        pred = _ids_predicate(request.entry_ids)
        with self.leases.maintenance() as lease:
            done = self._read(self._tables["removals"], ["request_id"], f"request_id = '{request.request_id}'")
            if done.num_rows:
                raise ReplayError(f"removal request {request.request_id} was already applied: issue a new request")
            removed = 0
            for _, table in self._tier_tables(True):
                n = self._read(table, ["entry_id"], pred).num_rows
                if n:
                    lease.check()
                    table.delete(pred)
                removed += n
            approvals_json = json.dumps([{"key_id": a.key_id, "signature": a.signature.hex()} for a in approvals])
            lease.check()
            self._tables["removals"].add(to_arrow([RemovalRecord(request.request_id, request.to_json().decode(),
                                                                 approvals_json, time.time_ns())], RemovalRecord))
        return RemovalReceipt(request.request_id, removed, approved_by)

    def request_forget(self, subject: str, signed: ForgetRequest) -> ForgetTicket:
        """Record a signed request to forget ``subject``'s entries. The signer must be a
        validator key or a governance key. Purging the bytes is the forget job's work."""
        if signed.subject_hash != subject_hash(subject) or signed.store_id != self.store_id:
            raise SignatureError("the forget request was signed for another subject or store")
        ring = KeyRing([*self.keyring, *(self.governance.keys if self.governance else ())])
        signed.verify(ring)
        if not re.fullmatch(r"[0-9a-f]{32}", signed.request_id):
            raise ConfigError("forget request ids are 32 hex digits: use ForgetRequest.create()")
        seen = self._read(self._tables["forget_requests"], ["request_id"], f"request_id = '{signed.request_id}'")
        if seen.num_rows:
            raise ReplayError(f"forget request {signed.request_id} was already recorded")
        matched = 0
        for _, table in self._tier_tables(True):
            rows = self._read(table, ["forget_subject", "forget_tag"], "forget_subject IS NOT NULL")
            matched += sum(1 for r in rows.to_pylist() if r["forget_subject"] == signed.subject_hash
                           and (signed.tag is None or r["forget_tag"] == signed.tag))
        self._tables["forget_requests"].add(to_arrow([ForgetRequestRow(**dataclasses.asdict(signed), matched=matched)],
                                                     ForgetRequestRow))
        return ForgetTicket(signed.request_id, matched)

    # ------------------------------------------------------------------ attestations

    def _log(self) -> pa.Table:
        return self._read(self._tables["merkle_log"]).sort_by("leaf_index")

    def inclusion_proof(self, entry_id: str) -> InclusionProof:
        """The audit path of an entry under the latest signed tree head."""
        sth = self.latest_tree_head()
        logt = self._log()
        tree = MerkleTree(logt["leaf_hash"].to_pylist())
        idx = logt["entry_id"].to_pylist().index(entry_id) if entry_id in set(logt["entry_id"].to_pylist()) else -1
        if sth is None or idx < 0 or idx >= sth.tree_size:
            raise VerificationError(f"entry {entry_id} is not in the log under the latest tree head")
        return InclusionProof(entry_id, idx, tree.leaf(idx), tree.inclusion_proof(idx, sth.tree_size), sth)

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        tree = MerkleTree(self._log()["leaf_hash"].to_pylist())
        return tree.consistency_proof(old_size, new_size)

    def tree_heads(self) -> list[SignedTreeHead]:
        return [h for h, _ in self._tree_heads()]

    def _check_rows(self, rows: pa.Table, tier: str) -> tuple[list[tuple[str, bytes]], list[RowFailure]]:
        return check_table(rows, tier, self.store_id, self.keyring, self.dim)

    def verify(self, workers: int | None = None, trusted_head: SignedTreeHead | None = None,
               full: bool = False, witnessed: Sequence[CosignedTreeHead] | None = None) -> VerifyReport:
        """Check every row's id, its key binding and its inclusion under the latest signed tree
        head (or ``trusted_head``, e.g. one read from the Kafka topic); report each failing
        row. Logged entries with no row and no approved removal are failures too.

        ``witnessed``: the heads a witness cosigned for this store (read with
        :class:`memstream.witness.WitnessLog`, which checks the cosignatures). The log must
        extend every one: a store whose newest head is behind one was rolled back, a log with
        fewer leaves was truncated, another root at that size is a fork.

        A row's Merkle leaf hashes its message, key id and signature, and every tree head is
        signed by a validator that checked each entry's signature before logging it, so by
        default the rows are checked by hashing under the (few) verified tree-head
        signatures, RFC 6962 style. ``full=True`` also checks every entry's own Ed25519
        signature."""
        started = time.monotonic()
        report = VerifyReport()
        try:
            self.recover(strict=True)
        except IntegrityError as e:
            report.log_failures.append(f"an interrupted append cannot be finished: {e}")
        # The rows are checked by worker processes while this one checks the log and the heads.
        pool = ThreadPoolExecutor(1)
        rows_checked = pool.submit(lambda: [(tier, *self._verify_table(table, tier, workers, full))
                                            for tier, table in self._tier_tables(True)])
        pool.shutdown(wait=False)
        heads = self._tree_heads()
        logt = self._read(self._tables["merkle_log"])
        positions = logt["leaf_index"].combine_chunks().to_numpy(zero_copy_only=False)
        if len(positions) and not (np.diff(positions) > 0).all():
            logt = logt.take(np.argsort(positions, kind="stable"))
            positions = np.sort(positions, kind="stable")
        if not np.array_equal(positions, np.arange(len(positions))):
            report.log_failures.append("merkle_log indices are not 0..n-1 in order: leaves were removed or added")
        leaf_col = logt["leaf_hash"].combine_chunks()
        log_ids = logt["entry_id"].combine_chunks()
        tree = MerkleTree(leaf_col.to_pylist())
        for sth, _ in heads:
            try:
                sth.verify(self.keyring)
                if sth.tree_size > tree.size or tree.root(sth.tree_size) != sth.root_hash:
                    raise VerificationError("its root does not match the log's leaves")
            except IntegrityError as e:
                report.log_failures.append(f"tree head of size {sth.tree_size}: {e}")
        latest = heads[-1][0] if heads else None
        if trusted_head is not None:
            trusted_head.verify(self.keyring)
            if trusted_head.tree_size > tree.size or tree.root(trusted_head.tree_size) != trusted_head.root_hash:
                report.log_failures.append(f"the trusted tree head of size {trusted_head.tree_size} does not match "
                                           "the stored log")
            latest = trusted_head
        report.tree_head = latest
        if witnessed is not None:
            report.witnessed_heads, report.witness_failures = check_witnessed(
                self.store_id, self.keyring, tree, heads[-1][0] if heads else None, witnessed)
        size = latest.tree_size if latest else 0
        report.tree_size = size
        results = rows_checked.result()
        log_leaves = fixed_width(leaf_col, 32)  # None if a stored leaf is not 32 bytes: compared one by one
        log_hex = fixed_width(log_ids, 64)
        log_index = _HexIndex(log_hex) if log_hex is not None else None
        indexes = [_HexIndex(hexed) for _, hexed, _, _ in results] if log_index and log_index.exact else []
        if indexes and all(i.exact for i in indexes):
            # No id twice in the log or in a tier (and no two sharing 64 bits): sorted lookups.
            unseen_at = self._match_sorted(report, results, indexes, log_index, log_leaves, leaf_col, size)
            removed = self._approved_removals(report) | self._attested_purges(report)
            for r in unseen_at:
                eid = bytes(log_hex[r]).decode()
                if eid not in removed:
                    report.failures.append(RowFailure(eid, "missing", "logged entry has no row and no approved "
                                                                       "removal"))
        else:
            self._match_arrow(report, results, log_ids, log_leaves, leaf_col, size)
        report.seconds = time.monotonic() - started
        return report

    @staticmethod
    def _row_failures(tier: str, hexed: np.ndarray, rows: np.ndarray, where: np.ndarray, leaves: np.ndarray,
                      log_leaves: np.ndarray | None, leaf_col, size: int) -> list[tuple[int, RowFailure]]:
        """The failures of rows ``rows`` (not seen before), ``where`` their leaf index (-1: not logged)."""
        def eid(r) -> str:
            return bytes(hexed[r]).decode()

        logged = where >= 0
        found = [(int(r), RowFailure(eid(r), tier, "not in the Merkle log")) for r in rows[~logged]]
        late = logged & (where >= size)
        found += [(int(r), RowFailure(eid(r), tier, f"leaf {i} is not covered by the latest signed tree head "
                                                    f"(size {size})")) for r, i in zip(rows[late], where[late])]
        inside = logged & ~late
        r_in, i_in = rows[inside], where[inside]
        if log_leaves is not None:
            differs = (leaves[r_in] != log_leaves[i_in]).any(1)
        else:
            differs = np.array([bytes(leaves[r]) != leaf_col[int(i)].as_py() for r, i in zip(r_in, i_in)], bool)
        found += [(int(r), RowFailure(eid(r), tier, f"row does not match Merkle leaf {i}: its bytes were changed "
                                                    "after it was signed and logged"))
                  for r, i in zip(r_in[differs], i_in[differs])]
        return found

    def _match_sorted(self, report: VerifyReport, results, indexes, log_index, log_leaves, leaf_col,
                      size: int) -> np.ndarray:
        """Match each tier's checked rows to the log (ids unique everywhere); return the log
        positions below ``size`` that no row and no failing row accounts for."""
        kept: list[_HexIndex] = []  # the rows of earlier tiers
        failing: set[str] = set()
        for (tier, hexed, leaves, failed), index in zip(results, indexes):
            report.failures.extend(failed)
            report.rows_checked += len(hexed) + len(failed)
            failing |= {f.entry_id for f in failed}
            again = np.zeros(len(hexed), bool)
            for k in kept:
                again |= k.find(hexed) >= 0
            hit = index.find(_hex_of(failing))
            again[hit[hit >= 0]] = True
            found = []
            if tier != "cold":  # in the cold tier: mid-demotion, the same verified entry in both tiers
                found += [(int(r), RowFailure(bytes(hexed[r]).decode(), tier, "entry id appears twice in the table"))
                          for r in np.flatnonzero(again)]
            rows = np.flatnonzero(~again)
            found += self._row_failures(tier, hexed, rows, log_index.find(hexed[rows]), leaves, log_leaves, leaf_col,
                                        size)
            report.failures.extend(f for _, f in sorted(found, key=lambda x: x[0]))
            kept.append(index if len(rows) == len(hexed) else _HexIndex(hexed[rows]))
        covered = log_index.hexed[:size]
        seen = np.zeros(len(covered), bool)
        for k in kept:
            seen |= k.find(covered) >= 0
        hit = log_index.find(_hex_of(failing))
        seen[hit[(hit >= 0) & (hit < size)]] = True
        return np.flatnonzero(~seen)

    def _match_arrow(self, report: VerifyReport, results, log_ids, log_leaves, leaf_col, size: int) -> None:
        """The general match, in Arrow hash lookups: ids may be logged or stored twice."""
        n_log = len(log_ids)
        if pc.count_distinct(log_ids, mode="all").as_py() != n_log:
            report.log_failures.append("an entry id appears twice in the merkle_log")
        # The last occurrence, should an id be logged twice.
        log_reversed = log_ids[::-1]
        seen: list[pa.Array] = []
        for tier, hexed, leaves, failed in results:
            report.failures.extend(failed)
            report.rows_checked += len(hexed) + len(failed)
            m = len(hexed)
            ids = pa.Array.from_buffers(pa.string(), m, [None, pa.py_buffer(np.arange(0, 64 * m + 1, 64, np.int32)),
                                                         pa.py_buffer(np.ascontiguousarray(hexed))])
            seen.append(pa.array([f.entry_id for f in failed], pa.string()))
            before = pa.concat_arrays(seen)
            again = ((pc.index_in(ids, value_set=ids).to_numpy(zero_copy_only=False) != np.arange(m))
                     | pc.is_in(ids, value_set=before).to_numpy(zero_copy_only=False))
            found: list[tuple[int, RowFailure]] = []
            if tier != "cold":  # in the cold tier: mid-demotion, the same verified entry in both tiers
                found += [(int(r), RowFailure(ids[int(r)].as_py(), tier, "entry id appears twice in the table"))
                          for r in np.flatnonzero(again)]
            rows = np.flatnonzero(~again)
            seen.append(ids.take(pa.array(rows)))
            at = pc.index_in(seen[-1], value_set=log_reversed)
            where = np.where(at.is_valid().to_numpy(zero_copy_only=False),
                             n_log - 1 - at.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64), -1)
            found += self._row_failures(tier, hexed, rows, where, leaves, log_leaves, leaf_col, size)
            report.failures.extend(f for _, f in sorted(found, key=lambda x: x[0]))
        removed = self._approved_removals(report) | self._attested_purges(report)
        covered = log_ids[:size]
        everything = pa.concat_arrays(seen) if seen else pa.array([], pa.string())
        unseen = np.flatnonzero(~pc.is_in(covered, value_set=everything).to_numpy(zero_copy_only=False))
        for r in unseen:
            eid = covered[int(r)].as_py()
            if eid not in removed:
                report.failures.append(RowFailure(eid, "missing", "logged entry has no row and no approved removal"))

    def _approved_removals(self, report: VerifyReport) -> set[str]:
        removed: set[str] = set()
        for r in self._read(self._tables["removals"]).to_pylist():
            req = RemovalRequest.from_json(r["request"])
            approvals = _approvals_from_json(r["approvals"])
            try:
                if self.governance is None:
                    raise GovernanceError("no governance policy configured to check it")
                self.governance.check(req.message(), approvals)
            except GovernanceError as e:
                report.log_failures.append(f"removal {r['request_id']} is not validly approved: {e}")
                continue
            removed.update(req.entry_ids)
        return removed

    def _attested_purges(self, report: VerifyReport) -> set[str]:
        """Entries erased by a forget purge whose attestation is signed by a validator,
        governance or maintenance key, names stored and validly signed forget requests with
        their subject hashes, and carries the M-of-N governance approvals of exactly those
        requests and entry ids. One key alone cannot launder a removal as a purge."""
        ring = KeyRing([*self.keyring, *(self.governance.keys if self.governance else ()), *self.maintenance_keys])
        requests = {r["request_id"]: r for r in self._read(self._tables["forget_requests"]).to_pylist()}
        purged: set[str] = set()
        for r in self._read(self._tables["purges"], None, "attestation IS NOT NULL").to_pylist():
            try:
                att = PurgeAttestation.from_json(r["attestation"])
                verify_record(att, ring)
                if att.store_id != self.store_id or att.purge_id != r["purge_id"]:
                    raise VerificationError(f"attests purge {att.purge_id} of store {att.store_id}")
                if len(att.subject_hashes) != len(att.request_ids):
                    raise VerificationError("names a subject hash for each of its forget requests, and does not")
                bound = []
                for rid, sh in zip(att.request_ids, att.subject_hashes):
                    q = requests.get(rid)
                    if q is None:
                        raise VerificationError(f"names forget request {rid}, which is not stored")
                    ForgetRequest(q["store_id"], q["subject_hash"], q["tag"], q["key_id"], q["signature"], rid,
                                  q["issued_at_ns"]).verify(ring)
                    if q["subject_hash"] != sh or q["store_id"] != self.store_id:
                        raise VerificationError(f"binds forget request {rid} to another subject or store")
                    bound.append((rid, sh, q["tag"]))
                if not att.entry_ids:
                    continue  # nothing erased: nothing to approve
                if self.governance is None:
                    raise GovernanceError("no governance policy configured to check its approvals")
                self.governance.check(purge_message(self.store_id, att.purge_id, bound, att.entry_ids),
                                      _approvals_from_json(att.approvals))
            except (IntegrityError, GovernanceError, ValueError, TypeError, KeyError) as e:
                report.log_failures.append(f"purge {r['purge_id']}: the attestation does not check out: {e}")
                continue
            purged.update(att.entry_ids)
        return purged

    def add_purge_approval(self, purge_id: str, approval: Approval) -> bool:
        """Keep a governance key's approval of a planned purge (once per key); False when that
        key's approval was already kept."""
        if not re.fullmatch(r"[0-9a-f]{32}", purge_id) or not re.fullmatch(r"[0-9a-f]{32}", approval.key_id):
            raise ConfigError(f"not a purge id and key id: {purge_id!r}, {approval.key_id!r}")
        rec = PurgeApprovalRecord(purge_id, approval.key_id, approval.signature, time.time_ns())
        return self._objects.put_if_absent(f"_purges/{purge_id}/approvals/{approval.key_id}.json", rec.to_json())

    def purge_approvals(self, purge_id: str) -> list[Approval]:
        out = []
        for key in sorted(self._objects.list(f"_purges/{purge_id}/approvals")):
            body = self._objects.get(key)
            if body is not None:
                rec = PurgeApprovalRecord.from_json(body)
                out.append(Approval(rec.key_id, rec.signature))
        return out

    def _verify_table(self, table, tier: str, workers: int | None, full: bool = True):
        ds = table.to_lance()
        frags = [f.fragment_id for f in ds.get_fragments()]
        n = ds.count_rows()
        workers = workers if workers is not None else (min(os.cpu_count() or 1, 8) if n > 50_000 else 1)
        if workers <= 1 or len(frags) < 2:
            return _verify_fragments(ds.uri, self._opts_for(tier), frags, tier, self.store_id,
                                     [k.raw for k in self.keyring], self.dim, full)
        chunks = [frags[i::workers] for i in range(workers)]
        ids, leaves, failed = [], [], []
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            for c, lh, f in pool.map(_verify_fragments, [ds.uri] * workers, [self._opts_for(tier)] * workers, chunks,
                                     [tier] * workers, [self.store_id] * workers,
                                     [[k.raw for k in self.keyring]] * workers, [self.dim] * workers,
                                     [full] * workers):
                ids.append(c)
                leaves.append(lh)
                failed += f
        return np.concatenate(ids), np.concatenate(leaves), failed

    def _opts_for(self, tier: str) -> dict[str, str]:
        return self.cold_storage_options if tier == "cold" else self.storage_options


def _approvals_from_json(text: str) -> list[Approval]:
    return [Approval(a["key_id"], bytes.fromhex(a["signature"])) for a in json.loads(text or "[]")]


def check_witnessed(store_id: str, keyring: KeyRing, tree: MerkleTree, newest: SignedTreeHead | None,
                    witnessed: Sequence[CosignedTreeHead]) -> tuple[int, list[str]]:
    """How many witnessed heads of ``store_id`` there are, and what is wrong with the log
    (``tree``, its newest stored head ``newest``) against them. Rollback: the store's newest
    head is behind a witnessed head. Truncation: the log lost leaves that a head covers
    while the heads stayed. Fork: the log's leaves under a witnessed head hash to another
    root. A store behind several witnessed heads is reported against the newest of them."""
    failures, behind, n = [], None, 0
    stored = head_size(newest)
    for w in sorted((w for w in witnessed if w.log_id == store_id), key=lambda w: w.tree_size):
        n += 1
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(w.witnessed_at_ns / 1e9))
        try:
            w.tree_head().verify(keyring)
        except IntegrityError as e:
            failures.append(f"witnessed head of size {w.tree_size}: not signed by a validator key of the ring ({e})")
            continue
        if tree.size < w.tree_size or stored < w.tree_size:
            kind = "rollback" if stored < w.tree_size else "truncation"
            behind = (f"{kind}: the store's newest signed tree head has size {stored} and its merkle_log "
                      f"{tree.size} leaves, behind the head of size {w.tree_size} the witness cosigned at {when}")
        if tree.size >= w.tree_size and tree.root(w.tree_size) != w.root_hash:
            failures.append(f"fork: the log's first {w.tree_size} leaves do not hash to the root of the head the "
                            f"witness cosigned at {when}: they were rewritten")
    return n, failures + ([behind] if behind else [])


def hashed_rows(rows: pa.Table, tier: str, store_id: str, keyring: KeyRing,
                dim: int) -> tuple[np.ndarray, np.ndarray, list[RowFailure]] | None:
    """The checks of ``check_table(signatures=False)`` as matrices: the hex ids ([m, 64]
    uint8) and leaf hashes ([m, 32]) of the rows whose id and key binding hold, in row
    order, and the failures of the others. None where a row is malformed (a missing vector
    or a field of the wrong type): ``check_table`` then names it."""
    vec = rows["vector"].combine_chunks()
    if vec.null_count:
        return None
    flat = vec.values.to_numpy(zero_copy_only=False).reshape(-1, dim) if len(vec) else np.zeros((0, dim), np.float32)
    try:
        ids, leaves = arrow_leaves(store_id, rows, flat)
    except (TypeError, ValueError, AttributeError, pa.ArrowException):
        return None
    n = rows.num_rows
    hexed = hex_rows(ids)
    computed = pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(np.arange(0, 64 * n + 1, 64, dtype=np.int32)),
                                                      pa.py_buffer(hexed)])
    stored = rows["entry_id"].combine_chunks()
    id_ok = pc.equal(stored, computed).fill_null(False).to_numpy(zero_copy_only=False)
    key_hashes = {k.key_id: domain_hash("memstream.key.v1", k.raw).hex() for k in keyring}
    kid = rows["key_id"].combine_chunks().dictionary_encode()
    expected = pc.take(pa.array([key_hashes.get(k) for k in kid.dictionary.to_pylist()], pa.string()), kid.indices)
    key_ok = pc.equal(expected, rows["validator_key_hash"].combine_chunks()).fill_null(False).to_numpy(
        zero_copy_only=False)
    failed = []
    for i in np.flatnonzero(~(id_ok & key_ok)):
        sid, k = stored[int(i)].as_py(), kid[int(i)].as_py()
        if not id_ok[i]:
            failed.append(RowFailure(str(sid), tier, "VerificationError: entry id does not match the entry's content"))
        else:
            failed.append(RowFailure(str(sid), tier, f"SignatureError: key {k} is not a validator key of the ring, "
                                                     "or the provenance names another validator"))
    ok = id_ok & key_ok
    return hexed[ok], leaves[ok], failed


def check_table(rows: pa.Table, tier: str, store_id: str, keyring: KeyRing, dim: int,
                signatures: bool = True) -> tuple[list[tuple[str, bytes]], list[RowFailure]]:
    """Verify rows of an entries table: (entry id, leaf hash) of the good ones, and failures.
    ``signatures=False`` checks ids and key bindings only: the caller then matches each leaf
    against a signed tree head."""
    if not signatures:
        fast = hashed_rows(rows, tier, store_id, keyring, dim)
        if fast is not None:
            hexed, leaves, failed = fast
            return [(bytes(h).decode(), bytes(lh)) for h, lh in zip(hexed, leaves)], failed
    checked, failed = [], []
    key_hashes = {k.key_id: domain_hash("memstream.key.v1", k.raw).hex() for k in keyring}
    cols = {c: rows[c].to_pylist() for c in ROW_COLUMNS if c != "vector"}
    vec = rows["vector"].combine_chunks()
    flat = vec.values.to_numpy(zero_copy_only=False).reshape(-1, dim) if len(vec) else np.zeros((0, dim), np.float32)
    for i in range(rows.num_rows):
        eid = cols["entry_id"][i]
        try:
            if vec.is_null(i) if vec.null_count else False:
                raise VerificationError("vector is missing")
            fields = {c: cols[c][i] for c in Entry.CONTENT if c != "vector"}
            fields["vector"] = flat[i]
            msg = Entry.message(store_id, fields)
            if signatures:
                lh = check_row(msg, eid, cols["key_id"][i], cols["validator_key_hash"][i], cols["signature"][i],
                               keyring)
            else:
                if Entry.id_of(msg) != eid:
                    raise VerificationError("entry id does not match the entry's content")
                if key_hashes.get(cols["key_id"][i]) != cols["validator_key_hash"][i]:
                    raise SignatureError(f"key {cols['key_id'][i]} is not a validator key of the ring, or the "
                                         "provenance names another validator")
                lh = entry_leaf_hash(msg, cols["key_id"][i], cols["signature"][i])
            checked.append((eid, lh))
        except (IntegrityError, TypeError, ValueError) as e:
            failed.append(RowFailure(str(eid), tier, f"{type(e).__name__}: {e}"))
    return checked, failed


def _verify_fragments(uri: str, storage_options: dict[str, str], fragment_ids: list[int], tier: str,
                      store_id: str, raw_keys: list[bytes], dim: int, full: bool = True):
    """Runs in a worker process too: opens the dataset itself and checks its fragments.
    Returns the good rows as matrices (hex ids [m, 64] uint8, leaf hashes [m, 32]), which
    cross the process boundary as two buffers, and the failures."""
    import lance

    ds = lance.dataset(uri, storage_options=storage_options or None)
    keyring = KeyRing([VerifyKey(k) for k in raw_keys])
    ids, leaves, failed = [np.zeros((0, 64), np.uint8)], [np.zeros((0, 32), np.uint8)], []
    for fid in fragment_ids:
        frag = ds.get_fragment(fid)
        for batch in frag.to_batches(columns=ROW_COLUMNS, batch_size=65536):
            rows = pa.Table.from_batches([batch])
            fast = None if full else hashed_rows(rows, tier, store_id, keyring, dim)
            if fast is None:
                c, f = check_table(rows, tier, store_id, keyring, dim, full)
                fast = (np.frombuffer("".join(e for e, _ in c).encode(), np.uint8).reshape(-1, 64),
                        np.frombuffer(b"".join(lh for _, lh in c), np.uint8).reshape(-1, 32), f)
            ids.append(fast[0])
            leaves.append(fast[1])
            failed += fast[2]
    return np.concatenate(ids), np.concatenate(leaves), failed


class _HexIndex:
    """Exact lookups among many ids of 64 hex digits ([n, 64] uint8), by a sort on their first
    16 digits, each match confirmed on all 64. ``exact`` is False when two ids share those
    digits (the same id twice, or a made-up one): lookups could then miss one of them."""

    def __init__(self, hexed: np.ndarray):
        self.hexed = hexed
        key = _prefix_keys(hexed)
        self.order = np.argsort(key, kind="stable")
        self.sorted = key[self.order]
        self.exact = not (np.diff(self.sorted) == 0).any()

    def find(self, hexed: np.ndarray) -> np.ndarray:
        """The index of each id among these, -1 where absent."""
        if not len(self.sorted) or not len(hexed):
            return np.full(len(hexed), -1, np.int64)
        key = _prefix_keys(hexed)
        pos = np.minimum(np.searchsorted(self.sorted, key), len(self.sorted) - 1)
        at = self.order[pos]
        hit = (self.sorted[pos] == key) & (self.hexed[at] == hexed).all(1)
        return np.where(hit, at, -1)


_NIBBLE = np.zeros(256, np.uint8)
_NIBBLE[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint8)


def _prefix_keys(hexed: np.ndarray) -> np.ndarray:
    """The first 16 digits of each id as one integer (any other byte counts as 0: a match is
    confirmed on every digit, and a shared key makes the index inexact)."""
    nib = _NIBBLE[hexed[:, :16]]
    head = np.ascontiguousarray((nib[:, 0::2] << 4) | nib[:, 1::2])
    return head.view(">u8").reshape(-1).astype(np.uint64)


def _hex_of(ids: Iterable[str]) -> np.ndarray:
    """The ids that are 64 lower-case hex digits, as an [n, 64] uint8 matrix."""
    good = [i for i in ids if isinstance(i, str) and _ID.fullmatch(i)]
    return np.frombuffer("".join(good).encode(), np.uint8).reshape(-1, 64)


_INDEX_KINDS = {"IvfFlat": "ivf_flat", "IvfHnswSq": "ivf_hnsw_sq", "IvfPq": "ivf_pq", "IvfSq": "ivf_sq"}


def _centroid_copies(ds, index_name: str, forgotten: np.ndarray) -> bool:
    """Whether an IVF centroid of the index is (up to float rounding) one of the ``forgotten``
    vectors: k-means can leave an outlier alone in its partition, and the centroid is then a
    copy of it, which a remap of the row ids keeps."""
    if not len(forgotten):
        return False
    os.environ.setdefault("LANCE_INCLUDE_VECTOR_CENTROIDS", "true")  # lance 13 reports them only when asked
    for part in ds.stats.index_stats(index_name).get("indices", []):
        c = np.asarray(part.get("centroids") or [], np.float32)
        if not c.size:
            continue
        c = c.reshape(len(c), -1) / np.maximum(np.linalg.norm(c.reshape(len(c), -1), axis=1, keepdims=True), 1e-30)
        f = forgotten / np.maximum(np.linalg.norm(forgotten, axis=1, keepdims=True), 1e-30)
        for start in range(0, len(f), 4096):
            if (f[start:start + 4096] @ c.T).max() > 1 - 1e-6:
                return True
    return False
