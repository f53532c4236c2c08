"""Crash and lease safety of the long-term store, on real LanceDB (local folders and S3 on
SeaweedFS): fencing tokens and heartbeats, a paused lease holder that resumes, and a writer
killed at every step of an append, then the store opened again and verified."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from memstream.crypto import KeyRing, SignedTreeHead, SigningKey
from memstream.crypto.merkle import MerkleFrontier
from memstream.errors import FencedError, LeaseError
from memstream.longterm import LongTermStore
from memstream.schemas.records import TreeHeadRow
from memstream.storage.lease import Leases
from memstream.storage.objects import object_store

DIM = 16
TTL = 2.0


def open_lt(backend, key, signer=True, **kw) -> LongTermStore:
    uri, opts = backend
    return LongTermStore(uri, keyring=KeyRing([key]), signer=key if signer else None, storage_options=opts, dim=DIM,
                         lease_ttl_s=TTL, **kw)


def entries_for(store: LongTermStore, n: int, seed: int):
    """Deterministic entries (fixed timestamps): the same call signs the same bytes."""
    vecs = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return [store.new_entry(v, f"p{seed}-{i}".encode(), query=f"q{seed}-{i}", timestamp_ns=10**18 + i)
            for i, v in enumerate(vecs)]


def assert_consistent(store: LongTermStore, n: int) -> None:
    ids = store.rows(["entry_id"])["entry_id"].to_pylist()
    logged = store.table("merkle_log").to_lance().to_table()["entry_id"].to_pylist()
    assert len(ids) == len(set(ids)) == n and sorted(logged) == sorted(ids)  # nothing lost, nothing doubled
    assert store.latest_tree_head().tree_size == n
    report = store.verify(full=True)
    assert report.ok and report.rows_checked == n, report.to_json()


# -- leases ------------------------------------------------------------------------------

def test_fencing_tokens_grow_and_a_stale_holder_is_refused(backend):
    objects = object_store(*backend)
    stale = Leases(objects, ttl_s=1.0, heartbeat=False)  # a holder that stopped renewing
    with stale.sequencer() as first:
        time.sleep(1.2)
        with Leases(objects, ttl_s=1.0).sequencer(timeout_s=5) as second:
            assert second.token == first.token + 1
            with pytest.raises(FencedError, match="no longer held"):
                first.check()
            second.check()
        with pytest.raises(FencedError):  # released by its successor: still not the holder
            first.check()
    with Leases(objects, ttl_s=1.0).sequencer() as third:
        assert third.token == second.token + 1  # counted on from the released lease, never reused
    assert len(objects.list("_leases/fenced/sequencer")) <= 3  # old tokens are collected


def test_heartbeats_keep_a_lease_past_its_ttl(backend):
    objects = object_store(*backend)
    with Leases(objects, ttl_s=1.0).sequencer() as held:
        time.sleep(2.5)  # more than two TTLs: only the heartbeat keeps it
        held.check()
        with pytest.raises(LeaseError, match="another process holds it"):
            with Leases(objects, ttl_s=1.0).sequencer(timeout_s=0.5):
                pass
    with Leases(objects, ttl_s=1.0).sequencer(timeout_s=0.5) as next_one:  # released: taken at once
        assert next_one.token == held.token + 1


def test_maintenance_breaks_an_expired_writer_which_is_then_fenced(backend):
    objects = object_store(*backend)
    with Leases(objects, ttl_s=1.0, heartbeat=False).writer() as writer:
        time.sleep(1.2)
        with Leases(objects, ttl_s=1.0).maintenance(timeout_s=5) as maintenance:
            assert objects.get(writer.key) is None  # broken as expired
            with pytest.raises(FencedError, match="no longer held"):
                writer.check()
            maintenance.check()


def test_an_expired_maintenance_holder_is_fenced_once_writers_enter(backend):
    objects = object_store(*backend)
    with Leases(objects, ttl_s=1.0, heartbeat=False).maintenance() as maintenance:
        maintenance.check()
        time.sleep(1.2)
        with Leases(objects, ttl_s=1.0).writer(timeout_s=2) as writer:  # enters: maintenance stopped renewing
            writer.check()
            with pytest.raises(FencedError, match="no longer held"):
                maintenance.check()  # so its next destructive step is refused


def _paused_append(uri, opts, pem: bytes, stop_at: str, out: str) -> None:
    os.environ["MEMSTREAM_STOP_AT"] = stop_at
    key = SigningKey.parse(pem)
    store = open_lt((uri, opts), key)
    try:
        store.append(entries_for(store, 8, 2))
        Path(out).write_text("appended")
    except FencedError as e:
        Path(out).write_text(f"FencedError: {e}")


def _wait_stopped(pid: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "T":
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} never reached its stop point")


@pytest.mark.parametrize("stop_at,committed", [("longterm.append.intent", False), ("longterm.append.rows", True)])
def test_paused_lease_holder_is_fenced(backend, tmp_path, stop_at, committed):
    """A writer stopped mid-append (every thread: no heartbeat) past its leases' expiry: another
    appender takes the sequencer with the next token and resolves the paused one's batch; the
    paused writer, resumed, has its next commit refused, and the store verifies."""
    key = SigningKey.generate()
    uri, opts = backend
    store = open_lt(backend, key)
    store.append(entries_for(store, 5, 1))
    out = tmp_path / "paused.txt"
    child = mp.get_context("spawn").Process(target=_paused_append, args=(uri, opts, key.private_pem(), stop_at,
                                                                          str(out)))
    child.start()
    try:
        _wait_stopped(child.pid)
        time.sleep(TTL + 0.5)  # its leases expire: nobody renews them
        mine = store.append(entries_for(store, 3, 3))  # takes over, resolving the paused batch first
        assert mine.first_index == (13 if committed else 5)
    finally:
        os.kill(child.pid, signal.SIGCONT)
        child.join(120)
    assert child.exitcode == 0 and out.read_text().startswith("FencedError: the "), out.read_text()
    assert_consistent(store, 16 if committed else 8)
    # The fenced writer's retry writes what was dropped, and only that.
    retry = store.append(entries_for(store, 8, 2), if_absent=True)
    assert (len(retry.entry_ids), len(retry.skipped)) == ((0, 8) if committed else (8, 0))
    assert_consistent(store, 16)


# -- crashes inside an append ------------------------------------------------------------

def _crashing_append(uri, opts, pem: bytes, crash_at: str) -> None:
    os.environ["MEMSTREAM_CRASH_AT"] = crash_at
    key = SigningKey.parse(pem)
    store = open_lt((uri, opts), key)
    store.append(entries_for(store, 8, 2))


@pytest.mark.parametrize("crash_at,committed", [("longterm.append.intent", False), ("longterm.append.rows", True),
                                                ("longterm.append.leaves", True), ("longterm.append.head", True)])
def test_crash_mid_append_repaired_on_open(backend, crash_at, committed):
    """A writer killed at each step of an append; the store, opened again by a reader with no
    signing key, verifies at once (the dead writer's leases are broken by its PID), holding
    the batch whole or not at all."""
    key = SigningKey.generate()
    uri, opts = backend
    store = open_lt(backend, key)
    store.append(entries_for(store, 5, 1))
    child = mp.get_context("spawn").Process(target=_crashing_append, args=(uri, opts, key.private_pem(), crash_at))
    child.start()
    child.join(120)
    assert child.exitcode == -signal.SIGKILL  # killed at the crash point, mid-batch
    assert object_store(uri, opts).get("_appends/pending.json") is not None  # the batch is unfinished
    reader = open_lt(backend, key, signer=False)  # the next open: no signer needed to repair
    assert object_store(uri, opts).get("_appends/pending.json") is None
    assert_consistent(reader, 13 if committed else 5)
    # The writer's retry signs the same entries: the committed batch is skipped, the dropped one written.
    retry = store.append(entries_for(store, 8, 2), if_absent=True)
    assert (len(retry.entry_ids), len(retry.skipped)) == ((0, 8) if committed else (8, 0))
    assert_consistent(store, 13)
    assert_consistent(open_lt(backend, key, signer=False), 13)


def test_verify_reports_an_intent_that_does_not_check_out(tmp_path):
    """A planted intent whose tree head is signed by a key the store does not accept is neither
    applied at open nor passed over by verify."""
    key, forger = SigningKey.generate(), SigningKey.generate()
    where = (str(tmp_path / "lt"), {})
    store = open_lt(where, key)
    store.append(entries_for(store, 3, 1))
    frontier = MerkleFrontier()
    for _ in range(5):
        frontier.append_hash(os.urandom(32))
    sth = SignedTreeHead.create(forger, store.store_id, frontier.size, frontier.root(), time.time_ns())
    row = TreeHeadRow(**dataclasses.asdict(sth), frontier=frontier.hashes)
    intent = {"first": 3, "entry_ids": [e.entry_id for e in entries_for(store, 2, 9)],
              "leaf_hashes": [h.hex() for h in frontier.hashes[-2:]], "head": json.loads(row.to_json()), "token": 1}
    object_store(*where).put("_appends/pending.json", json.dumps(intent).encode())
    reopened = open_lt(where, key, signer=False)
    report = reopened.verify()
    assert not report.ok and "interrupted append cannot be finished" in report.log_failures[0], report.to_json()
    assert reopened.count() == 3 and object_store(*where).get("_appends/pending.json") is not None
