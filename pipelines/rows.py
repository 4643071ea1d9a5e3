"""The one converter between the pipeline's Python rows and Arrow tables (DESIGN.md §2).

A row is a dict with the BASE columns below plus one binary column per payload it carries. A payload
(a stage's output: a dataclass of tensors, lists of tensors, bytes and plain values) becomes ONE
binary value: safetensors bytes holding its tensor fields (`name` for a tensor, `name.<i>` for the
i-th of a list of tensors, uint8 `name` for bytes), with how each was stored and the plain fields as
JSON in the safetensors metadata. dtype and shape travel with the bytes (bfloat16 included) and
nothing is ever unpickled. The ScenePlan never travels: each pool re-plans it from the `request`
column (a pure function of the request and the checkpoint's config).
"""
from __future__ import annotations

import dataclasses
import json
import struct

import numpy as np
import pyarrow as pa
import torch
from safetensors.torch import load, save

from omnireel.stages import STAGE_GRAPH

# A payload column's name is the payload's name in STAGE_GRAPH; its type the stage's return type.
PAYLOAD_TYPES: dict[str, type] = {stage.output: stage.output_type for stage in STAGE_GRAPH}

BASE = pa.schema([
    ("row", pa.int64()),              # position in the manifest (after --limit), from 0
    ("id", pa.string()),              # the manifest's id
    ("key", pa.string()),             # request_key(request, checkpoint digest): the artifact's name
    ("request", pa.string()),         # the normalized GenerationRequest as JSON ("" when invalid)
    ("stage", pa.string()),           # where the row failed: "validate" or a stage name ("" = fine)
    ("field", pa.string()),           # the offending field of a row that failed validation
    ("message", pa.string()),         # why it failed, one line
    ("timings", pa.string()),         # JSON {stage name: seconds} of the stages run so far
    ("denoise_start", pa.float64()),  # epoch seconds when the backbone started this row (0 = not yet)
    ("denoise_end", pa.float64()),
    ("denoise_busy", pa.float64()),   # seconds of its actor's backbone time this row accounts for (rows
                                      # denoised together share their actor's busy time over their call)
    ("denoise_callers", pa.int64()),  # the most denoise calls whose rows shared one of its steps (0 = none)
    ("record", pa.string()),          # the artifact's sidecar record as JSON ("" = not rendered)
    ("members", pa.list_(pa.struct([("row", pa.int64()), ("id", pa.string())]))),
                                      # the later rows of the same key, which share this row's outcome
])
EMPTY = {"row": 0, "id": "", "key": "", "request": "", "stage": "", "field": "",
         "message": "", "timings": "{}", "denoise_start": 0.0, "denoise_end": 0.0,
         "denoise_busy": 0.0, "denoise_callers": 0, "record": "", "members": []}


# ---- payload <-> bytes --------------------------------------------------------------------------

def encode_payload(payload) -> bytes:
    """A payload dataclass -> safetensors bytes; metadata `kinds` says how each tensor field was stored."""
    tensors, kinds, plain = {}, {}, {}
    for f in dataclasses.fields(payload):
        value = getattr(payload, f.name)
        if isinstance(value, torch.Tensor):
            tensors[f.name], kinds[f.name] = value.contiguous(), "tensor"
        elif isinstance(value, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in value):
            tensors.update({f"{f.name}.{i}": t.contiguous() for i, t in enumerate(value)})
            kinds[f.name] = len(value)                      # a list of this many tensors
        elif isinstance(value, bytes):
            tensors[f.name], kinds[f.name] = torch.from_numpy(np.frombuffer(value, dtype=np.uint8).copy()), "bytes"
        else:
            plain[f.name] = value                           # JSON
    return save(tensors, metadata={"kinds": json.dumps(kinds), "plain": json.dumps(plain)})


def decode_payload(name: str, data: bytes):
    """The inverse of encode_payload for the payload called `name` in STAGE_GRAPH."""
    tensors = load(data)
    header = _metadata(data)
    fields = json.loads(header["plain"])
    for field, kind in json.loads(header["kinds"]).items():
        if kind == "tensor":
            fields[field] = tensors[field]
        elif kind == "bytes":
            fields[field] = tensors[field].numpy().tobytes()
        else:
            fields[field] = [tensors[f"{field}.{i}"] for i in range(kind)]
    return PAYLOAD_TYPES[name](**fields)


def _metadata(data: bytes) -> dict:
    """The safetensors header's __metadata__ (header: 8-byte little-endian length, then JSON)."""
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]).get("__metadata__", {})


# ---- rows <-> Arrow ------------------------------------------------------------------------------

def to_row(row: dict, payloads: dict) -> dict:
    """`row` with each payload in `payloads` ({name: payload}) as its binary column."""
    return {**row, **{name: encode_payload(value) for name, value in payloads.items()}}


def from_row(row: dict, names) -> dict:
    """{name: payload} for the payload columns `names` of `row`."""
    return {name: decode_payload(name, row[name]) for name in names}


def schema(payload_names=()) -> pa.Schema:
    """BASE plus one binary column per payload name."""
    return pa.schema([*BASE, *((name, pa.binary()) for name in payload_names)])


def to_table(rows: list[dict], payload_names=()) -> pa.Table:
    """Rows (BASE columns, missing ones defaulted, plus `payload_names`; b"" for a failed row) -> Table."""
    full = [{**EMPTY, **{name: b"" for name in payload_names}, **row} for row in rows]
    target = schema(payload_names)
    return pa.Table.from_pylist([{name: r[name] for name in target.names} for r in full], schema=target)


def from_table(table: pa.Table) -> list[dict]:
    return table.to_pylist()


def one_line(exc: BaseException, limit: int = 500) -> str:
    """An exception as a row's `message`: its type and text on one line, at most `limit` characters."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
