"""The model can learn: flow matching overfits one (caption, clip, sound) on the tiny preset."""
import math

import torch

from omnireel.model.audio import MelSpectrogram
from omnireel.model.backbone import ConditionTokens
from omnireel.model.layout import build_layout
from omnireel.model.sampler import Guidance, sample
from omnireel.model.training import TrainingExample, flow_matching_loss, train
from omnireel.plan import language_index
from omnireel.checkpoint import load_checkpoint
from omnireel.families.omni import initial_noise

CAPTION = "a white ball bounces across a dark floor with a clicking sound"


@torch.no_grad()
def mean_loss(backbone, ex: TrainingExample, samples: int = 64, seed: int = 1234) -> float:
    """The loss averaged over a fixed set of (sigma, noise) draws: comparable before and after training."""
    generator = torch.Generator().manual_seed(seed)
    return sum(flow_matching_loss(backbone, ex, generator).item() for _ in range(samples)) / samples


def synthetic_clip(frames: int, size: int) -> torch.Tensor:
    """A bright square moving left to right: (1, 3, T, H, W) in [-1, 1]."""
    clip = -torch.ones(1, 3, frames, size, size)
    for t in range(frames):
        x = 2 + t * (size - 10) // max(frames - 1, 1)
        clip[:, :, t, size // 2 - 4: size // 2 + 4, x: x + 8] = 1.0
    return clip


def synthetic_sound(samples: int, sample_rate: int) -> torch.Tensor:
    """A 440 Hz tone with clicks every 0.25 s: (1, samples)."""
    t = torch.arange(samples) / sample_rate
    wave = 0.3 * torch.sin(2 * math.pi * 440 * t)
    wave[(t * 4).frac() < 0.01] += 0.5
    return wave[None]


def test_flow_matching_overfits_one_example(tiny_engine):
    engine = tiny_engine
    from omnireel.config import GenerationRequest
    plan = engine.plan(GenerationRequest(prompt=CAPTION, seconds=1.0, size="32x32", fps=9, steps=24))
    model = load_checkpoint(engine.checkpoint)          # the OmniModel the session engine loaded
    with torch.no_grad():
        video = model.vae.encode(synthetic_clip(1 + 4 * (plan.latent_frames - 1), 32))
        mel = MelSpectrogram(engine.config.audio)(synthetic_sound(plan.audio_frames * 960, 24000))
        audio = model.audio_codec.encode(mel)
    captions = engine.components["text_encoder"].encode(list(plan.captions))
    backbone = type(model.backbone)(model.backbone.cfg)
    backbone.load_state_dict(model.backbone.state_dict())     # train a copy; the session engine stays as is
    cfg = backbone.cfg
    prep = backbone.prepare(build_layout(plan.layout_spec(tuple(c.shape[0] for c in captions)), cfg), "cpu")
    cond = ConditionTokens(torch.cat(captions)[None], torch.tensor([language_index(plan.language)]),
                           torch.zeros(1, 0, cfg.speaker_dim), torch.zeros(1, 0, cfg.video_channels, 4, 4))
    example = TrainingExample(video=video, audio=audio, cond=cond, prep=prep)

    before = mean_loss(backbone, example)
    train(backbone, example, steps=800, lr=3e-3)
    after = mean_loss(backbone, example)
    with torch.no_grad():
        noise_v, noise_a = initial_noise(plan, cfg.video_channels, cfg.audio_channels)
        out_v, out_a = sample(backbone, noise_v, noise_a, cond, prep, steps=24, shift=1.0, guidance=Guidance())
    video_err = ((out_v - video).norm() / video.norm()).item()
    audio_err = ((out_a - audio).norm() / audio.norm()).item()
    print(f"\nflow-matching loss {before:.4f} -> {after:.4f} ({before / after:.1f}x); "
          f"sampled latents' relative error: video {video_err:.3f}, audio {audio_err:.3f}")
    assert before / after >= 10
    assert video_err < 0.25 and audio_err < 0.25
