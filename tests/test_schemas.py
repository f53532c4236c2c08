"""The dataclasses are the source of truth: schema files, Arrow schemas and errors follow them."""

from __future__ import annotations

import dataclasses
import json

import jsonschema
import pytest

from memstream import errors
from memstream.schemas import generate
from memstream.schemas import records as r
from memstream.schemas.records import HEADER, JSON_RECORDS, DeadLetterReason, LatentChunkHeader, LongTermEntry

T = 1_700_000_000_000_000
SAMPLES = [
    r.SessionEvent(1, "close", "s1", b"\x01" * 16, "bf16", 384, 42, T),
    r.SummaryRecord(2, "s1", 3, 768, 1024, "close", 256, 384, "fp16", b"\x00\x3c" * 8, "summarizer-1/ckpt-7",
                    b"\x01" * 16, "fp32", 384, T, b"\x11" * 32, b"\x22" * 32, b"\x33" * 64, "k1"),
    r.DeadLetterRecord(1, DeadLetterReason.foreign_producer, "chunk 3..5 from another producer", "memstream.latents", 2, 17,
                       b"s1", b"MSLT\x01", 5, 1_700_000_000_000, T + 123),
    r.GcRecord(1, "s1", "closed", 12, 300, 11, 11, b"\xaa" * 32, T, T + 100_000_000, b"\xbb" * 64, "k1"),
    r.ConsolidationRecord(1, "s1", b"\xaa" * 32, ["3:" + "ab" * 32], [7], ["cd" * 32], "ef" * 16, 40, T,
                          b"\xbb" * 64, "k1"),
    r.ReadDivergence(1, "ab" * 16, "s1", "both", "s3://b/primary", "s3://b/replica", ["episodic:3:" + "cd" * 32],
                     ["episodic:4:" + "ef" * 32], 0.25, ["fragments differ"], T),
    r.PublishMark("s1", 3),
    r.ReadRecord("s1", b"\x05" * 16, T, [1, 4]),
    r.SummaryBias("s1", 3, -0.5, 68, 200),
    LongTermEntry("e" * 64, __import__("numpy").array([0.25, -1.5], "float32"), b"payload", "summary_tokens",
                  "44" * 32, "55" * 32, 7, "k1", b"\x66" * 64, "tag", "aa" * 32, None),
    r.TreeHead("store", 10, b"\x77" * 32, T, "k1", b"\x88" * 64),
    r.TreeHeadRow("store", 10, b"\x77" * 32, T, "k1", b"\x88" * 64, [b"\x01" * 32, b"\x02" * 32]),
    r.MerkleLeaf(4, "e" * 64, b"\x03" * 32),
    r.AccessRecord("e" * 64, T, "hot"),
    r.AccessStats("e" * 64, 3, T),
    r.RemovalRequest("store", ["e" * 64], "court order", "ab" * 16, T),
    r.RemovalRecord("ab" * 16, "{}", "[]", T),
    r.ForgetRequest("store", "aa" * 32, None, "k2", b"\x99" * 64, "cd" * 16, T),
    r.ForgetRequestRow("store", "aa" * 32, "tag", "k2", b"\x99" * 64, "cd" * 16, T, 3),
    r.PurgeRecord("ab" * 16, ["cd" * 16], ["e" * 64], 1, 0, b"{}", T, None),
    r.PurgeApprovalRecord("ab" * 16, "k3", b"\x56" * 64, T),
    r.PurgeAttestation(2, "store", "ab" * 16, ["cd" * 16], ["aa" * 32], '[{"key_id": "k3", "signature": "00"}]',
                       ["ef" * 32], 1, 0, 42, b"\x12" * 32, 17, 4096, 9, T, b"\x34" * 64, "k1"),
    r.CosignedTreeHead("store", 10, b"\x77" * 32, T, "k1", b"\x88" * 64, "w1", T + 5, b"\x99" * 64),
    r.CosignedChainHead("s1", 3, b"\x11" * 32, 40, "k1", b"\x22" * 64, "w1", T + 5, b"\x99" * 64),
]


def test_every_record_has_a_sample():
    assert sorted(type(s).__name__ for s in SAMPLES) == sorted(c.__name__ for c in JSON_RECORDS)


def test_checked_in_schema_files_match_the_dataclasses():
    for name, text in generate.rendered().items():
        path = generate.SCHEMA_DIR / name
        assert path.exists() and path.read_text() == text, (
            f"{name} is stale: run `python -m memstream.schemas.generate`")
    on_disk = {p.name for p in generate.SCHEMA_DIR.glob("*.json")}
    assert on_disk == set(generate.rendered()), "schema files without a dataclass"


@pytest.mark.parametrize("record", SAMPLES, ids=lambda r: type(r).__name__)
def test_json_round_trip_validates_against_its_schema(record):
    schema = generate.json_schema(type(record))
    data = json.loads(record.to_json())
    jsonschema.Draft202012Validator(schema).validate(data)
    assert type(record).from_json(record.to_json()) == record
    first = next(iter(data))
    if first == "schema_version":
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.Draft202012Validator(schema).validate({**data, "schema_version": data["schema_version"] + 1})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema).validate({**data, "unknown": 1})
    missing = {k: v for k, v in data.items() if k != first}
    with pytest.raises(ValueError, match="missing"):
        type(record).from_dict(missing)


@pytest.mark.parametrize("record", SAMPLES, ids=lambda r: type(r).__name__)
def test_arrow_schema_holds_the_record(record):
    table = generate.to_arrow([record], type(record), dim=2)
    assert table.schema == generate.arrow_schema(type(record), dim=2)
    assert table.schema.names == [f.name for f in dataclasses.fields(record)]
    def plain(value):  # what Arrow gives back: enums by value, vectors as lists
        if isinstance(value, DeadLetterReason):
            return value.value
        return [float(v) for v in value] if hasattr(value, "dtype") else value

    assert table.to_pylist()[0] == {f.name: plain(getattr(record, f.name)) for f in dataclasses.fields(record)}


def test_stores_build_their_tables_from_the_records():
    from memstream.episodic import ledger, store
    from memstream.longterm import store as longterm

    assert store.SCHEMA == generate.arrow_schema(r.SummaryRecord)
    assert ledger.READS_SCHEMA == generate.arrow_schema(r.ReadRecord)
    assert longterm.entries_schema(384) == generate.arrow_schema(LongTermEntry, 384)
    assert longterm.SCHEMAS["tree_heads"] == generate.arrow_schema(r.TreeHeadRow)


def test_chunk_header_struct_follows_the_dataclass():
    names = [f.name for f in dataclasses.fields(LatentChunkHeader)]
    layout = generate.chunk_header_layout()
    assert [f["name"] for f in layout["fields"]] == names
    assert HEADER.size == layout["size"] == 52
    assert layout["fields"][-1]["offset"] == 48  # crc32c last, so it can cover everything before it


def test_each_dead_letter_reason_has_one_error_class():
    assert set(errors.INVALID_INPUT_ERRORS) == set(DeadLetterReason)
    assert len(errors.INVALID_INPUT_ERRORS) == len(errors.InvalidInputError.__subclasses__())
    for reason, cls in errors.INVALID_INPUT_ERRORS.items():
        assert issubclass(cls, errors.MemstreamError) and cls.__doc__, reason


def test_import_memstream_stays_light():
    import subprocess
    import sys

    code = "import memstream, sys; print(sorted(m for m in ('kafka', 'numpy', 'torch', 'pyarrow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
