"""Long-term store on real LanceDB, local folders and S3 (SeaweedFS), and real Kafka."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import threading
import time
import uuid

import lancedb
import numpy as np
import pytest

from memstream import cli
from memstream.crypto import KeyRing, SignedTreeHead, SigningKey, verify_consistency
from memstream.errors import (AppendOnlyViolation, GovernanceError, IntegrityError, KeyDestroyedError, LeaseError,
                              ReplayError, SignatureError)
from memstream.longterm import Entry, ForgetRequest, GovernancePolicy, LongTermStore, RemovalRequest

DIM = 16


@pytest.fixture
def keys():
    return {"validator": SigningKey.generate(), "gov": [SigningKey.generate() for _ in range(3)]}


def open_store(backend, keys, **kw) -> LongTermStore:
    uri, opts = backend
    return LongTermStore(uri, keyring=KeyRing([keys["validator"]]), signer=keys["validator"], storage_options=opts,
                         dim=DIM, governance=GovernancePolicy(KeyRing(keys["gov"]), 2), **kw)


def vectors(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def fill(store: LongTermStore, n: int, seed: int = 0, **kw) -> list[str]:
    return store.append([store.new_entry(v, f"tokens-{seed}-{i}".encode(), query=f"q{seed}-{i}", **kw)
                         for i, v in enumerate(vectors(n, seed))]).entry_ids


def raw_table(backend, name="entries", cold=False):
    uri, opts = backend
    return lancedb.connect(f"{uri}/cold" if cold else uri, storage_options=opts or None).open_table(name)


def failing(report) -> set[str]:
    return {f.entry_id for f in report.failures}


def test_append_search_proofs_and_published_tree_heads(backend, keys, kafka_bootstrap, topic_name):
    from kafka import KafkaConsumer
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    admin.create_topics([NewTopic(topic_name, num_partitions=1, replication_factor=1)])
    admin.close()
    store = open_store(backend, keys, kafka_bootstrap=kafka_bootstrap, tree_head_topic=topic_name)
    vecs = vectors(13)
    first = fill(store, 13)
    second = fill(store, 7, seed=1)
    assert store.count() == 20
    hits = store.search(vecs[4], k=3)
    assert hits[0].entry_id == first[4] and hits[0].tier == "hot" and hits[0].payload == b"tokens-0-4"
    assert hits[0].distance == pytest.approx(0.0, abs=1e-5)
    heads = store.tree_heads()
    assert [h.tree_size for h in heads] == [13, 20]
    for eid in (first[0], first[12], second[6]):
        store.inclusion_proof(eid).verify(store.keyring)
    verify_consistency(13, 20, heads[0].root_hash, heads[1].root_hash, store.consistency_proof(13, 20))
    consumer = KafkaConsumer(topic_name, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest",
                             consumer_timeout_ms=10_000)
    published = []
    for msg in consumer:
        published.append(SignedTreeHead.from_json(msg.value))
        if len(published) == 2:
            break
    consumer.close()
    store.close()
    assert published == heads
    for h in published:
        h.verify(store.keyring)
    report = store.verify(trusted_head=published[-1])
    assert report.ok and report.rows_checked == 20 and report.tree_size == 20


def test_supersede_keeps_the_original(backend, keys):
    store = open_store(backend, keys)
    (orig,) = fill(store, 1)
    new = store.supersede(orig, vectors(1, 5)[0], b"revised", query="fix").entry_ids[0]
    got = store.get([orig, new])
    assert got[orig][1].payload == b"tokens-0-0" and got[orig][1].supersedes is None
    assert got[new][1].supersedes == orig and got[new][1].payload == b"revised"
    with pytest.raises(Exception, match="not in this store"):
        store.supersede("ab" * 32, vectors(1)[0], b"x", query="q")
    assert store.verify().ok


def test_update_and_delete_are_refused(backend, keys):
    store = open_store(backend, keys)
    ids = fill(store, 2)
    with pytest.raises(AppendOnlyViolation, match="supersede"):
        store.update(ids[0], payload=b"changed")
    with pytest.raises(AppendOnlyViolation, match="governance"):
        store.delete(ids[0])
    assert store.count() == 2


def test_governance_removal_needs_m_of_n(backend, keys):
    store = open_store(backend, keys)
    ids = fill(store, 5)
    req = RemovalRequest(store.store_id, (ids[1], ids[3]), "court order 42")
    outsider = SigningKey.generate()
    with pytest.raises(GovernanceError, match="1 valid governance approval"):
        store.remove(req, [req.approve(keys["gov"][0]), req.approve(keys["gov"][0]), req.approve(outsider)])
    forged = dataclasses.replace(req.approve(keys["gov"][1]), signature=bytes(64))
    with pytest.raises(GovernanceError, match="bad signature"):
        store.remove(req, [req.approve(keys["gov"][0]), forged])
    assert store.count() == 5
    receipt = store.remove(req, [req.approve(keys["gov"][0]), req.approve(keys["gov"][2])])
    assert receipt.removed == 2 and store.count() == 3
    assert set(store.get(ids)) == {ids[0], ids[2], ids[4]}
    with pytest.raises(ReplayError):
        store.remove(req, [req.approve(keys["gov"][0]), req.approve(keys["gov"][2])])
    assert store.verify().ok  # removed rows are accounted for by the approved removal


def test_forged_replayed_and_foreign_writes_are_rejected(backend, keys):
    store = open_store(backend, keys)
    (eid,) = fill(store, 1)
    stranger = SigningKey.generate()
    with pytest.raises(SignatureError):
        store.append([Entry.create(stranger, store.store_id, vectors(1)[0], b"x", query="q")])
    good = store.new_entry(vectors(1, 9)[0], b"honest", query="q")
    with pytest.raises(IntegrityError):  # content changed after signing
        store.append([dataclasses.replace(good, payload=b"forged")])
    with pytest.raises(SignatureError):  # signature bytes forged
        store.append([dataclasses.replace(good, signature=bytes(64))])
    with pytest.raises(IntegrityError):  # signed for another store
        store.append([Entry.create(keys["validator"], "another-store", vectors(1, 3)[0], b"x", query="q")])
    replay = store.get([eid])[eid][1]
    with pytest.raises(ReplayError):
        store.append([replay])
    store.append([good])
    with pytest.raises(ReplayError):
        store.append([good])
    assert store.count() == 2 and store.verify().ok


def test_key_rotation_old_rows_still_verify(backend, keys):
    store = open_store(backend, keys)
    old_ids = fill(store, 3)
    new_key = SigningKey.generate()
    uri, opts = backend
    ring = KeyRing([keys["validator"], new_key])
    rotated = LongTermStore(uri, keyring=ring, signer=new_key, storage_options=opts, dim=DIM)
    new_ids = fill(rotated, 2, seed=4)
    report = rotated.verify()
    assert report.ok and report.rows_checked == 5
    without_old = LongTermStore(uri, keyring=KeyRing([new_key]), storage_options=opts, dim=DIM)
    report = without_old.verify()
    assert set(old_ids) <= failing(report) and not set(new_ids) & failing(report)


def test_verify_names_rows_stored_twice_and_rows_never_logged(tmp_path, keys):
    """Both ways of matching rows to the log (sorted ids, and Arrow's hash lookups once an id
    repeats) name the same failures."""
    backend = (str(tmp_path / "ltm"), {})
    store = open_store(backend, keys)
    ids = fill(store, 6)
    raw = raw_table(backend)
    stray = store.new_entry(vectors(1, 9)[0], b"never logged", query="stray")
    raw.add(store._rows([stray]))  # a valid signed row that no append logged
    assert failing(store.verify()) == {stray.entry_id}
    assert "not in the Merkle log" in store.verify().failures[0].reason
    raw.add(raw.search().where(f"entry_id = '{ids[2]}'").to_arrow())  # the same row twice
    report = store.verify()
    assert failing(report) == {stray.entry_id, ids[2]}
    assert {f.reason for f in report.failures} == {"not in the Merkle log", "entry id appears twice in the table"}


def test_tampering_with_any_stored_field_is_caught(backend, keys):
    store = open_store(backend, keys)
    ids = fill(store, 14)
    raw = raw_table(backend)
    edits = {  # one row per field, each changed behind the store's back
        "vector": "[" + ",".join(["0.5"] * DIM) + "]", "payload": "X'00'", "payload_kind": "'episodic_ref'",
        "validator_key_hash": "'" + "0" * 64 + "'", "query_hash": "'" + "1" * 64 + "'",
        "timestamp_ns": "timestamp_ns + 1", "forget_tag": "'t'", "forget_subject": "'s'",
        "supersedes": f"'{ids[0]}'", "key_id": "'" + "2" * 32 + "'", "signature": "X'" + "00" * 64 + "'",
    }
    for i, (column, sql) in enumerate(edits.items()):
        raw.update(where=f"entry_id = '{ids[i]}'", values_sql={column: sql})
    changed_id = "f" * 64
    raw.update(where=f"entry_id = '{ids[11]}'", values_sql={"entry_id": f"'{changed_id}'"})
    raw.delete(f"entry_id = '{ids[12]}'")
    report = store.verify()
    assert failing(report) == set(ids[:13]) | {changed_id}
    reasons = {f.entry_id: f.reason for f in report.failures}
    assert "no row" in reasons[ids[12]] and "no row" in reasons[ids[11]]
    assert not report.log_failures
    # The log itself: a changed leaf no longer matches the signed tree head.
    raw_log = raw_table(backend, "merkle_log")
    raw_log.update(where="leaf_index = 13", values_sql={"leaf_hash": "X'" + "ab" * 32 + "'"})
    report = store.verify()
    assert ids[13] in failing(report) and any("root does not match" in m for m in report.log_failures)


def test_flipped_byte_in_a_data_file_is_caught(tmp_path, keys):
    backend = (str(tmp_path / "ltm"), {})
    store = open_store(backend, keys)
    vecs = vectors(6, seed=2)
    ids = fill(store, 6, seed=2)
    needle = vecs[3].tobytes()
    files = [p for p in (tmp_path / "ltm" / "entries.lance" / "data").iterdir() if needle in p.read_bytes()]
    assert len(files) == 1
    data = bytearray(files[0].read_bytes())
    at = data.index(needle) + 5
    data[at] ^= 0x01
    files[0].write_bytes(bytes(data))
    report = store.verify()
    assert failing(report) == {ids[3]}


def test_demote_to_cold_and_search_across_tiers(backend, keys):
    store = open_store(backend, keys)
    vecs = vectors(20, seed=6)
    ids = fill(store, 20, seed=6)
    moved = store.demote(ids[:5])
    assert sorted(moved) == sorted(ids[:5]) and store.count("hot") == 15 and store.count("cold") == 5
    assert store.search(vecs[2], k=1)[0].entry_id != ids[2]  # hot-only search cannot see it
    hit = store.search(vecs[2], k=1, include_cold=True)[0]
    assert hit.entry_id == ids[2] and hit.tier == "cold"
    assert store.search(vecs[10], k=1, include_cold=True)[0].tier == "hot"
    assert store.verify().ok
    # A tampered hot row is never demoted: the cold copy must verify.
    raw_table(backend).update(where=f"entry_id = '{ids[7]}'", values_sql={"payload": "X'01'"})
    with pytest.raises(IntegrityError, match="refusing to demote"):
        store.demote([ids[7]])
    assert store.count("cold") == 5


def test_retrieval_stats_are_kept_without_touching_signed_rows(backend, keys):
    store = open_store(backend, keys)
    vecs = vectors(6, seed=8)
    ids = fill(store, 6, seed=8)
    version = raw_table(backend).version
    for _ in range(3):
        store.search(vecs[0], k=1)
    store.search(vecs[1], k=1)
    stats = store.retrieval_stats(ids[:3])
    assert stats[ids[0]].count == 3 and stats[ids[1]].count == 1 and stats[ids[2]].count == 0
    assert stats[ids[0]].last_ns >= stats[ids[1]].last_ns - 10**9
    assert store.merge_access_log() == 4
    store.search(vecs[0], k=1)
    assert store.retrieval_stats([ids[0]])[ids[0]].count == 4
    assert raw_table(backend).version == version  # the signed table was never rewritten
    assert store.verify().ok


def test_request_forget_records_a_signed_request(backend, keys):
    store = open_store(backend, keys)
    fill(store, 3, forget_tag="chat", forget_subject="user-17")
    fill(store, 2, seed=1)
    req = ForgetRequest.create(keys["gov"][0], store.store_id, "user-17")
    ticket = store.request_forget("user-17", req)
    assert ticket.matched == 3
    with pytest.raises(ReplayError):
        store.request_forget("user-17", req)
    with pytest.raises(SignatureError):
        store.request_forget("user-18", ForgetRequest.create(keys["gov"][0], store.store_id, "user-17"))
    with pytest.raises(SignatureError):
        store.request_forget("user-17", ForgetRequest.create(SigningKey.generate(), store.store_id, "user-17"))
    with pytest.raises(Exception, match="subject"):
        store.new_entry(vectors(1)[0], b"x", query="q", forget_tag="chat")


def test_subject_bound_payloads_are_sealed_under_the_subjects_key(backend, keys, tmp_path):
    """With a key table, a payload bound to a forget subject is sealed before it is signed: no
    stored byte holds it, a reader with the key table gets it back, the store verifies without
    any key, a retried write makes the same entry, and destroying the subject's key leaves it
    unreadable (None) while other subjects' and unbound payloads still read."""
    import os

    from memstream.crypto.datakeys import MasterKey, subject_key_id
    from memstream.longterm.entry import payload_sealed, subject_hash
    from memstream.storage.keytable import KeyTable
    from memstream.storage.objects import iter_objects, read_object

    master = MasterKey.generate()
    table = KeyTable(str(tmp_path / "keys"), None, master)
    uri, opts = backend
    store = LongTermStore(uri, keyring=KeyRing([keys["validator"]]), signer=keys["validator"], storage_options=opts,
                          dim=DIM, keys=table)
    v = vectors(3, seed=9)
    secret, other, free = (f"{name}-{os.urandom(12).hex()}".encode() for name in ("SECRET", "OTHER", "FREE"))
    made = [store.new_entry(v[0], secret, query="q0", forget_subject="user-1", timestamp_ns=5),
            store.new_entry(v[1], other, query="q1", forget_subject="user-2"),
            store.new_entry(v[2], free, query="q2")]
    again = store.new_entry(v[0], secret, query="q0", forget_subject="user-1", timestamp_ns=5)
    assert again.entry_id == made[0].entry_id and again.payload == made[0].payload  # a retry is the same entry
    assert payload_sealed(made[0].payload, made[0].forget_subject) and secret not in made[0].payload
    assert made[2].payload == free
    store.append(made)
    blobs = [read_object(uri, k, opts or None) for k, _ in iter_objects(uri, opts or None)]
    assert not any(secret in b or other in b for b in blobs) and any(free in b for b in blobs)
    assert [store.search(x, k=1)[0].payload for x in v] == [secret, other, free]
    (_, entry), = store.get([made[0].entry_id]).values()
    assert entry.payload == made[0].payload and store.payload(entry) == secret
    keyless = LongTermStore(uri, keyring=KeyRing([keys["validator"]]), storage_options=opts, dim=DIM)
    assert keyless.verify().ok and keyless.verify(full=True).ok  # signed over the sealed bytes
    assert [keyless.search(x, k=1)[0].payload for x in v] == [None, None, free]

    table.destroy(subject_key_id(subject_hash("user-1")))
    reader = LongTermStore(uri, keyring=KeyRing([keys["validator"]]), signer=keys["validator"], storage_options=opts,
                           dim=DIM, keys=KeyTable(str(tmp_path / "keys"), None, master))
    assert [reader.search(x, k=1)[0].payload for x in v] == [None, other, free]
    with pytest.raises(Exception, match="forgotten"):
        reader.new_entry(v[0], b"new", query="q3", forget_subject="user-1")

    # A subject forgotten by a forget request: the approved purge destroys its key too.
    from memstream.maintenance import purge

    lt = LongTermStore(uri, keyring=KeyRing([keys["validator"]]), signer=keys["validator"], storage_options=opts,
                       dim=DIM, governance=GovernancePolicy(KeyRing(keys["gov"]), 2), keys=reader.keys)
    lt.request_forget("user-2", ForgetRequest.create(keys["validator"], lt.store_id, "user-2"))
    purge.run(lt, SigningKey.generate(), approvers=keys["gov"][:2])
    with pytest.raises(KeyDestroyedError):
        reader.keys.data_key(subject_key_id(subject_hash("user-2")))
    assert lt.count("hot") == 2 and lt.search(v[2], k=1)[0].payload == free


def _writer_proc(uri, opts, pem, worker, batches, per_batch, go):
    key = SigningKey.parse(pem)
    store = LongTermStore(uri, keyring=KeyRing([key]), signer=key, storage_options=opts, dim=DIM)
    go.wait(60)
    for b in range(batches):
        vecs = vectors(per_batch, seed=1000 * worker + b)
        store.append([store.new_entry(v, f"w{worker}b{b}i{i}".encode(), query=f"{worker}-{b}-{i}")
                      for i, v in enumerate(vecs)])


def test_concurrent_writer_processes_lose_no_rows(backend, keys):
    uri, opts = backend
    store = open_store(backend, keys)
    ctx = mp.get_context("spawn")
    go = ctx.Event()
    procs = [ctx.Process(target=_writer_proc, args=(uri, opts, keys["validator"].private_pem(), w, 3, 8, go))
             for w in range(3)]
    for p in procs:
        p.start()
    time.sleep(0.5)
    go.set()
    for p in procs:
        p.join(180)
        assert p.exitcode == 0
    assert store.count() == 72
    heads = store.tree_heads()
    assert [h.tree_size for h in heads] == [8 * i for i in range(1, 10)]
    report = store.verify()
    assert report.ok and report.rows_checked == 72 and report.tree_size == 72


def test_maintenance_excludes_writers(backend, keys):
    uri, opts = backend
    store = open_store(backend, keys)
    fill(store, 2)
    ctx = mp.get_context("spawn")
    go = ctx.Event()
    go.set()
    with store.leases.maintenance():
        writer = ctx.Process(target=_writer_proc, args=(uri, opts, keys["validator"].private_pem(), 1, 1, 4, go))
        writer.start()
        time.sleep(4)  # the writer has started and is waiting for the lease
        assert writer.is_alive() and store.count() == 2
    writer.join(60)
    assert writer.exitcode == 0 and store.count() == 6
    # And the other way round: cleanup waits for an active writer, then gives up.
    with store.leases.writer():
        blocked = []
        t = threading.Thread(target=lambda: blocked.append(_try_maintenance(store)))
        t.start()
        t.join(30)
    assert blocked == ["LeaseError"]
    store.compact(cleanup_older_than=__import__("datetime").timedelta(0))
    assert store.count() == 6 and store.verify().ok


def _try_maintenance(store):
    try:
        with store.leases.maintenance(timeout_s=1.0):
            return "entered"
    except LeaseError:
        return "LeaseError"


def test_ann_index_recall_at_10(tmp_path, keys):
    store = open_store((str(tmp_path / "ltm"), {}), keys)
    rng = np.random.default_rng(11)
    centers = rng.standard_normal((40, DIM)).astype(np.float32)
    base = centers[rng.integers(0, 40, 3000)] + 0.3 * rng.standard_normal((3000, DIM)).astype(np.float32)
    ids = []
    for chunk in np.array_split(base, 3):
        ids += store.append([store.new_entry(v, b"", query=str(uuid.uuid4())) for v in chunk]).entry_ids
    store.build_index(num_partitions=16)
    ids = np.asarray(ids)
    unit = base / np.linalg.norm(base, axis=1, keepdims=True)
    queries = centers[rng.integers(0, 40, 30)] + 0.3 * rng.standard_normal((30, DIM)).astype(np.float32)
    recall = []
    for q in queries:
        exact = set(ids[np.argsort(-(unit @ (q / np.linalg.norm(q))))[:10]])
        recall.append(len(exact & {h.entry_id for h in store.search(q, 10, nprobes=6, record_access=False)}) / 10)
    assert np.mean(recall) >= 0.95


def test_cli_verify_longterm_lists_failing_rows(tmp_path, keys, capsys):
    backend = (str(tmp_path / "ltm"), {})
    store = open_store(backend, keys)
    ids = fill(store, 4)
    pub = tmp_path / "validator.pub"
    pub.write_text(keys["validator"].verify_key.hex())
    assert cli.main(["verify", "longterm", backend[0], "--public-key", str(pub)]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    raw_table(backend).update(where=f"entry_id = '{ids[2]}'", values_sql={"payload": "X'ff'"})
    assert cli.main(["verify", "longterm", backend[0], "--public-key", keys["validator"].verify_key.hex()]) == 1
    out = json.loads(capsys.readouterr().out)
    assert [f["entry_id"] for f in out["failures"]] == [ids[2]]


def test_lease_objects_use_conditional_put(backend):
    from memstream.storage.objects import object_store

    uri, opts = backend
    objects = object_store(uri, opts)
    assert objects.put_if_absent("_leases/probe", b"first")
    assert not objects.put_if_absent("_leases/probe", b"second")  # If-None-Match / O_EXCL
    assert objects.get("_leases/probe") == b"first"
    assert objects.list("_leases") == ["_leases/probe"]
    objects.delete("_leases/probe")
    assert objects.get("_leases/probe") is None and objects.put_if_absent("_leases/probe", b"third")
