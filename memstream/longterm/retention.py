"""Retention at query time: every read offers its query latent, with what it retrieved, to the
learned write policy (:mod:`memstream.longterm.policy`); a retained candidate becomes a signed
long-term entry whose provenance is the validator key hash, the hash of the triggering query
(:func:`read_query`: the session and the query latent) and the read's timestamp.

The read path only queues the candidate (:meth:`Retention.offer`). A background thread
decides and writes in batches: the policy's neighbour similarities are the read's own
long-term hits when it had some, else one search of the store for the batch, and in both cases also the
candidates this writer already kept but has not yet seen in a search, so a burst of one
query is not kept many times. Each batch is one :meth:`LongTermStore.append` with
``if_absent=True``; an entry's id is a hash of its content, timestamp included, so a retried
batch signs the same entries and none is written twice. ``flush()`` waits for everything
offered so far; ``close()`` (and interpreter exit) flushes, and raises if anything could not
be written.
"""

from __future__ import annotations

import atexit
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from memstream.crypto.hashing import canonical_encode
from memstream.errors import ConfigError, MemstreamError, ServiceError
from memstream.longterm.entry import Entry, session_subject
from memstream.longterm.policy import K, WriteDecision, WritePolicy
from memstream.longterm.store import LongTermStore
from memstream.settings import RETAIN_BATCH, RETAIN_LINGER_S

log = logging.getLogger(__name__)

READ_QUERY_DOMAIN = "memstream.read.query.v1"


def read_query(session_id: str, latent) -> bytes:
    """The query a retained entry names (by hash) as its trigger: the session and the latent."""
    return canonical_encode(READ_QUERY_DOMAIN, {"session_id": session_id,
                                                "latent": np.ascontiguousarray(latent, np.float32).reshape(-1)})


@dataclass(frozen=True)
class Candidate:
    latent: np.ndarray
    session_id: str
    read_id: str
    ts_ns: int
    fragments: tuple[tuple[str, float], ...]  # what the read returned: (fragment key, score)
    neighbor_sims: tuple[float, ...] | None  # cosine of the read's long-term hits; None: not read

    def payload(self) -> bytes:
        return json.dumps({"session_id": self.session_id, "read_id": self.read_id,
                           "fragments": [{"key": k, "score": round(s, 6)} for k, s in self.fragments]},
                          sort_keys=True).encode()


@dataclass
class RetentionStats:
    offered: int = 0
    decided: int = 0
    kept: int = 0
    written: int = 0
    already_written: int = 0  # skipped by insert-if-absent (a retried batch)
    batches: int = 0
    retries: int = 0
    failed: int = 0  # entries still unwritten after every retry
    decisions: list[WriteDecision] = field(default_factory=list, repr=False)


_FLUSH = object()
_STOP = object()


class Retention:
    """``Retention(store)``: the background writer of query-time retention into ``store``
    (opened with a signer). ``batch``: most candidates per append; ``linger_s``: how long a
    partial batch waits for more; ``retries``: attempts per batch before it counts as failed."""

    def __init__(self, store: LongTermStore, policy: WritePolicy | None = None, *, batch: int = RETAIN_BATCH,
                 linger_s: float = RETAIN_LINGER_S, retries: int = 5, max_pending: int = 100_000, keep_decisions: bool = False):
        if store.signer is None:
            raise ConfigError("retention writes signed entries: open the long-term store with signer=...")
        if store.metric != "cosine":
            raise ConfigError("the write policy reads cosine similarities: open the store with metric='cosine'")
        if batch < 1 or linger_s < 0 or retries < 1:
            raise ConfigError(f"retention needs batch >= 1, linger_s >= 0, retries >= 1; got {batch}, {linger_s}, "
                              f"{retries}")
        self.store, self.policy = store, policy or WritePolicy.load()
        self.batch, self.linger_s, self.retries = batch, linger_s, retries
        self.keep_decisions = keep_decisions
        self.stats = RetentionStats()
        self.last_error: Exception | None = None
        self._queue: queue.Queue = queue.Queue(max_pending)
        self._kept: list[np.ndarray] = []  # unit vectors kept since the last search could see them
        self._unwritten: list[Entry] = []
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="memstream-retention", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    # -- the read's side: no I/O ---------------------------------------------------------
    def offer(self, latent, *, session_id: str, read_id: str, fragments: Sequence[tuple[str, float]] = (),
              neighbor_sims: Sequence[float] | None = None, ts_ns: int | None = None) -> None:
        if self._closed:
            raise ServiceError("retention is closed: offer() after close()")
        self._queue.put(Candidate(np.array(latent, np.float32).reshape(-1), session_id, read_id,
                                  time.time_ns() if ts_ns is None else int(ts_ns), tuple(fragments),
                                  None if neighbor_sims is None else tuple(float(s) for s in neighbor_sims)))
        self.stats.offered += 1

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every candidate offered so far is decided and written (or failed)."""
        done = threading.Event()
        self._queue.put((_FLUSH, done))
        if not done.wait(timeout):
            raise ServiceError(f"retention did not flush within {timeout}s")

    def close(self) -> None:
        """Flush, stop the writer, and raise if any kept entry could not be written."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        self._queue.put(_STOP)
        self._thread.join()
        if self._unwritten:
            raise ServiceError(f"{len(self._unwritten)} retained entr(y/ies) could not be written "
                               f"({self.last_error}); they were signed, so writing the same entries again is safe")

    def __enter__(self) -> "Retention":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the writer thread ---------------------------------------------------------------
    def _run(self) -> None:
        stop, waiters = False, []
        while True:
            pending: list[Candidate] = []
            deadline = 0.0
            while len(pending) < self.batch:
                try:
                    if stop or waiters:  # write what was queued before the flush or stop, in batches
                        item = self._queue.get_nowait()
                    elif not pending:
                        item = self._queue.get()
                    else:
                        item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                elif isinstance(item, tuple) and item[0] is _FLUSH:
                    waiters.append(item[1])
                else:
                    if not pending:
                        deadline = time.monotonic() + self.linger_s
                    pending.append(item)
            if pending:
                self._write(pending)
            if (stop or waiters) and self._queue.empty():
                if self._unwritten:
                    self._write_entries([])  # one more round of retries for earlier failures
                for w in waiters:
                    w.set()
                waiters = []
                if stop:
                    return

    def _decide(self, pending: list[Candidate]) -> list[Entry]:
        entries = []
        unread = [i for i, c in enumerate(pending) if c.neighbor_sims is None]
        # One search for the whole batch: a search per candidate cost the reader's cores more
        # than the reads' own work.
        searched = dict(zip(unread, self.store.neighbor_sims(np.stack([pending[i].latent for i in unread]), K)
                            if unread else ()))
        for i, c in enumerate(pending):
            sims = list(c.neighbor_sims) if c.neighbor_sims is not None else [
                float(s) for s in searched[i] if not np.isnan(s)]
            unit = c.latent / max(float(np.linalg.norm(c.latent)), 1e-12)
            if self._kept:
                sims += (np.stack(self._kept) @ unit).tolist()
            sims = sorted(sims, reverse=True)[:K]
            decision = self.policy.decide(c.latent, sims)
            self.stats.decided += 1
            if self.keep_decisions:
                self.stats.decisions.append(decision)
            if decision.keep:
                self._kept.append(unit)
                entries.append(self.store.new_entry(c.latent, c.payload(), query=read_query(c.session_id, c.latent),
                                                    payload_kind="episodic_ref", timestamp_ns=c.ts_ns,
                                                    forget_subject=session_subject(c.session_id)))
        self.stats.kept += len(entries)
        return entries

    def _write(self, pending: list[Candidate]) -> None:
        try:
            entries = self._decide(pending)
        except (MemstreamError, OSError, RuntimeError, ValueError) as e:  # the store could not be searched
            log.error("retention: %d candidates dropped, the policy could not decide: %s", len(pending), e)
            self.last_error = e
            self.stats.failed += len(pending)
            return
        self._write_entries(entries)

    def _write_entries(self, entries: list[Entry]) -> None:
        todo = self._unwritten + entries
        if not todo:
            return
        for attempt in range(self.retries):
            try:
                for start in range(0, len(todo), self.batch):
                    result = self.store.append(todo[start:start + self.batch], if_absent=True)
                    self.stats.written += len(result.entry_ids)
                    self.stats.already_written += len(result.skipped)
                    self.stats.batches += 1
                self._unwritten = []
                self.stats.failed = 0
                # The store now holds them: its search sees them, the writer need not.
                self._kept = []
                return
            except (MemstreamError, OSError, RuntimeError) as e:
                self.last_error = e
                self.stats.retries += 1
                log.warning("retention: append of %d entries failed (attempt %d/%d): %s", len(todo), attempt + 1,
                            self.retries, e)
                time.sleep(min(2.0, 0.05 * 2 ** attempt))
        self._unwritten = todo
        self.stats.failed = len(todo)


class RetentionProcess:
    """:class:`Retention` in a child process at a lower CPU priority (``nice``): the read's
    process only queues candidates (a pipe write), so the writer's decisions, signatures and
    LanceDB commits take neither the read's GIL nor, under contention, its CPU. Same
    ``offer``/``flush``/``close`` as :class:`Retention`; ``stats`` is refreshed by ``flush``
    and ``close``. The child opens its own store from ``uri`` and the keys."""

    def __init__(self, uri: str, *, keyring, signer, storage_options: dict[str, str] | None = None,
                 dim: int | None = None, kafka_bootstrap: str | None = None, kafka_security=None,
                 tree_head_topic: str | None = None, policy_path: str | None = None, nice: int = 10,
                 start_timeout_s: float = 300.0, key_table: tuple[str, dict[str, str] | None, str] | None = None,
                 **retention_kw):
        import multiprocessing as mp

        # The key table as (episodic uri, its storage options, master key file): the child opens
        # it itself (a master key never crosses a pipe) to seal subject-bound payloads.
        spec = {"uri": uri, "storage_options": storage_options, "raw_keys": [k.raw for k in keyring],
                "key_table": key_table,
                "signer_pem": signer.private_pem(), "dim": dim, "kafka_bootstrap": kafka_bootstrap,
                "kafka_security": kafka_security,
                "tree_head_topic": tree_head_topic, "policy_path": policy_path, "nice": nice,
                "retention": retention_kw}
        ctx = mp.get_context("spawn")
        self._in, self._out = ctx.Queue(), ctx.Queue()
        self._proc = ctx.Process(target=_serve, args=(spec, self._in, self._out), name="memstream-retention",
                                 daemon=True)
        self._proc.start()
        kind, detail = self._reply(start_timeout_s)
        if kind != "ready":
            raise ServiceError(f"the retention process did not start: {detail}")
        self.stats = RetentionStats()
        self._closed = False
        atexit.register(self.close)

    def _reply(self, timeout: float | None):
        try:
            return self._out.get(timeout=timeout)
        except queue.Empty:
            alive = self._proc.is_alive()
            raise ServiceError(f"no answer from the retention process in {timeout}s "
                               f"({'still running' if alive else f'exit code {self._proc.exitcode}'})") from None

    def offer(self, latent, *, session_id: str, read_id: str, fragments: Sequence[tuple[str, float]] = (),
              neighbor_sims: Sequence[float] | None = None, ts_ns: int | None = None) -> None:
        if self._closed:
            raise ServiceError("retention is closed: offer() after close()")
        self._in.put(("offer", Candidate(np.array(latent, np.float32).reshape(-1), session_id, read_id,
                                         time.time_ns() if ts_ns is None else int(ts_ns), tuple(fragments),
                                         None if neighbor_sims is None else tuple(float(s) for s in neighbor_sims))))
        self.stats.offered += 1

    def flush(self, timeout: float | None = None) -> None:
        self._in.put(("flush", None))
        kind, stats = self._reply(timeout)
        self._take(stats)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        self._in.put(("stop", None))
        kind, (stats, error) = self._reply(None)
        self._proc.join(60)
        self._take(stats)
        if error:
            raise ServiceError(error)

    def _take(self, stats: dict) -> None:
        offered = self.stats.offered
        self.stats = RetentionStats(**stats)
        self.stats.offered = offered

    def __enter__(self) -> "RetentionProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _counts(stats: RetentionStats) -> dict:
    return {k: v for k, v in stats.__dict__.items() if k != "decisions"}


def _serve(spec: dict, inq, outq) -> None:
    """The retention process: a :class:`Retention` fed from ``inq``."""
    import os

    from memstream.crypto.keys import KeyRing, SigningKey, VerifyKey

    try:
        os.nice(spec["nice"])
        extra = {"tree_head_topic": spec["tree_head_topic"]} if spec["tree_head_topic"] else {}
        if spec["dim"] is not None:
            extra["dim"] = spec["dim"]
        if spec["key_table"] is not None:
            from memstream.storage.keytable import KeyTable

            extra["keys"] = KeyTable.open(*spec["key_table"])
        store = LongTermStore(spec["uri"], keyring=KeyRing([VerifyKey(k) for k in spec["raw_keys"]]),
                              signer=SigningKey.parse(spec["signer_pem"]), storage_options=spec["storage_options"],
                              kafka_bootstrap=spec["kafka_bootstrap"], kafka_security=spec["kafka_security"],
                              **extra)
        retention = Retention(store, WritePolicy.load(spec["policy_path"]) if spec["policy_path"] else None,
                              **spec["retention"])
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
        outq.put(("error", f"{type(e).__name__}: {e}"))
        return
    outq.put(("ready", None))
    while True:
        kind, body = inq.get()
        if kind == "offer":
            retention._queue.put(body)
            retention.stats.offered += 1
        elif kind == "flush":
            retention.flush()
            outq.put(("flushed", _counts(retention.stats)))
        else:
            error = None
            try:
                retention.close()
            except ServiceError as e:
                error = str(e)
            store.close()
            outq.put(("closed", (_counts(retention.stats), error)))
            return
