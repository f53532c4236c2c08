"""Maintenance functions without Airflow: the storage scan, and what makes a purge fail."""

from __future__ import annotations

import dataclasses
import os
import threading

import numpy as np
import pytest

from memstream.crypto import KeyRing, SigningKey
from memstream.errors import LeaseError, VerificationError
from memstream.longterm import ForgetRequest, LongTermStore
from memstream.longterm.entry import GovernancePolicy
from memstream.crypto.signed import sign_record
from memstream.maintenance import purge
from memstream.maintenance.scan import _CHUNK, SHINGLE, Markers, scan_storage


GOVERNANCE = SigningKey.generate()


def test_markers_find_every_window_and_nothing_else():
    secret, short, tiny = os.urandom(300), b"alice@example.org", b"abc"
    m = Markers()
    for v in (secret, short, tiny):
        m.add(v)
    assert (len(m), m.skipped) == (5, 1)  # start, middle and end windows; the 17-byte value has two
    m = Markers.from_bytes(m.to_bytes())
    noise = bytearray(os.urandom(2 * _CHUNK + 1000))
    at = _CHUNK - 40  # across the boundary of two numpy chunks
    noise[at:at + len(secret)] = secret
    noise[100:100 + len(short)] = short
    noise[5000:5000 + SHINGLE] = secret[1:SHINGLE + 1]  # shifted by one byte: no window starts there
    middle = (len(secret) - SHINGLE) // 2
    assert m.scan_buffer(bytes(noise)) == [100, 101, at, at + middle, at + len(secret) - SHINGLE]
    assert m.scan_buffer(os.urandom(100_000)) == [] and m.scan_buffer(b"") == []
    assert secret not in m.to_bytes() and short not in m.to_bytes()


@pytest.fixture
def store_with_request(tmp_path):
    key = SigningKey.generate()
    store = LongTermStore(str(tmp_path / "lt"), keyring=KeyRing([key]), signer=key, dim=8,
                          governance=GovernancePolicy(KeyRing([GOVERNANCE]), 1))
    rng = np.random.default_rng(5)
    entries = [store.new_entry(rng.standard_normal(8), f"{'SECRET' if i % 3 == 0 else 'public'}-{i}-".encode() * 3,
                               query="q", forget_tag="t" if i % 3 == 0 else None,
                               forget_subject="carol" if i % 3 == 0 else None) for i in range(30)]
    store.append(entries)
    store.request_forget("carol", ForgetRequest.create(key, store.store_id, "carol"))
    return store, key, entries


def test_a_logical_delete_fails_the_scan(store_with_request):
    store, key, entries = store_with_request
    planned = purge.plan(store)
    assert (planned["entries"], planned["hot"]) == (10, 10)
    purge.approve(store, planned["purge_id"], GOVERNANCE)
    store.table("entries").delete("forget_subject IS NOT NULL")  # rows gone, bytes kept
    assert store.count() == 20
    with pytest.raises(VerificationError, match="forgotten bytes remain"):
        purge.check(store, planned["purge_id"])
    assert purge.plan(store)["resumed"] is True  # the unfinished plan is picked up again
    purge.erase(store, planned["purge_id"])
    assert purge.check(store, planned["purge_id"])["hits"] == 0


def test_erase_waits_for_writers_and_gives_up(store_with_request):
    store, key, _ = store_with_request
    planned = purge.plan(store)
    purge.approve(store, planned["purge_id"], GOVERNANCE)
    held, release = threading.Event(), threading.Event()

    def writer():
        with store.leases.writer():
            held.set()
            release.wait(30)

    t = threading.Thread(target=writer)
    t.start()
    held.wait(10)
    try:
        with pytest.raises(LeaseError):
            purge.erase(store, planned["purge_id"], lease_timeout_s=1)
        assert store.count() == 30  # nothing was deleted
    finally:
        release.set()
        t.join()
    purge.erase(store, planned["purge_id"])
    assert store.count() == 20


def test_verify_accepts_only_a_validly_signed_purge(store_with_request):
    store, key, entries = store_with_request
    done = purge.run(store, key, approvers=[GOVERNANCE])
    assert done["entries"] == 10 and store.verify().ok
    (att,) = purge.attestations(store)
    forged = sign_record(dataclasses.replace(att, entry_ids=sorted({*att.entry_ids, entries[1].entry_id})),
                         SigningKey.generate())
    store.table("purges").update(where=f"purge_id = '{att.purge_id}'", values={"attestation": forged.to_json().decode()})
    report = store.verify()
    assert not report.ok and "signed by unknown key" in report.log_failures[0]
    assert {f.reason for f in report.failures} == {"logged entry has no row and no approved removal"}


def test_scan_reports_objects_with_hits(tmp_path):
    secret = os.urandom(64)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(os.urandom(1000) + secret)
    (tmp_path / "y.bin").write_bytes(os.urandom(5000))
    m = Markers()
    m.add(secret)
    report = scan_storage(m, [(str(tmp_path), None)])
    assert (report.files, report.bytes) == (2, 6064)
    assert {h[0] for h in report.hits} == {str(tmp_path / "a" / "x.bin")}


def _data_files(store) -> set[str]:
    return {df.path for f in store.table("entries").to_lance().get_fragments() for df in f.metadata.files}


def test_erase_rewrites_only_the_fragments_that_held_forgotten_rows(tmp_path):
    """Five appends make five fragments; the subject's entries sit in two of them, and a
    demotion left deletions in a third. The erase rewrites the two, leaves the other data
    files as they were, remaps the HNSW index instead of rebuilding it, and the scan of every
    stored byte proves nothing remains."""
    key = SigningKey.generate()
    store = LongTermStore(str(tmp_path / "lt"), keyring=KeyRing([key]), signer=key, dim=16,
                          governance=GovernancePolicy(KeyRing([GOVERNANCE]), 1))
    rng = np.random.default_rng(7)
    for batch in range(5):
        forget = batch in (1, 3)
        store.append([store.new_entry(rng.standard_normal(16), f"{'SECRET' if forget and i % 5 == 0 else 'kept'}"
                                                               f"-{batch}-{i}-padding".encode(), query="q",
                                      forget_tag="t" if forget and i % 5 == 0 else None,
                                      forget_subject="dana" if forget and i % 5 == 0 else None)
                      for i in range(200)])
    store.build_index("hot", "ivf_hnsw_sq", num_partitions=2)
    # demoted entries leave deletions in the first fragment, which the erase leaves alone
    store.demote(store.rows(["entry_id"], "payload_kind = 'summary_tokens'")["entry_id"].to_pylist()[:5])
    before, index_before = _data_files(store), store.table("entries").list_indices()[0].index_uuid
    probe = store.rows(["entry_id", "vector"], "forget_subject IS NULL").to_pylist()[:5]
    store.request_forget("dana", ForgetRequest.create(key, store.store_id, "dana"))
    planned = purge.plan(store)
    purge.approve(store, planned["purge_id"], GOVERNANCE)
    assert planned["entries"] == 80
    erased = purge.erase(store, planned["purge_id"])["removed_now"]
    assert (erased["hot"], erased["fragments_rewritten"], erased["fragments"], erased["index_rebuilds"]) == (80, 2, 6, 0)  # 5 hot, 1 cold
    after = _data_files(store)
    assert len(before & after) == 3 and len(after - before) >= 1  # three fragments untouched
    index = store.table("entries").list_indices()[0]
    assert index.index_type == "IvfHnswSq" and index.num_indexed_rows == 915 and index.index_uuid != index_before
    for row in probe:  # the remapped index still finds what it holds
        assert store.search(row["vector"], 1, record_access=False)[0].entry_id == row["entry_id"]
    assert purge.check(store, planned["purge_id"])["hits"] == 0


def test_a_centroid_that_copies_a_forgotten_vector_makes_the_erase_rebuild_the_index(tmp_path):
    """With as many IVF partitions as rows every centroid is one of the vectors: a remap
    would keep the forgotten one, so the erase rebuilds the index."""
    from memstream.longterm.store import _centroid_copies

    key = SigningKey.generate()
    store = LongTermStore(str(tmp_path / "lt"), keyring=KeyRing([key]), signer=key, dim=8,
                          governance=GovernancePolicy(KeyRing([GOVERNANCE]), 1))
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((12, 8))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    store.append([store.new_entry(v, f"entry-{i}-payload-bytes".encode(), query="q", forget_tag="t" if i == 4 else None,
                                  forget_subject="erin" if i == 4 else None) for i, v in enumerate(vectors)])
    store.build_index("hot", "ivf_flat", num_partitions=12)
    forgotten = np.asarray(vectors[4:5], np.float32)
    assert _centroid_copies(store.table("entries").to_lance(), "vector_idx", forgotten)
    store.request_forget("erin", ForgetRequest.create(key, store.store_id, "erin"))
    planned = purge.plan(store)
    purge.approve(store, planned["purge_id"], GOVERNANCE)
    erased = purge.erase(store, planned["purge_id"])["removed_now"]
    assert erased["hot"] == 1 and erased["index_rebuilds"] == 1
    assert not _centroid_copies(store.table("entries").to_lance(), "vector_idx", forgotten)
    assert purge.check(store, planned["purge_id"])["hits"] == 0
