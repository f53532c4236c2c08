"""docs/tables.md stays true: its column lists are the generated Arrow schemas, and every
example on the page runs against real stores that memstream wrote."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from memstream.crypto.keys import KeyRing, SigningKey
from memstream.episodic.chain import seal
from memstream.episodic.ledger import ReadLedger
from memstream.episodic.store import EpisodicStore
from memstream.longterm.store import LongTermStore
from memstream.schemas import records
from memstream.schemas.generate import arrow_schema
from memstream.settings import SUMMARY_TOKENS

DOC = Path(__file__).resolve().parent.parent / "docs" / "tables.md"
ROW = re.compile(r"^\| `([\w/]+)` \| `(\w+)` \| [^|]+ \| ([^|]+) \|$")


def test_the_column_lists_are_the_schemas():
    rows = [ROW.match(line) for line in DOC.read_text().splitlines()]
    rows = [m for m in rows if m]
    assert len(rows) == 14
    for m in rows:
        table, record, columns = m.group(1), getattr(records, m.group(2)), m.group(3).split(", ")
        assert [c.strip() for c in columns] == arrow_schema(record, 2).names, table


@pytest.fixture
def stores(tmp_path):
    key = SigningKey.generate()
    episodic, longterm = str(tmp_path / "episodic"), str(tmp_path / "longterm")
    rng = np.random.default_rng(0)
    prev, sealed = b"", []
    for w in range(3):
        tokens = rng.standard_normal((SUMMARY_TOKENS, 384)).astype("<f2").tobytes()
        rec = seal(records.SummaryRecord(
            schema_version=2, session_id="doc-1", window_index=w, seq_start=w * 4096, seq_end=(w + 1) * 4096,
            cut="full", token_count=SUMMARY_TOKENS, dim=384, tokens_dtype="fp16", tokens=tokens, operator_version="op",
            producer_id=b"\x01" * 16, latents_dtype="fp32", latent_dim=384, event_time_us=10 + w, prev_hash=prev,
            hash=b"", signature=b"", key_id=""), key)
        sealed.append(rec)
        prev = rec.hash
    EpisodicStore(episodic).append(sealed)
    with ReadLedger(episodic, flush_every=1) as ledger:
        for windows in ([0, 2], [2], []):
            ledger.record("doc-1", windows)
    with LongTermStore(longterm, keyring=KeyRing([key]), signer=key) as store:
        store.append([store.new_entry(rng.standard_normal(384), b"p%d" % i, query=f"q{i}") for i in range(5)])
    return episodic, longterm


def test_every_example_runs(stores, capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 5
    scope = {"EPISODIC": stores[0], "LONGTERM": stores[1]}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), scope)  # noqa: S102 - the documentation's own examples
    out = capsys.readouterr().out
    assert "summaries" in out and "entries" in out and "(256, 384)" in out
    assert scope["latest"]["tree_size"] == 5 and len(scope["hits"]) == 3
