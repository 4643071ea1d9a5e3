"""Request -> ScenePlan: frame arithmetic, shots on latent boundaries that cover the clip exactly."""
import pytest

from omnireel.config import GenerationRequest
from omnireel.model.config import preset
from omnireel.plan import PlanError, first_frame, plan_request

CONFIG = preset("tiny")


@pytest.mark.parametrize("seconds,fps", [(2, 24), (1.5, 30), (1, 8), (0.5, 60), (3, 12), (0.2, 10)])
def test_frames_latents_and_audio(seconds, fps):
    plan = plan_request(GenerationRequest(prompt="p", seconds=seconds, fps=fps, size="64x32"), CONFIG)
    frames = round(seconds * fps)
    assert plan.num_frames == frames
    assert plan.latent_frames == 1 + -(-(frames - 1) // 4)                 # rounded up to 1 + 4n frames
    assert 1 + 4 * (plan.latent_frames - 1) >= frames > 1 + 4 * (plan.latent_frames - 2)
    assert (plan.latent_width, plan.latent_height) == (8, 4)
    assert plan.audio_samples == round(frames / fps * 24000)
    assert plan.audio_frames * 960 >= plan.audio_samples > (plan.audio_frames - 1) * 960


@pytest.mark.parametrize("shot_seconds", [[1, 1], [0.5, 0.5, 1], [0.5] * 6, [0.2, 1.6, 0.2]])
def test_shots_cover_the_clip_exactly_on_latent_boundaries(shot_seconds):
    seconds = sum(shot_seconds)
    request = GenerationRequest(prompt="scene", seconds=seconds, fps=24,
                                shots=[{"prompt": f"shot {i}", "seconds": s} for i, s in enumerate(shot_seconds)])
    plan = plan_request(request, CONFIG)
    assert len(plan.shots) == len(shot_seconds)
    assert plan.shots[0].frame_start == 0 and plan.shots[-1].frame_end == plan.num_frames
    assert plan.shots[0].latent_start == 0 and plan.shots[-1].latent_end == plan.latent_frames
    for a, b in zip(plan.shots, plan.shots[1:]):
        assert a.frame_end == b.frame_start == first_frame(b.latent_start, plan.frames_per_latent)
        assert a.latent_end == b.latent_start
    assert all(s.frame_end > s.frame_start for s in plan.shots)
    # cuts land near the requested times (within one latent frame = 4 video frames)
    elapsed = 0.0
    for shot, s in zip(plan.shots, shot_seconds):
        assert abs(shot.frame_start - round(elapsed * 24)) <= 4
        elapsed += s
    assert plan.captions == ("scene", *(f"shot {i}" for i in range(len(shot_seconds))))


def test_one_shot_has_one_caption_and_image_is_one_frame():
    plan = plan_request(GenerationRequest(prompt="a cat", shots=[{"prompt": "close up", "seconds": 2}]), CONFIG)
    assert plan.captions == ("a cat close up",) and len(plan.shots) == 1
    image = plan_request(GenerationRequest(prompt="a cat", output="image"), CONFIG)
    assert (image.num_frames, image.latent_frames, image.audio_samples) == (1, 1, 0)


def test_too_many_shots_for_a_short_clip_names_the_field():
    request = GenerationRequest(prompt="p", seconds=0.3, fps=10,
                                shots=[{"prompt": "a", "seconds": 0.1}, {"prompt": "b", "seconds": 0.1},
                                       {"prompt": "c", "seconds": 0.1}])
    with pytest.raises(PlanError, match="shots: 3 shots need at least 3 latent frames"):
        plan_request(request, CONFIG)


def test_a_vae_with_time_factor_2_plans_and_lays_out_two_frames_per_latent():
    """The VAE's time factor reaches the frame rule, the cuts and the video tokens' RoPE times."""
    import dataclasses

    import torch

    from omnireel.model.layout import build_layout

    config = dataclasses.replace(CONFIG, vae=dataclasses.replace(CONFIG.vae, time_factor=2))
    request = GenerationRequest(prompt="scene", seconds=2, fps=12, size="64x32",
                                shots=[{"prompt": "a", "seconds": 0.75}, {"prompt": "b", "seconds": 1.25}])
    plan = plan_request(request, config)
    assert plan.frames_per_latent == 2
    assert plan.num_frames == 24 and plan.latent_frames == 13 and plan.frame_count == 25   # 1 + 2 * 12
    a, b = plan.shots
    assert b.latent_start == 5 and a.frame_end == b.frame_start == first_frame(5, 2) == 9   # 0.75 s * 12 = frame 9
    layout = build_layout(plan.layout_spec((4, 2, 2)), config.backbone)
    video = layout.position[layout.spans["video"], 0].view(plan.latent_frames, -1)[:, 0]   # (T,) seconds
    gap = config.backbone.shot_gap_seconds
    expected = [first_frame(k, 2) / 12 + (gap if k >= 5 else 0.0) for k in range(13)]
    assert torch.allclose(video, torch.tensor(expected))
