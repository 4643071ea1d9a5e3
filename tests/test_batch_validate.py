"""Validation only, on the session's Ray: a few thousand generated rows are triaged as Ray Data stages
(numbered, validated, duplicate ids refused) into the errors file, with nothing rendered; a folder
manifest of several files and row groups is numbered in manifest order, --limit cutting a row group."""
from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

from omnireel import storage
from omnireel.pipelines.render import run_batch

from batch_support import OPTIONS, SMALL, artifacts, read_parquet, write_manifest

ROWS = 2000
VALIDATE_ONLY = OPTIONS.model_copy(update={"validate_only": True})


def generated_rows() -> list[dict]:
    """Every tenth row from 3 too narrow, from 5 a repeat of the id five rows up, from 7 too many steps;
    prompts and seeds repeat, so many valid rows share an artifact key."""
    rows = []
    for i in range(ROWS):
        row = dict(id=f"clip{i}", prompt=f"prompt {i % 40}", seed=i % 3, **SMALL)
        if i % 10 == 3:
            row["size"] = "30x32"
        elif i % 10 == 5:
            row["id"] = f"clip{i - 5}"
        elif i % 10 == 7:
            row["steps"] = 1000
        rows.append(row)
    return rows


def test_validation_only_names_every_refused_row_and_renders_nothing(ray_session, tiny_checkpoint, tmp_path):
    manifest = write_manifest(str(tmp_path / "manifest.parquet"), generated_rows())
    out = str(tmp_path / "out")
    summary = run_batch(manifest, out, tiny_checkpoint, VALIDATE_ONLY)

    expected = {}                                  # row -> (id, field, message start)
    for i in range(ROWS):
        if i % 10 == 3:
            expected[i] = (f"clip{i}", "size", "size: ")
        elif i % 10 == 5:
            expected[i] = (f"clip{i - 5}", "id", f"id: duplicate of row {i - 5}")
        elif i % 10 == 7:
            expected[i] = (f"clip{i}", "steps", "steps: ")
    errors = read_parquet(summary.errors_uri)
    assert len(errors) == len(expected)
    for error in errors:
        row_id, field, message = expected[error["row"]]
        assert (error["id"], error["stage"], error["field"]) == (row_id, "validate", field)
        assert error["message"].startswith(message), error
    assert (summary.rows, summary.invalid, summary.pending) == (ROWS, len(expected), ROWS - len(expected))
    assert (summary.rendered, summary.skipped, summary.failed, summary.videos) == (0, 0, 0, 0)
    assert read_parquet(summary.results_uri) == [] and artifacts(out) == {}


def test_a_folder_manifest_is_numbered_in_manifest_order(ray_session, tiny_checkpoint, tmp_path):
    """Three files (named out of order on purpose: path order is manifest order) of 100-row row groups;
    every row refused, so the errors file shows every row number; --limit 420 ends inside a row group."""
    folder = tmp_path / "manifest"
    sizes = {"part-1.parquet": 250, "part-0.parquet": 130, "part-2.parquet": 300}
    first = {"part-0.parquet": 0, "part-1.parquet": 130, "part-2.parquet": 380}
    for name, n in sizes.items():
        table = pa.table({"id": [f"g{first[name] + i}" for i in range(n)], "prompt": ["x"] * n,
                          "size": ["30x32"] * n})
        buffer = io.BytesIO()
        pq.write_table(table, buffer, row_group_size=100)
        storage.write_bytes(str(folder / name), buffer.getvalue())
    summary = run_batch(str(folder), str(tmp_path / "out"), tiny_checkpoint, VALIDATE_ONLY.model_copy(update={"limit": 420}))
    errors = read_parquet(summary.errors_uri)
    assert sorted((e["row"], e["id"]) for e in errors) == [(p, f"g{p}") for p in range(420)]
    assert (summary.rows, summary.invalid, summary.pending) == (420, 420, 0)
