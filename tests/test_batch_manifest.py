"""The batch pipeline's pieces without Ray: manifest rows through the request validator, the
payload <-> Arrow converter, and the stage graph cut into pools."""
from __future__ import annotations

import math

import pyarrow as pa
import pytest
import torch

from omnireel.checkpoint import read_config
from omnireel.pipelines import rows
from omnireel.pipelines.manifest import COLUMNS, ManifestError, check_columns, check_row
from omnireel.pipelines.render import POOLS, carried, check_manifest
from omnireel.stages import STAGE_GRAPH, EncodedStream, GeneratedLatents, TextEmbeddings, VoiceEmbeddings

from batch_support import write_manifest


@pytest.fixture(scope="module")
def config(tiny_checkpoint):
    return read_config(tiny_checkpoint)


def test_valid_row_becomes_a_request_with_defaults(config):
    checked = check_row({"id": "a", "prompt": "  waves  ", "seconds": None, "fps": math.nan, "seed": 7}, config)
    assert checked.request is not None and not checked.message
    assert (checked.id, checked.request.prompt, checked.request.seed) == ("a", "waves", 7)
    assert checked.request.seconds == 2.0 and checked.request.fps == 24      # null and NaN take defaults


@pytest.mark.parametrize("row,field,words", [
    ({"prompt": "x"}, "id", "required"),
    ({"id": "  ", "prompt": "x"}, "id", "required"),
    ({"id": "a"}, "prompt", "required"),
    ({"id": "a", "prompt": "x", "size": "30x32"}, "size", "within [32, 1920]"),
    ({"id": "a", "prompt": "x", "steps": 1000}, "steps", "<= 100"),
    ({"id": "a", "prompt": "x", "language": "xx"}, "language", "language"),
    ({"id": "a", "prompt": "x", "shots": "[{"}, "shots", "not valid JSON"),
    ({"id": "a", "prompt": "x", "shots": '[{"prompt": "p", "seconds": 1}]', "seconds": 2}, "shots", "add up"),
    ({"id": "a", "prompt": "x", "seconds": 0.125, "fps": 8,           # planner: 2 shots in 1 latent frame
      "shots": '[{"prompt": "p", "seconds": 0.0625}, {"prompt": "q", "seconds": 0.0625}]'}, "shots", "latent frames"),
])
def test_invalid_rows_name_the_field(config, row, field, words):
    checked = check_row(row, config)
    assert checked.request is None
    assert checked.field == field and checked.message.startswith(field) and words in checked.message
    assert "\n" not in checked.message


def test_structured_fields_take_json_strings_or_nested_values(config):
    shots = [{"prompt": "a wide street", "seconds": 0.5}, {"prompt": "a face", "seconds": 0.5, "camera": None}]
    as_json = check_row({"id": "a", "prompt": "x", "fps": 8, "shots": '[{"prompt": "a wide street", "seconds": 0.5},'
                         ' {"prompt": "a face", "seconds": 0.5}]'}, config)
    nested = check_row({"id": "a", "prompt": "x", "fps": 8, "shots": shots}, config)
    assert as_json.request == nested.request and len(nested.request.shots) == 2


def test_manifest_columns_are_checked_before_any_work(tmp_path):
    check_columns(["id", "prompt", "seed"])
    with pytest.raises(ManifestError, match="missing required column.*prompt"):
        check_columns(["id", "seed"])
    with pytest.raises(ManifestError, match="unknown column.*sead"):
        check_columns(["id", "prompt", "sead"])
    assert "prompt" in COLUMNS and "shots" in COLUMNS
    with pytest.raises(ManifestError, match="cannot read"):
        check_manifest(str(tmp_path / "missing.parquet"))
    with pytest.raises(ManifestError, match="unknown column"):
        check_manifest(write_manifest(str(tmp_path / "m.parquet"), [{"id": "a", "prompt": "x", "colour": "red"}]))


def test_payloads_round_trip_through_arrow():
    payloads = {
        "text": TextEmbeddings([torch.randn(3, 8), torch.randn(5, 8).bfloat16()]),
        "voice": VoiceEmbeddings(torch.zeros(0, 0)),
        "latents": GeneratedLatents(torch.randn(4, 2, 2, 2), torch.randn(8, 5)),
        "artifact": EncodedStream(b"\x00mp4 bytes", "video/mp4"),
    }
    table = rows.to_table([rows.to_row({"id": "a", "key": "k"}, payloads)], tuple(payloads))
    table = pa.Table.from_batches(table.to_batches())           # as a block comes back from the store
    [row] = rows.from_table(table)
    back = rows.from_row(row, tuple(payloads))
    assert row["id"] == "a" and row["stage"] == "" and row["timings"] == "{}"
    for a, b in zip(payloads["text"].captions, back["text"].captions):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert back["voice"].speakers.shape == (0, 0)
    assert torch.equal(back["latents"].video, payloads["latents"].video)
    assert torch.equal(back["latents"].audio, payloads["latents"].audio)
    assert back["artifact"] == payloads["artifact"]
    assert rows.from_row({"text": rows.encode_payload(TextEmbeddings([]))}, ("text",))["text"].captions == []


def test_pools_cover_the_stage_graph_in_order():
    assert [s for pool in POOLS.values() for s in pool] == list(STAGE_GRAPH)
    assert [s.name for s in POOLS["denoise"]] == ["denoise"]
    assert carried(None) == ()
    assert set(carried("encode")) == {"text", "voice", "media"}
    assert carried("denoise") == ("latents", "media")   # decode_audio takes the soundtrack encode_media made
    assert carried("decode") == ()
