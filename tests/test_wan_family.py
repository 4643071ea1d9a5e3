"""The Wan family against diffusers' own pipelines, on tiny random checkpoints (benchmarks/tiny_wan.py).

Parity (DESIGN.md §3b): the family's stages and its denoiser's prepare / step / finish loop give
WanPipeline's latents within 1e-4 for the same prompt, seed, steps, size, frames and guidance, and its
frames at >= 40 dB PSNR: Wan 2.1 text-to-video with guidance off and CFG on; Wan 2.2 A14B switching
from the high-noise expert to the low-noise one at diffusers' step; image-to-video against
WanImageToVideoPipeline (Wan 2.1 I2V with its CLIP image tokens, and TI2V-5B's clean first latent).
Wan is video-only: its MP4 has no audio stream, and requests for sound or voices are refused.
"""
from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch

from tiny_wan import ROBOT, build_tiny_wan

from omnireel import media
from omnireel.config import GenerationRequest
from omnireel.families import family_name, family_of
from omnireel.families.wan import FAMILY, decode_frames
from omnireel.plan import PlanError

torch.set_num_threads(2)

SEED, FRAMES, SIZE = ROBOT["seed"], 9, 32       # 9 = 1 + 4 * 2: three latent frames


def request(**fields) -> GenerationRequest:
    return GenerationRequest(**{**ROBOT, **fields})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, wan_checkpoint):
    """{variant: folder}: the shared Wan 2.1 T2V folder and this module's A14B, I2V and TI2V ones."""
    root = tmp_path_factory.mktemp("wan-variants")
    return {"t2v": wan_checkpoint, **{v: build_tiny_wan(root / v, v) for v in ("a14b", "i2v", "ti2v")}}


@pytest.fixture(scope="module")
def loaded(tiny):
    """(config, components) per variant, loaded once."""
    return {v: (FAMILY.read_config(folder), FAMILY.load_components(folder, set(FAMILY.component_names)))
            for v, folder in tiny.items()}


def render(components, plan):
    """The family's stages in graph order, the denoise loop as the engine runs it. -> (latents, state)."""
    stage = FAMILY.stage
    text = stage("encode_text")(components["text_encoder"], plan)
    voice = stage("encode_voice")(components["voices"], plan)
    media_latents = stage("encode_media")(components["media_encoder"], plan)
    denoiser = components["backbone"]
    state = denoiser.prepare(plan, text, voice, media_latents)
    while state.done < state.steps:
        denoiser.step([state])
    return denoiser.finish(state), state


def reference_pipe(folder, image: bool = False):
    from diffusers import WanImageToVideoPipeline, WanPipeline

    pipe = (WanImageToVideoPipeline if image else WanPipeline).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_arguments(plan) -> dict:
    return dict(prompt=plan.captions[0], height=plan.height, width=plan.width, num_frames=FRAMES,
                num_inference_steps=plan.steps, guidance_scale=plan.guidance_video, return_dict=False)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio of images in [0, 1], dB."""
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean().clamp_min(1e-20)))


def check_parity(pipe, components, plan, ours, frames: bool = True, **pipeline_inputs) -> None:
    """ours (GeneratedLatents) against the pipeline's latents (and, if `frames`, its frames) for the same seed."""
    arguments = {**pipeline_arguments(plan), **pipeline_inputs}
    (latents,) = pipe(**arguments, generator=torch.Generator().manual_seed(SEED), output_type="latent")
    assert ours.video.shape == latents.shape[1:]                                  # (C, T, h, w)
    assert (ours.video - latents[0]).abs().max() <= 1e-4
    assert latents.abs().max() > 0.1
    if not frames:
        return
    (frames,) = pipe(**arguments, generator=torch.Generator().manual_seed(SEED), output_type="pt")  # (1, F, 3, H, W)
    our_frames = (decode_frames(components["vae"], plan, ours) / 2 + 0.5).clamp(0, 1)           # (3, F, H, W)
    assert psnr(our_frames.permute(1, 0, 2, 3), frames[0][:plan.num_frames]) >= 40


def test_folders_are_wan_pipelines(tiny, loaded):
    assert json.loads((tiny["t2v"] / "model_index.json").read_text())["_class_name"] == "WanPipeline"
    assert {v: family_name(folder) for v, folder in tiny.items()} == dict.fromkeys(tiny, "wan")
    assert family_of(tiny["i2v"]) is FAMILY
    config = loaded["t2v"][0]
    assert (config.family, config.vae_spatial_compression, config.vae_temporal_compression) == ("wan", 8, 4)
    assert (config.size_multiple, config.experts, config.default_steps, config.default_guidance) == (16, 1, 50, 5.0)
    assert (loaded["a14b"][0].experts, loaded["a14b"][0].boundary_timestep) == (2, 875.0)
    assert (loaded["ti2v"][0].size_multiple, loaded["ti2v"][0].vae_latent_channels) == (32, 48)
    assert loaded["i2v"][0].needs_image and loaded["i2v"][0].image_dim == 24
    assert FAMILY.limits.describe()["modalities"] == ["video"]


def test_plan_rounds_frames_up_to_1_plus_4k(loaded):
    config = loaded["t2v"][0]
    plan = FAMILY.plan(GenerationRequest(prompt="a cat", size="832x480", seconds=1.0, fps=16), config)
    assert plan.family == "wan" and plan.captions == ("a cat",)
    assert (plan.num_frames, plan.latent_frames) == (16, 5)                  # generated: 17 = 1 + 4 * 4
    assert (plan.latent_height, plan.latent_width) == (60, 104)
    assert (plan.audio_frames, plan.audio_samples, plan.steps, plan.guidance_video) == (0, 0, 50, 5.0)


PNG = "data:image/png;base64," + base64.b64encode(media.encode_png(np.zeros((32, 32, 3), np.uint8))).decode()
REFUSED = {
    "voices": dict(prompt="ANNA sings", voices=[{"character": "ANNA", "voice_id": "v1"}]),
    "mode": dict(mode="audio"),
    "input_audio": dict(input_audio="data:audio/wav;base64,AAAA"),
    "physics": dict(physics={"bodies": [{"position": [16, 16], "radius": 4}]}),
    "shots": dict(shots=[{"prompt": "a cat", "seconds": 9 / 16}]),
    "language": dict(language="zh"),
    "fps": dict(fps=4, seconds=2.0),
    "seconds": dict(seconds=12.0),
    "input_reference": dict(input_reference=PNG),               # a text-to-video checkpoint
}


@pytest.mark.parametrize("field", sorted(REFUSED))
def test_unsupported_requests_are_refused_naming_the_field(loaded, field):
    with pytest.raises(PlanError) as refused:
        FAMILY.plan(request(**REFUSED[field]), loaded["t2v"][0])
    assert refused.value.field == field
    limit = {"seconds": "at most 10 seconds", "fps": "8 to 30 fps",
             "input_reference": "text-to-video"}.get(field, "not supported by the wan family")
    assert limit in str(refused.value)


def test_sizes_follow_each_checkpoints_multiple_and_i2v_needs_an_image(loaded):
    """(Sizes off the request's own multiple of 16 never reach a family: GenerationRequest refuses them.)"""
    with pytest.raises(PlanError, match="multiples of 32") as refused:
        FAMILY.plan(request(size="48x48"), loaded["ti2v"][0])                  # TI2V-5B: VAE x16, patch 2
    assert refused.value.field == "size"
    with pytest.raises(PlanError, match="required") as refused:
        FAMILY.plan(request(), loaded["i2v"][0])
    assert refused.value.field == "input_reference"


@pytest.mark.parametrize("guidance", [1.0, 5.0], ids=["guidance-off", "cfg"])
def test_text_to_video_equals_wan_pipeline(tiny, loaded, guidance):
    config, components = loaded["t2v"]
    plan = FAMILY.plan(request(guidance_video=guidance), config)
    ours, _ = render(components, plan)
    check_parity(reference_pipe(tiny["t2v"]), components, plan, ours, frames=guidance > 1)


def experts_called(pipe) -> list[int]:
    """Forward pre-hooks on the pipeline's two experts: which one each transformer call went to."""
    calls = []
    for index, module in enumerate((pipe.transformer, pipe.transformer_2)):
        module.register_forward_pre_hook(lambda *_, index=index: calls.append(index))
    return calls


def test_a14b_switches_experts_at_diffusers_step(tiny, loaded):
    config, components = loaded["a14b"]
    plan = FAMILY.plan(request(guidance_video=1.0), config)
    ours, state = render(components, plan)
    pipe = reference_pipe(tiny["a14b"])
    calls = experts_called(pipe)
    (latents,) = pipe(**pipeline_arguments(plan), generator=torch.Generator().manual_seed(SEED), output_type="latent")
    assert [int(t) for t in state.timesteps] == [999, 750]                   # 750 < 0.875 * 1000
    assert state.experts == calls == [0, 1]                                   # one call per step: guidance off
    assert (ours.video - latents[0]).abs().max() <= 1e-4


def test_a14b_with_cfg_equals_wan_pipeline(tiny, loaded):
    config, components = loaded["a14b"]
    plan = FAMILY.plan(request(), config)
    ours, state = render(components, plan)
    assert state.experts == [0, 1]
    check_parity(reference_pipe(tiny["a14b"]), components, plan, ours, frames=False)   # same VAE as t2v's


def random_image():
    import PIL.Image

    pixels = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels), "data:image/png;base64," + base64.b64encode(media.encode_png(pixels)).decode()


@pytest.mark.parametrize("variant", ["i2v", "ti2v"])
def test_image_to_video_equals_wan_image_to_video_pipeline(tiny, loaded, variant):
    config, components = loaded[variant]
    image, reference = random_image()
    plan = FAMILY.plan(request(input_reference=reference), config)
    ours, state = render(components, plan)
    assert state.condition is not None and (state.image_tokens is not None) == (variant == "i2v")
    check_parity(reference_pipe(tiny[variant], image=True), components, plan, ours, image=image)


def test_the_mp4_is_h264_without_an_audio_stream(loaded):
    config, components = loaded["t2v"]
    plan = FAMILY.plan(request(), config)
    latents = FAMILY.warmup_values(config)["latents"]
    latents.video = torch.zeros(config.vae_latent_channels, plan.latent_frames, plan.latent_height, plan.latent_width)
    video = FAMILY.stage("decode_video")(components["vae"], plan, latents)
    audio = FAMILY.stage("decode_audio")(components["audio_decoder"], plan, latents)
    assert components["audio_decoder"] is None and audio.data == b""
    artifact = FAMILY.stage("mux")(plan, video, audio)
    (stream,) = media.probe(artifact.data)
    assert (stream["type"], stream["codec"], stream["frames"], stream["width"]) == ("video", "h264", FRAMES, SIZE)


@pytest.mark.parametrize("variant", ["t2v", "i2v"])
def test_warmup_values_run_every_stage(loaded, variant):
    config, components = loaded[variant]
    values = FAMILY.warmup_values(config)
    plan = values["plan"]
    assert plan.num_frames == 1 + config.vae_temporal_compression and plan.steps == 2
    text = FAMILY.stage("encode_text")(components["text_encoder"], plan)
    assert [t.shape for t in text.captions] == [t.shape for t in values["text"].captions]
    media_latents = FAMILY.stage("encode_media")(components["media_encoder"], plan)
    assert (media_latents.video is None) == (values["media"].video is None)
    denoiser = components["backbone"]
    state = denoiser.prepare(plan, values["text"], values["voice"], values["media"])
    denoiser.step([state])
    latents = denoiser.finish(state)
    assert torch.isfinite(latents.video).all() and latents.video.shape == values["latents"].video.shape
    assert FAMILY.stage("decode_video")(components["vae"], plan, values["latents"]).media_type == "video/mp4"


def test_components_honor_dtype(tiny, loaded):
    parts = FAMILY.load_components(tiny["a14b"], {"text_encoder", "backbone"}, dtype="bfloat16")
    assert set(parts) == {"text_encoder", "backbone"}                          # only what was asked for
    assert [t.dtype for t in parts["backbone"].transformers] == [torch.bfloat16] * 2
    assert parts["text_encoder"].pipeline.text_encoder.dtype == torch.bfloat16
    plan = FAMILY.plan(request(), loaded["a14b"][0])
    ours, _ = render({**parts, "voices": None, "media_encoder": None}, plan)
    assert torch.isfinite(ours.video).all()


def test_an_injected_forward_runs_the_steps_expert_and_changes_nothing(loaded):
    """The denoiser's one model call can be swapped (step batching, CFG-parallel): it receives the
    expert the step chose and its inputs, and calling it gives the same latents."""
    config, components = loaded["a14b"]
    plan = FAMILY.plan(request(guidance_video=1.0), config)
    expected, _ = render(components, plan)
    denoiser, modules = components["backbone"], []

    def forward(module, *args, **kwargs):
        modules.append(denoiser.transformers.index(module))
        return module(*args, **kwargs)

    text = FAMILY.stage("encode_text")(components["text_encoder"], plan)
    state = denoiser.prepare(plan, text, None, FAMILY.stage("encode_media")(components["media_encoder"], plan))
    while state.done < state.steps:
        denoiser.step([state], forward)
    assert modules == state.experts == [0, 1]
    assert torch.equal(denoiser.finish(state).video, expected.video)


def test_limits_are_the_checkpoints_own(loaded):
    """GET /v1/models publishes limits_for(config): TI2V-5B's VAE makes its sides multiples of 32."""
    assert FAMILY.limits_for(loaded["t2v"][0]).size_multiple == 16
    assert FAMILY.limits_for(loaded["ti2v"][0]).describe()["size_multiple"] == 32
