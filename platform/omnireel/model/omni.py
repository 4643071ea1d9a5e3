"""OmniModel: the trainable parts of one checkpoint (backbone + video VAE + audio codec).

The text encoder is frozen and loaded from its own folder; the vocoder has no weights.
"""
from __future__ import annotations

from torch import nn

from .audio import AudioCodec
from .backbone import OmniBackbone
from .config import ModelConfig
from .vae import VideoVAE


PARTS = ("backbone", "vae", "audio_codec")   # the OmniModel's children: its state_dict's key prefixes


def build_part(name: str, config: ModelConfig) -> nn.Module:
    """One part of the OmniModel, freshly initialized (a replica that needs only it builds only it)."""
    if name == "backbone":
        return OmniBackbone(config.backbone)
    if name == "vae":
        return VideoVAE(config.vae)
    if name == "audio_codec":
        return AudioCodec(config.audio)
    raise ValueError(f"unknown model part {name!r}; parts: {list(PARTS)}")


class OmniModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        for name in PARTS:
            setattr(self, name, build_part(name, config))


def build_model(config: ModelConfig) -> OmniModel:
    return OmniModel(config)
