"""OmniModel: the trainable parts of one checkpoint (backbone + video VAE + audio codec).

The text encoder is frozen and loaded from its own folder; the vocoder has no weights.
"""
from __future__ import annotations

from torch import nn

from .audio import AudioCodec
from .backbone import OmniBackbone
from .config import ModelConfig
from .vae import VideoVAE


class OmniModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.backbone = OmniBackbone(config.backbone)
        self.vae = VideoVAE(config.vae)
        self.audio_codec = AudioCodec(config.audio)


def build_model(config: ModelConfig) -> OmniModel:
    return OmniModel(config)
