"""Read accounting: exact query counts under concurrent readers, staleness, decay bias."""

from __future__ import annotations

import multiprocessing
import threading

import pytest

from memstream.errors import ConfigError
from memstream.episodic.decay import decay_bias
from memstream.episodic.ledger import ReadLedger


def test_decay_bias_is_zero_within_k_then_linear():
    assert decay_bias(0) == 0.0
    assert decay_bias(64) == 0.0
    assert decay_bias(65) == pytest.approx(-0.125)
    assert decay_bias(100, k=64, slope=0.5) == pytest.approx(-18.0)
    with pytest.raises(ConfigError):
        decay_bias(3, k=-1)


def test_staleness_counts_queries_since_last_read_or_since_stored(tmp_path):
    ledger = ReadLedger(str(tmp_path), flush_every=1000)
    # window 0 stored at t=0, window 1 stored at t=50, window 2 stored at t=1000 (after all reads)
    for t in range(100):
        windows = [0] if t == 10 else ([1] if t == 97 else [])
        ledger.record("s", windows, ts_ns=t + 1)
    ledger.record("other", [0, 1, 2], ts_ns=5)
    ledger.flush()
    st = ledger.staleness("s", {0: 0, 1: 50, 2: 1000, 3: 60})
    assert st.queries == 100
    assert st.by_window == {0: 89, 1: 2, 2: 0, 3: 40}
    assert ledger.query_count("other") == 1
    assert ledger.sessions() == ["other", "s"]


def test_biases_round_trip_and_replace(tmp_path):
    ledger = ReadLedger(str(tmp_path))
    ledger.set_biases("s", {0: -1.0, 1: 0.0}, {0: 72, 1: 3}, queries=80)
    ledger.set_biases("s", {0: -2.0}, {0: 80}, queries=88)
    assert ledger.biases("s") == {0: -2.0, 1: 0.0}
    assert ledger.biases("s", [0, 5]) == {0: -2.0, 5: 0.0}
    ledger.forget_windows("s", [0])
    assert ledger.biases("s") == {1: 0.0}
    ledger.drop_session("s")
    assert ledger.biases("s") == {}


def test_exact_counts_under_concurrent_threads(tmp_path):
    ledger = ReadLedger(str(tmp_path), flush_every=7)

    def reader(i):
        for j in range(50):
            ledger.record("s", [i, j % 5])

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ledger.flush()
    assert ledger.query_count("s") == 200


def _process_reader(uri: str, n: int) -> None:
    with ReadLedger(uri, flush_every=5) as ledger:
        for _ in range(n):
            ledger.record("s", [1])


def test_exact_counts_under_concurrent_processes(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_process_reader, args=(str(tmp_path), 40)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert ReadLedger(str(tmp_path)).query_count("s") == 120


def test_s3_stores_refuse_implicit_credentials():
    from memstream.episodic.store import EpisodicStore

    for open_store in (EpisodicStore, ReadLedger):
        with pytest.raises(ConfigError, match="metadata service"):
            open_store("s3://bucket/prefix")
