"""JSON Schema and Arrow schemas generated from the dataclasses in :mod:`memstream.schemas.records`.

``python -m memstream.schemas.generate`` rewrites ``schemas/*.json``; tests/test_schemas.py
fails when a checked-in file differs from what this module generates.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import struct
import types
import typing
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa

from memstream.schemas.records import JSON_RECORDS, HEADER, JsonRecord, LatentChunkHeader, Vector

SCHEMA_DIR = Path(__file__).resolve().parent
_BASE_URI = "https://memstream.dev/schemas/"


def _optional(tp) -> tuple[typing.Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1 and len(args) == 2:
            return inner[0], True
        raise TypeError(f"only X | None unions are supported, not {tp}")
    return tp, False


def _json_type(tp) -> dict:
    tp, nullable = _optional(tp)
    origin = typing.get_origin(tp)
    if tp is Vector:
        out = {"type": "array", "items": {"type": "number"}}
    elif origin is Literal:
        out = {"type": "string", "enum": list(typing.get_args(tp))}
    elif origin is list:
        out = {"type": "array", "items": _json_type(typing.get_args(tp)[0])}
    elif dataclasses.is_dataclass(tp):
        out = _json_object(tp)
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        out = {"type": "string", "enum": [m.value for m in tp]}
    else:
        out = {bool: {"type": "boolean"}, int: {"type": "integer"}, float: {"type": "number"},
               str: {"type": "string"}, bytes: {"type": "string", "contentEncoding": "base64"}}[tp]
    if nullable:
        out = {"anyOf": [out, {"type": "null"}]}
    return out


def _json_object(cls) -> dict:
    hints = typing.get_type_hints(cls)
    props = {}
    for f in dataclasses.fields(cls):
        prop = _json_type(hints[f.name])
        if "doc" in f.metadata:
            prop = {"description": f.metadata["doc"], **prop}
        props[f.name] = prop
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def json_schema(cls: type[JsonRecord]) -> dict:
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema",
              "$id": f"{_BASE_URI}{cls.SCHEMA_NAME}.v{cls.SCHEMA_VERSION}.json",
              "title": cls.__name__,
              "description": " ".join((cls.__doc__ or cls.__name__).split()),
              **_json_object(cls)}
    if "schema_version" in schema["properties"]:
        schema["properties"]["schema_version"] = {**schema["properties"]["schema_version"],
                                                  "const": cls.SCHEMA_VERSION}
    return schema


def chunk_header_layout() -> dict:
    """The binary header as a document: fields with offsets, sizes and struct codes."""
    fields, offset = [], 0
    for f in dataclasses.fields(LatentChunkHeader):
        size = struct.calcsize("<" + f.metadata["struct"])
        fields.append({"name": f.name, "offset": offset, "size": size, "struct": f.metadata["struct"],
                       "description": f.metadata["doc"]})
        offset += size
    assert offset == HEADER.size
    return {"title": "LatentChunkHeader", "byte_order": "little", "size": HEADER.size,
            "description": " ".join(LatentChunkHeader.__doc__.split()), "fields": fields}


def _arrow_type(tp, meta: typing.Mapping, dim: int | None) -> tuple[pa.DataType, bool]:
    tp, nullable = _optional(tp)
    arrow = meta.get("arrow")
    if arrow == "vector":  # a fixed-size list, so LanceDB can index it
        if dim is None:
            raise TypeError("this record has a vector column: pass arrow_schema(cls, dim=...)")
        return pa.list_(pa.float32(), dim), nullable
    if arrow == "float32":
        return pa.float32(), nullable
    if arrow == "binary16":
        return pa.binary(16), nullable
    origin = typing.get_origin(tp)
    if origin is Literal or (isinstance(tp, type) and issubclass(tp, enum.Enum)):
        return pa.string(), nullable
    if origin is list:
        return pa.list_(_arrow_type(typing.get_args(tp)[0], {}, dim)[0]), nullable
    if dataclasses.is_dataclass(tp):
        return pa.struct(_arrow_fields(tp, dim)), nullable
    return {bool: pa.bool_(), int: pa.int64(), float: pa.float64(), str: pa.string(),
            bytes: pa.binary()}[tp], nullable


def _arrow_fields(cls, dim: int | None) -> list[pa.Field]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        dtype, nullable = _arrow_type(hints[f.name], f.metadata, dim)
        out.append(pa.field(f.name, dtype, nullable=nullable,
                            metadata={"doc": f.metadata["doc"]} if "doc" in f.metadata else None))
    return out


def arrow_schema(cls: type[JsonRecord], dim: int | None = None) -> pa.Schema:
    """The Arrow schema of a record's table; ``dim`` sizes its vector column, if it has one."""
    return pa.schema(_arrow_fields(cls, dim), metadata={"name": cls.SCHEMA_NAME,
                                                        "schema_version": str(cls.SCHEMA_VERSION)})


def to_arrow(records, cls: type[JsonRecord], dim: int | None = None) -> pa.Table:
    """Records of one class as a table of its Arrow schema (vectors stacked in one buffer)."""
    schema = arrow_schema(cls, dim)
    columns = {}
    for f in dataclasses.fields(cls):
        values = [getattr(r, f.name) for r in records]
        if f.metadata.get("arrow") == "vector":
            flat = np.stack([np.asarray(v, np.float32).reshape(dim) for v in values]).ravel() if values else \
                np.zeros(0, np.float32)
            columns[f.name] = pa.FixedSizeListArray.from_arrays(pa.array(flat), dim)
        else:
            columns[f.name] = values
    return pa.table(columns, schema=schema)


def rendered() -> dict[str, str]:
    """File name -> text of every generated schema file."""
    docs = {f"{cls.SCHEMA_NAME}.v{cls.SCHEMA_VERSION}.json": json_schema(cls) for cls in JSON_RECORDS}
    docs["latent_chunk_header.v1.json"] = chunk_header_layout()
    return {name: json.dumps(doc, indent=2) + "\n" for name, doc in docs.items()}


def main() -> None:
    for name, text in rendered().items():
        (SCHEMA_DIR / name).write_text(text)
        print(SCHEMA_DIR / name)


if __name__ == "__main__":
    main()
