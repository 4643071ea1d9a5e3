"""The flow-matching objective and a minimal training loop (the seed of a training recipe)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .backbone import ConditionTokens, OmniBackbone, PreparedLayout


@dataclass
class TrainingExample:
    """One (caption, clip, sound) as clean latents plus its conditioning and layout."""
    video: torch.Tensor      # (1, C, T, h, w) clean video latents
    audio: torch.Tensor      # (1, Ca, Ta) clean audio latents
    cond: ConditionTokens
    prep: PreparedLayout


def flow_matching_loss(backbone: OmniBackbone, ex: TrainingExample, generator: torch.Generator,
                       caption_dropout: float = 0.0) -> torch.Tensor:
    """MSE between predicted and true velocity (noise - x0) at random, independent video/audio sigmas."""
    sig_video, sig_audio, drop = torch.rand(3, generator=generator)
    noise_v = torch.randn(ex.video.shape, generator=generator)
    noise_a = torch.randn(ex.audio.shape, generator=generator)
    x_video = (1 - sig_video) * ex.video + sig_video * noise_v
    x_audio = (1 - sig_audio) * ex.audio + sig_audio * noise_a
    sigmas = torch.stack([torch.zeros(()), sig_video, sig_audio])[None]                 # (1, 3)
    pred_v, pred_a = backbone(x_video, x_audio, sigmas, ex.cond, ex.prep,
                              drop_captions=(drop < caption_dropout).reshape(1))
    return 0.5 * (F.mse_loss(pred_v, noise_v - ex.video) + F.mse_loss(pred_a, noise_a - ex.audio))


def train(backbone: OmniBackbone, ex: TrainingExample, steps: int, lr: float = 3e-3, seed: int = 0,
          caption_dropout: float = 0.0) -> list[float]:
    """AdamW with a one-cycle schedule on the backbone for `steps` steps; returns the loss per step."""
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(backbone.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    losses = []
    backbone.train()
    for _ in range(steps):
        loss = flow_matching_loss(backbone, ex, generator, caption_dropout)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        losses.append(loss.item())
    backbone.eval()
    return losses
