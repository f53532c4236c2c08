"""The maintenance DAGs: integrity (BundleDagBag, schedules, Params and their validation) and
each DAG run with ``dag.test()`` on real LanceDB tables, in a local folder and on S3.

Airflow reads its configuration when first imported, so the environment (a throwaway
SQLite database, this repository's dags/ folder) is set by the ``airflow_db`` fixture before
any airflow import, and one test process runs every DAG (the first ``dag.test()`` costs
seconds, the next ones a fraction). Each test loads a fresh DAG object: Params of one run
would otherwise leak into the next run of the same object.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import memstream.dags
from memstream.episodic.chain import seal
from memstream.crypto import KeyRing, SigningKey
from memstream.schemas.records import SummaryRecord

DAGS = Path(memstream.dags.__file__).resolve().parent
DAG_IDS = {"episodic_decay", "session_gc", "longterm_cold_demotion", "forget_purge", "longterm_compaction",
           "longterm_anchoring", "session_consolidation", "session_forget"}
KEY_ENV = "MEMSTREAM_TEST_MAINTENANCE_KEY"
VALIDATOR_ENV = "MEMSTREAM_TEST_VALIDATOR_KEY"
DAY_NS = 86400 * 10**9


@pytest.fixture(scope="module")
def airflow_db(tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow")
    env = {"AIRFLOW_HOME": str(home), "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from airflow.utils import db

    db.resetdb()
    yield home
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def load_dag(dag_id: str):
    from airflow.dag_processing.dagbag import BundleDagBag

    bag = BundleDagBag(dag_folder=DAGS / f"{dag_id}.py", bundle_path=DAGS, bundle_name="memstream-dags")
    assert not bag.import_errors, bag.import_errors
    return bag.dags[dag_id]


def run_dag(dag_id: str, conf: dict):
    started = time.monotonic()
    dr = load_dag(dag_id).test(run_conf=conf)
    states = {ti.task_id: ti.state for ti in dr.get_task_instances()}
    assert dr.state == "success", f"{dag_id}: {dr.state} {states}"
    return time.monotonic() - started


@pytest.fixture
def key(monkeypatch):
    """The maintenance key, in KEY_ENV."""
    k = SigningKey.generate()
    monkeypatch.setenv(KEY_ENV, k.private_pem().decode())
    return k


@pytest.fixture
def validator(monkeypatch):
    """A validator key of its own, in VALIDATOR_ENV: roles never share a key."""
    k = SigningKey.generate()
    monkeypatch.setenv(VALIDATOR_ENV, k.private_pem().decode())
    return k


# -- integrity ---------------------------------------------------------------------------

def test_dag_integrity(airflow_db):
    from airflow.dag_processing.dagbag import BundleDagBag

    bag = BundleDagBag(dag_folder=DAGS, bundle_path=DAGS, bundle_name="memstream-dags")
    assert bag.import_errors == {}
    assert set(bag.dag_ids) == DAG_IDS
    schedules = {d: bag.dags[d].schedule for d in DAG_IDS}
    assert [a.name for a in schedules.pop("longterm_compaction")] == ["memstream_longterm_store"]
    assert schedules.pop("session_forget") is None  # triggered with the sessions to forget
    assert schedules == {"episodic_decay": "@hourly", "session_gc": "@daily", "longterm_cold_demotion": "@daily",
                         "forget_purge": "@hourly", "longterm_anchoring": "@hourly",
                         "session_consolidation": "@hourly"}
    for dag_id in DAG_IDS:
        dag = bag.dags[dag_id]
        dag.check_cycle()
        assert dag.catchup is False and dag.max_active_runs == 1
        assert dag.default_args["retries"] >= 1
        dag.params.validate()  # every default is valid: scheduled runs need no configuration
    assert set(bag.dags["episodic_decay"].params) == {"episodic_uri", "storage_options", "storage_options_env",
                                                      "k", "slope", "cutoff", "dry_run"}
    assert bag.dags["episodic_decay"].params["k"] == 64
    assert bag.dags["longterm_cold_demotion"].params["not_retrieved_days"] == 90
    assert {"retention_hours", "key_env", "key_file", "dry_run"} <= set(
        bag.dags["session_gc"].params)
    assert [t.task_id for t in bag.dags["forget_purge"].topological_sort()] == ["plan", "erase", "scan_storage",
                                                                               "attest"]
    outlets = {d: {a.name for t in bag.dags[d].tasks for a in t.outlets} for d in DAG_IDS}
    assert outlets["forget_purge"] == outlets["longterm_cold_demotion"] == {"memstream_longterm_store"}
    assert outlets["episodic_decay"] == outlets["session_gc"] == {"memstream_episodic_store"}


@pytest.mark.parametrize("dag_id,bad", [
    ("episodic_decay", {"k": -1}),
    ("episodic_decay", {"cutoff": 0.5}),
    ("episodic_decay", {"episodic_uri": "relative/folder"}),
    ("episodic_decay", {"storage_options": {"allow_http": True}}),
    ("session_gc", {"retention_hours": 0}),
    ("session_gc", {"episodic_uri": "relative/folder"}),
    ("session_gc", {"require_consolidation": "no"}),
    ("session_consolidation", {"top": 0}),
    ("session_consolidation", {"longterm_uri": "relative/folder"}),
    ("longterm_cold_demotion", {"not_retrieved_days": "ninety"}),
    ("forget_purge", {"longterm_uri": "http://example.org/store"}),
    ("session_forget", {"session_ids": "alice"}),
    ("session_forget", {"session_ids": [""]}),
    ("session_forget", {"kafka_log_dirs": ["relative/logs"]}),
    ("longterm_compaction", {"reindex_unindexed_fraction": 2}),
])
def test_params_reject_bad_values(airflow_db, dag_id, bad):
    from airflow.sdk.exceptions import ParamValidationError

    dag = load_dag(dag_id)
    with pytest.raises(ParamValidationError):
        dag.test(run_conf=bad)


# -- episodic ----------------------------------------------------------------------------

def summaries(key: SigningKey, session: str, n: int, produced_us: int, closed: bool = False) -> list[SummaryRecord]:
    out, prev = [], b""
    for w in range(n):
        r = seal(SummaryRecord(
            schema_version=2, session_id=session, window_index=w, seq_start=w * 4096, seq_end=(w + 1) * 4096,
            cut="close" if closed and w == n - 1 else "full", token_count=4, dim=8, tokens_dtype="fp32", tokens=np.full((4, 8), w, np.float32).tobytes(),
            operator_version="test", producer_id=b"\x01" * 16, latents_dtype="fp32", latent_dim=8,
            event_time_us=produced_us, prev_hash=prev, hash=b"", signature=b"", key_id=""), key)
        out.append(r)
        prev = r.hash
    return out


def test_episodic_decay(airflow_db, backend, key):
    from memstream.episodic.store import EpisodicStore
    from memstream.episodic.ledger import ReadLedger

    uri, so = backend
    store, ledger = EpisodicStore(uri, so or None), ReadLedger(uri, so or None, flush_every=1000)
    store.append(summaries(key, "s-decay", 5, produced_us=1))
    store.append(summaries(key, "s-fresh", 3, produced_us=1))
    reads = {10: [0], 30: [1], 97: [2]}
    for i in range(100):
        ledger.record("s-decay", reads.get(i, []), ts_ns=10_000_000 + i)
        if i >= 90:
            ledger.record("s-fresh", [0, 1, 2], ts_ns=10_000_000 + i)
    ledger.flush()
    conf = {"episodic_uri": uri, "storage_options": so, "k": 64, "slope": 0.125, "cutoff": -2.0}

    run_dag("episodic_decay", {**conf, "dry_run": True})
    assert sorted(store.stored_at_ns("s-decay")) == [0, 1, 2, 3, 4] and ledger.biases("s-decay") == {}

    # staleness at 100 queries: w0 89, w1 69, w2 2, w3 100, w4 100 (the head: never evicted)
    took = run_dag("episodic_decay", conf)
    assert sorted(store.stored_at_ns("s-decay")) == [1, 2, 4]
    assert ledger.biases("s-decay") == pytest.approx({1: -0.625, 2: 0.0, 4: -4.5})
    assert sorted(store.stored_at_ns("s-fresh")) == [0, 1, 2] and set(ledger.biases("s-fresh").values()) == {0.0}

    for i in range(11):  # w1 at staleness 80: bias exactly the cutoff, kept
        ledger.record("s-decay", [2], ts_ns=20_000_000 + i)
    ledger.flush()
    run_dag("episodic_decay", conf)
    assert sorted(store.stored_at_ns("s-decay")) == [1, 2, 4]
    assert ledger.biases("s-decay")[1] == pytest.approx(-2.0)

    ledger.record("s-decay", [2], ts_ns=30_000_000)  # staleness 81: below the cutoff
    ledger.flush()
    run_dag("episodic_decay", conf)
    assert sorted(store.stored_at_ns("s-decay")) == [2, 4]
    assert set(ledger.biases("s-decay")) == {2, 4}
    assert ledger.query_count("s-decay") == 112  # reads are never evicted: they are the count
    print(f"episodic_decay dag.test: {took:.2f}s")


def test_session_gc(airflow_db, backend, key, validator):
    from memstream.longterm.entry import query_hash
    from memstream.maintenance.consolidate import consolidation_query
    from memstream.episodic.store import EpisodicStore
    from memstream.crypto.signed import verify_record
    from memstream.maintenance.episodic import gc_records
    from memstream.episodic.ledger import ReadLedger

    uri, so = backend
    now_us = time.time_ns() // 1000
    old_us = now_us - 10 * 86400 * 10**6
    store, ledger = EpisodicStore(uri, so or None), ReadLedger(uri, so or None)
    sessions = {"gc-closed": now_us, "gc-idle": old_us, "gc-active": old_us, "gc-unpublished": old_us}
    heads = {}
    for sid, produced in sessions.items():
        recs = summaries(key, sid, 3, produced, closed=sid == "gc-closed")  # its chain ends in the close
        store.append(recs)
        heads[sid] = recs[-1].hash
        if sid != "gc-unpublished":
            store.mark_published(recs)
    ledger.record("gc-idle", [1], ts_ns=(old_us + 10**6) * 1000)
    ledger.record("gc-active", [2], ts_ns=time.time_ns() - 3600 * 10**9)
    ledger.record("gc-reads-only", [], ts_ns=old_us * 1000)
    ledger.record("gc-closed", [0], ts_ns=time.time_ns())
    ledger.flush()
    conf = {"episodic_uri": uri, "storage_options": so, "retention_hours": 24.0, "key_env": KEY_ENV}

    run_dag("session_gc", {**conf, "dry_run": True})
    assert gc_records(uri, so or None) == [] and len(store.sessions()) == 4

    # GC waits for consolidation: no session with stored summaries goes before its record.
    run_dag("session_gc", conf)
    assert len(store.sessions()) == 4 and [r.session_id for r in gc_records(uri, so or None)] == ["gc-reads-only"]

    lt_uri = f"{uri}/longterm"
    lt = longterm((lt_uri, so), validator, dim=8)
    lt_conf = {**conf, "longterm_uri": lt_uri, "validator_keys": [validator.verify_key.hex()],
               "validator_key_env": VALIDATOR_ENV}
    run_dag("session_consolidation", {**lt_conf, "dry_run": True})
    assert lt.count() == 0 and store.consolidation("gc-idle") is None
    run_dag("session_consolidation", lt_conf)
    cons = {s: store.consolidation(s, heads[s]) for s in ("gc-closed", "gc-idle")}
    assert store.consolidation("gc-active") is None and store.consolidation("gc-unpublished") is not None
    assert [(c.summaries[0].split(":")[0], c.reads) for c in cons.values()] == [("0", [1]), ("1", [1])]
    for c in cons.values():
        verify_record(c, KeyRing([key]))
    written = lt.get([i for c in cons.values() for i in c.entry_ids])
    assert len(written) == 2 and lt.verify(full=True).ok
    window = {r.window_index: r for r in store.records("gc-idle")}[1]
    entry = written[cons["gc-idle"].entry_ids[0]][1]
    assert entry.query_hash == query_hash(consolidation_query(window))
    assert entry.payload == window.token_array().astype(np.float16).tobytes()
    run_dag("session_consolidation", lt_conf)  # idempotent: no second entry, no second record
    assert lt.count() == 2 and store.consolidation("gc-idle", heads["gc-idle"]) == cons["gc-idle"]

    run_dag("session_gc", conf)
    assert store.sessions() == ["gc-active", "gc-unpublished"]
    assert ledger.sessions() == ["gc-active"]
    records = {r.session_id: r for r in gc_records(uri, so or None)}
    assert {s: r.reason for s, r in records.items()} == {"gc-closed": "closed", "gc-idle": "idle",
                                                         "gc-reads-only": "idle"}
    assert (records["gc-closed"].summaries_removed, records["gc-closed"].reads_removed) == (3, 1)
    assert records["gc-idle"].head_hash == heads["gc-idle"] and records["gc-idle"].head_window_index == 2
    assert records["gc-reads-only"].head_window_index is None and records["gc-reads-only"].reads_removed == 1
    for r in records.values():
        verify_record(r, KeyRing([key]))
    with pytest.raises(Exception):
        verify_record(dataclasses.replace(records["gc-idle"], summaries_removed=0), KeyRing([key]))

    run_dag("session_gc", conf)  # nothing left to collect; no second record
    assert len(gc_records(uri, so or None)) == 3 and store.sessions() == ["gc-active", "gc-unpublished"]


# -- long-term ---------------------------------------------------------------------------

def longterm(where, key, **kw):
    from memstream.longterm import LongTermStore

    uri, so = where
    kw.setdefault("dim", 16)
    return LongTermStore(uri, keyring=KeyRing([key]), signer=key, storage_options=so or None, **kw)


def test_cold_demotion(airflow_db, backend, key):
    store = longterm(backend, key)
    now = time.time_ns()
    rng = np.random.default_rng(1)
    ages = {"old-never": 100, "old-read-now": 100, "old-read-long-ago": 100, "fresh": 10, "old-read-80d": 120}
    entries = {name: store.new_entry(rng.standard_normal(16), name.encode() * 4, query=name,
                                     timestamp_ns=now - age * DAY_NS) for name, age in ages.items()}
    store.append(list(entries.values()))
    ids = {name: e.entry_id for name, e in entries.items()}
    hits = store.search(entries["old-read-now"].vector, k=1)
    assert [h.entry_id for h in hits] == [ids["old-read-now"]]
    store.close()  # flushes the access log
    store.table("access_log").add(pa.table({
        "entry_id": [ids["old-read-long-ago"], ids["old-read-80d"]], "ts_ns": [now - 95 * DAY_NS, now - 80 * DAY_NS],
        "tier": ["hot", "hot"]}, schema=store.table("access_log").schema))
    uri, so = backend
    conf = {"longterm_uri": uri, "storage_options": so, "validator_keys": [key.verify_key.hex()],
            "not_retrieved_days": 90}

    run_dag("longterm_cold_demotion", {**conf, "dry_run": True})
    assert store.count("cold") == 0

    run_dag("longterm_cold_demotion", conf)
    cold = set(store.rows(["entry_id"], tier="cold")["entry_id"].to_pylist())
    hot = set(store.rows(["entry_id"])["entry_id"].to_pylist())
    assert cold == {ids["old-never"], ids["old-read-long-ago"]}
    assert hot == {ids["old-read-now"], ids["fresh"], ids["old-read-80d"]}
    assert store.table("access_log").count_rows() == 0  # merged into access_stats
    report = store.verify()
    assert report.ok and report.rows_checked == 5, report.to_json()

    run_dag("longterm_cold_demotion", conf)  # idempotent
    assert store.count("cold") == 2 and store.count("hot") == 3


def stored_bytes(where) -> list[bytes]:
    from memstream.maintenance.scan import iter_objects, read_object

    uri, so = where
    return [read_object(uri, k, so or None) for k, _ in iter_objects(uri, so or None)]


def test_forget_purge(airflow_db, backend, key, validator):
    from memstream.longterm import ForgetRequest
    from memstream.crypto.signed import verify_record
    from memstream.maintenance import purge

    from memstream.longterm.entry import GovernancePolicy

    gov = [SigningKey.generate(), SigningKey.generate()]
    store = longterm(backend, validator, maintenance_keys=[key.verify_key],  # key: the maintenance key
                     governance=GovernancePolicy(KeyRing(gov), 2))
    rng = np.random.default_rng(2)
    secret = {}
    batch = []
    for i in range(60):
        subject, tag = [("alice@example.org", "chat"), ("alice@example.org", "profile"), ("bob@example.org", "chat"),
                        (None, None)][i % 4]
        marker = f"{'FORGET-' if subject and subject.startswith('alice') else 'KEEP-'}{i:03d}-{os.urandom(6).hex()}"
        e = store.new_entry(rng.standard_normal(16), marker.encode() * 2, query=f"q{i}", forget_tag=tag,
                            forget_subject=subject)
        batch.append(e)
        if marker.startswith("FORGET"):
            secret[e.entry_id] = e
    store.append(batch[:30])
    store.append(batch[30:])
    kept = {e.entry_id: e for e in batch if e.entry_id not in secret}
    # one forgotten and one kept entry in the cold tier; a vector index over the hot tier
    store.demote([next(iter(secret)), next(iter(kept))])
    store.build_index("hot", num_partitions=4)
    store.search(batch[5].vector, k=3)
    store.close()
    store.request_forget("alice@example.org", ForgetRequest.create(validator, store.store_id, "alice@example.org"))

    def leftovers():
        blobs = stored_bytes(backend)
        found = set()
        for e in secret.values():
            for name, needle in (("payload", e.payload), ("vector", np.asarray(e.vector, "<f4").tobytes()[:32]),
                                 ("signature", e.signature)):
                if any(needle in b for b in blobs):
                    found.add(name)
        if any(b"alice@example.org" in b for b in blobs):
            found.add("subject")
        return found

    assert leftovers() == {"payload", "vector", "signature"}  # the scan sees them before the purge
    uri, so = backend
    conf = {"longterm_uri": uri, "storage_options": so, "key_env": KEY_ENV,
            "validator_keys": [validator.verify_key.hex()], "governance_keys": [g.verify_key.hex() for g in gov]}
    run_dag("forget_purge", conf)  # planned, not approved yet: nothing is erased
    assert leftovers() == {"payload", "vector", "signature"} and purge.attestations(store) == []
    (pending,) = store.table("purges").to_lance().to_table(columns=["purge_id"]).to_pylist()
    for g in gov:
        purge.approve(store, pending["purge_id"], g)
    took = run_dag("forget_purge", conf)
    assert leftovers() == set()
    (att,) = purge.attestations(store)
    verify_record(att, KeyRing([key]))
    assert att.entry_ids == sorted(secret) and (att.removed_hot, att.removed_cold) == (29, 1)
    assert att.files_scanned > 10 and att.markers == 30 * 9
    assert b"FORGET" not in att.to_json()
    assert store.count("hot") + store.count("cold") == len(kept)
    got = store.get(list(kept))
    assert set(got) == set(kept) and all(got[i][1].payload == kept[i].payload for i in kept)
    assert [h.entry_id for h in store.search(batch[3].vector, k=1)] == [batch[3].entry_id]
    report = store.verify()
    assert report.ok and report.rows_checked == len(kept) and report.tree_size == 60, report.to_json()

    run_dag("forget_purge", conf)
    assert len(purge.attestations(store)) == 1  # nothing pending: no second purge
    print(f"forget_purge dag.test: {took:.2f}s")


def test_session_forget(airflow_db, backend, key, validator, tmp_path):
    """session_forget on real LanceDB (local and S3): the named session's data key, summaries,
    publish marks and reads are gone, the others' stay, its long-term entry is planned for the
    governance-approved purge; the run's proof scan fails when a copy of the key survives."""
    from memstream.crypto.datakeys import MasterKey, session_key_id
    from memstream.episodic.ledger import ReadLedger
    from memstream.episodic.store import EpisodicStore
    from memstream.longterm.entry import GovernancePolicy, session_subject
    from memstream.maintenance import purge
    from memstream.storage.keytable import KeyTable
    from memstream.storage.objects import object_store
    from tests.test_forget import store_sealed_summaries

    root, so = backend
    uri = f"{root}/episodic"
    master_file = str(MasterKey.generate().write(tmp_path / "master.key"))
    keys = KeyTable(uri, so or None, MasterKey.from_file(master_file))
    store = EpisodicStore(uri, so or None)
    rng = np.random.default_rng(5)
    sealed = {sid: store_sealed_summaries(uri, so or None, keys, validator, sid, 3, rng) for sid in ("F", "K", "L")}
    gov = SigningKey.generate()
    lt = longterm((f"{root}/lt", so), validator, dim=384, maintenance_keys=[key.verify_key],
                  governance=GovernancePolicy(KeyRing([gov]), 1))
    lt.append([lt.new_entry(rng.standard_normal(384), f"about {sid}".encode(), query=f"q-{sid}",
                            forget_subject=session_subject(sid)) for sid in ("F", "K")])
    conf = {"session_ids": ["F"], "episodic_uri": uri, "storage_options": so, "master_key_file": master_file,
            "key_env": KEY_ENV, "validator_key_env": VALIDATOR_ENV, "longterm_uri": f"{root}/lt",
            "validator_keys": [validator.verify_key.hex()], "governance_keys": [gov.verify_key.hex()]}
    run_dag("session_forget", conf)

    fresh = KeyTable(uri, so or None, MasterKey.from_file(master_file))
    assert fresh.destroyed(session_key_id("F")) and not fresh.destroyed(session_key_id("K"))
    assert store.records("F") == [] and [r.tokens for r in store.records("K")] == sealed["K"]
    with ReadLedger(uri, so or None) as ledger:
        assert ledger.query_count("F") == 0 and ledger.query_count("K") == 1
    blobs = stored_bytes((uri, so))
    assert not any(t in b for t in sealed["F"] for b in blobs)
    assert all(any(t in b for b in blobs) for t in sealed["K"])  # the control: the check can see tokens
    # The long-term entry waits for governance; approved, forget_purge erases it.
    (pending,) = lt.table("purges").to_lance().to_table(columns=["purge_id", "entry_ids"]).to_pylist()
    assert len(pending["entry_ids"]) == 1
    purge.approve(lt, pending["purge_id"], gov)
    run_dag("forget_purge", {k: conf[k] for k in ("longterm_uri", "storage_options", "key_env", "validator_keys",
                                                   "governance_keys")})
    assert lt.count("hot") == 1 and len(purge.attestations(lt)) == 1

    run_dag("session_forget", conf)  # idempotent: forgetting again finds nothing and changes nothing
    assert [r.tokens for r in store.records("K")] == sealed["K"]
    # A backup copy of L's wrapped key left in the store: the proof scan finds it and the run fails.
    wrapped = fresh.wrapped(session_key_id("L"))
    object_store(uri, so or None).put("backups/keys.bin", b"old backup:" + wrapped)
    dr = load_dag("session_forget").test(run_conf={**conf, "session_ids": ["L"], "forget_longterm": False})
    states = {ti.task_id: ti.state for ti in dr.get_task_instances()}
    assert dr.state == "failed" and states["forget"] == "success" and states["prove"] == "failed", states
    assert store.records("L") == [] and fresh.destroyed(session_key_id("L"))


def test_compaction_and_anchoring(airflow_db, tmp_path, key, kafka_bootstrap, topic_name, monkeypatch):

    from kafka import KafkaConsumer

    from memstream import topics
    from memstream.crypto import SignedTreeHead

    where = (str(tmp_path / "lt"), {})
    store = longterm(where, key)
    rng = np.random.default_rng(3)
    for b in range(3):
        store.append([store.new_entry(rng.standard_normal(16), f"p{b}-{i}".encode(), query="q") for i in range(20)])
    conf = {"longterm_uri": where[0], "validator_keys": [key.verify_key.hex()]}
    run_dag("longterm_compaction", {**conf, "index_min_rows": 50, "cleanup_older_than_hours": 0,
                                    "episodic_uri": str(tmp_path / "ep")})
    assert [i.columns for i in store.table("entries").list_indices()] == [["vector"]]
    assert store.verify().ok and len(store.table("entries").to_lance().get_fragments()) == 1

    topics.create_topics(kafka_bootstrap, [topic_name], partitions=1)
    from memstream.episodic.chain import seal
    from memstream.episodic.store import EpisodicStore
    from memstream.schemas.records import SummaryRecord
    from memstream.witness import WitnessLog

    head = seal(SummaryRecord(2, "anchored", 0, 0, 10, "full", 2, 4, "fp16", bytes(16), "op-1", b"\x01" * 16, "fp32",
                              4, 1_000, b"", b"", b"", ""), key)
    EpisodicStore(str(tmp_path / "ep")).append([head])
    witness_key = SigningKey.generate()
    monkeypatch.setenv("MEMSTREAM_TEST_WITNESS_KEY", witness_key.private_pem().decode())
    run_dag("longterm_anchoring", {**conf, "kafka_bootstrap": kafka_bootstrap, "attestations_topic": topic_name,
                                   "witness_uri": str(tmp_path / "witness"), "episodic_uri": str(tmp_path / "ep"),
                                   "witness_key_env": "MEMSTREAM_TEST_WITNESS_KEY"})
    audit = WitnessLog(str(tmp_path / "witness"), witness_keys=KeyRing([witness_key]))
    assert [h.tree_size for h in audit.tree_heads(store.store_id)] == [60]
    assert [(h.window_index, h.head_hash) for h in audit.chain_heads("anchored")] == [(0, head.hash)]
    assert store.verify(witnessed=audit.tree_heads(store.store_id)).ok
    consumer = KafkaConsumer(topic_name, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest",
                             consumer_timeout_ms=10000, group_id=None)
    msg = next(iter(consumer))  # the one head published
    consumer.close()
    sth = SignedTreeHead.from_json(msg.value)
    sth.verify(KeyRing([key]))
    assert sth.tree_size == 60 and sth == store.latest_tree_head()
