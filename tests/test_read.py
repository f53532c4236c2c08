"""The unified read API on real stores: LanceDB (local and S3 on SeaweedFS), Kafka for read
sampling, the pipeline on Prism for the end-to-end read."""

from __future__ import annotations

import multiprocessing
import shutil
import threading
from collections import Counter

import lancedb
import numpy as np
import pytest
import torch
from kafka import KafkaConsumer

from memstream import topics
from memstream.crypto import KeyRing, SigningKey
from memstream.episodic.store import EpisodicStore
from memstream.errors import IntegrityError, InvalidQueryError, SessionNotFoundError
from memstream.longterm import LongTermStore
from memstream.operators.checkpoint import load_default
from memstream.read.memory import Memory
from memstream.read.window import SessionWindow
from memstream.episodic.ledger import ReadLedger
from memstream.read.routing import RoutePolicy
from memstream.schemas.records import ReadDivergence
from tests.read_fixtures import cue, sealed_summaries, write_session

D = 384


@pytest.fixture(scope="module")
def model():
    return load_default()


@pytest.fixture(scope="module")
def key():
    return SigningKey.generate()


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "memory"), None
    s3 = request.getfixturevalue("s3_config")
    return s3.uri(request.getfixturevalue("s3_prefix")), s3.storage_options()


def latents(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)


def test_attention_with_cached_slot_norms_is_the_decoders_and_sums_to_one(model):
    torch.manual_seed(0)
    q, mem, bias = torch.randn(3, D), torch.randn(700, D), 3 * torch.randn(700)
    norms = model.slots_of(mem).norm(dim=-1)
    with torch.no_grad():
        out, p = model.attend(q, mem, bias, norms)
        assert torch.allclose(out, model.decode(q, mem, bias), atol=1e-4)
        assert torch.allclose(p.sum(-1), torch.ones(3), atol=1e-5)
        batched = model.decode(q.expand(2, -1, -1), mem.expand(2, -1, -1), bias)  # one set of cues, two memories
        assert torch.allclose(batched[1], model.decode(q, mem, bias), atol=1e-5)


def test_two_stage_read_agrees_with_the_exact_read_on_real_latents(tmp_path, model, key):
    """Real MiniLM latents of held-out text, cut into windows of 1,024 latents (48 summaries),
    read by cues of their latents: the two-stage read (16 candidates out of 48, a sixth of the
    groups probed) against the exact read over every token."""
    from memstream.operators.data import split_latents

    x = np.concatenate(list(split_latents("heldout").values()))[:48 * 1024]
    uri = str(tmp_path / "m")
    write_session(uri, None, model, key, "s", x, window=1024)
    rng = np.random.default_rng(11)
    targets = rng.choice(len(x), 40, replace=False)
    overlap, gap, agree = [], [], []

    def cos(a, b):
        return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))

    with Memory(uri, model=model, mode="exact") as exact, Memory(uri, model=model, probe_groups=256) as fast:
        assert len(fast.session_memory("s").windows) == 48
        for n, t in enumerate(targets):
            q = cue(x[t], rng.uniform(0.2, 0.6), n)
            a, b = exact.read(q, "s", k=8, route="episodic"), fast.read(q, "s", k=8, route="episodic")
            overlap.append(len({f.key for f in a.fragments} & {f.key for f in b.fragments}) / 8)
            gap.append(abs(cos(a.reconstruction, x[t]) - cos(b.reconstruction, x[t])))
            agree.append(cos(a.reconstruction, b.reconstruction))
            shares = {f.key: f.score for f in a.fragments}
            for f in b.fragments:  # a candidate's share can only grow: fewer slots share the attention
                assert f.key not in shares or f.score >= shares[f.key] - 1e-5
    assert np.mean(overlap) >= 0.95, overlap
    assert np.mean(gap) <= 0.005 and np.mean(agree) >= 0.995, (np.mean(gap), np.mean(agree))


def test_window_index_is_incremental_and_consistent_under_concurrent_changes(model):
    """The index after summaries arrive and leave reads as one built at once, and reads that
    run while summaries are added and removed only ever see whole, live summaries."""
    rng = np.random.default_rng(3)
    with torch.inference_mode():
        tokens = model.encode(torch.from_numpy(rng.standard_normal((40, 512, D), dtype=np.float32))).half()
    fresh = SessionWindow(model, probe=64, candidates=4)
    fresh.add_many([(w, tokens[w]) for w in range(24)])
    grown = SessionWindow(model, probe=64, candidates=4)
    for w in range(30):
        grown.add(w, tokens[w])
    for w in range(24, 30):
        grown.remove(w)
    assert grown.windows == fresh.windows == list(range(24))
    queries = torch.from_numpy(rng.standard_normal((6, D), dtype=np.float32))
    biases = {3: -2.0, 5: -0.5}
    for q in queries:
        a, b = fresh.read(q, biases, 5), grown.read(q, biases, 5)
        assert a.windows == b.windows and np.allclose(a.shares, b.shares, atol=1e-6)
        assert torch.allclose(a.reconstruction, b.reconstruction, atol=1e-5)
        assert a.candidates == 4 and fresh.read(q, biases, 5, exact=True).candidates == 24
    own = {w: [model.attend(q[None], tokens[w].float())[0][0] for q in queries] for w in range(40)}
    stop, seen, errors = threading.Event(), Counter(), []

    def churn():
        i = 0
        while not stop.is_set():
            w = 24 + i % 16
            grown.add(w, tokens[w]) if w not in grown else grown.remove(w)
            i += 1

    def reader(j):
        try:
            for n in range(30):
                qi = (j + n) % len(queries)
                got = grown.read(queries[qi], None, 3)
                for w, latent in zip(got.windows, got.latents):
                    assert torch.allclose(latent, own[w][qi], atol=1e-4), w
                    seen[w] += 1
        except Exception as e:  # reported below, with the thread's name
            errors.append(e)

    threads = [threading.Thread(target=churn)] + [threading.Thread(target=reader, args=(j,)) for j in range(3)]
    for t in threads:
        t.start()
    for t in threads[1:]:
        t.join()
    stop.set()
    threads[0].join()
    assert not errors, errors
    assert any(w >= 24 for w in seen)  # reads did run while summaries came and went
    assert grown.nbytes < 2 * fresh.nbytes  # storage of removed summaries is reused


def test_the_session_cache_is_bounded_by_bytes(tmp_path, model, key):
    uri = str(tmp_path / "m")
    for i, s in enumerate("abc"):
        write_session(uri, None, model, key, s, latents(2 * 4096, 20 + i))
    with Memory(uri, model=model, cache_bytes=1) as mem:
        for s in "abca":
            mem.read(np.ones(D), s, route="episodic")
        assert list(mem.cached_bytes()) == ["a"]  # the session being read always stays
    with Memory(uri, model=model) as mem:
        for s in "abc":
            mem.read(np.ones(D), s, route="episodic")
        held = mem.cached_bytes()
        one = held["a"]
        assert sorted(held) == ["a", "b", "c"] and held["b"] == held["c"] == one == mem.session_memory("a").nbytes
        assert one >= 2 * 256 * D * 2  # at least the fp16 tokens of its two summaries
    with Memory(uri, model=model, cache_bytes=2 * one) as mem:
        for s in "abcb":
            mem.read(np.ones(D), s, route="episodic")
        assert list(mem.cached_bytes()) == ["c", "b"]  # least recently read out first


def test_episodic_read_provenance_accounting_and_cache(backend, model, key):
    uri, opts = backend
    x = latents(3 * 4096 + 900, 1)
    records = write_session(uri, opts, model, key, "s", x)
    with Memory(uri, storage_options=opts, keyring=KeyRing([key]), model=model, flush_every=1000) as mem:
        res = mem.read(cue(x[4096 + 17], 0.3, 0), "s", k=2, route="episodic")
        assert res.route.route == "episodic" and res.route.chosen_by == "caller"
        assert len(res.fragments) == 2 and res.reconstruction.shape == (D,)
        by_window = {r.window_index: r for r in records}
        for f in res.fragments:
            p, r = f.provenance, by_window[f.provenance.window_index]
            assert (f.source, f.tier, p.session_id, p.hash, p.prev_hash, p.key_id, p.seq_start, p.seq_end,
                    p.partial, p.operator_version) == ("episodic", "hot", "s", r.hash.hex(), r.prev_hash.hex(),
                                                       key.key_id, r.seq_start, r.seq_end, r.partial,
                                                       r.operator_version)
            assert p.verified and 0 < f.score <= 1 and f.latent.shape == (D,)
        assert res.fragments[0].score >= res.fragments[1].score
        returned = [f.provenance.window_index for f in res.fragments]
        window = mem.session_memory("s")
        assert mem.session_memory("s") is window  # cached while the store is unchanged
        kept = window.window.tokens(1)
        # A new summary is picked up (only it is loaded), an evicted one is dropped.
        new = sealed_summaries(model, key, "s", latents(4096, 2), first_window=4, prev_hash=records[-1].hash)
        EpisodicStore(uri, opts).append(new)
        EpisodicStore(uri, opts).evict_windows("s", [0])
        grown = mem.session_memory("s")
        assert grown.windows == [1, 2, 3, 4] and sorted(grown.provenance) == [1, 2, 3, 4]
        assert grown.window.tokens(1).data_ptr() == kept.data_ptr()  # not read again
        assert grown.window.tokens(4).dtype == torch.float16 and grown.window.tokens(4).shape == (256, D)
        with pytest.raises(SessionNotFoundError, match="memstream run"):
            mem.read(np.ones(D), "nobody", route="episodic")
    ledger = ReadLedger(uri, opts)
    assert ledger.query_count("s") == 1  # close() flushed it
    assert ledger.staleness("s", {w: 0 for w in range(4)}).by_window == {
        w: (0 if w in returned else 1) for w in range(4)}


def test_bad_queries_are_refused_with_what_to_do(tmp_path, model, key):
    uri = str(tmp_path / "m")
    write_session(uri, None, model, key, "s", latents(500, 3))
    mem = Memory(uri, model=model)
    for bad, match in [(np.ones(D - 1), "384 values"), (np.full(D, np.nan), "NaN"), ([[1.0] * D] * 2, "384 values"),
                       ("text", "384 numbers")]:
        with pytest.raises(InvalidQueryError, match=match):
            mem.read(bad, "s")
    for k in (0, 65, 2.5, True):
        with pytest.raises(InvalidQueryError, match="k must be"):
            mem.read(np.ones(D), "s", k=k)
    with pytest.raises(InvalidQueryError, match="route"):
        mem.read(np.ones(D), "s", route="everywhere")
    with pytest.raises(InvalidQueryError, match="no long-term store"):
        mem.read(np.ones(D), "s", route="longterm")
    assert mem.stats.reads == 0


def test_decay_bias_stops_a_summary_being_attended(tmp_path, model, key):
    uri = str(tmp_path / "m")
    x = latents(4 * 4096, 4)
    write_session(uri, None, model, key, "s", x)
    q = cue(x[2 * 4096 + 5], 0.3, 1)
    with Memory(uri, model=model, flush_every=1) as mem:
        first = mem.read(q, "s", k=2, route="episodic")
        top = first.fragments[0].provenance.window_index
        ReadLedger(uri).set_biases("s", {top: -40.0}, {top: 384}, queries=400)
        second = mem.read(q, "s", k=2, route="episodic")
        windows = [f.provenance.window_index for f in second.fragments]
        assert top not in windows
        # Its attention is gone: with k = all, it comes last with a share near zero and its bias shown.
        everything = mem.read(q, "s", k=4, route="episodic")
        last = everything.fragments[-1]
        assert last.provenance.window_index == top and last.score < 1e-12 and last.bias == -40.0
        assert sum(f.score for f in everything.fragments) == pytest.approx(1.0, abs=1e-4)


def _reader(uri: str, lt_uri: str, n: int, seed: int, out) -> None:
    torch.set_num_threads(1)
    counts: Counter = Counter()
    lt_hits: Counter = Counter()
    with Memory(uri, lt_uri, flush_every=3) as mem:
        rng = np.random.default_rng(seed)
        for _ in range(n):
            res = mem.read(rng.standard_normal(D).astype(np.float32), "s", k=2, route="both")
            counts.update(f.provenance.window_index for f in res.fragments if f.source == "episodic")
            lt_hits.update(f.provenance.entry_id for f in res.fragments if f.source == "longterm")
    out.put((dict(counts), dict(lt_hits)))


def test_accounting_is_exact_under_concurrent_threads_and_processes(tmp_path, model, key):
    uri, lt_uri = str(tmp_path / "m"), str(tmp_path / "ltm")
    write_session(uri, None, model, key, "s", latents(3 * 4096, 5))
    lt = LongTermStore(lt_uri, keyring=KeyRing([key]), signer=key, dim=D)
    lt.append([lt.new_entry(v, f"p{i}".encode(), query=f"q{i}") for i, v in enumerate(latents(50, 6))])
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_reader, args=(uri, lt_uri, 12, 100 + i, queue)) for i in range(2)]
    for p in procs:
        p.start()
    counts: Counter = Counter()
    lt_hits: Counter = Counter()
    lock = threading.Lock()
    mem = Memory(uri, lt_uri, model=model, flush_every=7)

    def thread_reader(seed):
        rng = np.random.default_rng(seed)
        for _ in range(15):
            res = mem.read(rng.standard_normal(D).astype(np.float32), "s", k=2, route="both")
            with lock:
                counts.update(f.provenance.window_index for f in res.fragments if f.source == "episodic")
                lt_hits.update(f.provenance.entry_id for f in res.fragments if f.source == "longterm")

    threads = [threading.Thread(target=thread_reader, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    mem.close()
    for p in procs:
        c, h = queue.get(timeout=300)
        counts.update(c)
        lt_hits.update(h)
        p.join(60)
        assert p.exitcode == 0
    total = 3 * 15 + 2 * 12
    assert ReadLedger(uri).query_count("s") == total
    assert mem.stats.reads == 45 and mem.stats.by_route["both"] == 45
    rows = lancedb.connect(uri).open_table("reads").to_arrow()["windows"].to_pylist()
    assert Counter(w for r in rows for w in r) == counts and sum(counts.values()) == 2 * total
    stats = LongTermStore(lt_uri, keyring=KeyRing([key]), dim=D).retrieval_stats(list(lt_hits))
    assert {i: s.count for i, s in stats.items()} == dict(lt_hits) and sum(lt_hits.values()) == 2 * total


def test_routed_reads_serve_as_well_as_reading_both_and_skip_searches_and_episodic_reads(tmp_path, model, key):
    """Queries about long-term content and about the session, on real stores. Each is read
    through both stores (to measure what each would serve: the cosine of the episodic
    reconstruction, and of the top long-term entry, to the latent the query is a cue of)
    and then routed by the policy; the routed reads must serve within tolerance of reading
    both every time, skip the long-term search for some session queries (no probe in the read's
    trace, no long-term fragment), skip the episodic read for some long-term queries, and the
    long-term queries must find their entry."""
    from memstream.operators.data import split_latents

    policy = RoutePolicy.load()
    info = policy.info["heldout"]
    assert info["routed_score"] >= info["always_both_score"] - 0.005 and info["episodic_share"] < 0.95
    assert info["skipped_search_share"] > 0.05
    docs = list(split_latents("heldout").values())
    session, stored = np.concatenate(docs[:2]), np.concatenate(docs[2:4])
    uri, lt_uri = str(tmp_path / "m"), str(tmp_path / "ltm")
    write_session(uri, None, model, key, "s", session)
    lt = LongTermStore(lt_uri, keyring=KeyRing([key]), signer=key, dim=D)
    ids = []
    for i in range(0, len(stored), 2000):
        ids += lt.append([lt.new_entry(v, f"lt{i + j}".encode(), query=f"q{i + j}")
                          for j, v in enumerate(stored[i:i + 2000])]).entry_ids
    row = {e: i for i, e in enumerate(ids)}
    rng = np.random.default_rng(9)
    targets = [stored[j] for j in rng.choice(len(stored), 30, replace=False)]
    targets += [session[j] for j in rng.choice(len(session), 30, replace=False)]

    def cos(a, b):
        return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))

    ep, lts, choice, found = [], [], [], 0
    with Memory(uri, lt_uri, keyring=KeyRing([key]), model=model) as mem:
        for n, target in enumerate(targets):
            q = cue(target, 0.5, n)
            both = mem.read(q, "s", k=3, route="both", account=False)
            top = next(f for f in both.fragments if f.source == "longterm")
            ep.append(cos(both.reconstruction, target))
            lts.append(cos(stored[row[top.provenance.entry_id]], target))
            routed = mem.read(q, "s", k=3)
            probs, trace = routed.route.probabilities, routed.timings_ms
            assert routed.route.chosen_by == "policy" and "skip_ms" in trace
            assert sum(probs.values()) == pytest.approx(1, abs=1e-5)
            sources = {f.source for f in routed.fragments}
            if probs["episodic"] >= policy.skip_threshold:  # stage 1: no long-term search at all
                assert routed.route.route == "episodic" and "probe_ms" not in trace and sources == {"episodic"}
            else:  # stage 2: the probe ran, then the episodic read where it serves better
                both_p = probs["both"] / (1.0 - probs["episodic"])
                assert routed.route.route == ("both" if both_p >= policy.threshold else "longterm")
                assert "probe_ms" in trace and "longterm" in sources
            assert ("episodic" in sources) == (routed.reconstruction is not None)
            choice.append(routed.route.route)
            if n < 30 and routed.route.route != "episodic":
                hit = next(f for f in routed.fragments if f.source == "longterm")
                if hit.provenance.entry_id == ids[int(np.flatnonzero((stored == target).all(1))[0])]:
                    found += 1
                    assert hit.payload.startswith(b"lt") and hit.provenance.key_id == key.key_id
    ep, lts = np.array(ep), np.array(lts)
    served = np.array([e if c == "episodic" else l if c == "longterm" else max(e, l)
                       for c, e, l in zip(choice, ep, lts)])
    both = np.maximum(ep, lts).mean()
    assert served.mean() >= both - 0.01, (served.mean(), both, choice)
    assert choice.count("longterm") >= 10, choice  # the episodic read skipped where the probe answers
    assert "episodic" in choice[30:], choice  # the search skipped where the session answers
    assert "episodic" not in choice[:30] or served[:30].mean() >= np.maximum(ep, lts)[:30].mean() - 0.01, choice
    assert found >= 25, (found, choice[:30])
    assert ReadLedger(uri).query_count("s") == len(targets)  # routed reads only: account=False is not a query


def test_sampled_reads_report_a_divergent_replica_on_kafka(tmp_path, model, key, kafka_bootstrap, topic_name):
    topics.create_topics(kafka_bootstrap, [topic_name], partitions=1)
    uri = str(tmp_path / "primary")
    x = latents(3 * 4096, 7)
    write_session(uri, None, model, key, "s", x)
    same, biased, tampered = (str(tmp_path / n) for n in ("same", "biased", "tampered"))
    for copy in (same, biased, tampered):
        shutil.copytree(uri, copy)
    q = cue(x[4096 + 3], 0.3, 2)
    # Replica 1, an honest copy: no divergence. Replica 2: a decay bias that is not the primary's.
    # Replica 3: one summary's stored tokens altered (its hash no longer matches).
    with Memory(uri, model=model) as probe:
        top = probe.read(q, "s", k=1, route="episodic", account=False).fragments[0].provenance.window_index
    ReadLedger(biased).set_biases("s", {top: -30.0}, {top: 200}, queries=300)
    lancedb.connect(tampered).open_table("summaries").update(where="window_index = 2",
                                                             values={"tokens": bytes(256 * D * 2)})
    seen = []
    for replica_uri, divergent in [(same, False), (biased, True), (tampered, True)]:
        replica = Memory(replica_uri, model=model)
        mem = Memory(uri, model=model, replica=replica, sample_rate=1.0, kafka_bootstrap=kafka_bootstrap,
                     divergence_topic=topic_name, seed=0)
        res = mem.read(q, "s", k=2, route="episodic")
        mem.close()
        assert res.sampled and res.divergent is divergent
        assert (mem.stats.sampled, mem.stats.divergent, mem.stats.published) == (1, int(divergent), int(divergent))
        assert ReadLedger(replica_uri).query_count("s") == 0  # the replica's execution is not a query
        if divergent:
            seen.append((res.read_id, replica_uri))
    consumer = KafkaConsumer(topic_name, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest",
                             consumer_timeout_ms=5000)
    records = [ReadDivergence.from_json(m.value) for m in consumer]
    consumer.close()
    assert [(r.read_id, r.replica) for r in records] == seen
    biased_rec, tampered_rec = records
    assert biased_rec.primary == uri and biased_rec.session_id == "s" and biased_rec.route == "episodic"
    assert biased_rec.primary_fragments != biased_rec.replica_fragments and biased_rec.reasons
    assert "IntegrityError" in tampered_rec.reasons[0] and tampered_rec.replica_fragments == []
    with pytest.raises(IntegrityError, match="altered in storage"):
        Memory(tampered, model=model).read(q, "s", route="episodic")


def test_reads_through_the_api_drive_decay_and_eviction(tmp_path, model, key):
    """The accounting feeds the episodic_decay DAG's task: after 140 reads of one part of a
    session, the summaries no read returned decay past the cutoff and are evicted (never the
    chain head), and later reads carry the stored biases."""
    from memstream.maintenance.episodic import decay

    uri = str(tmp_path / "m")
    # Each window drawn around its own centres, so a cue of window 1 is read from window 1.
    rng = np.random.default_rng(6)
    centres = rng.standard_normal((4, 64, D)).astype(np.float32)
    x = (centres[:, rng.integers(0, 64, 4096)] + 0.3 * rng.standard_normal((4, 4096, D))).reshape(-1, D)
    x = x.astype(np.float32)
    write_session(uri, None, model, key, "s", x)
    returned = []
    with Memory(uri, model=model, flush_every=32) as mem:
        for i in range(140):
            res = mem.read(cue(x[4096 + i], 0.3, i), "s", k=1, route="episodic")
            returned.append({f.provenance.window_index for f in res.fragments})
    # Staleness as the issue defines it: queries since the last read (all summaries were
    # stored before the first query).
    expected = {}
    for w in range(4):
        last = max((i for i, r in enumerate(returned) if w in r), default=None)
        expected[w] = 140 if last is None else 139 - last
    out = decay(uri, k=64, slope=0.125, cutoff=-8.0)
    stale = {w for w, s in expected.items() if -0.125 * max(0, s - 64) < -8.0}
    assert stale, f"the reads should leave some summary unread for more than 128 queries: {returned}"
    assert out["evicted"] == len(stale - {3}) and out["head_kept"] == int(3 in stale)
    biases = ReadLedger(uri).biases("s")
    assert sorted(biases) == sorted(set(range(4)) - (stale - {3}))
    for w, b in biases.items():
        assert b == pytest.approx(-0.125 * max(0, expected[w] - 64))
    with Memory(uri, model=model) as mem:
        assert mem.session_memory("s").windows == sorted(biases)
        res = mem.read(cue(x[5], 0.3, 999), "s", k=4, route="episodic")
        assert {f.provenance.window_index for f in res.fragments} == set(biases)
        assert {f.provenance.window_index: f.bias for f in res.fragments} == pytest.approx(biases)
