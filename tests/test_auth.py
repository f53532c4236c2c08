"""Access to the read API, adversarially: tenants own sessions, credentials are stored hashed,
anonymous reads get 401, reads of another tenant's session get 403 and are never accounted
(so they cannot evict its summaries), long-term search is scoped to the tenant's subjects,
and the service runs open only with a flag that says so. Real stores (local and S3), a real
HTTP server for the command line."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from memstream.access.registry import AccessGuard, AccessRegistry
from memstream.crypto import KeyRing, SigningKey
from memstream.episodic.ledger import ReadLedger
from memstream.errors import AuthenticationError, ConfigError
from memstream.infra import process
from memstream.longterm import LongTermStore
from memstream.operators.checkpoint import load_default
from memstream.read.http import create_app
from memstream.read.memory import Memory
from tests.read_fixtures import cue, wait_healthy, write_session

D = 384


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Session "acme/s" (4 windows, each around its own centres, so cues of window 1 read
    window 1) owned by tenant acme, "beta/t" by beta; long-term entries of subjects alice
    (acme's), bob (beta's) and of none."""
    root = tmp_path_factory.mktemp("auth")
    key, model = SigningKey.generate(), load_default()
    rng = np.random.default_rng(6)
    centres = rng.standard_normal((4, 64, D)).astype(np.float32)
    x = (centres[:, rng.integers(0, 64, 4096)] + 0.3 * rng.standard_normal((4, 4096, D))).reshape(-1, D)
    x = x.astype(np.float32)
    uri = str(root / "m")
    write_session(uri, None, model, key, "acme/s", x)
    write_session(uri, None, model, key, "beta/t", x[: 2 * 4096])
    lt = LongTermStore(str(root / "ltm"), keyring=KeyRing([key]), signer=key, dim=D)
    subjects = ["alice", "bob", None]
    lt.append([lt.new_entry(v, f"{subjects[i % 3]}-{i}".encode(), query=f"q{i}", forget_subject=subjects[i % 3])
               for i, v in enumerate(x[:30])])
    reg = AccessRegistry(str(root / "access"))
    reg.add_tenant("acme")
    reg.grant("acme", ["acme/*"], ["alice"])
    reg.add_tenant("beta")
    reg.grant("beta", ["beta/t"], ["bob"])
    tokens = {"acme": reg.issue("acme")[1], "beta": reg.issue("beta")[1]}
    return {"root": root, "uri": uri, "ltm": str(root / "ltm"), "key": key, "model": model, "x": x, "reg": reg,
            "tokens": tokens}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def app_over(world, memory):
    return create_app(memory, access=AccessGuard(world["reg"], refresh_s=0.2))


def read_body(world, session: str, i: int = 0, route: str = "episodic", k: int = 1) -> dict:
    return {"query": cue(world["x"][4096 + i], 0.3, i).tolist(), "session_id": session, "k": k, "route": route}


def test_anonymous_and_bad_credentials_get_typed_401(world):
    memory = Memory(world["uri"], keyring=KeyRing([world["key"]]), model=world["model"])
    acme = world["tokens"]["acme"]
    with TestClient(app_over(world, memory)) as c:
        for headers, words in [({}, "needs a credential"),
                               ({"Authorization": "Basic dXNlcjpwYXNz"}, "Bearer mst_"),
                               (bearer("mst_nothex"), "Bearer mst_"),
                               (bearer(acme[:-4] + ("AAAA" if not acme.endswith("AAAA") else "BBBB")), "not known"),
                               (bearer(f"mst_{'0' * 16}_{acme.split('_', 2)[2]}"), "not known")]:
            r = c.post("/v1/read", json=read_body(world, "acme/s"), headers=headers)
            assert r.status_code == 401, (headers, r.text)
            err = r.json()["error"]
            assert err["type"] == "AuthenticationError" and err["code"] == "unauthenticated", err
            assert words in err["message"] and r.headers["www-authenticate"] == "Bearer"
        assert c.get("/v1/stats").status_code == 401
        assert c.get("/v1/stats", headers=bearer(acme)).status_code == 200
        assert c.get("/v1/health").status_code == 200  # liveness stays open: it reveals nothing
    assert ReadLedger(world["uri"]).query_count("acme/s") == 0


def test_expired_and_revoked_credentials_are_refused(world):
    reg = world["reg"]
    _, short = reg.issue("acme", ttl_s=0.5)
    revoked, token = reg.issue("acme")
    guard = AccessGuard(reg, refresh_s=60)
    assert guard.check(f"Bearer {short}", "acme/s").tenant == "acme"
    assert guard.check(f"Bearer {token}", "acme/s").tenant == "acme"
    time.sleep(0.6)
    with pytest.raises(AuthenticationError, match="expired"):
        guard.check(f"Bearer {short}", "acme/s")
    reg.revoke(revoked.credential_id)
    guard.refresh()
    with pytest.raises(AuthenticationError, match="revoked"):
        guard.check(f"Bearer {token}", "acme/s")
    guard.close()


def test_foreign_reads_get_403_and_cannot_evict_the_sessions_summaries(tmp_path, world):
    """Beta reads acme's session 140 times (enough to evict its unread summaries, as the
    control below shows): every read is refused with 403, none reaches the ledger, and the
    decay task evicts nothing. Then acme's own 140 reads do evict: the refusal is what saved them."""
    import shutil

    from memstream.maintenance.episodic import decay

    uri = str(tmp_path / "m")
    shutil.copytree(world["uri"], uri)
    memory = Memory(uri, keyring=KeyRing([world["key"]]), model=world["model"], flush_every=8)
    beta, acme = bearer(world["tokens"]["beta"]), bearer(world["tokens"]["acme"])
    with TestClient(app_over(world, memory)) as c:
        for i in range(140):
            r = c.post("/v1/read", json=read_body(world, "acme/s", i), headers=beta)
            assert r.status_code == 403, r.text
            assert r.json()["error"]["type"] == "AuthorizationError" and r.json()["error"]["code"] == "forbidden"
        # An unknown session is refused alike: a 404 would tell a foreign caller which ids exist.
        r = c.post("/v1/read", json=read_body(world, "acme/none"), headers=beta)
        assert r.status_code == 403
        r = c.post("/v1/read", json=read_body(world, "nobody/x"), headers=acme)
        assert r.status_code == 403, "a session no tenant owns is granted to nobody"
    assert ReadLedger(uri).query_count("acme/s") == 0
    out = decay(uri, k=64, slope=0.125, cutoff=-8.0)
    assert out["evicted"] == 0
    assert Memory(uri, model=world["model"]).session_memory("acme/s").windows == [0, 1, 2, 3]

    memory = Memory(uri, keyring=KeyRing([world["key"]]), model=world["model"], flush_every=8)
    with TestClient(app_over(world, memory)) as c:
        for i in range(140):
            r = c.post("/v1/read", json=read_body(world, "acme/s", i), headers=acme)
            assert r.status_code == 200, r.text
    assert ReadLedger(uri).query_count("acme/s") == 140
    assert decay(uri, k=64, slope=0.125, cutoff=-8.0)["evicted"] >= 1


def test_granted_reads_work_and_long_term_search_is_scoped_to_the_tenants_subjects(world):
    memory = Memory(world["uri"], world["ltm"], keyring=KeyRing([world["key"]]), model=world["model"])
    with TestClient(app_over(world, memory)) as c:
        for tenant, session, subject in [("acme", "acme/s", "alice"), ("beta", "beta/t", "bob")]:
            for route in ("both", None):  # the routing probe is scoped too
                body = read_body(world, session, 3, route="both", k=8)
                if route is None:
                    body.pop("route")
                r = c.post("/v1/read", json=body, headers=bearer(world["tokens"][tenant]))
                assert r.status_code == 200, r.text
                got = r.json()
                payloads = [f["payload_b64"] for f in got["fragments"] if f["source"] == "longterm"]
                if got["route"]["route"] in ("longterm", "both"):
                    import base64

                    names = [base64.b64decode(p).decode() for p in payloads]
                    assert len(names) == 8 and all(n.startswith(f"{subject}-") for n in names), names
                if got["route"]["route"] in ("episodic", "both"):
                    assert any(f["source"] == "episodic" for f in got["fragments"])
    memory.close()
    # Scoping is the store's: unscoped search sees every subject, an empty scope sees nothing.
    lt = LongTermStore(world["ltm"], keyring=KeyRing([world["key"]]), dim=D)
    assert len(lt.search(world["x"][3], 30, record_access=False)) == 30
    assert lt.search(world["x"][3], 30, record_access=False, subjects=frozenset()) == []
    with pytest.raises(ConfigError, match="subject hashes"):
        lt.search(world["x"][3], 3, subjects=frozenset({"alice' OR 1=1 --"}))


def test_a_credential_can_be_narrowed_to_some_of_its_tenants_sessions(world, tmp_path):
    reg = AccessRegistry(str(tmp_path / "access"))
    reg.add_tenant("acme")
    reg.grant("acme", ["acme/s", "acme/u"])
    _, narrow = reg.issue("acme", sessions=["acme/s"])
    guard = AccessGuard(reg, refresh_s=60)
    assert guard.check(f"Bearer {narrow}", "acme/s").tenant == "acme"
    with pytest.raises(Exception, match="not granted session 'acme/u'"):
        guard.check(f"Bearer {narrow}", "acme/u")
    with pytest.raises(ConfigError, match="does not own"):
        reg.issue("acme", sessions=["beta/t"])
    guard.close()


def test_ownership_is_exclusive_and_no_secret_is_stored(backend):
    uri, options = backend
    reg = AccessRegistry(uri + "/access", options)
    assert reg.add_tenant("acme") and reg.add_tenant("beta") and not reg.add_tenant("acme")
    reg.grant("acme", ["s1", "acme/*"], ["alice"])
    for sessions, subjects, what in [(["s1"], [], "session 's1'"), (["acme/x/*"], [], "overlaps"),
                                     (["a*"], [], "overlaps"), ([], ["alice"], "subject 'alice'")]:
        with pytest.raises(ConfigError, match=what):
            reg.grant("beta", sessions, subjects)
    with pytest.raises(ConfigError, match="no tenant 'gamma'"):
        reg.grant("gamma", ["s9"])
    with pytest.raises(ConfigError, match="tenant name"):
        reg.add_tenant("../etc")
    cred, token = reg.issue("acme")
    g = reg.load()
    assert g.owner("s1") == g.owner("acme/1") == "acme" and g.owner("beta/1") is None
    assert g.authenticate(f"Bearer {token}").tenant == "acme"
    # Stored: the secret's hash, never the secret; session ids and subjects only as hashes.
    secret = token.split("_", 2)[2].encode()
    from memstream.storage.objects import iter_objects, read_object

    found = list(iter_objects(uri + "/access", options))
    assert len(found) == 6  # 2 tenants, a session, a prefix, a subject, a credential
    everything = b"".join(read_object(uri + "/access", path, options) for path, _ in found)
    assert cred.secret_sha256.encode() in everything
    assert secret not in everything and b"alice" not in everything and b'"s1"' not in everything


def test_serve_is_authenticated_unless_started_with_insecure_no_auth(world, tmp_path):
    """`memstream serve` with credentials of `memstream credentials issue`; open only with
    --insecure-no-auth; create_app refuses to build an open app without being told."""
    from tests.test_serve import _free_port

    cli = [sys.executable, "-m", "memstream.cli"]
    access = str(tmp_path / "access")
    subprocess.run([*cli, "tenants", "add", "acme", "--sessions", "acme/s", "--access", access], check=True)
    issued = json.loads(subprocess.run([*cli, "credentials", "issue", "--tenant", "acme", "--ttl", "1h",
                                        "--access", access, "--json"], check=True, capture_output=True,
                                       text=True).stdout)
    assert issued["token"].startswith("mst_") and issued["expires"]
    assert "--insecure-no-auth" in subprocess.run([*cli, "serve", "--help"], capture_output=True, text=True).stdout
    with pytest.raises(ConfigError, match="insecure_no_auth"):
        create_app(Memory(world["uri"], model=world["model"]))
    for flags, anonymous_status in [([], 401), (["--insecure-no-auth"], 200)]:
        port = _free_port()
        log = tmp_path / f"serve{len(flags)}.log"
        with open(log, "wb") as out:
            server = subprocess.Popen([*cli, "serve", "--episodic", world["uri"], "--access", access,
                                       "--public-key", world["key"].verify_key.hex(), "--port", str(port), *flags],
                                      stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_healthy(port, server, log)
            url = f"http://127.0.0.1:{port}/v1/read"
            r = httpx.post(url, json=read_body(world, "acme/s"), timeout=60)
            assert r.status_code == anonymous_status, r.text
            if not flags:
                assert r.json()["error"]["type"] == "AuthenticationError"
                ok = httpx.post(url, json=read_body(world, "acme/s"), headers=bearer(issued["token"]), timeout=60)
                assert ok.status_code == 200, ok.text
                other = httpx.post(url, json=read_body(world, "beta/t"), headers=bearer(issued["token"]), timeout=60)
                assert other.status_code == 403
        finally:
            process.stop_pid(server.pid, timeout=10)
        if flags:
            assert "--insecure-no-auth" in log.read_text()  # it says so, loudly


def test_authenticated_api_conforms_to_its_openapi_spec(world):
    """schemathesis against the app with access on: the spec declares the bearer scheme, a
    request with a generated (invalid) credential must get 401, and every answer to a valid
    credential is one the spec documents (403 for sessions not granted)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    memory = Memory(world["uri"], keyring=KeyRing([world["key"]]), model=world["model"])
    app = app_over(world, memory)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    assert "HTTPBearer" in json.dumps(schema.raw_schema["components"]["securitySchemes"])
    for path, method in [("/v1/read", "POST"), ("/v1/stats", "GET")]:
        @given(case=schema[path][method].as_strategy(generation_mode=schemathesis.GenerationMode.POSITIVE))
        @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def check(case):
            case.call_and_validate(headers=bearer(world["tokens"]["acme"]), excluded_checks=[positive_data_acceptance])

        check()
    memory.close()
