"""The pure core without services: chain linking and verification, decay arithmetic, routing
features and policy, settings. Every input here is made in memory."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from memstream.crypto.keys import KeyRing, SigningKey
from memstream.episodic.chain import check_summary, head_at, seal, summary_hash, verify_chain
from memstream.episodic.decay import decay_bias, staleness
from memstream.errors import ConfigError, IntegrityError
from memstream.read.routing import SKIP_FEATURES, RoutePolicy, features, skip_features
from memstream.read.train_routing import choose_skip_threshold, served
from memstream.schemas.records import SummaryRecord
from memstream.settings import DECAY_K, DECAY_SLOPE, Settings

KEY = SigningKey.generate()
RING = KeyRing([KEY])


def chain(n: int, session: str = "s", key: SigningKey = KEY, start: int = 0, prev: bytes = b"") -> list[SummaryRecord]:
    out = []
    for i in range(start, start + n):
        rec = seal(SummaryRecord(
            schema_version=2, session_id=session, window_index=i, seq_start=i * 10, seq_end=i * 10 + 10, cut="full",
            token_count=2, dim=4, tokens_dtype="fp16", tokens=bytes(16), operator_version="op-1",
            producer_id=b"\x01" * 16, latents_dtype="fp32", latent_dim=4, event_time_us=1_000 + i, prev_hash=prev,
            hash=b"", signature=b"", key_id=""), key)
        out.append(rec)
        prev = rec.hash
    return out


# -- chains -----------------------------------------------------------------------------------

def test_a_sealed_chain_links_and_verifies():
    records = chain(5)
    assert records[0].prev_hash == b"" and all(b.prev_hash == a.hash for a, b in zip(records, records[1:]))
    report = verify_chain("s", records, RING)
    assert report.ok and report.records == 5 and (report.first_index, report.head_index) == (0, 4)
    assert report.head_hash == records[-1].hash and report.key_ids == {KEY.key_id}
    assert all(check_summary(r, RING) for r in records)


def test_each_kind_of_break_is_named_at_its_record():
    records = chain(4)
    cases = {
        "window index": records[:1] + records[2:],  # a window missing
        "prev_hash": records[:2] + [dataclasses.replace(records[2], prev_hash=b"\x00" * 32)],
        "hash mismatch": records[:3] + [dataclasses.replace(records[3], seq_end=99)],
        "bad signature": records[:1] + [dataclasses.replace(records[1], signature=bytes(64))],
        "belongs to session": records[:1] + [dataclasses.replace(records[1], session_id="other")],
    }
    for problem, broken in cases.items():
        report = verify_chain("s", broken, RING)
        assert not report.ok and problem in report.fault.problem, (problem, report.fault)
    assert not verify_chain("s", records, KeyRing()).ok  # an unknown key


def test_a_byte_identical_redelivery_is_a_duplicate_not_a_fork():
    records = chain(3)
    report = verify_chain("s", [records[0], records[1], records[1], records[2]], RING)
    assert report.ok and report.duplicates == 1 and report.records == 3
    other = chain(1, key=SigningKey.generate(), start=1, prev=records[0].hash)[0]  # same window, other bytes
    assert not verify_chain("s", [records[0], other, records[1]], RING).ok


def test_a_chain_whose_oldest_windows_were_evicted_verifies_unanchored():
    tail = chain(6)[3:]
    assert not verify_chain("s", tail, RING).ok
    assert verify_chain("s", tail, RING, anchored=False).ok


def test_the_head_at_a_time_is_the_last_record_by_then():
    records = chain(4)
    assert head_at(records, records[2].event_time_us).window_index == 2
    assert head_at(records, 0) is None


def test_check_summary_recomputes_the_hash_even_without_keys():
    rec = chain(1)[0]
    assert check_summary(rec, None) is False
    with pytest.raises(IntegrityError):
        check_summary(dataclasses.replace(rec, tokens=b"\x01" * 16), None)
    assert summary_hash(rec) == rec.hash


# -- decay ------------------------------------------------------------------------------------

def test_decay_bias_is_zero_within_k_then_falls_by_slope():
    assert decay_bias(DECAY_K) == 0.0 and decay_bias(DECAY_K + 8) == pytest.approx(-8 * DECAY_SLOPE)
    with pytest.raises(ConfigError):
        decay_bias(1, k=-1)


def test_staleness_counts_the_sessions_queries_since_a_summary_was_read_or_stored():
    reads = [(10, [0]), (20, []), (30, [1]), (40, [])]  # (time, windows returned), in query order
    st = staleness(reads, {0: 5, 1: 5, 2: 25, 3: 50})
    assert st.queries == 4
    assert st.by_window == {0: 3, 1: 1, 2: 2, 3: 0}  # 2: stored at 25, queries at 30 and 40 since


# -- routing features -------------------------------------------------------------------------

def test_routing_features_follow_the_centroids_and_the_probe():
    rng = np.random.default_rng(0)
    centroids = rng.standard_normal((5, 8)).astype(np.float32)
    query = rng.standard_normal((1, 16)).astype(np.float32)
    near = features(query, centroids[2:3] * 3, centroids, [[0.9, 0.2]])  # projected query on a centroid
    far = features(query, -centroids[2:3], centroids, [[0.1, 0.05]])
    assert near.shape == (1, 8) and near[0, 1] == pytest.approx(1.0, abs=1e-5)  # max cosine to a centroid
    assert far[0, 1] < near[0, 1]
    assert near[0, 6] == pytest.approx(0.9) and near[0, 7] == pytest.approx(0.7)  # nearest, and its margin
    missing = features(query, centroids[:1], centroids, [[np.nan, np.nan]])  # an empty long-term store
    assert missing[0, 6] == -1.0


def test_stage_one_sees_only_what_is_known_before_the_search():
    rng = np.random.default_rng(1)
    centroids, query = rng.standard_normal((7, 8)).astype(np.float32), rng.standard_normal((3, 16)).astype(np.float32)
    projected = rng.standard_normal((3, 8)).astype(np.float32)
    first = skip_features(query, projected, centroids)
    assert first.shape == (3, SKIP_FEATURES)
    for sims in ([[0.9, 0.2]] * 3, [[np.nan, np.nan]] * 3):  # whatever the probe would find
        assert np.array_equal(features(query, projected, centroids, sims)[:, :SKIP_FEATURES], first)


def _policy(skip_threshold: float, threshold: float = 0.5) -> RoutePolicy:
    """Stage 1 rises with the max cosine to a centroid (feature 1), stage 2 falls with the
    probe's nearest cosine (feature 6): a policy written by hand, not trained."""
    def mlp(n, col, sign, prefix=""):  # logit = 40 * sign * (x[col] - 0.5) for x in 0..1
        w1 = np.zeros((n, 1), np.float32)
        w1[col, 0] = sign
        return {prefix + "w1": w1, prefix + "b1": np.ones(1), prefix + "w2": np.full((1, 1), 40.0),
                prefix + "b2": np.full(1, -40.0), prefix + "mu": np.eye(n)[col] * 0.5, prefix + "sigma": np.ones(n)}
    return RoutePolicy({**mlp(8, 6, -1.0), **mlp(SKIP_FEATURES, 1, 1.0, "skip_")}, threshold, {}, skip_threshold)


def test_route_policy_keeps_both_stages_through_save_and_load(tmp_path):
    policy = _policy(0.8, 0.3)
    x = np.random.default_rng(2).uniform(0, 1, (50, 8)).astype(np.float32)
    policy.save(tmp_path / "p.npz")
    back = RoutePolicy.load(tmp_path / "p.npz")
    assert (back.threshold, back.skip_threshold) == pytest.approx((0.3, 0.8))
    assert np.allclose(back.skip_scores(x[:, :SKIP_FEATURES]), policy.skip_scores(x[:, :SKIP_FEATURES]))
    assert np.allclose(back.scores(x), policy.scores(x))
    s = back.skip_scores(x[:, :SKIP_FEATURES])
    assert ((s > 0.5) == (x[:, 1] > 0.5)).all()  # stage 1 follows the centroid feature, not the probe's
    with pytest.raises(ConfigError, match="train_routing"):
        RoutePolicy.load(tmp_path / "missing.npz")


def test_the_skip_threshold_skips_searches_only_where_quality_holds():
    """Queries whose max centroid cosine is high are served by the episodic read alone (a little
    better than by the entry); below 0.5 only the long-term entry serves. The chosen threshold
    skips the first kind only."""
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 1, (400, 8)).astype(np.float32)
    x[:, 6] = 0.9  # the probe finds something: stage 2 does not run the episodic read
    close = x[:, 1] > 0.5
    ep = np.where(close, 0.95, 0.0).astype(np.float32)
    lt = np.where(close, 0.949, 0.9).astype(np.float32)
    policy = _policy(1.5)
    t = choose_skip_threshold(policy, x, ep, lt, tolerance=0.002)
    policy.skip_threshold = t
    skipped = policy.skip_scores(x[:, :SKIP_FEATURES]) >= t
    episodic = policy.scores(x) >= policy.threshold
    assert skipped[close].mean() > 0.9 and not skipped[~close].any()
    assert served(episodic, ep, lt, skipped).mean() >= np.maximum(ep, lt).mean() - 0.002
    harmful = np.where(close, 0.5, 0.9).astype(np.float32)  # now the episodic read never serves
    assert choose_skip_threshold(_policy(1.5), x, harmful, lt, tolerance=0.002) == 1.5  # never skip


# -- settings ---------------------------------------------------------------------------------

def test_settings_come_from_defaults_then_the_file_then_the_environment(tmp_path):
    assert Settings.load(tmp_path / "none.toml", {}).episodic.window == 4096
    f = tmp_path / "memstream.toml"
    f.write_text('[kafka]\nbootstrap = "b:1"\npartitions = 8\n[episodic]\nhorizon = 10\n')
    s = Settings.load(f, {"MEMSTREAM_KAFKA_PARTITIONS": "16", "MEMSTREAM_READ_PORT": "9000"})
    assert (s.kafka.bootstrap, s.kafka.partitions, s.episodic.horizon, s.read.port) == ("b:1", 16, 10, 9000)


def test_a_bad_setting_says_where_it_came_from(tmp_path):
    with pytest.raises(ConfigError, match="MEMSTREAM_EPISODIC_HORIZON"):
        Settings.load(tmp_path / "none.toml", {"MEMSTREAM_EPISODIC_HORIZON": "many"})
    f = tmp_path / "memstream.toml"
    f.write_text("[kafka]\nbootstrapp = 1\n")
    with pytest.raises(ConfigError, match="bootstrapp"):
        Settings.load(f, {})
    with pytest.raises(ConfigError, match="does not exist"):
        Settings.load(None, {"MEMSTREAM_CONFIG": str(tmp_path / "missing.toml")})
