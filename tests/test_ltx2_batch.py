"""The LTX-2 family through the Ray Data batch pipeline: a row's saved latents equal LTX2Pipeline's
within 1e-4, its MP4 holds H.264 and stereo AAC, and rows asking for what the family cannot honor
land in the errors file naming the field."""
from __future__ import annotations

import pytest
from ltx2_support import denormalized
from tiny_ltx2 import ROBOT

from omnireel import media, storage

from batch_support import family_batch, read_parquet, the_rendered_row



@pytest.fixture(scope="module")
def batch_run(ray_session, ltx2_checkpoint, tmp_path_factory):
    return family_batch(tmp_path_factory.mktemp("ltx2-batch"), ltx2_checkpoint, [
        dict(id="robot", **ROBOT),
        dict(id="voiced", **ROBOT, voices='[{"character": "ANNA", "voice_id": "anna"}]'),
        dict(id="wide", **{**ROBOT, "size": "48x48"}),
        dict(id="talky", **ROBOT, language="ko"),
    ])


def test_a_batch_row_equals_ltx2_pipeline(batch_run, ltx2_robot_reference):
    summary, out = batch_run
    assert (summary.rows, summary.rendered, summary.invalid, summary.failed) == (4, 1, 3, 0)
    result, latents = the_rendered_row(out)
    pipe, video, audio = ltx2_robot_reference
    ours_video, ours_audio = denormalized(pipe, latents)
    assert (ours_video - video).abs().max().item() <= 1e-4 and (ours_audio - audio).abs().max().item() <= 1e-4
    streams = {s["type"]: s for s in media.probe(storage.read_bytes(result["uri"]))}
    assert (streams["video"]["codec"], streams["video"]["frames"], streams["audio"]["codec"]) == ("h264", 9, "aac")


def test_rows_the_family_cannot_honor_name_their_field(batch_run):
    _, out = batch_run
    errors = {e["id"]: e for e in read_parquet(storage.join(out, "errors.parquet"))}
    assert {name: e["field"] for name, e in errors.items()} == {"voiced": "voices", "wide": "size", "talky": "language"}
    assert "multiples of 32" in errors["wide"]["message"]
    assert all(e["message"].startswith(e["field"] + ":") and "ltx" in e["message"].lower() for e in errors.values())
