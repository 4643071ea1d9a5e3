"""Elements and image-to-video: reference images go through the video VAE into clean ref tokens that
every shot sees; input_reference becomes the clean first latent frame; references cross the trust
boundary only as uploads within limits, allow-listed URIs, or (CLI) local files."""
from __future__ import annotations

import base64

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from omnireel import media
from omnireel.cli import main as cli_main
from omnireel.config import (MAX_UPLOAD_BYTES, TRUSTED, GenerationRequest, ReferencePolicy, parse_request,
                             request_error_message)
from omnireel.model.attention import build_attention_mask
from omnireel.model.config import MODALITY_ID
from omnireel.model.layout import CLEAN, VIDEO_SIGMA, build_layout
from omnireel.plan import plan_request
from omnireel.references import MediaReferenceError, load_frames, read_reference
from omnireel.families.omni import denoise_layout_spec
from omnireel.stages import STAGE_GRAPH, run_stage

from media_support import encode_wav

STAGES = {stage.name: stage for stage in STAGE_GRAPH}


def picture(width: int, height: int, colour) -> np.ndarray:
    """uint8 (H, W, 3): a coloured square on grey."""
    image = np.full((height, width, 3), 128, np.uint8)
    image[height // 4: 3 * height // 4, width // 4: 3 * width // 4] = colour
    return image


def png_file(tmp_path, name, width=96, height=64, colour=(220, 30, 30)) -> str:
    path = tmp_path / name
    path.write_bytes(media.encode_png(picture(width, height, colour)))
    return str(path)


def data_uri(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def encode_stages(engine, request):
    values = {"plan": plan_request(request, engine.config)}
    for name in ("encode_text", "encode_voice", "encode_media"):
        values[STAGES[name].output] = run_stage(STAGES[name], engine.components, values)
    return values


def test_elements_become_clean_ref_tokens_that_every_shot_sees(tiny_engine, tmp_path):
    red, blue = png_file(tmp_path, "red.png"), png_file(tmp_path, "blue.png", colour=(20, 40, 230))
    request = parse_request(dict(prompt="a red box meets a blue box", size="64x48", fps=8, steps=2,
                                 elements=[red, data_uri((tmp_path / "blue.png").read_bytes())],
                                 shots=[{"prompt": "the red box", "seconds": 1}, {"prompt": "the blue box", "seconds": 1}]),
                            TRUSTED)
    values = encode_stages(tiny_engine, request)
    refs = values["media"].refs                                              # (R, C, h, w)
    assert refs.shape == (2, 4, 6, 8)
    with torch.no_grad():                                                    # the VAE's encoding of the picture
        pixels = torch.from_numpy(load_frames(red, 64, 48, 1)).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
        assert torch.allclose(refs[0], tiny_engine.components["vae"].encode(pixels)[0, :, 0], atol=1e-5)
    assert not torch.allclose(refs[0], refs[1])
    plan = values["plan"]
    layout = build_layout(denoise_layout_spec(plan, values["text"], values["voice"], values["media"]),
                          tiny_engine.config.backbone)
    ref = layout.modality == MODALITY_ID["ref"]
    assert int(ref.sum()) == 2 * 3 * 4 and (layout.timestep[ref] == CLEAN).all()
    mask = build_attention_mask(layout.shot, layout.caption, "cpu")
    for shot in range(len(plan.shots)):
        members = (layout.shot == shot).nonzero().flatten()                  # this shot's caption and media
        assert mask[members][:, ref].all() and mask[ref][:, members].all()


def test_image_to_video_keeps_the_image_as_the_clean_first_latent(tiny_engine, tmp_path):
    image = png_file(tmp_path, "first.png", width=64, height=64)
    base = dict(prompt="the square slides away", seconds=1, size="32x32", fps=8, steps=3, seed=2)
    request = parse_request({**base, "input_reference": image}, TRUSTED)
    values = encode_stages(tiny_engine, request)
    first = values["media"].video                                            # (C, 1, h, w)
    assert first.shape == (4, 1, 4, 4)
    layout = build_layout(denoise_layout_spec(values["plan"], values["text"], values["voice"], values["media"]),
                          tiny_engine.config.backbone)
    video = layout.timestep[layout.spans["video"]].view(values["plan"].latent_frames, -1)
    assert (video[0] == CLEAN).all() and (video[1:] == VIDEO_SIGMA).all()
    result = tiny_engine.render(request)
    assert torch.equal(result.latents.video[:, :1], first)                   # never moved by the sampler
    plain = tiny_engine.render(GenerationRequest(**base)).latents.video
    assert (result.latents.video[:, 1:] - plain[:, 1:]).abs().max() > 1e-3   # and it conditions the rest


def test_references_cross_the_trust_boundary_only_as_allowed(tmp_path):
    image = png_file(tmp_path, "x.png")

    def error(policy=None, **fields) -> str:
        with pytest.raises(ValidationError) as caught:
            parse_request({"prompt": "p", **fields}, policy) if policy else GenerationRequest(prompt="p", **fields)
        return request_error_message(caught.value)

    assert "elements.0: local paths are not allowed here" in error(elements=[image])
    assert "input_reference: scheme 'file' is not allowed" in error(input_reference=f"file://{image}")
    assert "input_reference: host 169.254.169.254 is a private" in error(input_reference="https://169.254.169.254/a.png")
    assert "bucket 'other' is not in the allow-list" in error(ReferencePolicy(buckets=("ours",)), elements=["s3://other/a.png"])
    assert "elements: at most 4 elements (got 5)" in error(elements=["s3://b/a.png"] * 5)
    too_big = "data:image/png;base64," + "A" * (4 * (MAX_UPLOAD_BYTES // 3 + 2))
    assert f"elements.0: upload must be at most {MAX_UPLOAD_BYTES} bytes" in error(elements=[too_big])
    assert "not valid base64" in error(input_reference="data:image/png;base64,@@@@")
    assert "input_reference: no such file" in error(TRUSTED, input_reference=str(tmp_path / "missing.png"))
    assert GenerationRequest(prompt="p", elements=["s3://bucket/a.png", data_uri(b"png")]).elements[0] == "s3://bucket/a.png"
    assert parse_request({"prompt": "p", "input_reference": f"file://{image}"}, TRUSTED).input_reference == image


def test_references_are_size_and_duration_checked_before_decoding(tmp_path):
    clip = tmp_path / "long.mp4"
    clip.write_bytes(media.encode_video(np.zeros((25, 32, 32, 3), np.uint8), fps=1))     # 25 s
    with pytest.raises(MediaReferenceError, match=r"must be at most 20 s long \(got 25.00 s\)"):
        load_frames(str(clip), 32, 32)
    with pytest.raises(MediaReferenceError, match="must be at most 100 bytes"):
        read_reference(str(clip), max_bytes=100)                  # from the file's size, before reading it
    with pytest.raises(MediaReferenceError, match="has no video stream"):
        load_frames(data_uri(encode_wav(np.zeros(800, np.float32), 8000)), 32, 32)
    with pytest.raises(MediaReferenceError, match="not a readable video file"):
        load_frames(data_uri(b"\x00" * 64), 32, 32)


def test_cli_renders_elements_and_reference_and_reports_bad_ones(tiny_checkpoint, tmp_path, capsys):
    image = png_file(tmp_path, "ref.png")
    out = tmp_path / "i2v.mp4"
    cli_main(["render", "a red square", "--reference", image, "--element", image, "-q", "-o", str(out),
              "--checkpoint", str(tiny_checkpoint), "--seconds", "0.625", "--size", "32x32", "--fps", "8", "--steps", "1"])
    assert [s["type"] for s in media.probe(out.read_bytes())] == ["video", "audio"]
    wav = tmp_path / "sound.wav"
    wav.write_bytes(encode_wav(np.zeros(800, np.float32), 8000))
    for argv, expected in ((["--element", str(wav)], "elements.0: has no video stream"),
                           (["--reference", image, "--image"], "input_reference: not available with output 'image'"),
                           (["--reference", image, "--seconds", "0.125"], "input_reference: needs a clip of at least 2 frames")):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["render", "x", "--checkpoint", str(tiny_checkpoint), "--size", "32x32", "--fps", "8",
                      "--steps", "1", "-o", str(tmp_path / "x.mp4"), *argv])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and expected in err, err
