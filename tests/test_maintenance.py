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
from memstream.crypto.signed import sign_record
from memstream.maintenance import purge
from memstream.maintenance.scan import _CHUNK, SHINGLE, Markers, scan_storage


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
    store = LongTermStore(str(tmp_path / "lt"), keyring=KeyRing([key]), signer=key, dim=8)
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
    done = purge.run(store, key)
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
