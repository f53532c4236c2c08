"""Forgetting that reaches every copy, on real Kafka, LanceDB and Prism: a session's latents
and summary tokens are sealed under its data key; forget destroys the key and erases its rows;
then no file of the Kafka log directories, the store, the ledger or the key table holds any of
its bytes, nothing sealed under it opens, and a replay from the start brings nothing back."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from kafka import KafkaConsumer

from memstream.crypto.datakeys import MasterKey, session_key_id, subject_key_id
from memstream.crypto.keys import KeyRing, SigningKey
from memstream.episodic.chain import verify_chain
from memstream.episodic.ledger import ReadLedger
from memstream.episodic.store import EpisodicStore
from memstream.errors import ConfigError, KeyDestroyedError
from memstream.longterm.entry import GovernancePolicy, session_subject, subject_hash
from memstream.longterm.store import LongTermStore
from memstream.maintenance.consolidate import consolidate_sessions
from memstream.maintenance.forget import forget_session, scan_locations
from memstream.maintenance.scan import Markers
from memstream.operators.checkpoint import load_compressor
from memstream.read.memory import Memory
from memstream.schemas.records import HEADER_SIZE, LatentChunkHeader
from memstream.sdk import Publisher
from memstream.settings import CHUNK_BYTES, WINDOW
from memstream.storage.keytable import KeyTable
from memstream.topics import read_summaries
from memstream.wire.codec import SEALED_EXTRA, LatentChunk, decode, summary_tokens, tokens_sealed
from tests.test_episodic import checkpoint, dead_letters, key_file, make_config, prism  # noqa: F401 (fixtures)

CHUNK = 700


def store_sealed_summaries(uri, so, keys, signer, sid: str, n: int, rng) -> list[bytes]:
    """n chained summaries of ``sid`` with tokens sealed under its data key, stored, marked
    published and read once (what the pipeline and a read leave); returns the sealed tokens."""
    from memstream.episodic.chain import seal
    from memstream.episodic.store import EpisodicStore
    from memstream.schemas.records import SummaryRecord
    from memstream.wire.codec import seal_tokens

    key_id, data_key = keys.session_key(sid)
    prev, records = b"", []
    for w in range(n):
        raw = rng.standard_normal((4, 8)).astype(np.float32).tobytes()
        r = seal(SummaryRecord(
            schema_version=2, session_id=sid, window_index=w, seq_start=w * WINDOW, seq_end=(w + 1) * WINDOW,
            cut="full", token_count=4, dim=8, tokens_dtype="fp32", tokens=seal_tokens(sid, w, raw, key_id, data_key),
            operator_version="test", producer_id=b"\x01" * 16, latents_dtype="fp32", latent_dim=8,
            event_time_us=1, prev_hash=prev, hash=b"", signature=b"", key_id=""), signer)
        records.append(r)
        prev = r.hash
    store = EpisodicStore(uri, so)
    store.append(records)
    store.mark_published(records)
    with ReadLedger(uri, so) as ledger:
        ledger.record(sid, [0])
    return [r.tokens for r in records]


def _records(bootstrap: str, topic: str, session_id: str) -> list[bytes]:
    c = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=4000,
                      max_partition_fetch_bytes=64 << 20)
    try:
        return [m.value for m in c if m.key == session_id.encode()]
    finally:
        c.close()


def _latents_records(config, session_id: str) -> list[bytes]:
    return _records(config.bootstrap, config.latents_topic, session_id)


@pytest.fixture
def master_key_file(tmp_path) -> str:
    return str(MasterKey.generate().write(tmp_path / "master.key"))


def test_a_master_key_file_readable_by_others_is_refused(tmp_path):
    path = MasterKey.generate().write(tmp_path / "m.key")
    path.chmod(0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        MasterKey.from_file(path)


def test_forget_reaches_the_kafka_logs_the_store_the_ledger_and_the_key_table(
        stack, kafka_bootstrap, topic_name, tmp_path, checkpoint, key_file, master_key_file):  # noqa: F811
    config = make_config(kafka_bootstrap, topic_name, tmp_path / "episodic", checkpoint, key_file,
                         master_key_file=master_key_file)
    keys = config.data_keys()
    rng = np.random.default_rng(7)
    data = {sid: rng.standard_normal((WINDOW + 900, 384)).astype(np.float32) for sid in ("A", "B")}
    plain = rng.standard_normal((CHUNK, 384)).astype(np.float32)
    with Publisher(kafka_bootstrap, topic=config.latents_topic, keys=keys) as pub:
        for sid, x in data.items():
            with pub.session(sid) as s:
                for i in range(0, len(x), CHUNK):
                    s.publish(x[i:i + CHUNK])
    with Publisher(kafka_bootstrap, topic=config.latents_topic) as pub, pub.session("C") as s:
        s.publish(plain)  # the control: published without a key table
    prism(config)

    store = config.store()
    records = {sid: store.records(sid) for sid in "ABC"}
    assert [len(records[s]) for s in "ABC"] == [2, 2, 1]
    # Sealed at rest and on the summaries topic (C's tokens too: the pipeline gave C a key),
    # and every chain verifies without any data key.
    assert all(tokens_sealed(r) for rs in records.values() for r in rs if r.token_count)
    ring = KeyRing([config.signing_key()])
    assert all(verify_chain(sid, rs, ring).ok for sid, rs in records.items())
    tokens = {sid: [summary_tokens(r, keys) for r in rs] for sid, rs in records.items()}
    model = load_compressor(checkpoint)
    with Memory(config.store_uri, model=model, keyring=ring, keys=keys) as memory:
        for sid in "AB":
            assert memory.read(data[sid][5], sid, k=1, route="episodic").fragments
    with ReadLedger(config.store_uri) as ledger:
        assert ledger.query_count("A") == 1
    # Consolidation copies the most-read summaries of A and B to long-term memory, bound to
    # each session's forget subject.
    validator = config.signing_key()
    governance, maintenance = SigningKey.generate(), SigningKey.generate()
    lt = LongTermStore(str(tmp_path / "ltm"), keyring=ring, signer=validator, maintenance_keys=[maintenance],
                       governance=GovernancePolicy(KeyRing([governance]), 1), keys=keys)
    slept = consolidate_sessions(config.store_uri, None, lt, key=maintenance, retention_s=1e9,
                                 closed=["A", "B"], keys=keys)
    entry_ids = {sid: slept["sessions"][sid]["entry_ids"] for sid in "AB"}
    assert all(len(ids) == 1 for ids in entry_ids.values())
    (_, a_entry), = lt.get(entry_ids["A"]).values()
    assert a_entry.forget_subject == subject_hash(session_subject("A"))
    a_payload = lt.payload(a_entry)  # sealed under A's subject key at rest, open to the key table
    assert a_payload is not None and a_payload not in a_entry.payload

    a_key = keys.data_key(session_key_id("A"))
    markers = Markers()
    for i in range(0, len(data["A"]), CHUNK):
        markers.add_with_base64(data["A"][i:i + CHUNK].tobytes())  # each chunk's plaintext payload
    for t in tokens["A"]:
        markers.add_with_base64(t.astype("<f2").tobytes())  # base64: in JSON on the summaries topic
    markers.add_with_base64(np.asarray(a_entry.vector, "<f4").tobytes())
    markers.add(a_payload)
    markers.add_with_base64(a_key)
    markers.add_with_base64(keys.wrapped(session_key_id("A")))
    assert markers.skipped == 0
    control = Markers()  # what must still be found: C's plaintext on Kafka, B's sealed tokens
    control.add(plain.tobytes())
    for r in records["B"]:
        control.add_with_base64(r.tokens)
    logs = stack.kafka_log_dirs()
    where = {"kafka_log_dirs": logs, "stores": [(config.store_uri, None), (lt.uri, None)]}
    before = {f for f, _ in scan_locations(markers, **where).hits}
    # Before forgetting, the scan finds A's wrapped key in the key table, and A's tokens in
    # the long-term entry that consolidation wrote.
    assert any("_datakeys" in f for f in before) and any(f.startswith(lt.uri) for f in before), before

    out = forget_session(config.store_uri, None, "A", keys=keys, key=maintenance, longterm=lt,
                         longterm_key=validator, approvers=[governance])
    assert out["key_destroyed"] and out["summaries_removed"] == 2 and out["record"]["reason"] == "forgotten"
    assert out["longterm"]["entries"] == 1 and lt.get(entry_ids["A"]) == {} and len(lt.get(entry_ids["B"])) == 1
    assert lt.verify().ok

    def assert_gone():
        report = scan_locations(markers, **where)
        assert report.files > 20 and report.bytes > 2 * data["A"].nbytes
        assert report.hits == [], report.to_json()
        found = scan_locations(control, **where)
        hit_files = {f for f, _ in found.hits}
        assert any(f.startswith(logs[0]) and "latents" in f for f in hit_files), found.to_json()
        assert any(f.startswith(logs[0]) and "summaries" in f for f in hit_files), found.to_json()
        assert any(f.startswith(config.store_uri) for f in hit_files), found.to_json()

    assert_gone()
    # Nothing sealed under A's key opens any more, through any key table of the store.
    fresh = KeyTable(config.store_uri, None, MasterKey.from_file(master_key_file))
    chunks = [v for v in _latents_records(config, "A") if v[:4] == b"MSLT"]
    per_chunk = (CHUNK_BYTES - HEADER_SIZE - SEALED_EXTRA) // (384 * 4)  # a publish of 700 makes two chunks
    assert len(chunks) == sum(-(-len(data["A"][i:i + CHUNK]) // per_chunk) for i in range(0, len(data["A"]), CHUNK))
    for v in chunks:
        with pytest.raises(KeyDestroyedError):
            decode(b"A", v, keys=fresh)
    on_topic = [r for r in read_summaries(kafka_bootstrap, topic=config.summaries_topic) if r.session_id == "A"]
    assert len(on_topic) == 2
    for r in on_topic:
        with pytest.raises(KeyDestroyedError):
            summary_tokens(r, fresh)
    with pytest.raises(KeyDestroyedError), Publisher(kafka_bootstrap, topic=config.latents_topic, keys=fresh) as pub:
        pub.session("A")
    with ReadLedger(config.store_uri) as ledger:
        assert ledger.query_count("A") == 0 and ledger.query_count("B") == 1
    # B is untouched, and still opens.
    assert [r.hash for r in store.records("B")] == [r.hash for r in records["B"]]
    assert all(np.array_equal(summary_tokens(r, fresh), t) for r, t in zip(store.records("B"), tokens["B"]))
    assert isinstance(decode(b"B", _latents_records(config, "B")[1], keys=fresh), LatentChunk)

    # A restart that reads everything again brings nothing back: A's chunks are dead letters.
    prism(dataclasses.replace(config, start="earliest"))
    assert store.records("A") == []
    assert [r.hash for r in store.records("B")] == [r.hash for r in records["B"]]
    reasons = {d.reason.value for d in dead_letters(config) if d.key == b"A"}
    assert reasons == {"key_destroyed", "collected_session"}, reasons
    assert_gone()


def test_the_forget_command_shreds_erases_and_proves_on_real_kafka(stack, kafka_bootstrap, topic_name, tmp_path,
                                                                   master_key_file, capsys):
    """`memstream forget session` with the broker's log directories in its proof: the session's
    chunks on Kafka no longer open, its rows are gone from the store and the ledger, its
    long-term entry is purged with the approver's key, and the scan finds nothing; a leftover
    copy of a data key makes the command exit 1."""
    from memstream.cli import main
    from memstream.crypto.keys import write_key_file
    from memstream.storage.objects import object_store
    from memstream.topics import create_topics

    uri = str(tmp_path / "episodic")
    keys = KeyTable(uri, None, MasterKey.from_file(master_key_file))
    topic = f"{topic_name}.latents"
    create_topics(kafka_bootstrap, [topic])
    rng = np.random.default_rng(3)
    data = {sid: rng.standard_normal((900, 384)).astype(np.float32) for sid in ("F", "K", "L")}
    with Publisher(kafka_bootstrap, topic=topic, keys=keys) as pub:
        for sid, x in data.items():
            with pub.session(sid) as s:
                s.publish(x)
    files = {}
    for role in ("maintenance", "validator", "governance"):
        files[role] = tmp_path / f"{role}.key"
        write_key_file(files[role], SigningKey.generate(), role)
    validator = SigningKey.from_file(files["validator"], role="validator")
    sealed = {sid: store_sealed_summaries(uri, None, keys, validator, sid, 2, rng) for sid in data}
    lt = LongTermStore(str(tmp_path / "ltm"), keyring=KeyRing([validator]), signer=validator, keys=keys)
    lt.append([lt.new_entry(rng.standard_normal(384), b"about F", query="q", forget_subject=session_subject("F"))])
    lt.close()
    subject_key = keys.data_key(subject_key_id(subject_hash(session_subject("F"))))  # it sealed the payload
    base = ["forget", "session", "--episodic", uri, "--master-key-file", master_key_file,
            "--key-file", str(files["maintenance"]), "--kafka-log-dir", stack.kafka_log_dirs()[0], "--json"]
    assert main([*base, "--session", "F", "--longterm", str(tmp_path / "ltm"),
                 "--validator-key-file", str(files["validator"]),
                 "--approver-key-file", str(files["governance"])]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["key_destroyed"] and out["summaries_removed"] == 2 and out["reads_removed"] == 1
    assert out["longterm"]["entries"] == 1
    proof = out["proof"]
    assert proof["ok"] and proof["sealed"] and proof["fingerprints"]["keys"] > 0 and proof["fingerprints"]["rows"] > 0
    assert proof["key_scan"]["files"] > 5 and proof["key_scan"]["hits"] == 0 and proof["row_scan"]["hits"] == 0
    fresh = KeyTable(uri, None, MasterKey.from_file(master_key_file))
    with pytest.raises(KeyDestroyedError):
        fresh.data_key(subject_key_id(subject_hash(session_subject("F"))))
    assert not scan_locations(_marked(subject_key), kafka_log_dirs=[], stores=[(uri, None)]).hits
    chunks = {sid: [v for v in _records(kafka_bootstrap, topic, sid) if v[:4] == b"MSLT"] for sid in data}
    assert all(len(v) >= 1 for v in chunks.values())
    for v in chunks["F"]:
        with pytest.raises(KeyDestroyedError):
            decode(b"F", v, keys=fresh)
    assert isinstance(decode(b"K", chunks["K"][0], keys=fresh), LatentChunk)
    store = EpisodicStore(uri)
    assert store.records("F") == [] and [r.tokens for r in store.records("K")] == sealed["K"]
    with ReadLedger(uri) as ledger:
        assert ledger.query_count("F") == 0 and ledger.query_count("K") == 1
    reopened = LongTermStore(str(tmp_path / "ltm"), keyring=KeyRing([validator]),  # accepting the attestation's key
                             maintenance_keys=[SigningKey.from_file(files["maintenance"], role="maintenance")],
                             governance=GovernancePolicy(KeyRing([SigningKey.from_file(files["governance"])]), 1))
    assert reopened.count("hot") == 0 and reopened.verify().ok

    # A leftover copy of L's data key (a stray backup): the proof finds it, the command says so.
    object_store(uri, None).put("backups/keys.bin", b"backup:" + fresh.data_key(session_key_id("L")))
    assert main([*base, "--session", "L"]) == 1
    proof = json.loads(capsys.readouterr().out)["proof"]
    assert not proof["ok"] and proof["key_scan"]["hits"] >= 1
    assert any("backups" in f for f in proof["key_scan"]["objects_with_hits"])


def _marked(value: bytes) -> Markers:
    m = Markers()
    m.add_with_base64(value)
    return m


def test_a_sealed_chunk_header_is_bound_to_its_ciphertext(tmp_path):
    keys = KeyTable(str(tmp_path), None, MasterKey.generate())
    x = np.arange(8 * 384, dtype=np.float32).reshape(8, 384)
    from memstream.errors import ChecksumError
    from memstream.schemas.records import HEADER, DType
    from memstream.wire.codec import chunk_crc, encode_chunk

    value = encode_chunk(producer_id=b"p" * 16, dtype=DType.fp32, dim=384, count=8, first_seq=0, event_time_us=1,
                         payload=x.data.cast("B"), sealed_by=(b"S", *keys.session_key("S")))
    assert x.tobytes()[:64] not in value
    assert np.array_equal(decode(b"S", value, keys=keys).array(), x)
    # Another first_seq with a recomputed CRC: the CRC passes, the data key's tag does not.
    h = LatentChunkHeader(*HEADER.unpack_from(value))
    prefix = HEADER.pack(h.magic, h.version, h.dtype, 0, h.dim, h.count, 8, h.event_time_us, h.producer_id, 0)[:-4]
    moved = prefix + chunk_crc(prefix, value[HEADER.size:]).to_bytes(4, "little") + value[HEADER.size:]
    with pytest.raises(ChecksumError, match="does not authenticate"):
        decode(b"S", moved, keys=keys)


def test_the_key_table_destroys_a_key_for_good_on_local_and_s3(backend):
    from memstream.storage.objects import iter_objects, read_object

    uri, options = backend
    master = MasterKey.generate()
    keys, other = KeyTable(uri, options, master), KeyTable(uri, options, master)
    kid, key = keys.session_key("s")
    assert other.session_key("s") == (kid, key) and other.subject_key("h" * 64)[1] != key
    wrapped = keys.wrapped(kid)
    assert key not in wrapped and len(wrapped) == 60  # nonce, 32 key bytes, tag
    assert keys.destroy(kid) and not keys.destroy(kid)
    objects = {k: read_object(uri, k, options) for k, _ in iter_objects(uri, options)}
    assert not any(wrapped in body or key in body for body in objects.values())
    assert any(k.endswith(kid.hex() + ".destroyed") for k in objects)
    for table in (keys, other, KeyTable(uri, options, master)):  # other's cache: it re-reads after its TTL
        table._cache.clear()
        with pytest.raises(KeyDestroyedError):
            table.data_key(kid)
        with pytest.raises(KeyDestroyedError, match="forgotten"):
            table.session_key("s")
    with pytest.raises(ConfigError):  # another master key cannot open the others
        KeyTable(uri, options, MasterKey.generate()).data_key(other.subject_key("h" * 64)[0])


def test_sealed_tokens_replay_byte_for_byte_and_are_bound_to_their_window(tmp_path):
    from memstream.episodic.chain import seal
    from memstream.errors import IntegrityError, KeyUnavailableError
    from memstream.schemas.records import SummaryRecord
    from memstream.wire.codec import seal_tokens

    keys = KeyTable(str(tmp_path), None, MasterKey.generate())
    kid, key = keys.session_key("s")
    tokens = np.random.default_rng(0).standard_normal((256, 8)).astype("<f2")
    sealed = seal_tokens("s", 0, tokens.tobytes(), kid, key)
    assert sealed == seal_tokens("s", 0, tokens.tobytes(), kid, key) != seal_tokens("s", 1, tokens.tobytes(), kid, key)
    assert tokens.tobytes()[:32] not in sealed and seal_tokens("s", 0, b"", kid, key) == b""
    signer = SigningKey.generate()
    record = seal(SummaryRecord(2, "s", 0, 0, 4096, "full", 256, 8, "fp16", sealed, "op", b"p" * 16, "fp32", 8, 1,
                                b"", b"", b"", ""), signer)
    assert tokens_sealed(record) and verify_chain("s", [record], KeyRing([signer])).ok  # no data key needed
    assert np.array_equal(summary_tokens(record, keys), tokens.astype(np.float32))
    with pytest.raises(KeyUnavailableError):
        summary_tokens(record, None)
    moved = dataclasses.replace(record, window_index=1)  # the same ciphertext under another window
    with pytest.raises(IntegrityError):
        summary_tokens(moved, keys)


def test_a_window_of_a_session_forgotten_in_flight_is_never_stored(tmp_path, key_file, master_key_file):  # noqa: F811
    from memstream.episodic.progress import PartitionProgress
    from memstream.episodic.window import Window
    from memstream.pipelines.episodic import Commit, Compressed, EpisodicConfig, _Work

    config = EpisodicConfig(bootstrap="127.0.0.1:9", store_uri=str(tmp_path / "episodic"), key_file=key_file,
                            master_key_file=master_key_file)
    commit = Commit(config)
    commit.setup()  # no Kafka client is made before a record is read or sent
    keys = config.data_keys()

    def compressed(sid: str, index: int) -> Compressed:
        w = Window(sid, index, index * WINDOW, (index + 1) * WINDOW, "full", (), 1, b"p" * 16, "fp32", 384, (0, index))
        return Compressed(0, w, bytes(256 * 384 * 2), 256, 384, "op")

    class Bag(list):
        add, read, clear = list.append, lambda self: list(self), list.clear

    keys.session_key("gone"), keys.session_key("kept")
    keys.destroy(session_key_id("gone"))
    work, heads, progress = _Work(), {}, PartitionProgress(0)
    for sid in ("gone", "kept"):
        for index in (0, 1):
            commit._chain(compressed(sid, index), heads, progress, work, Bag())
    assert [(r.session_id, r.window_index) for r in work.sealed] == [("kept", 0), ("kept", 1)]
    assert all(tokens_sealed(r) for r in work.sealed) and heads["gone"] == (1, b"")
