"""Spacetime rotary position embedding over (time in seconds, y, x) splits of the head dim.

Video tokens use their frame time and latent-patch grid; audio tokens sit on the same time axis
with y = x = 0, so a video and an audio token of the same instant rotate identically in time.
"""
from __future__ import annotations

import torch
from torch import nn


class SpacetimeRoPE(nn.Module):
    def __init__(self, split: tuple[int, int, int], theta: float, time_scale: float):
        super().__init__()
        self.split = split            # head-dim channels for (t, y, x); each even
        self.theta = theta
        self.time_scale = time_scale  # seconds -> RoPE units (25: one audio latent frame per unit)
        self.register_buffer("inv_freq", torch.empty(sum(split) // 2), persistent=False)
        self.init_buffers()

    def init_buffers(self) -> None:
        """(Re)compute the non-persistent frequencies; called after `to_empty` on meta-built models."""
        parts = [1.0 / self.theta ** (torch.arange(0, n, 2, dtype=torch.float64) / n) for n in self.split]
        self.inv_freq = torch.cat(parts).to(torch.float32).to(self.inv_freq.device)

    def angles(self, positions: torch.Tensor) -> torch.Tensor:
        """positions (L, 3) = (t seconds, y, x) -> rotation angles (L, head_dim / 2)."""
        pos = positions.to(torch.float64) * positions.new_tensor([self.time_scale, 1.0, 1.0], dtype=torch.float64)
        t_n, y_n, x_n = (n // 2 for n in self.split)
        inv = self.inv_freq.to(torch.float64)
        axis = torch.cat([pos[:, 0:1].expand(-1, t_n), pos[:, 1:2].expand(-1, y_n), pos[:, 2:3].expand(-1, x_n)], 1)
        return (axis * inv).to(torch.float32)  # (L, head_dim/2)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (L, 3) -> (cos, sin), each (L, head_dim / 2)."""
        a = self.angles(positions.to(self.inv_freq.device))
        return a.cos(), a.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, L, H, head_dim) rotated pairwise (even, odd channels) by cos/sin (L, head_dim/2)."""
    x_even, x_odd = x.float()[..., 0::2], x.float()[..., 1::2]   # (B, L, H, head_dim/2)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack([x_even * c - x_odd * s, x_even * s + x_odd * c], dim=-1)  # (B, L, H, hd/2, 2)
    return out.flatten(-2).type_as(x)
