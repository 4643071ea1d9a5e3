"""Causal video VAE: time x4, space x8 (DESIGN.md §3, "Codecs").

Dimension names used in the shape comments:
  B batch, C latent channels, c feature channels, T frames (= 1 + 4n), L latent frames (= 1 + n),
  H, W pixel rows and columns, h, w latent rows and columns (H / 8, W / 8),
  N = B * T (or B * L): frames folded into the batch for per-frame 2D convs.

Latent 0 encodes frame 0 alone; latent k >= 1 encodes frames 4k-3 .. 4k. All spatial work is per
frame (2D convs with time folded into the batch) and all temporal mixing is causal convs at 1/8
resolution, padded on the left only with copies of frame 0. So a prefix of 1 + 4k frames encodes to
the first 1 + k latents, and a prefix of 1 + k latents decodes to the first 1 + 4k frames.
Normalisation is per position (over channels), never over space or time, which keeps both
causality and tiled decoding intact. The decoder's spatial receptive field is under 3 latents, so
large frames decode as overlapping tiles, each with 3 latents of context, blended linearly: the
result equals an untiled decode up to float rounding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VideoVAEConfig


def to_pixels(frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames (T, H, W, 3) -> float32 pixels (3, T, H, W) in [-1, 1], what the VAE encodes."""
    return frames.permute(3, 0, 1, 2).float() / 127.5 - 1


class ChannelNorm(nn.Module):
    """RMS norm over channels at every position: (N, C, ...) -> same shape."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + self.eps)  # (N, 1, ...)
        return x * scale * self.weight.view(-1, *[1] * (x.dim() - 2))


class ResBlock(nn.Module):
    """Per-frame residual block: (N, C, H, W) -> (N, C, H, W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            ChannelNorm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            ChannelNorm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class CausalTimeBlock(nn.Module):
    """Residual temporal conv over the current and 2 previous frames: (B, C, T, h, w) -> same."""

    def __init__(self, channels: int, kernel: int = 3):
        super().__init__()
        self.norm = ChannelNorm(channels)
        self.conv = nn.Conv3d(channels, channels, (kernel, 1, 1))
        self.pad = kernel - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.silu(self.norm(x))                                                    # (B, C, T, h, w)
        y = torch.cat([y[:, :, :1].expand(-1, -1, self.pad, -1, -1), y], dim=2)  # (B, C, pad + T, h, w)
        return x + self.conv(y)


def down(c_in: int, c_out: int) -> nn.Module:
    """(N, c_in, H, W) -> (N, c_out, H/2, W/2): a 2x2 conv with stride 2 (disjoint 2x2 cells)."""
    return nn.Conv2d(c_in, c_out, 2, stride=2)


def up(c_in: int, c_out: int) -> nn.Module:
    """(N, c_in, H, W) -> (N, c_out, 2H, 2W): each input pixel becomes a 2x2 cell (no overlap)."""
    return nn.ConvTranspose2d(c_in, c_out, 2, stride=2)


# Per-frame 2D work runs a few frames at a time: activations stay small enough for the allocator to
# reuse instead of mapping fresh pages for every op, which halves the decode time on CPU.
CHUNK_PIXELS = 1 << 17  # full-resolution pixels per chunk (2 frames of 256 x 256)


def per_frame(module: nn.Module, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """Apply a 2D module to every frame, `chunk` frames at a time: (B, C, T, H, W) -> (B, C', T, H', W')."""
    b, c, t, height, width = x.shape
    frames = x.transpose(1, 2).reshape(b * t, c, height, width)  # (N, C, H, W)
    frames = frames.contiguous(memory_format=torch.channels_last)  # oneDNN's fast layout
    out = torch.cat([module(part) for part in frames.split(chunk)])  # (N, C', H', W')
    return out.reshape(b, t, *out.shape[1:]).transpose(1, 2)  # (B, C', T, H', W')


def frames_per_chunk(height: int, width: int) -> int:
    """Frames per per_frame chunk for frames of height x width pixels at full resolution."""
    return max(1, CHUNK_PIXELS // (height * width))


# Spatial receptive field of the decoder, in latents, rounded up: dec_in's 3x3 at 1/8 (1 latent),
# each ResBlock at 1/2**l (two 3x3 convs: 2**(l+1) pixels; 1 + 1/2 latent at 1/4 and 1/2) and the
# output 3x3 (1 pixel) add up to 2.625. A tile decoded with this much context around it is exact.
DECODER_HALO = 3


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of `tile` covering `size`, neighbours overlapping by >= `overlap`."""
    if size <= tile:
        return [0]
    return [*range(0, size - tile, tile - overlap), size - tile]


def blend_ramp(size: int, ramp: int, ramp_in: bool, ramp_out: bool) -> torch.Tensor:
    """Tile weights along one axis: (size,), rising linearly over the first `ramp` entries when
    `ramp_in` and falling over the last `ramp` when `ramp_out`; never zero."""
    position = torch.arange(size) + 0.5  # (size,) distance from the start, in entries
    weight = torch.ones(size)
    if ramp_in:
        weight = torch.minimum(weight, position / ramp)
    if ramp_out:
        weight = torch.minimum(weight, position.flip(0) / ramp)
    return weight


class VideoVAE(nn.Module):
    def __init__(self, cfg: VideoVAEConfig):
        super().__init__()
        if cfg.space_factor != 2 ** len(cfg.channels):
            raise ValueError(f"space_factor {cfg.space_factor} must be 2 ** len(channels) "
                             f"({len(cfg.channels)} widths: full, 1/2, 1/4, ... resolution)")
        if cfg.tile_latents and not 0 <= cfg.tile_overlap < cfg.tile_latents:
            raise ValueError(f"tile_overlap {cfg.tile_overlap} must be in [0, tile_latents)")
        self.cfg = cfg
        widths = cfg.channels            # width at full, 1/2, 1/4 resolution
        deep = widths[-1]                # width at latent resolution
        tf = cfg.time_factor
        z = cfg.latent_channels

        # Encoder. Per frame: full -> 1/2 -> 1/4 -> 1/8, each downsample followed by a ResBlock.
        encoder = [nn.Conv2d(3, widths[0], 3, padding=1)]
        for c_in, c_out in zip(widths, [*widths[1:], deep]):
            encoder += [down(c_in, c_out), ResBlock(c_out)]
        self.enc_space = nn.Sequential(*encoder)
        self.enc_time = CausalTimeBlock(deep)                             # at frame rate
        self.enc_group = nn.Conv3d(deep, deep, (tf, 1, 1), stride=(tf, 1, 1))  # 4 frames -> 1 latent
        self.enc_latent_time = CausalTimeBlock(deep)                      # at latent rate
        self.enc_out = nn.Sequential(ChannelNorm(deep), nn.SiLU(), nn.Conv3d(deep, z, 1))

        # Decoder. Time first (cheap at 1/8), then per frame 1/8 -> 1/4 -> 1/2 -> full.
        self.dec_in = nn.Conv2d(z, deep, 3, padding=1)                   # per latent frame
        self.dec_latent_time = CausalTimeBlock(deep)                      # at latent rate
        self.dec_ungroup = nn.Conv3d(deep, tf * deep, 1)                  # 1 latent -> 4 frames
        self.dec_time = CausalTimeBlock(deep)                             # at frame rate
        decoder = []
        for level in reversed(range(len(widths))):  # output resolution 1 / 2**level
            c_in = deep if level == len(widths) - 1 else widths[level + 1]
            decoder.append(up(c_in, widths[level]))
            if level > 0:  # full resolution stays a single thin layer
                decoder.append(ResBlock(widths[level]))
        self.dec_space = nn.Sequential(*decoder, nn.SiLU(), nn.Conv2d(widths[0], 3, 3, padding=1))

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (B, 3, T, H, W) in [-1, 1], T = 1 + 4n -> latents (B, C, 1 + n, H/8, W/8)."""
        tf, sf = self.cfg.time_factor, self.cfg.space_factor
        if frames.dim() != 5 or frames.shape[1] != 3:
            raise ValueError(f"expected frames (B, 3, T, H, W), got {tuple(frames.shape)}")
        _, _, n_frames, height, width = frames.shape
        if (n_frames - 1) % tf:
            raise ValueError(
                f"frame count must be 1 + {tf}n (1, {1 + tf}, {1 + 2 * tf}, ...), got {n_frames}")
        if height % sf or width % sf:
            raise ValueError(f"height and width must be multiples of {sf}, got {height}x{width}")
        x = per_frame(self.enc_space, frames, frames_per_chunk(height, width))  # (B, c, T, h, w)
        x = self.enc_time(x)
        x = torch.cat([x[:, :, :1].expand(-1, -1, tf - 1, -1, -1), x], dim=2)  # (B, c, 4L, h, w)
        x = self.enc_latent_time(self.enc_group(x))                       # (B, c, L, h, w)
        return self.enc_out(x)                                            # (B, C, L, h, w)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (B, C, 1 + n, h, w) -> frames (B, 3, 1 + 4n, 8h, 8w) in [-1, 1].

        Above cfg.tile_latents, decodes overlapping spatial tiles and blends them linearly.
        """
        if latents.dim() != 5 or latents.shape[1] != self.cfg.latent_channels:
            raise ValueError(f"expected latents (B, {self.cfg.latent_channels}, L, h, w), "
                             f"got {tuple(latents.shape)}")
        b, _, n_latents, h, w = latents.shape
        tile, overlap, sf = self.cfg.tile_latents, self.cfg.tile_overlap, self.cfg.space_factor
        if tile == 0 or (h <= tile and w <= tile):
            return self._decode(latents)
        n_frames = 1 + self.cfg.time_factor * (n_latents - 1)
        out = latents.new_zeros(b, 3, n_frames, h * sf, w * sf)  # (B, 3, T, H, W) weighted sum
        total = latents.new_zeros(h * sf, w * sf)                # (H, W) sum of weights
        for y in tile_starts(h, tile, overlap):
            for x in tile_starts(w, tile, overlap):
                th, tw = min(tile, h - y), min(tile, w - x)     # tile size in latents
                # Decode the tile with DECODER_HALO latents of context, then crop the context off.
                y0, x0 = max(y - DECODER_HALO, 0), max(x - DECODER_HALO, 0)
                window = latents[..., y0:y + th + DECODER_HALO, x0:x + tw + DECODER_HALO]
                frames = self._decode(window)[..., (y - y0) * sf:(y - y0 + th) * sf,
                                                   (x - x0) * sf:(x - x0 + tw) * sf]  # (B, 3, T, 8th, 8tw)
                weight = torch.outer(                            # (8th, 8tw)
                    blend_ramp(th * sf, overlap * sf, y > 0, y + th < h),
                    blend_ramp(tw * sf, overlap * sf, x > 0, x + tw < w)).to(latents)
                rows, cols = slice(y * sf, (y + th) * sf), slice(x * sf, (x + tw) * sf)
                out[..., rows, cols] += frames * weight
                total[rows, cols] += weight
        return out / total

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Untiled decode: (B, C, L, h, w) -> (B, 3, 1 + 4(L-1), 8h, 8w)."""
        tf, sf = self.cfg.time_factor, self.cfg.space_factor
        chunk = frames_per_chunk(latents.shape[-2] * sf, latents.shape[-1] * sf)
        x = self.dec_latent_time(per_frame(self.dec_in, latents, chunk))  # (B, c, L, h, w)
        x = self.dec_ungroup(x)                                           # (B, 4c, L, h, w)
        b, c4, n_latents, h, w = x.shape
        x = x.view(b, c4 // tf, tf, n_latents, h, w).transpose(2, 3)      # (B, c, L, 4, h, w)
        # Latent k's 4 frames are 4k-3 .. 4k; latent 0's first 3 fall before frame 0 and are dropped.
        x = x.reshape(b, c4 // tf, n_latents * tf, h, w)[:, :, tf - 1:]   # (B, c, T, h, w)
        x = self.dec_time(x)
        return torch.tanh(per_frame(self.dec_space, x, chunk))           # (B, 3, T, H, W)
