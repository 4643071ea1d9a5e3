"""Training recipes: the model a recipe trains, the clips it trains on, and how long each stage runs.

`demo` is the shipped recipe (the checkpoint in omnireel/checkpoints/demo): a 64 x 64, 12 fps,
2-second model sized to train on a 2-core CPU in about 70 minutes. `tiny` is for tests (seconds).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..model.config import (AudioCodecConfig, BackboneConfig, ModelConfig, SamplerConfig,
                            VideoVAEConfig)

# Seed ranges. Training draws its scenes from [0, recipe.clips); the evaluation every N steps uses
# EVAL_SEEDS onwards and benchmarks/fidelity.py BENCHMARK_SEEDS onwards: scenes training never saw.
EVAL_SEEDS = 10_000_000
BENCHMARK_SEEDS = 20_000_000


def demo_config() -> ModelConfig:
    """The shipped model: 64 x 64 frames (8 x 8 latents, 4 x 4 patches), a latent every 2 frames (a
    time factor of 4 blurred the bounces: through the VAE alone, 65 % of the contacts kept their
    sound within a frame against 77 % at 2), 16 kHz audio, 40 mel bands."""
    return ModelConfig(
        name="demo",
        backbone=BackboneConfig(dim=192, heads=6, layers=6, mlp_hidden=512, modality_blocks=1,
                                video_channels=8, audio_channels=4, freq_dim=128, caption_modulation=True),
        vae=VideoVAEConfig(latent_channels=8, channels=(16, 32, 64), time_factor=2, tile_latents=16, tile_overlap=2),
        audio=AudioCodecConfig(sample_rate=16000, n_fft=512, hop_length=160, n_mels=40, latent_channels=4,
                               hidden=64, griffin_lim_iters=32),
        sampler=SamplerConfig(steps=16, shift=2.0, cfg_video=3.0, cfg_audio=3.0),
    )


def tiny_config() -> ModelConfig:
    """A few thousand weights: the tests' recipe."""
    return ModelConfig(
        name="train-tiny",
        backbone=BackboneConfig(dim=32, heads=2, layers=2, mlp_hidden=64, modality_blocks=1,
                                video_channels=4, audio_channels=2, freq_dim=32, caption_modulation=True),
        vae=VideoVAEConfig(latent_channels=4, channels=(4, 8, 8), time_factor=2, tile_latents=16, tile_overlap=2),
        audio=AudioCodecConfig(sample_rate=16000, n_fft=512, hop_length=160, n_mels=16, latent_channels=2,
                               hidden=16, griffin_lim_iters=4),
        sampler=SamplerConfig(steps=4, shift=1.0, cfg_video=2.0, cfg_audio=2.0),
    )


@dataclass(frozen=True)
class StageSchedule:
    steps: int
    batch: int
    lr: float
    warmup: int = 0


@dataclass(frozen=True)
class Recipe:
    name: str
    model: ModelConfig
    width: int = 64
    height: int = 64
    fps: int = 12
    seconds: float = 2.0
    clips: int = 1600                     # training scenes: seeds [0, clips)
    vae: StageSchedule = StageSchedule(steps=2000, batch=4, lr=2e-3, warmup=50)
    vae_window: int = 5                   # frames per VAE training clip (1 + time_factor * n)
    codec: StageSchedule = StageSchedule(steps=400, batch=8, lr=2e-3, warmup=20)
    backbone: StageSchedule = StageSchedule(steps=8000, batch=4, lr=6e-4, warmup=150)
    draws: int = 2                        # (sigma, noise) draws per example per step: a batch of one layout
    caption_dropout: float = 0.1          # share of examples trained with the null caption (for CFG)
    physics_share: float = 0.5            # share of examples trained with physics conditioning
    object_weight: float = 3.0            # extra video-loss weight of the latent cells a body covers
    ema: float = 0.998                    # EMA decay of the exported backbone weights
    eval_every: int = 500                 # backbone steps between evaluations (and exported checkpoints)
    eval_clips: int = 8
    save_every: int = 100                 # steps between training-state saves (every stage)
    seed: int = 0
    languages: tuple[str, ...] = field(default=())   # () = the dataset's mix

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"


def demo_recipe() -> Recipe:
    return Recipe(name="demo", model=demo_config())


def tiny_recipe() -> Recipe:
    return Recipe(name="tiny", model=tiny_config(), width=32, height=32, fps=6, seconds=1.0, clips=6,
                  vae=StageSchedule(steps=3, batch=2, lr=2e-3), vae_window=5,
                  codec=StageSchedule(steps=3, batch=2, lr=2e-3),
                  backbone=StageSchedule(steps=30, batch=2, lr=3e-3, warmup=2),
                  eval_every=10, eval_clips=2, save_every=5)


RECIPES = {"demo": demo_recipe, "tiny": tiny_recipe}


def recipe(name: str, **overrides) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    return replace(RECIPES[name](), **overrides)
