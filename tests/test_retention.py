"""Long-term memory written by the memory itself, on real LanceDB (local and S3 on SeaweedFS)
and Kafka: query-time retention through Memory.read, crashes inside a batched write, retried
batches, supersede-then-search, and the lookups that keep appends flat."""

from __future__ import annotations

import json
import multiprocessing as mp
import os

import numpy as np
import pytest
from kafka import KafkaConsumer

from memstream.crypto import KeyRing, SigningKey
from memstream.crypto.hashing import domain_hash
from memstream.errors import ReplayError
from memstream.longterm import store as store_module
from memstream.longterm import LongTermStore
from memstream.longterm.entry import query_hash
from memstream.longterm.retention import Retention, read_query
from memstream.read.memory import Memory
from tests.read_fixtures import cue, write_session
from tests import test_read as read_tests

D = read_tests.D
model, key = read_tests.model, read_tests.key  # the read tests' fixtures


def sub(backend, name: str):
    uri, opts = backend
    return f"{uri}/{name}", opts


def open_lt(where, key, dim=D, **kw) -> LongTermStore:
    uri, opts = where
    return LongTermStore(uri, keyring=KeyRing([key]), signer=key, storage_options=opts, dim=dim, **kw)


def entries_for(store: LongTermStore, n: int, seed: int, dim: int):
    """Deterministic entries (fixed timestamps): the same call signs the same bytes."""
    vecs = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return [store.new_entry(v, f"p{seed}-{i}".encode(), query=f"q{seed}-{i}", timestamp_ns=10**18 + i)
            for i, v in enumerate(vecs)]


def test_reads_retain_queries_with_provenance_flushed_on_close(backend, model, key, kafka_bootstrap, topic_name):
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    admin.create_topics([NewTopic(topic_name, num_partitions=1, replication_factor=1)])
    admin.close()
    uri, opts = sub(backend, "episodic")
    x = np.random.default_rng(3).standard_normal((2 * 4096, D)).astype(np.float32)
    write_session(uri, opts, model, key, "s", x)
    lt = open_lt(sub(backend, "lt"), key, kafka_bootstrap=kafka_bootstrap, tree_head_topic=topic_name)
    # A linger longer than the test: nothing is written before close(), which must flush it all.
    retention = Retention(lt, batch=1000, linger_s=3600)
    cues, results = [], []
    with Memory(uri, storage_options=opts, keyring=KeyRing([key]), model=model, retention=retention) as mem:
        for i in range(24):
            c = cue(x[(i * 331) % len(x)], 0.3, i)
            cues.append(c)
            results.append(mem.read(c, "s", k=2, route="episodic"))
        assert lt.count() == 0 and retention.stats.offered == 24
    st = retention.stats
    assert st.decided == 24 and 0 < st.kept <= 24 and st.written == st.kept == lt.count()
    assert st.failed == st.retries == st.already_written == 0
    rows = lt.get(lt.rows(["entry_id"])["entry_id"].to_pylist())
    expected = {query_hash(read_query("s", c)): r for c, r in zip(cues, results)}
    key_hash = domain_hash("memstream.key.v1", key.verify_key.raw).hex()
    for _, e in rows.values():
        r = expected[e.query_hash]  # the triggering query, by hash
        payload = json.loads(e.payload)
        assert payload["read_id"] == r.read_id and payload["session_id"] == "s"
        assert [f["key"] for f in payload["fragments"]] == [f.key for f in r.fragments]
        assert e.validator_key_hash == key_hash and e.payload_kind == "episodic_ref" and e.timestamp_ns > 0
        lt.inclusion_proof(e.entry_id).verify(lt.keyring)
    assert lt.verify(full=True).ok
    # Written in one batch: one tree head, published to Kafka.
    consumer = KafkaConsumer(topic_name, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest",
                             consumer_timeout_ms=5000)
    heads = [json.loads(m.value) for m in consumer]
    consumer.close()
    assert [h["tree_size"] for h in heads] == [st.kept]


def _crashing_append(uri, opts, pem: bytes, crash_at: str, seed: int) -> None:
    os.environ["MEMSTREAM_CRASH_AT"] = crash_at
    key = SigningKey.parse(pem)
    store = open_lt((uri, opts), key, dim=16, lease_ttl_s=3)  # the dead writer's leases expire soon
    store.append(entries_for(store, 8, seed, 16))


@pytest.mark.parametrize("crash_at", ["longterm.append.rows", "longterm.append.leaves"])
def test_crash_inside_a_batched_write_loses_nothing_and_doubles_nothing(backend, key, crash_at):
    uri, opts = sub(backend, "lt")
    store = open_lt((uri, opts), key, dim=16, lease_ttl_s=3)
    store.append(entries_for(store, 5, 1, 16))
    child = mp.get_context("spawn").Process(target=_crashing_append,
                                            args=(uri, opts, key.private_pem(), crash_at, 2))
    child.start()
    child.join(120)
    assert child.exitcode == -9  # killed at the crash point, mid-batch
    assert store.count() == 13  # the rows went first
    assert store.latest_tree_head().tree_size == 5  # no head covers the interrupted batch
    # The retry signs the same entries (same content, same timestamps): insert-if-absent.
    batch = entries_for(store, 8, 2, 16)
    result = store.append(batch, if_absent=True)
    assert sorted(result.entry_ids + result.skipped) == sorted(e.entry_id for e in batch)
    ids = store.rows(["entry_id"])["entry_id"].to_pylist()
    logged = store.table("merkle_log").to_lance().to_table()["entry_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 13 and sorted(logged) == sorted(ids)
    assert store.latest_tree_head().tree_size == 13
    report = store.verify(full=True)
    assert report.ok and report.rows_checked == 13, report.to_json()
    assert store.append(batch, if_absent=True).skipped == [e.entry_id for e in batch]
    with pytest.raises(ReplayError):
        store.append(batch[:1])


def test_a_failed_batch_is_retried_without_writing_twice(tmp_path, key, monkeypatch):
    lt = open_lt((str(tmp_path / "lt"), None), key)
    log_table = lt.table("merkle_log")
    calls = {"n": 0}
    real_add = type(log_table).add

    def flaky_add(self, *a, **kw):  # the rows are written, then the log write fails once
        if self is log_table and calls["n"] == 0:
            calls["n"] += 1
            raise OSError("injected: connection reset while logging leaves")
        return real_add(self, *a, **kw)

    monkeypatch.setattr(type(log_table), "add", flaky_add)
    retention = Retention(lt, batch=8, linger_s=0.01)
    rng = np.random.default_rng(5)
    for i in range(12):
        retention.offer(rng.standard_normal(D).astype(np.float32), session_id="s", read_id=f"r{i}",
                        ts_ns=10**18 + i)
    retention.close()
    st = retention.stats
    assert calls["n"] == 1 and st.retries == 1 and st.failed == 0 and st.kept > 0
    ids = lt.rows(["entry_id"])["entry_id"].to_pylist()
    assert len(ids) == len(set(ids)) == st.kept == st.written + st.already_written
    assert lt.verify(full=True).ok


def test_supersede_then_search_returns_the_newest_version(backend, key):
    store = open_lt(sub(backend, "lt"), key, dim=16)
    rng = np.random.default_rng(7)
    base = rng.standard_normal((6, 16)).astype(np.float32)
    ids = store.append([store.new_entry(v, f"v0-{i}".encode(), query=f"q{i}") for i, v in enumerate(base)]).entry_ids
    edit1 = store.supersede(ids[2], base[2], b"v1", query="edit 1").entry_ids[0]
    moved = base[2] + 0.1 * rng.standard_normal(16).astype(np.float32)
    edit2 = store.supersede(edit1, moved, b"v2", query="edit 2").entry_ids[0]
    hits = store.search(base[2], k=3)
    assert hits[0].entry_id == edit2 and hits[0].payload == b"v2" and hits[0].supersedes == edit1
    assert [h.entry_id for h in hits].count(edit2) == 1 and not {ids[2], edit1} & {h.entry_id for h in hits}
    d = 1 - moved @ base[2] / (np.linalg.norm(moved) * np.linalg.norm(base[2]))
    assert hits[0].distance == pytest.approx(d, abs=1e-5)  # the newest version's own distance
    history = store.search(base[2], k=3, history=True)
    assert {h.entry_id for h in history} == {ids[2], edit1, edit2}
    assert store.search(base[4], k=1)[0].entry_id == ids[4]  # an entry never edited is itself
    assert store.verify().ok


def test_a_reader_that_searched_before_any_edit_sees_a_later_edit_by_another_writer(tmp_path, key):
    """Search skips the edit lookup while no row supersedes another; an edit another store
    object (another process) writes afterwards must still be followed."""
    uri = (str(tmp_path / "lt"), None)
    writer, reader = open_lt(uri, key, dim=16), open_lt(uri, key, dim=16)
    rng = np.random.default_rng(3)
    base = rng.standard_normal((5, 16)).astype(np.float32)
    ids = writer.append([writer.new_entry(v, f"v0-{i}".encode(), query=f"q{i}") for i, v in enumerate(base)]).entry_ids
    assert reader.search(base[1], k=1, record_access=False)[0].entry_id == ids[1]
    edit = writer.supersede(ids[1], base[1], b"v1", query="edit").entry_ids[0]
    hit = reader.search(base[1], k=1, record_access=False)[0]
    assert hit.entry_id == edit and hit.payload == b"v1"


def test_appends_use_lookup_indexes_and_keep_refusing_replays(tmp_path, key, monkeypatch):
    monkeypatch.setattr(store_module, "LOOKUP_INDEX_EVERY", 30)
    store = open_lt((str(tmp_path / "lt"), None), key, dim=16)
    batches = [entries_for(store, 20, s, 16) for s in range(5)]
    for b in batches:
        store.append(b)
    for name, column in store_module.LOOKUP_INDEXES:
        indexed = [i.columns for i in store.table(name).list_indices()]
        # five tree heads: fewer rows than the threshold, no index yet
        assert ([column] in indexed) == (name != "tree_heads"), (name, column)
    with pytest.raises(ReplayError):
        store.append(batches[0][3:4])  # found through the index
    with pytest.raises(ReplayError):
        store.append(batches[4][:1])  # found among the rows not yet indexed
    assert store.append(batches[1] + entries_for(store, 2, 9, 16), if_absent=True).skipped == [
        e.entry_id for e in batches[1]]
    assert store.latest_tree_head().tree_size == 102
    report = store.verify()
    assert report.ok and report.rows_checked == 102


def test_retention_in_its_own_process_writes_what_reads_offered(tmp_path, model, key):
    from memstream.longterm.retention import RetentionProcess

    uri = str(tmp_path / "episodic")
    x = np.random.default_rng(4).standard_normal((4096, D)).astype(np.float32)
    write_session(uri, None, model, key, "s", x)
    lt_uri = str(tmp_path / "lt")
    retention = RetentionProcess(lt_uri, keyring=KeyRing([key]), signer=key, linger_s=3600, batch=1000)
    cues = [cue(x[i * 97], 0.3, i) for i in range(16)]
    with Memory(uri, keyring=KeyRing([key]), model=model, retention=retention) as mem:
        for c in cues:
            mem.read(c, "s", k=1, route="episodic")
    st = retention.stats
    assert st.offered == st.decided == 16 and 0 < st.kept == st.written and st.failed == 0
    lt = LongTermStore(lt_uri, keyring=KeyRing([key]))
    stored = {e.query_hash for _, e in lt.get(lt.rows(["entry_id"])["entry_id"].to_pylist()).values()}
    assert len(stored) == st.kept and stored <= {query_hash(read_query("s", c)) for c in cues}
    assert lt.verify(full=True).ok


def test_batched_leaves_are_the_canonical_encodings(key):
    """verify() hashes rows in batches (entry.table_leaves); every shape of row must give the
    id and leaf that Entry.create and Entry.leaf give through canonical_encode."""
    from memstream.longterm.entry import Entry, arrow_leaves, hex_rows, table_leaves
    from memstream.schemas.generate import to_arrow
    from memstream.schemas.records import LongTermEntry

    other = SigningKey.generate()
    rng = np.random.default_rng(12)
    es = [Entry.create(other if i % 5 == 0 else key, "store", rng.standard_normal(8), b"p" * (i % 3),
                       query=f"q{i}", forget_tag="t" if i % 4 == 1 else None,
                       forget_subject="u" if i % 4 == 1 else None, supersedes=None if i % 3 else "a" * 64,
                       payload_kind="episodic_ref" if i % 7 == 0 else "summary_tokens") for i in range(60)]
    cols = {c: [getattr(e, c) for e in es] for c in (*Entry.CONTENT, "key_id", "signature") if c != "vector"}
    assert table_leaves("store", cols, np.stack([e.vector for e in es])) == [(e.entry_id, e.leaf("store"))
                                                                              for e in es]
    # The same bytes straight from the Arrow buffers, mixed shapes in one table.
    table = to_arrow(es, LongTermEntry, 8)
    ids, leaves = arrow_leaves("store", table, np.stack([e.vector for e in es]))
    assert [bytes(h).decode() for h in hex_rows(ids)] == [e.entry_id for e in es]
    assert [bytes(lh) for lh in leaves] == [e.leaf("store") for e in es]
    cols["payload"][3] = b"changed"
    assert table_leaves("store", cols, np.stack([e.vector for e in es]))[3][0] != es[3].entry_id
