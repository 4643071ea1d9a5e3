"""Any-to-any through the per-token timestep rule, chosen in the request: continue a video (clean
leading latents), audio-driven video (clean audio tokens), text to image, text to audio alone."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from omnireel import media
from omnireel.cli import main as cli_main
from omnireel.config import TRUSTED, GenerationRequest, parse_request, request_error_message
from omnireel.model.layout import AUDIO_SIGMA, CLEAN, VIDEO_SIGMA, build_layout
from omnireel.plan import plan_request
from omnireel.families.omni import denoise_layout_spec
from omnireel.stages import STAGE_GRAPH, run_stage

from media_support import encode_wav

STAGES = {stage.name: stage for stage in STAGE_GRAPH}
BASE = dict(prompt="waves roll onto a beach", size="32x32", fps=8, steps=3, seed=4)


def run_encoders(engine, request):
    values = {"plan": plan_request(request, engine.config)}
    for name in ("encode_text", "encode_voice", "encode_media"):
        values[STAGES[name].output] = run_stage(STAGES[name], engine.components, values)
    layout = build_layout(denoise_layout_spec(values["plan"], values["text"], values["voice"], values["media"]),
                          engine.config.backbone)
    return values, layout


def video_steps(layout, latent_frames: int) -> torch.Tensor:
    """Per latent frame, the timestep index of its tokens (they agree within a frame)."""
    steps = layout.timestep[layout.spans["video"]].view(latent_frames, -1)
    assert (steps == steps[:, :1]).all()
    return steps[:, 0]


def test_continue_a_video_keeps_its_frames_as_clean_leading_latents(tiny_engine, tmp_path):
    clip = tmp_path / "in.mp4"
    frames = np.stack([np.full((32, 32, 3), 40 * i, np.uint8) for i in range(7)])     # 7 frames at 8 fps
    clip.write_bytes(media.encode_video(frames, fps=8))
    request = parse_request({**BASE, "seconds": 2, "input_video": str(clip)}, TRUSTED)
    values, layout = run_encoders(tiny_engine, request)
    plan, given = values["plan"], values["media"].video                     # given: (C, K, h, w)
    assert given.shape[1] == 2                                               # frames 0..4 = 2 whole latents
    assert video_steps(layout, plan.latent_frames).tolist() == [CLEAN] * 2 + [VIDEO_SIGMA] * (plan.latent_frames - 2)
    latents = tiny_engine.render(request).latents.video
    assert torch.equal(latents[:, :2], given) and latents.shape[1] == plan.latent_frames == 5


def test_audio_driven_video_keeps_the_given_audio(tiny_engine, tmp_path, monkeypatch):
    """...and decodes it once per job (encode_media; decode_audio hands on its soundtrack)."""
    decodes = []
    real_decode = media.decode_audio
    monkeypatch.setattr(media, "decode_audio", lambda data: decodes.append(len(data)) or real_decode(data))
    t = np.arange(24000) / 24000
    tone = (0.4 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)            # 1 s at 24 kHz
    sound = tmp_path / "tone.wav"
    sound.write_bytes(encode_wav(tone, 24000))
    request = parse_request({**BASE, "seconds": 1, "input_audio": str(sound)}, TRUSTED)
    values, layout = run_encoders(tiny_engine, request)
    given = values["media"].audio                                            # (Ca, Ta)
    assert given.shape == (4, values["plan"].audio_frames)
    assert (layout.timestep[layout.spans["audio"]] == CLEAN).all()
    assert (layout.timestep[layout.spans["video"]] == VIDEO_SIGMA).all()
    decodes.clear()
    result = tiny_engine.render(request)
    assert decodes == [len(sound.read_bytes())]                              # one decode of the input, per job
    assert torch.equal(result.latents.audio, given)                          # never moved by the sampler
    silent = tiny_engine.render(GenerationRequest(**BASE, seconds=1)).latents.video
    assert (result.latents.video - silent).abs().max() > 1e-3                # the video is made to it
    wave, rate = media.decode_audio(result.artifact.data)                    # the soundtrack is the input's
    spectrum = np.abs(np.fft.rfft(wave))
    assert rate == 24000 and abs(np.argmax(spectrum) * rate / len(wave) - 330) < 3
    assert abs(np.sqrt(np.mean(wave ** 2)) / np.sqrt(np.mean(tone ** 2)) - 1) < 0.1


def test_text_to_image_is_one_clean_free_frame_and_no_audio(tiny_engine):
    values, layout = run_encoders(tiny_engine, GenerationRequest(**BASE, output="image"))
    assert values["plan"].latent_frames == 1 and layout.spans["audio"].stop == layout.spans["audio"].start
    assert (layout.timestep[layout.spans["video"]] == VIDEO_SIGMA).all()


def test_text_to_audio_alone(tiny_engine, tmp_path):
    request = GenerationRequest(**BASE, seconds=1.5, mode="audio")
    values, layout = run_encoders(tiny_engine, request)
    video = layout.spans["video"]
    assert video.stop - video.start == 1 and (layout.timestep[video] == CLEAN).all()   # one blank clean token
    assert (layout.timestep[layout.spans["audio"]] == AUDIO_SIGMA).all()
    result = tiny_engine.render(request)
    streams = media.probe(result.artifact.data)
    assert [s["type"] for s in streams] == ["audio"]
    wave, rate = media.decode_audio(result.artifact.data)
    assert wave.shape[0] == round(1.5 * rate)                    # exact to the sample
    assert result.artifact.media_type == "audio/mp4"
    other = tiny_engine.render(GenerationRequest(**{**BASE, "prompt": "a dog barks"}, seconds=1.5, mode="audio"))
    assert (result.latents.audio - other.latents.audio).abs().max() > 1e-3
    out = tmp_path / "sound.m4a"
    cli_main(["render", "rain on a roof", "--audio-only", "-q", "-o", str(out), "--seconds", "0.5", "--steps", "1",
              "--checkpoint", str(tiny_engine.checkpoint)])
    assert [s["type"] for s in media.probe(out.read_bytes())] == ["audio"]


@pytest.mark.parametrize("fields,expected", [
    ({"mode": "audio", "elements": ["s3://b/a.png"]}, "elements: not available with mode 'audio' (no video)"),
    ({"mode": "audio", "input_audio": "s3://b/a.wav"}, "input_audio: not available with mode 'audio'"),
    ({"mode": "audio", "output": "image"}, "mode: not available with output 'image'"),
    ({"output": "image", "input_video": "s3://b/a.mp4"}, "input_video: not available with output 'image'"),
    ({"input_reference": "s3://b/a.png", "input_video": "s3://b/a.mp4"}, "input_reference, input_video: give at most one"),
    ({"mode": "text-to-audio"}, "mode: Input should be 'video' or 'audio'"),
])
def test_contradicting_choices_name_the_fields(fields, expected):
    with pytest.raises(ValidationError) as caught:
        GenerationRequest(prompt="p", **fields)
    assert expected in request_error_message(caught.value)
