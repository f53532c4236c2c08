"""The read API over HTTP: explicit requests, the OpenAPI spec checked by schemathesis
(property-based), and the end-to-end read of latents published through the SDK."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from memstream import topics
from memstream.episodic.chain import verify_chain
from memstream.crypto import KeyRing, SigningKey
from memstream.infra import process
from memstream.longterm import LongTermStore
from memstream.operators.checkpoint import load_default
from memstream.settings import WINDOW
from memstream.read.memory import Memory
from memstream.sdk import Publisher
from memstream.read.http import create_app
from tests.read_fixtures import cue, wait_healthy, write_session

D = 384


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A Memory over a real local episodic store (session "s") and long-term store, and its app."""
    root = tmp_path_factory.mktemp("serve")
    key, model = SigningKey.generate(), load_default()
    x = np.random.default_rng(0).standard_normal((2 * WINDOW, D)).astype(np.float32)
    write_session(str(root / "m"), None, model, key, "s", x)
    lt = LongTermStore(str(root / "ltm"), keyring=KeyRing([key]), signer=key, dim=D)
    lt.append([lt.new_entry(v, f"p{i}".encode(), query=f"q{i}") for i, v in enumerate(x[:20])])
    memory = Memory(str(root / "m"), str(root / "ltm"), keyring=KeyRing([key]), model=model)
    app = create_app(memory, insecure_no_auth=True)  # the API's shape; access is tests/test_auth.py's
    yield memory, app, x, key
    memory.close()


@pytest.fixture(scope="module")
def client(served):
    with TestClient(served[1]) as c:
        yield c


def test_read_by_list_and_base64_with_provenance(served, client):
    memory, _, x, key = served
    q = cue(x[5], 0.3, 0)
    r = client.post("/v1/read", json={"query": q.tolist(), "session_id": "s", "k": 2, "route": "both"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["route"] == {"route": "both", "probabilities": {}, "chosen_by": "caller"}
    eps = [f for f in body["fragments"] if f["source"] == "episodic"]
    lts = [f for f in body["fragments"] if f["source"] == "longterm"]
    assert len(eps) == 2 and len(lts) == 2 and len(body["reconstruction"]) == D
    stored = {r.window_index: r for r in memory.store.records("s")}
    for f in eps:
        p = f["episodic"]
        assert p["hash"] == stored[p["window_index"]].hash.hex() and p["verified"] and p["key_id"] == key.key_id
        assert f["longterm"] is None and len(f["latent"]) == D
    assert base64.b64decode(lts[0]["payload_b64"]) == b"p5" and lts[0]["tier"] == "hot"
    r2 = client.post("/v1/read", json={"query_b64": base64.b64encode(q.astype("<f4").tobytes()).decode(),
                                       "session_id": "s", "k": 2, "route": "both"})
    assert r2.status_code == 200
    assert [f["score"] for f in r2.json()["fragments"]] == pytest.approx([f["score"] for f in body["fragments"]])
    routed = client.post("/v1/read", json={"query": q.tolist(), "session_id": "s"}).json()
    assert routed["route"]["chosen_by"] == "policy" and set(routed["route"]["probabilities"]) == {
        "episodic", "longterm", "both"}
    sources = {f["source"] for f in routed["fragments"]}
    # Stage 1 skips the long-term search (episodic only) or stage 2 ran it (long-term hits returned).
    assert sources == {"episodic"} if routed["route"]["route"] == "episodic" else "longterm" in sources
    assert sum(routed["route"]["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    assert client.get("/v1/stats").json()["reads"] >= 3


@pytest.mark.parametrize("body, status, code, words", [
    ({"query": [0.5] * (D - 1), "session_id": "s"}, 422, "malformed_request", "query"),
    ({"query_b64": base64.b64encode(b"\0" * 8).decode(), "session_id": "s"}, 422, "malformed_request", "query_b64"),
    ({"query_b64": "not base64!", "session_id": "s"}, 422, "malformed_request", "query_b64"),
    ({"query": None, "query_b64": "AAAA", "session_id": "s"}, 422, "malformed_request", "query"),
    ({"query": [3.5e38] + [0.5] * (D - 1), "session_id": "s"}, 422, "malformed_request", "query"),
    ({"query": [0.5] * D, "session_id": "nobody"}, 404, "unknown_session", "memstream run"),
    ({"query": [0.5] * D, "session_id": "s", "k": 0}, 422, "malformed_request", "k"),
    ({"session_id": "s"}, 422, "invalid_query", "exactly one"),
    ({"query": [0.5] * D, "session_id": "s", "extra": 1}, 422, "malformed_request", "extra"),
    ({"query": "abc", "session_id": "s"}, 422, "malformed_request", "query"),
])
def test_bad_requests_get_typed_4xx_errors(client, body, status, code, words):
    r = client.post("/v1/read", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and words in err["message"], err


def test_nan_and_malformed_json_are_refused(client):
    nan = "[" + ",".join(["NaN"] + ["0.5"] * (D - 1)) + "]"
    r = client.post("/v1/read", content=f'{{"query": {nan}, "session_id": "s"}}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] in ("invalid_query", "malformed_request")
    assert "NaN" in r.json()["error"]["message"] or "finite" in r.json()["error"]["message"]
    nan_b64 = base64.b64encode(np.full(D, np.nan, "<f4").tobytes()).decode()
    r = client.post("/v1/read", json={"query_b64": nan_b64, "session_id": "s"})
    assert r.status_code == 422 and r.json()["error"] == {
        "code": "invalid_query", "message": "the query latent holds NaN or Inf: pass finite values",
        "type": "InvalidQueryError"}
    r = client.post("/v1/read", content=b'{"query": [1, 2', headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "malformed_request"


def test_api_conforms_to_its_openapi_spec(served):
    """Property-based: schemathesis generates requests from the spec (valid ones, then ones
    that violate it) for every operation; each response must be one the spec documents
    (status, content type, body schema), never a server error, and invalid requests must be
    refused."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", served[1])
    ran = 0
    for path, method in [("/v1/read", "POST"), ("/v1/stats", "GET"), ("/v1/health", "GET")]:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            if method == "GET" and mode is schemathesis.GenerationMode.NEGATIVE:
                continue  # no parameters to get wrong

            # Schema-valid reads can still be refused: base64 may encode NaN, a session id may be
            # unknown. Both are documented 4xx answers, so "valid data must be accepted" is the one
            # check left out there; every other check runs (negative data must be refused, etc.).
            excluded = [positive_data_acceptance] if path == "/v1/read" else []

            @given(case=schema[path][method].as_strategy(generation_mode=mode))
            @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            def check(case):
                case.call_and_validate(excluded_checks=excluded)

            check()
            ran += 1
    assert ran == 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_published_latents_read_back_through_python_and_http(kafka_bootstrap, topic_name, tmp_path):
    """SDK -> `memstream run --until-idle` (Prism) -> Memory.read and `memstream serve`."""
    names = {t: f"{topic_name}.{t}" for t in ("latents", "summaries", "deadletter")}
    topics.create_topics(kafka_bootstrap, list(names.values()), partitions=2)
    key = SigningKey.generate()
    key_file = tmp_path / "validator.pem"
    key_file.write_bytes(key.private_pem())
    key_file.chmod(0o600)
    store = str(tmp_path / "episodic")
    x = np.random.default_rng(3).standard_normal((2 * WINDOW + 700, D)).astype(np.float32)
    with Publisher(kafka_bootstrap, topic=names["latents"]) as pub:
        with pub.session("e2e") as s:
            for i in range(0, len(x), 1000):
                s.publish(x[i:i + 1000])
    run = subprocess.run([sys.executable, "-m", "memstream.cli", "run", "--runner", "prism", "--until-idle",
                          "--bootstrap", kafka_bootstrap, "--episodic", store, "--key-file", str(key_file),
                          "--latents-topic", names["latents"], "--summaries-topic", names["summaries"],
                          "--deadletter-topic", names["deadletter"]], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    with Memory(store, keyring=KeyRing([key])) as memory:
        stored = memory.store.records("e2e")
        assert verify_chain("e2e", stored, KeyRing([key])).ok and len(stored) == 3
        res = memory.read(cue(x[WINDOW + 100], 0.3, 1), "e2e", k=3, route="episodic")
    by_window = {r.window_index: r for r in stored}
    assert sorted(f.provenance.window_index for f in res.fragments) == [0, 1, 2]
    for f in res.fragments:
        p, r = f.provenance, by_window[f.provenance.window_index]
        assert p.verified and p.hash == r.hash.hex() and p.key_id == key.key_id and p.session_id == "e2e"
        assert (p.seq_start, p.seq_end) == (r.seq_start, r.seq_end) == (
            p.window_index * WINDOW, min(len(x), (p.window_index + 1) * WINDOW))
    # Authentication is on by default: a tenant owning the session, and its credential.
    cli = [sys.executable, "-m", "memstream.cli"]
    subprocess.run([*cli, "tenants", "add", "t1", "--sessions", "e2e", "--episodic", store], check=True)
    issued = subprocess.run([*cli, "credentials", "issue", "--tenant", "t1", "--episodic", store, "--json"],
                            check=True, capture_output=True, text=True)
    auth = {"Authorization": f"Bearer {json.loads(issued.stdout)['token']}"}
    port = _free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "memstream.cli", "serve", "--episodic", store,
                                   "--public-key", key.verify_key.hex(),
                                   "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        wait_healthy(port, server, log)
        body = {"query": cue(x[WINDOW + 100], 0.3, 1).tolist(), "session_id": "e2e", "k": 3, "route": "episodic"}
        anonymous = httpx.post(f"http://127.0.0.1:{port}/v1/read", timeout=60, json=body)
        assert anonymous.status_code == 401 and anonymous.json()["error"]["type"] == "AuthenticationError"
        r = httpx.post(f"http://127.0.0.1:{port}/v1/read", timeout=60, json=body, headers=auth)
        assert r.status_code == 200, r.text
        over_http = {f["episodic"]["window_index"]: f for f in r.json()["fragments"]}
        for f in res.fragments:
            h = over_http[f.provenance.window_index]
            assert h["episodic"] == json.loads(json.dumps(f.provenance.__dict__))
            assert h["score"] == pytest.approx(f.score, rel=1e-4)
        assert httpx.get(f"http://127.0.0.1:{port}/openapi.json").json()["info"]["title"] == "memstream read API"
    finally:
        process.stop_pid(server.pid, timeout=10)
    from memstream.episodic.ledger import ReadLedger

    assert ReadLedger(store).query_count("e2e") == 2  # one read each way; the server flushed on shutdown



def test_concurrent_reads_over_http_agree_with_serial_ones_and_a_cold_session_blocks_no_other(tmp_path):
    """`memstream serve`'s app on a real uvicorn server with 4 read threads: 16 clients at once
    get the answers one client gets alone, and while one client waits for a large session to
    load from the store, reads of a loaded session go on."""
    import threading

    import uvicorn

    key, model = SigningKey.generate(), load_default()
    rng = np.random.default_rng(8)
    uri = str(tmp_path / "m")
    x = rng.standard_normal((2 * WINDOW, D)).astype(np.float32)
    write_session(uri, None, model, key, "s", x)
    write_session(uri, None, model, key, "big", rng.standard_normal((240 * 256, D)).astype(np.float32), window=256)
    memory = Memory(uri, keyring=KeyRing([key]), model=model)
    memory.session_memory("s")
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(memory, workers=4, insecure_no_auth=True), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}/v1/read"
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.05)
        queries = [cue(x[i * 500], 0.3, i) for i in range(16)]

        def post(q, session="s"):
            with httpx.Client(timeout=300) as c:
                r = c.post(url, json={"query": q.tolist(), "session_id": session, "k": 2, "route": "episodic"})
                assert r.status_code == 200, r.text
                return r.json()

        alone = [post(q) for q in queries]
        together: list = [None] * len(queries)
        done_at: dict[str, float] = {}

        def client(i):
            together[i] = post(queries[i])

        def cold():
            post(queries[0], "big")
            done_at["big"] = time.monotonic()

        loader = threading.Thread(target=cold)
        loader.start()
        time.sleep(0.05)
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(queries))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done_at["s"] = time.monotonic()
        loader.join()
        assert done_at["s"] < done_at["big"], "reads of a loaded session waited for a cold one to load"
        for a, b in zip(alone, together):
            assert [f["episodic"]["window_index"] for f in a["fragments"]] == [
                f["episodic"]["window_index"] for f in b["fragments"]]
            assert [f["score"] for f in a["fragments"]] == pytest.approx([f["score"] for f in b["fragments"]])
            assert b["reconstruction"] == pytest.approx(a["reconstruction"], abs=1e-5)
    finally:
        server.should_exit = True
        thread.join(30)
    assert memory.stats.reads == 2 * len(queries) + 1
