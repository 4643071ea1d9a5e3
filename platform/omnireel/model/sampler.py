"""Rectified-flow sampling: shifted sigmas, Euler steps, classifier-free guidance (DESIGN.md §3).

x_sigma = (1 - sigma) * x0 + sigma * noise; the model predicts velocity v = noise - x0.
Cond and uncond run as one batch; video and audio have separate guidance scales.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .backbone import BackboneRows, ConditionTokens, OmniBackbone, PreparedLayout


class Cancelled(Exception):
    """Raised inside a denoising loop when should_stop() turned true."""


def shift_sigma(s: torch.Tensor, shift: float) -> torch.Tensor:
    """The shifted schedule's sigma for uniform s in [0, 1]: shift * s / (1 + (shift - 1) * s)."""
    return shift * s / (1 + (shift - 1) * s)


def shifted_sigmas(steps: int, shift: float) -> torch.Tensor:
    """(steps + 1,) float64 from 1 down to 0, shifted (shift_sigma)."""
    return shift_sigma(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)


@dataclass(frozen=True)
class Guidance:
    video: float = 1.0
    audio: float = 1.0

    @property
    def needs_uncond(self) -> bool:
        return self.video != 1.0 or self.audio != 1.0


def guidance_rows(video, audio, sigma: float, cond: ConditionTokens, prep: PreparedLayout,
                  guidance: Guidance) -> BackboneRows:
    """The model rows of one guided evaluation: the cond row, and the uncond row (captions dropped)
    when guidance needs it. video (1, C, T, h, w), audio (1, Ca, Ta)."""
    sig = video.new_tensor([[0.0, sigma, sigma]])                                   # (1, 3)
    if not guidance.needs_uncond:
        return BackboneRows(video, audio, sig, cond, prep)
    drop = torch.tensor([False, True], device=video.device)
    return BackboneRows(video.repeat(2, 1, 1, 1, 1), audio.repeat(2, 1, 1), sig.repeat(2, 1), cond.repeat(2),
                        prep, drop)


def guide(v_video, v_audio, guidance: Guidance):
    """The rows' velocities (cond, [uncond]) -> the guided velocity (1 row each)."""
    if not guidance.needs_uncond:
        return v_video, v_audio
    return (v_video[1:] + guidance.video * (v_video[:1] - v_video[1:]),
            v_audio[1:] + guidance.audio * (v_audio[:1] - v_audio[1:]))


def guided_velocity(backbone, video, audio, sigma: float, cond: ConditionTokens,
                    prep: PreparedLayout, guidance: Guidance):
    """One model evaluation with CFG (`backbone`: an OmniBackbone or any call with its signature).
    video (1, C, T, h, w), audio (1, Ca, Ta) -> velocities."""
    rows = guidance_rows(video, audio, sigma, cond, prep, guidance)
    if rows.drop_captions is None:
        return backbone(rows.video, rows.audio, rows.sigmas, rows.cond, prep)
    return guide(*backbone(rows.video, rows.audio, rows.sigmas, rows.cond, prep, drop_captions=rows.drop_captions),
                 guidance)


def noisy_masks(video: torch.Tensor, spec) -> tuple[torch.Tensor, float]:
    """Which latents move: (1, 1, T, 1, 1) video mask (0 on the clean leading frames) and the audio's 0/1."""
    video_noisy = torch.ones_like(video[:, :1, :, :1, :1])
    video_noisy[:, :, :spec.video_clean_frames] = 0
    return video_noisy, 0.0 if spec.audio_clean else 1.0


def euler_step(forward, video, audio, sigma: float, sigma_next: float, cond: ConditionTokens,
               prep: PreparedLayout, guidance: Guidance, video_noisy, audio_noisy):
    """One guided Euler step from `sigma` to `sigma_next`; `forward` is the backbone call."""
    v_video, v_audio = guided_velocity(forward, video, audio, sigma, cond, prep, guidance)
    return euler_update(video, audio, v_video, v_audio, sigma, sigma_next, video_noisy, audio_noisy)


def euler_update(video, audio, v_video, v_audio, sigma: float, sigma_next: float, video_noisy, audio_noisy):
    """The Euler move from `sigma` to `sigma_next` along the guided velocities (clean parts stay)."""
    dt = sigma_next - sigma
    return video + dt * video_noisy * v_video, audio + dt * audio_noisy * v_audio


def sample(backbone: OmniBackbone, video: torch.Tensor, audio: torch.Tensor, cond: ConditionTokens,
           prep: PreparedLayout, *, steps: int, shift: float, guidance: Guidance,
           progress: Callable[[int, int], None] | None = None,
           should_stop: Callable[[], bool] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Euler-integrate from noise (sigma 1) to data (sigma 0).

    video (1, C, T, h, w) and audio (1, Ca, Ta) hold noise where the layout says noisy and the clean
    latents where it says clean (leading video frames, or the whole audio); clean parts never move.
    """
    video_noisy, audio_noisy = noisy_masks(video, prep.layout.spec)
    sigmas = shifted_sigmas(steps, shift)
    for i in range(steps):
        if should_stop is not None and should_stop():
            raise Cancelled(f"stopped at step {i} of {steps}")
        video, audio = euler_step(backbone, video, audio, float(sigmas[i]), float(sigmas[i + 1]), cond, prep,
                                  guidance, video_noisy, audio_noisy)
        if progress is not None:
            progress(i + 1, steps)
    return video, audio
