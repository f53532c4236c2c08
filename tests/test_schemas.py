"""The dataclasses are the source of truth: schema files, Arrow schemas and errors follow them."""

from __future__ import annotations

import dataclasses
import json

import jsonschema
import pyarrow as pa
import pytest

from memstream import errors
from memstream.schemas import generate
from memstream.schemas.records import (HEADER, JSON_RECORDS, Attestation, DeadLetterReason, DeadLetterRecord,
                                       ForgetRequest, GcRecord, LatentChunkHeader, LongTermEntry, Provenance,
                                       PurgeAttestation, ReadDivergence, SessionEvent, SummaryRecord)

SAMPLES = [
    SessionEvent(1, "close", "s1", b"\x01" * 16, "bf16", 384, 42, 1_700_000_000_000_000),
    SummaryRecord(1, "s1", 3, 768, 1024, False, 256, 384, "fp16", b"\x00\x3c" * 8, "summarizer-1/ckpt-7",
                  1_700_000_000_000_000, 1_700_000_000_100_000, b"\x11" * 32, b"\x22" * 32, b"\x33" * 64, "k1"),
    LongTermEntry(1, "e-abc", [0.25, -1.5], b"payload", Provenance(b"\x44" * 32, b"\x55" * 32, 7), b"\x66" * 64,
                  "k1", "tag", "alice", None),
    Attestation(1, 10, b"\x77" * 32, 1_700_000_000_000_000, b"\x88" * 64, "k1"),
    ForgetRequest(1, "alice", ["e-abc", "e-def"], 1_700_000_000_000_000, b"\x99" * 64, "k2"),
    GcRecord(1, "s1", "closed", 12, 300, 11, 11, b"\xaa" * 32, 1_700_000_000_000_000, 1_700_000_100_000_000,
             b"\xbb" * 64, "k1"),
    PurgeAttestation(1, "store", "ab" * 16, ["cd" * 16], ["ef" * 32], 1, 0, 42, b"\x12" * 32, 17, 4096, 9,
                     1_700_000_000_000_000, b"\x34" * 64, "k1"),
    DeadLetterRecord(1, DeadLetterReason.sequence_gap, "latents 3..5 are missing", "memstream.latents", 2, 17,
                     b"s1", b"MSLT\x01", 5, 1_700_000_000_000, 1_700_000_000_000_123),
    ReadDivergence(1, "ab" * 16, "s1", "both", "s3://b/primary", "s3://b/replica", ["episodic:3:" + "cd" * 32],
                   ["episodic:4:" + "ef" * 32], 0.25, ["fragments differ"], 1_700_000_000_000_000),
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
    broken = {**data, "schema_version": 2}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema).validate(broken)
    missing = {k: v for k, v in data.items() if k != "schema_version"}
    with pytest.raises(ValueError, match="missing"):
        type(record).from_dict(missing)


@pytest.mark.parametrize("record", SAMPLES, ids=lambda r: type(r).__name__)
def test_arrow_schema_holds_the_record(record):
    schema = generate.arrow_schema(type(record))
    row = {k: (v.value if isinstance(v, DeadLetterReason) else v) for k, v in dataclasses.asdict(record).items()}
    table = pa.Table.from_pylist([row], schema=schema)
    assert table.schema.names == [f.name for f in dataclasses.fields(record)]
    back = table.to_pylist()[0]
    if isinstance(record, LongTermEntry):
        back["provenance"] = Provenance(**back["provenance"])
    assert type(record).from_dict({k: record.to_dict()[k] for k in back}) == record
    assert {k: back[k] for k in back if k != "provenance"} == {k: row[k] for k in row if k != "provenance"}


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
