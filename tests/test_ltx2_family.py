"""The LTX-2 family against diffusers' own pipelines, on a tiny random checkpoint (benchmarks/tiny_ltx2.py).

Parity (DESIGN.md §3b): the family's stages and its denoiser's prepare / step / finish loop give
LTX2Pipeline's latents within 1e-4 for the same prompt, seed, steps, size, frames, fps and guidance,
its frames at >= 40 dB PSNR and its waveform at >= 40 dB SNR; with every guidance term off, and
with CFG + STG + modality isolation + rescale on; image-to-video against LTX2ImageToVideoPipeline.
"""
from __future__ import annotations

import base64
import io
import json

import av
import numpy as np
import pytest
import torch

from ltx2_support import denormalized, pipeline_arguments
from tiny_ltx2 import build_tiny_ltx2

from omnireel import media
from omnireel.config import GenerationRequest
from omnireel.families import family_name, family_of
from omnireel.families.ltx2 import FAMILY, LTX2Guidance, decode_frames, decode_waveform
from omnireel.plan import PlanError

torch.set_num_threads(2)

PROMPT = "a robot dancing in the rain"
SEED, STEPS, FPS, SIZE, FRAMES = 3, 2, 24, 64, 9       # 9 = 1 + 8: two latent frames
GUIDANCE_OFF = LTX2Guidance(guidance_scale=1.0, audio_guidance_scale=1.0, stg_scale=0.0, audio_stg_scale=0.0,
                            modality_scale=1.0, audio_modality_scale=1.0, guidance_rescale=0.0,
                            audio_guidance_rescale=0.0, stg_blocks=(1,), use_cross_timestep=False)


@pytest.fixture(scope="module")
def components(ltx2_checkpoint):
    return FAMILY.load_components(ltx2_checkpoint, set(FAMILY.component_names))


@pytest.fixture(scope="module")
def config(ltx2_checkpoint):
    return FAMILY.read_config(ltx2_checkpoint)


def request(**fields) -> GenerationRequest:
    return GenerationRequest(**{"prompt": PROMPT, "size": f"{SIZE}x{SIZE}", "seconds": FRAMES / FPS, "fps": FPS,
                                "seed": SEED, "steps": STEPS, **fields})


def render(components, plan, guidance: LTX2Guidance):
    """The family's stages in graph order, the denoise loop as the engine runs it."""
    stage = FAMILY.stage
    text = stage("encode_text")(components["text_encoder"], plan)
    voice = stage("encode_voice")(components["voices"], plan)
    media_latents = stage("encode_media")(components["media_encoder"], plan)
    denoiser = components["backbone"]
    denoiser.guidance = guidance
    state = denoiser.prepare(plan, text, voice, media_latents)
    while state.done < state.steps:
        denoiser.step([state])
    return denoiser.finish(state)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio of images in [0, 1], dB."""
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean().clamp_min(1e-20)))


def snr(reference: torch.Tensor, test: torch.Tensor) -> float:
    return float(10 * torch.log10((reference ** 2).sum() / ((reference - test) ** 2).sum().clamp_min(1e-20)))


def check_parity(pipe, components, plan, guidance, ours, **pipeline_inputs):
    """ours (GeneratedLatents) against the pipeline's latents, frames and waveform for the same seed."""
    arguments = {**pipeline_arguments(plan, guidance, FRAMES), **pipeline_inputs}
    video, audio = pipe(**arguments, generator=torch.Generator().manual_seed(SEED), output_type="latent")
    our_video, our_audio = denormalized(pipe, ours)
    assert our_video.shape == video.shape and our_audio.shape == audio.shape
    assert (our_video - video).abs().max() <= 1e-4
    assert (our_audio - audio).abs().max() <= 1e-4

    frames, wave = pipe(**arguments, generator=torch.Generator().manual_seed(SEED), output_type="pt")
    our_frames = (decode_frames(components["vae"], plan, ours) / 2 + 0.5).clamp(0, 1)  # (3, T, H, W)
    assert psnr(our_frames.permute(1, 0, 2, 3), frames[0][:plan.num_frames]) >= 40
    our_wave = decode_waveform(components["audio_decoder"], plan, ours)               # (2, S)
    made = min(our_wave.shape[1], wave.shape[-1])
    assert snr(wave[0][:, :made], our_wave[:, :made]) >= 40


@pytest.fixture(scope="module")
def pipe(ltx2_checkpoint):
    from diffusers import LTX2Pipeline

    pipe = LTX2Pipeline.from_pretrained(ltx2_checkpoint)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_folder_is_an_ltx2_pipeline(ltx2_checkpoint, config, pipe):
    assert json.loads((ltx2_checkpoint / "model_index.json").read_text())["_class_name"] == "LTX2Pipeline"
    assert family_name(ltx2_checkpoint) == "ltx2" and family_of(ltx2_checkpoint) is FAMILY
    assert config.family == "ltx2"
    assert (config.vae_spatial_compression, config.vae_temporal_compression) == (
        pipe.vae_spatial_compression_ratio, pipe.vae_temporal_compression_ratio) == (32, 8)
    assert config.audio_latents_per_second == 25 and config.vocoder_sample_rate == 24000
    assert config.default_steps == 30 and config.guidance.guidance_scale == 3.0


def test_digest_is_stable_and_follows_the_weights(ltx2_checkpoint, tmp_path):
    again = build_tiny_ltx2(tmp_path / "again")                 # seeded: the same checkpoint
    assert FAMILY.digest(ltx2_checkpoint) == FAMILY.digest(again) == FAMILY.digest(ltx2_checkpoint)
    weights = again / "vocoder" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert FAMILY.digest(again) != FAMILY.digest(ltx2_checkpoint)


def test_plan_rounds_frames_up_to_1_plus_8k(config):
    plan = FAMILY.plan(GenerationRequest(prompt=PROMPT, size="768x512", seconds=1.0, fps=24), config)
    assert plan.family == "ltx2" and plan.captions == (PROMPT,)
    assert plan.num_frames == 24 and plan.latent_frames == 4                # generated: 25 = 1 + 8 * 3
    assert (plan.latent_height, plan.latent_width) == (16, 24)
    assert plan.audio_frames == round(25 / 24 * 25) and plan.audio_samples == 24000
    assert (plan.steps, plan.guidance_video, plan.guidance_audio) == (30, 3.0, 7.0)
    (shot,) = plan.shots
    assert (shot.latent_start, shot.latent_end, shot.frame_start, shot.frame_end) == (0, 4, 0, 24)


PNG = "data:image/png;base64," + base64.b64encode(media.encode_png(np.zeros((32, 32, 3), np.uint8))).decode()
REFUSED = {
    "voices": dict(prompt="ANNA sings", voices=[{"character": "ANNA", "voice_id": "v1"}]),
    "physics": dict(physics={"bodies": [{"position": [16, 16], "radius": 4}]}),
    "shots": dict(shots=[{"prompt": "a cat", "seconds": FRAMES / FPS}]),
    "elements": dict(elements=[PNG]),
    "input_video": dict(input_video="data:video/mp4;base64,AAAA"),
    "input_audio": dict(input_audio="data:audio/wav;base64,AAAA"),
    "mode": dict(mode="audio"),
    "language": dict(language="zh"),
    "output": dict(output="image", seconds=1 / FPS),
    "size": dict(size="48x48"),
    "seconds": dict(seconds=12.0),
    "fps": dict(fps=4, seconds=2.0),
    "steps": dict(steps=1),
}


@pytest.mark.parametrize("field", sorted(REFUSED))
def test_unsupported_requests_are_refused_naming_the_field(config, field):
    with pytest.raises(PlanError) as refused:
        FAMILY.plan(request(**REFUSED[field]), config)
    assert refused.value.field == field
    limit = {"size": "multiples of 32", "seconds": "at most 10 seconds", "fps": "8 to 60 fps",
             "steps": "at least 2 steps"}.get(field, "honors")
    assert limit in str(refused.value)


@pytest.mark.parametrize("guided", [False, True], ids=["guidance-off", "cfg-stg-modality"])
def test_text_to_video_equals_ltx2_pipeline(pipe, components, config, guided):
    guidance = config.guidance if guided else GUIDANCE_OFF
    plan = FAMILY.plan(request() if guided else request(guidance_video=1.0, guidance_audio=1.0), config)
    assert (plan.guidance_video, plan.guidance_audio) == ((3.0, 7.0) if guided else (1.0, 1.0))
    ours = render(components, plan, guidance)
    check_parity(pipe, components, plan, guidance, ours)


def test_image_to_video_equals_ltx2_image_to_video_pipeline(ltx2_checkpoint, components, config):
    import PIL.Image
    from diffusers import LTX2ImageToVideoPipeline

    from omnireel.references import load_frames

    pixels = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    reference = "data:image/png;base64," + base64.b64encode(media.encode_png(pixels)).decode()
    plan = FAMILY.plan(request(input_reference=reference), config)
    ours = render(components, plan, config.guidance)
    assert ours.video.shape[1] == plan.latent_frames == 2

    pipe = LTX2ImageToVideoPipeline.from_pretrained(ltx2_checkpoint)
    pipe.set_progress_bar_config(disable=True)
    image = PIL.Image.fromarray(load_frames(reference, plan.width, plan.height, 1)[0])
    check_parity(pipe, components, plan, config.guidance, ours, image=image)


def test_decoders_make_h264_and_stereo_aac(components, config):
    plan = FAMILY.plan(request(), config)
    latents = FAMILY.warmup_values(config)["latents"]
    video = FAMILY.stage("decode_video")(components["vae"], plan, latents)
    audio = FAMILY.stage("decode_audio")(components["audio_decoder"], plan, latents)
    artifact = FAMILY.stage("mux")(plan, video, audio)
    video_stream, audio_stream = media.probe(artifact.data)
    assert (video_stream["codec"], video_stream["frames"], video_stream["width"]) == ("h264", FRAMES, SIZE)
    assert (audio_stream["codec"], audio_stream["sample_rate"]) == ("aac", 24000)
    with av.open(io.BytesIO(artifact.data)) as container:
        assert container.streams.audio[0].codec_context.channels == 2


def test_warmup_values_run_every_stage(components, config):
    values = FAMILY.warmup_values(config)
    plan = values["plan"]
    assert plan.num_frames == 1 + config.vae_temporal_compression and plan.steps == 2
    text = FAMILY.stage("encode_text")(components["text_encoder"], plan)
    assert [t.shape for t in text.captions] == [t.shape for t in values["text"].captions]
    media_latents = FAMILY.stage("encode_media")(components["media_encoder"], plan)
    assert media_latents.refs.shape == values["media"].refs.shape
    denoiser = components["backbone"]
    denoiser.guidance = config.guidance
    state = denoiser.prepare(plan, values["text"], values["voice"], values["media"])
    denoiser.step([state])
    latents = denoiser.finish(state)
    assert torch.isfinite(latents.video).all() and torch.isfinite(latents.audio).all()
    assert latents.video.shape == values["latents"].video.shape
    assert latents.audio.shape == values["latents"].audio.shape
    assert FAMILY.stage("decode_video")(components["vae"], plan, values["latents"]).media_type == "video/mp4"


def test_step_flops_on_meta_equal_the_flops_a_real_step_runs(ltx2_checkpoint, components, config):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from omnireel.families.ltx2 import meta_transformer, step_flops

    transformer_config = json.loads((ltx2_checkpoint / "transformer" / "config.json").read_text())
    counted = step_flops(meta_transformer(transformer_config), width=SIZE, height=SIZE, frames=FRAMES, fps=FPS,
                         guidance=config.guidance, text_tokens=config.max_sequence_length)
    assert set(counted) == {"cond_uncond", "stg", "modality", "step"}
    plan = FAMILY.plan(request(), config)
    text = FAMILY.stage("encode_text")(components["text_encoder"], plan)
    denoiser = components["backbone"]
    denoiser.guidance = config.guidance
    state = denoiser.prepare(plan, text, None, None)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as real:   # CPU flash SDPA is uncounted
        denoiser.step([state])
    assert counted["step"] == real.get_total_flops() > 0
    assert counted["cond_uncond"] > counted["modality"] > 0    # the CFG batch is two rows


def test_components_honor_dtype(ltx2_checkpoint, config):
    parts = FAMILY.load_components(ltx2_checkpoint, {"text_encoder", "backbone", "vae"}, dtype="bfloat16")
    assert set(parts) == {"text_encoder", "backbone", "vae"}       # only what was asked for
    assert parts["backbone"].dtype == parts["vae"].vae.dtype == torch.bfloat16
    assert parts["text_encoder"].pipeline.text_encoder.dtype == torch.bfloat16
    plan = FAMILY.plan(request(), config)
    state = parts["backbone"].prepare(plan, FAMILY.stage("encode_text")(parts["text_encoder"], plan), None, None)
    while state.done < state.steps:
        parts["backbone"].step([state])
    assert torch.isfinite(parts["backbone"].finish(state).video).all()
