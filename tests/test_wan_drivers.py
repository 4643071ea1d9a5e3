"""The Wan family through the Serve app (its own application, route prefix /wan, beside the shared omni
app) and the Ray Data batch pipeline: served and batch latents equal WanPipeline's within 1e-4, the
official openai client gets an H.264 MP4 with no audio stream, and requests for sound or voices are a
400 (Serve) or an errors-file row (batch) naming the field.

(The random tiny model's frames are noise, which H.264 keeps at ~18 dB, so MP4s are not compared
across processes here; the latents are, strictly.)"""
from __future__ import annotations

import pytest
import torch
from tiny_wan import ROBOT

from omnireel import media, storage
from omnireel.config import GenerationRequest

from batch_support import family_batch, read_parquet, the_rendered_row
from serve_support import KEY, checkpoint_app, served_latents, wait_done

APP = "wan"


@pytest.fixture(scope="module")
def pipeline_latents(wan_checkpoint):
    """WanPipeline's own latents (1, C, T, h, w) for ROBOT at its default guidance (what the drivers serve)."""
    from diffusers import WanPipeline

    from omnireel.families.wan import FAMILY

    plan = FAMILY.plan(GenerationRequest(**ROBOT), FAMILY.read_config(wan_checkpoint))
    pipe = WanPipeline.from_pretrained(wan_checkpoint)
    pipe.set_progress_bar_config(disable=True)
    (latents,) = pipe(prompt=plan.captions[0], height=plan.height, width=plan.width, num_frames=9,
                      num_inference_steps=plan.steps, guidance_scale=plan.guidance_video,
                      generator=torch.Generator().manual_seed(ROBOT["seed"]), output_type="latent", return_dict=False)
    assert plan.guidance_video == 5.0 and latents.abs().max() > 0.1
    return latents


# The batch tests come first: a module fixture lives until the module ends, so the Wan Serve app
# (~1.9 logical CPUs) would otherwise still hold its replicas while the three batch pools start.

@pytest.fixture(scope="module")
def batch_run(ray_session, wan_checkpoint, tmp_path_factory):
    return family_batch(tmp_path_factory.mktemp("wan-batch"), wan_checkpoint, [
        dict(id="robot", **ROBOT),
        dict(id="voiced", **ROBOT, voices='[{"character": "ANNA", "voice_id": "anna"}]'),
        dict(id="song", **ROBOT, mode="audio"),
        dict(id="talky", **ROBOT, language="ko"),
    ])


def test_a_batch_row_equals_wan_pipeline(batch_run, pipeline_latents):
    summary, out = batch_run
    assert (summary.rows, summary.rendered, summary.invalid, summary.failed) == (4, 1, 3, 0)
    result, latents = the_rendered_row(out)
    assert (latents.video - pipeline_latents[0]).abs().max().item() <= 1e-4
    (stream,) = media.probe(storage.read_bytes(result["uri"]))
    assert (stream["type"], stream["codec"], stream["frames"]) == ("video", "h264", 9)


def test_rows_the_family_cannot_honor_name_their_field(batch_run):
    _, out = batch_run
    errors = {e["id"]: e for e in read_parquet(storage.join(out, "errors.parquet"))}
    assert {name: e["field"] for name, e in errors.items()} == {"voiced": "voices", "song": "mode", "talky": "language"}
    assert all(e["message"].startswith(e["field"] + ":") and "wan family" in e["message"] for e in errors.values())


@pytest.fixture(scope="module")
def wan_app(served, wan_checkpoint, tmp_path_factory):
    """build_app on the Wan folder at tp=1, as its own Serve application beside the shared one."""
    with checkpoint_app(served, wan_checkpoint, APP, tmp_path_factory.mktemp("serve-wan")) as app:
        yield app


def test_served_stages_equal_wan_pipeline(wan_app, pipeline_latents):
    latents = served_latents(GenerationRequest(**ROBOT), app=APP)
    assert latents.video.shape == pipeline_latents.shape[1:]                    # (C, T, h, w)
    assert (latents.video - pipeline_latents[0]).abs().max().item() <= 1e-4
    assert latents.audio.numel() == 0


def test_openai_client_gets_an_mp4_without_audio(wan_app):
    import openai

    client = openai.OpenAI(base_url=f"{wan_app.url}/v1", api_key=KEY, max_retries=2, timeout=120)
    extra = {k: v for k, v in ROBOT.items() if k not in ("prompt", "size", "seconds")}
    video = client.videos.create(prompt=ROBOT["prompt"], size=ROBOT["size"], seconds=str(ROBOT["seconds"]),
                                 extra_body=extra)
    with wan_app.http() as http:
        assert wait_done(http, video.id)["status"] == "completed"
    data = client.videos.download_content(video.id).read()
    (stream,) = media.probe(data)                                             # one stream: no audio
    assert (stream["type"], stream["codec"], stream["frames"], stream["width"]) == ("video", "h264", 9, 32)


@pytest.mark.parametrize("fields, field", [
    ({"voices": [{"character": "ANNA", "voice_id": "anna"}]}, "voices"),
    ({"mode": "audio"}, "mode"),
])
def test_sound_and_voices_are_a_400_naming_the_field(wan_app, fields, field):
    with wan_app.http() as http:
        response = http.post("/v1/videos", json={**ROBOT, **fields})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and error["message"].startswith(f"{field}:")
    assert "not supported by the wan family" in error["message"]
