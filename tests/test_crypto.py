"""memstream.crypto: RFC 6962 vectors from Certificate Transparency's reference test
(cpp/merkletree/merkle_tree_test.cc), proofs for every index and size up to 40, tamper
detection, key loading, key rings and canonical encoding."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from memstream import crypto
from memstream.crypto import (KeyRing, MerkleTree, SignedTreeHead, SigningKey, VerifyKey, canonical_encode,
                              leaf_hash, verify_consistency, verify_inclusion)
from memstream.errors import ConfigError, SignatureError, VerificationError

CT_INPUTS = [bytes.fromhex(h) for h in
             ["", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f"]]
CT_ROOTS = [bytes.fromhex(h) for h in [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"]]
# (leaf index 0-based, tree size, path): CT's vectors use 1-based leaves.
CT_PATHS = [
    (0, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (5, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (1, 5, ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]
CT_CONSISTENCY = [
    (1, 1, []),
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 5, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]


def _ct_tree() -> MerkleTree:
    tree = MerkleTree()
    for e in CT_INPUTS:
        tree.append(e)
    return tree


def _reference_root(hashes: list[bytes]) -> bytes:
    # The RFC's recursive definition, written independently of MerkleTree.
    if not hashes:
        return crypto.EMPTY_ROOT
    if len(hashes) == 1:
        return hashes[0]
    k = 1
    while k * 2 < len(hashes):
        k *= 2
    return crypto.node_hash(_reference_root(hashes[:k]), _reference_root(hashes[k:]))


def test_ct_reference_roots():
    tree = _ct_tree()
    assert tree.root(0) == crypto.EMPTY_ROOT
    for n in range(1, 9):
        assert tree.root(n) == CT_ROOTS[n - 1]
        assert crypto.root(CT_INPUTS[:n]) == CT_ROOTS[n - 1]


def test_ct_reference_paths_and_consistency():
    tree = _ct_tree()
    for index, size, path in CT_PATHS:
        proof = tree.inclusion_proof(index, size)
        assert [p.hex() for p in proof] == path
        verify_inclusion(leaf_hash(CT_INPUTS[index]), index, size, proof, CT_ROOTS[size - 1])
    for m, n, path in CT_CONSISTENCY:
        proof = tree.consistency_proof(m, n)
        assert [p.hex() for p in proof] == path
        verify_consistency(m, n, CT_ROOTS[m - 1], CT_ROOTS[n - 1], proof)


def test_every_inclusion_and_consistency_up_to_40():
    hashes = [leaf_hash(bytes([i, i * 7 % 256])) for i in range(40)]
    tree = MerkleTree(hashes)
    for n in range(1, 41):
        r = tree.root(n)
        assert r == _reference_root(hashes[:n])
        for i in range(n):
            proof = tree.inclusion_proof(i, n)
            verify_inclusion(hashes[i], i, n, proof, r)
            with pytest.raises(VerificationError):
                verify_inclusion(hashes[(i + 1) % n] if n > 1 else b"x" * 32, i, n, proof, r)
            if proof:
                bad = list(proof)
                bad[len(bad) // 2] = bytes(32)
                with pytest.raises(VerificationError):
                    verify_inclusion(hashes[i], i, n, bad, r)
                with pytest.raises(VerificationError):
                    verify_inclusion(hashes[i], i, n, proof[:-1], r)
            with pytest.raises(VerificationError):
                verify_inclusion(hashes[i], i, n, proof + [r], r)
        for m in range(0, n + 1):
            proof = tree.consistency_proof(m, n)
            verify_consistency(m, n, tree.root(m), r, proof)
            if 0 < m < n:
                with pytest.raises(VerificationError):
                    verify_consistency(m, n, tree.root(m), tree.root(n - 1) if n - 1 != m else bytes(32), proof)
                for j in range(len(proof)):
                    bad = list(proof)
                    bad[j] = bytes(32)
                    with pytest.raises(VerificationError):
                        verify_consistency(m, n, tree.root(m), r, bad)
                with pytest.raises(VerificationError):
                    verify_consistency(m, n, tree.root(m), r, proof[:-1])


def test_leaf_and_node_hashing_are_domain_separated():
    a, b = leaf_hash(b"a"), leaf_hash(b"b")
    # A node must never equal the leaf hash of its children's concatenation (second preimage).
    assert crypto.node_hash(a, b) != leaf_hash(a + b)
    assert MerkleTree([a, b]).root() == crypto.node_hash(a, b)


def test_keys_load_from_pem_hex_base64_file_and_env(tmp_path, monkeypatch):
    key = SigningKey.generate()
    pem = key.private_pem()
    from cryptography.hazmat.primitives import serialization

    seed_hex = serialization.load_pem_private_key(pem, None).private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()).hex()
    for text in (pem, seed_hex, base64.b64encode(bytes.fromhex(seed_hex)).decode()):
        assert SigningKey.parse(text).key_id == key.key_id
    f = tmp_path / "k.pem"
    f.write_bytes(pem)
    f.chmod(0o600)
    assert SigningKey.from_file(f).key_id == key.key_id
    for mode in (0o640, 0o604, 0o620):  # readable by the group or others, or writable: refused, with what to do
        f.chmod(mode)
        with pytest.raises(ConfigError, match="chmod 600"):
            SigningKey.from_file(f)
        with pytest.raises(ConfigError, match="chmod 600"):
            SigningKey.from_file(f, role="validator")
    monkeypatch.setenv("MS_TEST_KEY", seed_hex)
    loaded = SigningKey.from_env("MS_TEST_KEY")
    assert loaded.key_id == key.key_id
    assert seed_hex not in repr(loaded) and seed_hex not in str(loaded) and "redacted" in repr(loaded)
    assert len(key.key_id) == 32
    with pytest.raises(ConfigError):
        SigningKey.from_env("MS_TEST_KEY_UNSET")
    with pytest.raises(ConfigError):
        SigningKey.parse("not a key")
    with pytest.raises(TypeError):
        import pickle
        pickle.dumps(key)


def test_keyring_rotation_keeps_old_signatures_valid():
    old, new, stranger = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    ring = KeyRing([old])
    sig_old = old.sign(b"m")
    ring.add(VerifyKey.parse(new.verify_key.hex()))
    ring.verify(old.key_id, sig_old, b"m")
    ring.verify(new.key_id, new.sign(b"m"), b"m")
    with pytest.raises(SignatureError):
        ring.verify(old.key_id, sig_old, b"m2")
    with pytest.raises(SignatureError):
        ring.verify(stranger.key_id, stranger.sign(b"m"), b"m")
    with pytest.raises(SignatureError):  # a signature by another key under a known id
        ring.verify(new.key_id, stranger.sign(b"m"), b"m")


def test_canonical_encoding_is_deterministic_and_injective():
    v = np.arange(4, dtype=np.float32)
    a = canonical_encode("d", {"b": b"x", "a": "s", "n": 3, "v": v, "z": None})
    assert a == canonical_encode("d", {"z": None, "v": v.copy(), "n": 3, "a": "s", "b": b"x"})
    assert a != canonical_encode("e", {"b": b"x", "a": "s", "n": 3, "v": v, "z": None})
    # Moving a byte between adjacent fields changes the encoding (length prefixes).
    assert canonical_encode("d", {"a": "ab", "b": "c"}) != canonical_encode("d", {"a": "a", "b": "bc"})
    assert canonical_encode("d", {"a": b"1"}) != canonical_encode("d", {"a": "1"})
    assert canonical_encode("d", {"a": None}) != canonical_encode("d", {"a": b""})
    with pytest.raises(TypeError):
        canonical_encode("d", {"a": 1.5})


def test_signed_tree_head_roundtrip_and_tamper():
    key = SigningKey.generate()
    sth = SignedTreeHead.create(key, "log", 8, CT_ROOTS[7], 123)
    ring = KeyRing([key])
    SignedTreeHead.from_json(sth.to_json()).verify(ring)
    forged = SignedTreeHead(sth.log_id, 9, sth.root_hash, sth.timestamp_ns, sth.key_id, sth.signature)
    with pytest.raises(SignatureError):
        forged.verify(ring)


def test_frontier_roots_match_the_full_tree():
    hashes = [leaf_hash(i.to_bytes(2, "big")) for i in range(70)]
    tree = MerkleTree(hashes)
    f = crypto.MerkleFrontier()
    for n, h in enumerate(hashes, start=1):
        f.append_hash(h)
        assert f.root() == tree.root(n)
        # A frontier restored from its stored hashes continues identically.
        f = crypto.MerkleFrontier(f.size, list(f.hashes))
    with pytest.raises(VerificationError):
        crypto.MerkleFrontier(3, [bytes(32)])


def test_keys_new_writes_an_owner_only_file_that_states_its_role(tmp_path, capsys):
    import json
    import stat

    from memstream.cli import main

    out = tmp_path / "keys" / "validator.pem"
    assert main(["keys", "new", "--role", "validator", "--out", str(out), "--public-out", str(tmp_path / "v.pub"),
                 "--json"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600 and made["role"] == "validator"
    key = SigningKey.from_file(out, role="validator")
    assert key.key_id == made["key_id"] and (tmp_path / "v.pub").read_text().strip() == key.verify_key.hex()
    with pytest.raises(ConfigError, match="validator key"):
        SigningKey.from_file(out, role="governance")  # one key, one role
    assert main(["keys", "show", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["key_id"] == key.key_id
    assert main(["keys", "new", "--role", "validator", "--out", str(out)]) == 2  # never overwritten
    assert "never overwrites" in capsys.readouterr().err


def test_one_key_is_refused_in_two_roles(tmp_path):
    """Validator, governance, maintenance and witness keys are distinct: the same key under two
    roles is refused where the roles meet, even from bare key files that state no role."""
    from memstream.crypto.keys import ROLES, check_distinct_roles
    from memstream.longterm import GovernancePolicy, LongTermStore

    assert set(ROLES) >= {"validator", "governance", "maintenance", "witness"}
    keys = {r: SigningKey.generate() for r in ROLES}
    check_distinct_roles({r: [k] for r, k in keys.items()})  # distinct: accepted
    for a, b in [("validator", "governance"), ("maintenance", "witness"), ("validator", "maintenance"),
                 ("governance", "witness")]:
        roles = {r: [k] for r, k in keys.items()}
        roles[b] = [*roles[b], keys[a].verify_key]  # the public half of a's key, as a ring holds it
        with pytest.raises(ConfigError, match=f"both a {a} key and a {b} key"):
            check_distinct_roles(roles)
    with pytest.raises(ConfigError, match="unknown key role"):
        check_distinct_roles({"reader": [keys["validator"]]})
    shared = keys["validator"]
    gov = [SigningKey.generate(), shared]
    with pytest.raises(ConfigError, match="both a validator key and a governance key"):
        LongTermStore(str(tmp_path / "ltm"), keyring=KeyRing([shared]), signer=shared, dim=8,
                      governance=GovernancePolicy(KeyRing(gov), 2))
    store = LongTermStore(str(tmp_path / "ltm"), keyring=KeyRing([shared]), signer=shared, dim=8,
                          governance=GovernancePolicy(KeyRing([SigningKey.generate(), keys["governance"]]), 2))
    store.close()


def test_key_file_readable_by_others_refused(tmp_path):
    """A private key file open to the group or others is refused with what to do; the key
    files memstream writes are owner-only whatever the umask."""
    import os
    import stat

    from memstream.crypto.keys import write_key_file
    from memstream.errors import KeyPermissionError

    old = os.umask(0)  # the most permissive umask: the file must still be 0600
    try:
        f = write_key_file(tmp_path / "m.pem", SigningKey.generate(), "maintenance")
    finally:
        os.umask(old)
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert SigningKey.from_file(f, role="maintenance").role == "maintenance"
    for mode in (0o644, 0o640, 0o604, 0o660):
        f.chmod(mode)
        with pytest.raises(KeyPermissionError, match=f"chmod 600 {f}"):
            SigningKey.from_file(f, role="maintenance")


def test_shared_key_roles_refused(tmp_path, monkeypatch):
    """Where roles meet, one key in two of them is refused: a maintenance key as the long-term
    store's signer (entries and tree heads are a validator's to sign), a validator key among
    the maintenance keys, and one key for both the entries and the records of consolidation."""
    from memstream.crypto.keys import write_key_file
    from memstream.errors import KeyRoleError
    from memstream.longterm import LongTermStore
    from memstream.maintenance.consolidate import consolidate_sessions

    maintenance = SigningKey.from_file(write_key_file(tmp_path / "m.pem", SigningKey.generate(), "maintenance"))
    validator = SigningKey.generate()
    with pytest.raises(KeyRoleError, match="is a maintenance key"):
        LongTermStore(str(tmp_path / "a"), keyring=KeyRing([validator]), signer=maintenance, dim=8)
    monkeypatch.setenv("MS_TEST_KEY", (tmp_path / "m.pem").read_text())
    with pytest.raises(KeyRoleError, match="holds a maintenance key"):
        SigningKey.from_env("MS_TEST_KEY", role="validator")
    with pytest.raises(KeyRoleError, match="both a validator key and a maintenance key"):
        LongTermStore(str(tmp_path / "b"), keyring=KeyRing([validator]), signer=validator, dim=8,
                      maintenance_keys=[validator.verify_key])
    store = LongTermStore(str(tmp_path / "c"), keyring=KeyRing([validator]), signer=validator, dim=8,
                          maintenance_keys=[maintenance.verify_key])
    with pytest.raises(KeyRoleError, match="both a validator key and a maintenance key"):
        consolidate_sessions(str(tmp_path / "episodic"), None, store, key=validator, retention_s=1.0)
    store.close()
