"""Model configuration: plain frozen dataclasses, so `omnireel.model` imports with torch alone.

A `ModelConfig` fully describes one checkpoint's architecture. It round-trips through
`to_dict` / `from_dict` (the checkpoint's config.json). Presets live at the bottom.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

# Token streams of the joint sequence (DESIGN.md §3). The integer is the modality id. "motion"
# (trajectory tokens of a simulated scene) is optional: it has tokens only when a request has physics.
MODALITIES = ("text", "lang", "voice", "ref", "video", "audio", "motion")
MODALITY_ID = {name: i for i, name in enumerate(MODALITIES)}
# Weight groups of the per-modality first/last blocks: which group each modality uses.
MODALITY_GROUPS = ("text", "video", "audio")
GROUP_OF_MODALITY = {"text": 0, "lang": 0, "voice": 0, "ref": 1, "motion": 1, "video": 1, "audio": 2}
LANGUAGES = ("en", "zh", "ja", "ko", "es")
MAX_SHOTS = 6


@dataclass(frozen=True)
class BackboneConfig:
    dim: int = 256                 # d: token width
    heads: int = 4                 # attention heads; head_dim = dim // heads
    layers: int = 6                # transformer blocks
    mlp_hidden: int = 1024         # MLP hidden width
    modality_blocks: int = 1       # first and last k blocks hold per-modality weights
    text_dim: int = 384            # text encoder width (adapter input)
    speaker_dim: int = 256         # speaker embedding width (voice tokens; the GE2E encoder's)
    track_dim: int = 8             # features per trajectory token (physics.TRACK_FEATURES)
    video_channels: int = 8        # video latent channels C
    audio_channels: int = 8        # audio latent channels
    patch: tuple[int, int, int] = (1, 2, 2)  # video patch (t, y, x) in latent units
    rope_theta: float = 10000.0
    rope_time_scale: float = 25.0  # RoPE time unit = 1 / 25 s (one audio latent frame)
    shot_gap_seconds: float = 0.5  # time gap inserted at each cut
    freq_dim: int = 256            # sinusoidal timestep embedding width
    eps: float = 1e-6
    # adaLN caption conditioning: the mean of the caption tokens, through a zero-initialised
    # projection, added to the timestep embedding that drives every block's modulation (DiT's
    # adaLN conditioning, SD3's pooled text), beside the tokens' joint attention
    caption_modulation: bool = False

    def __post_init__(self):
        if self.dim % self.heads:
            raise ValueError(f"backbone.dim ({self.dim}) must be divisible by heads ({self.heads})")
        if self.head_dim % 8:
            raise ValueError(f"head_dim ({self.head_dim}) must be a multiple of 8 for (t, y, x) RoPE")
        if 2 * self.modality_blocks > self.layers:
            raise ValueError(
                f"modality_blocks ({self.modality_blocks}) first + last must fit in layers ({self.layers})")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Head-dim channels given to (t, y, x): half to time, a quarter each to y and x."""
        t = self.head_dim // 2
        y = (self.head_dim - t) // 2
        return t, y, self.head_dim - t - y


@dataclass(frozen=True)
class VideoVAEConfig:
    latent_channels: int = 8
    channels: tuple[int, ...] = (32, 64, 128)  # widths at full, 1/2, 1/4 resolution (1/8 = latent)
    time_factor: int = 4                      # frames = 1 + 4n  <->  latents = 1 + n
    space_factor: int = 8
    tile_latents: int = 32                    # decode in spatial tiles of this many latents (0 = never)
    tile_overlap: int = 4                     # latent overlap between tiles


@dataclass(frozen=True)
class AudioCodecConfig:
    sample_rate: int = 24000
    n_fft: int = 1024
    hop_length: int = 240          # 100 mel frames per second
    n_mels: int = 80
    latent_channels: int = 8
    time_factor: int = 4           # 100 mel frames/s -> 25 latent frames/s
    hidden: int = 128
    griffin_lim_iters: int = 32

    @property
    def mel_rate(self) -> float:
        return self.sample_rate / self.hop_length

    @property
    def latent_rate(self) -> float:
        return self.mel_rate / self.time_factor


@dataclass(frozen=True)
class TextEncoderConfig:
    backend: str = "hf"                # "hf" (transformers) or "vllm"
    model: str = "all-MiniLM-L6-v2"    # a local folder, or the name of a pip-packaged model
    dim: int = 384
    max_tokens: int = 77


@dataclass(frozen=True)
class SamplerConfig:
    steps: int = 8
    shift: float = 3.0
    cfg_video: float = 5.0
    cfg_audio: float = 4.0


@dataclass(frozen=True)
class ModelConfig:
    family: typing.ClassVar[str] = "omni"     # the model family (families/) this config belongs to
    name: str = "small"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    vae: VideoVAEConfig = field(default_factory=VideoVAEConfig)
    audio: AudioCodecConfig = field(default_factory=AudioCodecConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)

    def __post_init__(self):
        if self.backbone.video_channels != self.vae.latent_channels:
            raise ValueError("backbone.video_channels must equal vae.latent_channels")
        if self.backbone.audio_channels != self.audio.latent_channels:
            raise ValueError("backbone.audio_channels must equal audio.latent_channels")
        if self.backbone.text_dim != self.text.dim:
            raise ValueError("backbone.text_dim must equal text.dim")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        def build(kind, values):
            names = {f.name for f in dataclasses.fields(kind)}
            unknown = set(values) - names
            if unknown:
                raise ValueError(f"unknown {kind.__name__} fields: {sorted(unknown)}")
            return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

        parts = {"backbone": BackboneConfig, "vae": VideoVAEConfig, "audio": AudioCodecConfig,
                 "text": TextEncoderConfig, "sampler": SamplerConfig}
        return cls(name=d.get("name", "custom"),
                   **{k: build(kind, d.get(k, {})) for k, kind in parts.items()})


def _tiny() -> ModelConfig:
    return ModelConfig(
        name="tiny",
        backbone=BackboneConfig(dim=64, heads=4, layers=3, mlp_hidden=128, modality_blocks=1,
                                video_channels=4, audio_channels=4, freq_dim=64),
        vae=VideoVAEConfig(latent_channels=4, channels=(8, 16, 16), tile_latents=16, tile_overlap=2),
        audio=AudioCodecConfig(n_mels=32, latent_channels=4, hidden=32, griffin_lim_iters=8),
        sampler=SamplerConfig(steps=4, shift=1.0),
    )


def _small() -> ModelConfig:
    return ModelConfig(name="small")


def _wan14b() -> ModelConfig:
    """A Wan-14B-class backbone (GPU benchmarks only; never instantiated in CI)."""
    return ModelConfig(
        name="wan14b",
        backbone=BackboneConfig(dim=5120, heads=40, layers=40, mlp_hidden=13824, modality_blocks=1,
                                video_channels=16, audio_channels=8, freq_dim=256),
        vae=VideoVAEConfig(latent_channels=16, channels=(128, 256, 512)),
        sampler=SamplerConfig(steps=40, shift=5.0),
    )


PRESETS = {"tiny": _tiny, "small": _small, "wan14b": _wan14b}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
