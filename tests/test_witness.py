"""Anchoring outside the operator's reach: a witness with its own key and storage cosigns
tree heads and chain heads only when they extend what it cosigned before, and `verify`
checks the stores against every cosigned head. Adversarial: the operator restores older
copies of its tables, truncates its log, rolls an episodic chain back, forks a log, and
launders a removal as a forget purge signed with one key. Real LanceDB, local and s3://
(SeaweedFS), with the witness in a bucket of its own."""

from __future__ import annotations

import dataclasses
import json
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest

from memstream.cli import main
from memstream.crypto import KeyRing, MerkleTree, SigningKey, SignedTreeHead, leaf_hash
from memstream.crypto.merkle import MerkleFrontier, consistency_proof_from
from memstream.crypto.proof import verify_consistency
from memstream.crypto.signed import sign_record
from memstream.episodic.chain import check_witnessed_chain, seal
from memstream.episodic.store import EpisodicStore
from memstream.errors import ConfigError, GovernanceError, VerificationError, WitnessRefusal
from memstream.longterm import ForgetRequest, LongTermStore
from memstream.longterm.entry import GovernancePolicy
from memstream.maintenance import purge
from memstream.maintenance.episodic import anchor_chains
from tests.test_core import chain
from memstream.maintenance.longterm import anchor
from memstream.schemas.generate import to_arrow
from memstream.schemas.records import PurgeAttestation, PurgeRecord, SummaryRecord
from memstream.storage.objects import object_store
from memstream.storage.s3 import S3Config, s3_request
from memstream.witness import Witness, WitnessLog

TABLES = ("entries.lance", "merkle_log.lance", "tree_heads.lance")


# -- where the witness keeps its heads: never under the operator's root -----------------------

@pytest.fixture
def witness_root(backend, tmp_path, request):
    """(uri, storage_options) of the witness: a folder of its own, or a versioned bucket of its own."""
    uri, options = backend
    if not uri.startswith("s3://"):
        return str(tmp_path / "witness"), {}
    cfg = request.getfixturevalue("s3_config")
    own = S3Config(cfg.endpoint, f"witness-{uuid.uuid4().hex[:12]}", cfg.access_key, cfg.secret_key)
    assert s3_request(own, "PUT", f"/{own.bucket}")[0] == 200
    body = (b'<VersioningConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            b"<Status>Enabled</Status></VersioningConfiguration>")
    assert s3_request(own, "PUT", f"/{own.bucket}?versioning=", body)[0] == 200
    assert b"<Status>Enabled</Status>" in s3_request(own, "GET", f"/{own.bucket}?versioning=")[1]
    return own.uri("heads"), own.storage_options()


def snapshot(uri: str, options: dict, names=TABLES) -> dict[str, bytes]:
    """Every object of the named table folders: what an operator would copy aside."""
    if not uri.startswith("s3://"):
        saved = Path(f"{uri}-saved-{uuid.uuid4().hex[:6]}")
        for n in names:
            shutil.copytree(Path(uri) / n, saved / n)
        return {"_copy": str(saved)}
    objects = object_store(uri, options)
    return {key: objects.get(key) for name in names for key in objects.list(name)}


def restore(uri: str, options: dict, saved: dict, names=TABLES) -> None:
    """Put the old copies back in place of the current folders (a rollback)."""
    if not uri.startswith("s3://"):
        for n in names:
            shutil.rmtree(Path(uri) / n)
            shutil.copytree(Path(saved["_copy"]) / n, Path(uri) / n)
        return
    objects = object_store(uri, options)
    for name in names:
        for key in objects.list(name):
            objects.delete(key)
    for key, body in saved.items():
        assert objects.put_if_absent(key, body)


@pytest.fixture
def keys():
    return {"validator": SigningKey.generate(), "witness": SigningKey.generate(),
            "gov": [SigningKey.generate() for _ in range(3)]}


def appended(store, rng, batches: int, n: int = 5, subject=None):
    out = []
    for b in range(batches):
        entries = [store.new_entry(rng.standard_normal(8), f"p{b}-{i}-{uuid.uuid4().hex[:6]}".encode(), query="q",
                                   forget_subject=subject(b, i) if subject else None) for i in range(n)]
        store.append(entries)
        out += entries
    return out


# -- pure: consistency proofs from a frontier -------------------------------------------------

def test_consistency_proofs_from_a_frontier_are_the_rfc_proofs():
    leaves = [leaf_hash(bytes([i % 256, i // 256])) for i in range(70)]
    tree = MerkleTree(leaves)
    for m in range(1, 40):
        frontier = MerkleFrontier()
        for lh in leaves[:m]:
            frontier.append_hash(lh)
        for n in (m, m + 1, m + 7, 70):
            proof = consistency_proof_from(frontier, leaves[m:n])
            assert proof == tree.consistency_proof(m, n)
            verify_consistency(m, n, tree.root(m), tree.root(n), proof)


# -- the witness itself --------------------------------------------------------------------------

def test_the_witness_refuses_smaller_inconsistent_and_foreign_heads(tmp_path, keys):
    v, w = keys["validator"], keys["witness"]
    witness = Witness(str(tmp_path / "w"), key=w, log_keys=KeyRing([v]))
    log_id = uuid.uuid4().hex
    leaves = [leaf_hash(b"a%d" % i) for i in range(20)]
    tree = MerkleTree(leaves)

    def head(t: MerkleTree, n: int, key=v) -> SignedTreeHead:
        return SignedTreeHead.create(key, log_id, n, t.root(n), n)

    first = witness.cosign_tree_head(head(tree, 8), [])
    first.verify(KeyRing([w]), KeyRing([v]))
    assert witness.cosign_tree_head(head(tree, 8), []) == first  # the same head again: the same cosignature
    with pytest.raises(WitnessRefusal) as smaller:
        witness.cosign_tree_head(head(tree, 5), [])
    assert smaller.value.kind == "rollback"
    fork = MerkleTree(leaves[:6] + [leaf_hash(b"forged%d" % i) for i in range(14)])
    with pytest.raises(WitnessRefusal) as forked:  # a proof from the forked log does not reach the cosigned root
        witness.cosign_tree_head(head(fork, 12), fork.consistency_proof(8, 12))
    assert forked.value.kind == "fork"
    with pytest.raises(WitnessRefusal) as same_size:
        witness.cosign_tree_head(head(fork, 8), [])
    assert same_size.value.kind == "fork"
    with pytest.raises(WitnessRefusal) as unsigned:
        witness.cosign_tree_head(head(tree, 12, key=SigningKey.generate()), tree.consistency_proof(8, 12))
    assert unsigned.value.kind == "signature"
    witness.cosign_tree_head(head(tree, 12), tree.consistency_proof(8, 12))
    heads = WitnessLog(str(tmp_path / "w"), witness_keys=KeyRing([w])).tree_heads(log_id)
    assert [h.tree_size for h in heads] == [8, 12]  # refused heads were never stored
    with pytest.raises(ConfigError, match="roles never share a key"):
        Witness(str(tmp_path / "w2"), key=v, log_keys=KeyRing([v]))
    with pytest.raises(ConfigError, match="roles never share a key"):
        LongTermStore(str(tmp_path / "lt"), keyring=KeyRing([w]), signer=w, dim=8, witness=witness)


def test_a_witnessed_head_cannot_be_dropped_from_the_witness_quietly(tmp_path, keys):
    v, w = keys["validator"], keys["witness"]
    witness = Witness(str(tmp_path / "w"), key=w, log_keys=KeyRing([v]))
    store = LongTermStore(str(tmp_path / "lt"), keyring=KeyRing([v]), signer=v, dim=8, witness=witness)
    appended(store, np.random.default_rng(0), 3)
    (tmp_path / "w" / "tree" / store.store_id / "000000000001.json").unlink()
    with pytest.raises(Exception, match="not numbered 0..n-1"):
        witness.tree_heads(store.store_id)


# -- long-term: rollback and truncation -----------------------------------------------------------

def test_a_rollback_of_the_three_tables_is_detected_against_the_witness(backend, witness_root, keys, capsys):
    uri, options = backend
    v, w = keys["validator"], keys["witness"]
    witness = Witness(*witness_root, key=w, log_keys=KeyRing([v]))
    store = LongTermStore(uri, keyring=KeyRing([v]), signer=v, storage_options=options, dim=8, witness=witness)
    rng = np.random.default_rng(1)
    appended(store, rng, 2)
    saved = snapshot(uri, options)
    appended(store, rng, 2)
    audit = WitnessLog(*witness_root, witness_keys=KeyRing([w]))
    assert [h.tree_size for h in audit.tree_heads(store.store_id)] == [5, 10, 15, 20]
    report = store.verify(witnessed=audit.tree_heads(store.store_id))
    assert report.ok and report.witnessed_heads == 4, report.to_json()

    restore(uri, options, saved)
    rolled = LongTermStore(uri, keyring=KeyRing([v]), signer=v, storage_options=options, dim=8)
    assert rolled.latest_tree_head().tree_size == 10
    assert rolled.verify().ok  # on its own the store looks fine: that is what the witness is for
    report = rolled.verify(witnessed=audit.tree_heads(rolled.store_id))
    assert not report.ok and report.failures == [] and report.log_failures == []
    assert len(report.witness_failures) == 1 and report.witness_failures[0].startswith("rollback"), report.to_json()
    assert "size 20" in report.witness_failures[0]

    # the witness refuses what the rolled-back store publishes next, and anchoring fails loudly
    with pytest.raises(WitnessRefusal) as refused:
        anchor(rolled, witness)
    assert refused.value.kind == "rollback"
    rolled.witness = witness
    with pytest.raises(WitnessRefusal):
        appended(rolled, rng, 1)
    assert [h.tree_size for h in audit.tree_heads(rolled.store_id)] == [5, 10, 15, 20]

    # the command an auditor runs
    argv = ["verify", "longterm", uri, "--public-key", v.verify_key.hex(), "--witness", witness_root[0],
            "--witness-key", w.verify_key.hex()]
    argv += [f"--storage-option={k}={val}" for k, val in options.items()]
    argv += [f"--witness-storage-option={k}={val}" for k, val in witness_root[1].items()]
    capsys.readouterr()
    assert main(argv) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["witnessed_heads"] == 4
    # the entry appended after the rollback sits where the witnessed log has another: a fork too
    assert [f.split(":")[0] for f in out["witness_failures"]] == ["fork", "rollback"]


def test_truncation_and_a_fork_of_the_log_are_detected(backend, witness_root, keys):
    uri, options = backend
    v, w = keys["validator"], keys["witness"]
    witness = Witness(*witness_root, key=w, log_keys=KeyRing([v]))
    store = LongTermStore(uri, keyring=KeyRing([v]), signer=v, storage_options=options, dim=8, witness=witness)
    entries = appended(store, np.random.default_rng(2), 3)
    audit = WitnessLog(*witness_root, witness_keys=KeyRing([w]))
    witnessed = audit.tree_heads(store.store_id)
    # the last batch's leaves and rows go; the heads stay
    store.table("merkle_log").delete("leaf_index >= 10")
    store.table("entries").delete(" OR ".join(f"entry_id = '{e.entry_id}'" for e in entries[10:]))
    report = store.verify(witnessed=witnessed)
    assert not report.ok
    assert report.witness_failures == [report.witness_failures[0]]
    assert report.witness_failures[0].startswith("truncation") and "15" in report.witness_failures[0]

    # one leaf under a witnessed head rewritten (a fork): the witness's root no longer matches
    leaf = store.table("merkle_log").to_lance().to_table(filter="leaf_index = 3").to_pylist()[0]
    store.table("merkle_log").update(where="leaf_index = 3", values={"leaf_hash": b"\x00" * 32})
    report = store.verify(witnessed=witnessed)
    assert any(f.startswith("fork") for f in report.witness_failures), report.witness_failures
    assert leaf["leaf_hash"] != b"\x00" * 32


def test_the_normal_path_stays_green_with_a_witness(backend, witness_root, keys):
    uri, options = backend
    v, w = keys["validator"], keys["witness"]
    witness = Witness(*witness_root, key=w, log_keys=KeyRing([v]))
    store = LongTermStore(uri, keyring=KeyRing([v]), signer=v, storage_options=options, dim=8)
    rng = np.random.default_rng(3)
    appended(store, rng, 3)
    assert anchor(store, witness)["witnessed"] is True  # the first head the witness sees
    appended(store, rng, 2)
    assert anchor(store, witness)["tree_size"] == 25  # extends it: a proof from the stored frontier of size 15
    assert anchor(store, witness)["tree_size"] == 25  # again: nothing new, the same cosignature
    heads = WitnessLog(*witness_root, witness_keys=KeyRing([w])).tree_heads(store.store_id)
    assert [h.tree_size for h in heads] == [15, 25]
    report = store.verify(witnessed=heads)
    assert report.ok and report.witnessed_heads == 2 and report.tree_size == 25


# -- episodic chains ----------------------------------------------------------------------------------

def summaries(key: SigningKey, session: str, start: int, n: int, prev: bytes) -> list[SummaryRecord]:
    return chain(n, session, key, start, prev)


def test_an_episodic_chain_rolled_back_is_detected(backend, witness_root, keys, capsys):
    uri, options = backend
    v, w = keys["validator"], keys["witness"]
    witness = Witness(*witness_root, key=w, log_keys=KeyRing([v]))
    store = EpisodicStore(uri, options or None)
    a = summaries(v, "sess-a", 0, 3, b"")
    b = summaries(v, "sess-b", 0, 2, b"")
    store.append(a + b)
    assert anchor_chains(uri, options or None, witness=witness)["cosigned"] == 2
    saved = snapshot(uri, options, ("summaries.lance",))
    a += summaries(v, "sess-a", 3, 3, a[-1].hash)
    store.append(a[3:])
    out = anchor_chains(uri, options or None, witness=witness)
    assert (out["cosigned"], out["unchanged"]) == (1, 1)  # linked from window 2 through the stored windows 3..5
    audit = WitnessLog(*witness_root, witness_keys=KeyRing([w]))
    assert [h.window_index for h in audit.chain_heads("sess-a")] == [2, 5] and audit.sessions() == ["sess-a", "sess-b"]
    assert check_witnessed_chain("sess-a", store.records("sess-a"), audit.chain_heads("sess-a")) == []

    restore(uri, options, saved, ("summaries.lance",))
    rolled = EpisodicStore(uri, options or None)
    assert [r.window_index for r in rolled.records("sess-a")] == [0, 1, 2]
    problems = check_witnessed_chain("sess-a", rolled.records("sess-a"), audit.chain_heads("sess-a"))
    assert len(problems) == 1 and problems[0].startswith("rollback") and "window 5" in problems[0]
    with pytest.raises(WitnessRefusal) as refused:
        anchor_chains(uri, options or None, witness=witness)
    assert refused.value.kind == "rollback"

    # a fork: window 2 re-signed with other content, by the operator's own validator key
    forked = summaries(v, "sess-b", 0, 1, b"") + [dataclasses.replace(b[1], tokens=b"\x07" * 16)]
    forked[1] = seal(forked[1], v)
    rolled.table.delete("session_id = 'sess-b'")
    rolled.append(forked)
    problems = check_witnessed_chain("sess-b", rolled.records("sess-b"), audit.chain_heads("sess-b"))
    assert problems and problems[0].startswith("fork")

    argv = ["verify", "episodic", "--episodic", uri, "--public-key", v.verify_key.hex(), "--witness",
            witness_root[0], "--witness-key", w.verify_key.hex()]
    argv += [f"--storage-option={k}={val}" for k, val in options.items()]
    argv += [f"--witness-storage-option={k}={val}" for k, val in witness_root[1].items()]
    capsys.readouterr()
    assert main(argv) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["witnessed_sessions"] == 2 and set(out["failures"]) == {"sess-a", "sess-b"}


def test_an_evicted_link_is_reported_not_cosigned(tmp_path, keys):
    v, w = keys["validator"], keys["witness"]
    witness = Witness(str(tmp_path / "w"), key=w, log_keys=KeyRing([v]))
    uri = str(tmp_path / "ep")
    store = EpisodicStore(uri)
    chain = summaries(v, "s", 0, 2, b"")
    store.append(chain)
    anchor_chains(uri, witness=witness)
    chain += summaries(v, "s", 2, 3, chain[-1].hash)
    store.append(chain[2:])
    store.evict_windows("s", [1, 2])  # decay took the cosigned head and the window after it
    out = anchor_chains(uri, witness=witness)
    assert out["unlinked"] == ["s"] and out["cosigned"] == 0
    assert [h.window_index for h in witness.chain_heads("s")] == [1]


# -- purge attestations bound to forget requests and M-of-N approval ------------------------------------

@pytest.fixture
def governed(backend, keys):
    uri, options = backend
    v, gov = keys["validator"], keys["gov"]
    store = LongTermStore(uri, keyring=KeyRing([v]), signer=v, storage_options=options, dim=8,
                          governance=GovernancePolicy(KeyRing(gov), 2))
    entries = appended(store, np.random.default_rng(4), 2, 6, subject=lambda b, i: "erin" if i % 3 == 0 else None)
    return store, entries


def test_a_purge_needs_m_of_n_approval_of_exactly_its_subjects_entries(governed, keys):
    store, entries = governed
    v, gov = keys["validator"], keys["gov"]
    store.request_forget("erin", ForgetRequest.create(v, store.store_id, "erin"))
    planned = purge.plan(store)
    assert planned["entries"] == 4
    with pytest.raises(GovernanceError, match="0 valid governance approval"):
        purge.erase(store, planned["purge_id"])
    with pytest.raises(GovernanceError, match="not a governance key"):
        purge.approve(store, planned["purge_id"], v)
    purge.approve(store, planned["purge_id"], gov[0])
    with pytest.raises(GovernanceError, match="1 valid governance approval"):
        purge.erase(store, planned["purge_id"])
    assert store.count() == 12
    purge.approve(store, planned["purge_id"], gov[2])
    purge.erase(store, planned["purge_id"])
    att = purge.attest(store, planned["purge_id"], v, purge.check(store, planned["purge_id"]))
    assert att["subject_hashes"] == [ForgetRequest.create(v, store.store_id, "erin").subject_hash]
    report = store.verify()
    assert report.ok and store.count() == 8, report.to_json()


def test_a_purge_laundered_with_one_key_is_rejected(governed, keys):
    """The operator holds a validator key: it signs a forget request for a subject of its
    choosing, a plan and attestation naming entries that are not that subject's, and deletes
    them. Verify refuses the purge, so the entries are missing without approved removal."""
    store, entries = governed
    v, gov = keys["validator"], keys["gov"]
    req = ForgetRequest.create(v, store.store_id, "nobody")
    store.request_forget("nobody", req)
    victims = sorted(e.entry_id for e in entries[1:3])
    purge_id = uuid.uuid4().hex
    store.table("purges").add(to_arrow([PurgeRecord(purge_id, [req.request_id], victims, 2, 0, b"[]", 1, None)],
                                       PurgeRecord))
    with pytest.raises(VerificationError, match="do not approve it"):  # a reviewer's check refuses the plan
        purge.approve(store, purge_id, gov[0])
    with pytest.raises(GovernanceError):
        purge.erase(store, purge_id)
    laundered_approvals = [{"key_id": gov[0].key_id,
                            "signature": gov[0].sign(b"something else entirely").hex()}]
    for approvals in ([], [{"key_id": v.key_id, "signature": v.sign(purge.approval_message(
            store, purge_id)).hex()}], laundered_approvals):
        att = sign_record(PurgeAttestation(
            schema_version=2, store_id=store.store_id, purge_id=purge_id, request_ids=[req.request_id],
            subject_hashes=[req.subject_hash], approvals=json.dumps(approvals), entry_ids=victims, removed_hot=2,
            removed_cold=0, tree_size=12, root_hash=b"", files_scanned=0, bytes_scanned=0, markers=0,
            purged_at_us=0, signature=b"", key_id=""), v)
        store.table("purges").update(where=f"purge_id = '{purge_id}'",
                                     values={"attestation": att.to_json().decode()})
        store.table("entries").delete(" OR ".join(f"entry_id = '{i}'" for i in victims))
        report = store.verify()
        assert not report.ok
        assert any("does not check out" in f and "governance approval" in f for f in report.log_failures), \
            report.log_failures
        assert {f.entry_id for f in report.failures} == set(victims)
    # one real governance approval of that exact plan is still one of the two required
    one = [{"key_id": gov[1].key_id, "signature": gov[1].sign(purge.approval_message(store, purge_id)).hex()}]
    att = dataclasses.replace(att, approvals=json.dumps(one))
    store.table("purges").update(where=f"purge_id = '{purge_id}'",
                                 values={"attestation": sign_record(att, v).to_json().decode()})
    assert any("1 valid governance approval(s), 2 required" in f for f in store.verify().log_failures)


def test_a_writer_whose_head_was_overtaken_is_not_a_rollback(tmp_path, keys):
    """Two writers of one store: the second's newer head reaches the witness first; the
    first's older head is covered by it (the store holds the newer head), not refused."""
    v, w = keys["validator"], keys["witness"]
    witness = Witness(str(tmp_path / "w"), key=w, log_keys=KeyRing([v]))
    first = LongTermStore(str(tmp_path / "lt"), keyring=KeyRing([v]), signer=v, dim=8)
    second = LongTermStore(str(tmp_path / "lt"), keyring=KeyRing([v]), signer=v, dim=8, witness=witness)
    rng = np.random.default_rng(5)
    appended(first, rng, 1)
    stale = first.latest_tree_head()
    appended(second, rng, 1)
    assert first.witness_tree_head(witness, stale).tree_size == 10
    assert [h.tree_size for h in witness.tree_heads(first.store_id)] == [10]
