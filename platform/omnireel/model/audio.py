"""Audio codec path (DESIGN.md §3, "Codecs"): waveform -> log-mel -> latents -> log-mel -> waveform.

Dimension names used in the shape comments:
  B batch, S samples, F = n_fft // 2 + 1 linear frequency bins, M mel bands (n_mels),
  T mel frames (100 per second: one per hop_length samples), m latent frames (T / 4, 25 per second),
  C latent channels.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import AudioCodecConfig

LOG_FLOOR = 1e-5  # log-mel = log(max(mel, LOG_FLOOR)): -11.5 for silence


def hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    """Slaney mel scale: linear below 1 kHz (15 mels), logarithmic above."""
    return torch.where(hz < 1000, 3 * hz / 200, 15 + 27 * torch.log(hz / 1000) / math.log(6.4))


def mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    return torch.where(mel < 15, 200 * mel / 3, 1000 * 6.4 ** ((mel - 15) / 27))


def mel_filterbank(cfg: AudioCodecConfig) -> torch.Tensor:
    """Triangular filters evenly spaced on the Slaney mel scale, 0 Hz to Nyquist, peak 1: (M, F)."""
    nyquist = torch.tensor(cfg.sample_rate / 2, dtype=torch.float64)
    bins = torch.linspace(0, nyquist, cfg.n_fft // 2 + 1, dtype=torch.float64)       # (F,) Hz
    edges = mel_to_hz(torch.linspace(0, hz_to_mel(nyquist), cfg.n_mels + 2, dtype=torch.float64))
    low, centre, high = edges[:-2, None], edges[1:-1, None], edges[2:, None]          # (M, 1) each
    rising = (bins - low) / (centre - low)                                            # (M, F)
    falling = (high - bins) / (high - centre)                                         # (M, F)
    return torch.minimum(rising, falling).clamp(min=0).float()


class MelSpectrogram(nn.Module):
    """wave (B, S) -> log-mel (B, M, S // hop_length): exactly sample_rate / hop_length frames/s."""

    def __init__(self, cfg: AudioCodecConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("window", torch.hann_window(cfg.n_fft), persistent=False)     # (n_fft,)
        self.register_buffer("filterbank", mel_filterbank(cfg), persistent=False)          # (M, F)

    def clip(self, wave: torch.Tensor, audio_frames: int) -> torch.Tensor:
        """wave (S,) -> log-mel (M, audio_frames * time_factor) of a clip that many audio latents long:
        the wave cut to its length or padded with silence, the mel padded with the log floor."""
        mel_frames = audio_frames * self.cfg.time_factor
        samples = mel_frames * self.cfg.hop_length
        wave = torch.nn.functional.pad(wave[:samples], (0, max(0, samples - wave.shape[0])))
        mel = self(wave[None])[0]                                                       # (M, <= mel_frames)
        return torch.nn.functional.pad(mel, (0, mel_frames - mel.shape[-1]), value=math.log(LOG_FLOOR))

    def stft(self, wave: torch.Tensor) -> torch.Tensor:
        """(B, S) -> complex (B, F, 1 + S // hop), frame k centred on sample k * hop."""
        return torch.stft(wave, self.cfg.n_fft, self.cfg.hop_length, window=self.window,
                          center=True, pad_mode="constant", return_complex=True)

    def istft(self, spec: torch.Tensor, length: int) -> torch.Tensor:
        """complex (B, F, 1 + length // hop) -> (B, length): the inverse of `stft`."""
        return torch.istft(spec, self.cfg.n_fft, self.cfg.hop_length, window=self.window,
                           center=True, length=length)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        n_frames = wave.shape[-1] // self.cfg.hop_length
        magnitude = self.stft(wave).abs()[..., :n_frames]                  # (B, F, T): drop the end frame
        return torch.log((self.filterbank @ magnitude).clamp(min=LOG_FLOOR))  # (B, M, T)


class ResBlock1d(nn.Module):
    """(B, H, T) -> (B, H, T)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(1, channels), nn.SiLU(), nn.Conv1d(channels, channels, 3, padding=1),
            nn.GroupNorm(1, channels), nn.SiLU(), nn.Conv1d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class AudioCodec(nn.Module):
    """log-mel (B, M, 4m) <-> latents (B, C, m): 100 mel frames/s <-> 25 latent frames/s."""

    def __init__(self, cfg: AudioCodecConfig):
        super().__init__()
        self.cfg = cfg
        hidden, factor = cfg.hidden, cfg.time_factor
        self.encoder = nn.Sequential(
            nn.Conv1d(cfg.n_mels, hidden, 3, padding=1), ResBlock1d(hidden),      # (B, H, 4m)
            nn.Conv1d(hidden, hidden, factor, stride=factor), ResBlock1d(hidden),  # (B, H, m)
            nn.GroupNorm(1, hidden), nn.SiLU(), nn.Conv1d(hidden, cfg.latent_channels, 1))
        self.decoder = nn.Sequential(
            nn.Conv1d(cfg.latent_channels, hidden, 3, padding=1), ResBlock1d(hidden),       # (B, H, m)
            nn.ConvTranspose1d(hidden, hidden, factor, stride=factor), ResBlock1d(hidden),  # (B, H, 4m)
            nn.GroupNorm(1, hidden), nn.SiLU(), nn.Conv1d(hidden, cfg.n_mels, 3, padding=1))

    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, M, 4m) -> (B, C, m)."""
        if mel.dim() != 3 or mel.shape[1] != self.cfg.n_mels:
            raise ValueError(f"expected mel (B, {self.cfg.n_mels}, T), got {tuple(mel.shape)}")
        if mel.shape[-1] % self.cfg.time_factor:
            raise ValueError(f"mel length must be a multiple of {self.cfg.time_factor}, "
                             f"got {mel.shape[-1]}")
        return self.encoder(mel)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, m) -> (B, M, 4m)."""
        if latents.dim() != 3 or latents.shape[1] != self.cfg.latent_channels:
            raise ValueError(f"expected latents (B, {self.cfg.latent_channels}, m), "
                             f"got {tuple(latents.shape)}")
        return self.decoder(latents)


class Vocoder(nn.Module):
    """log-mel (B, M, T) -> wave (B, T * hop_length) by fast Griffin-Lim; no learned weights."""

    momentum = 0.99  # fast Griffin-Lim (Perraudin et al. 2013), as in torchaudio

    def __init__(self, cfg: AudioCodecConfig):
        super().__init__()
        self.cfg = cfg
        self.mel = MelSpectrogram(cfg)
        inverse = torch.linalg.pinv(mel_filterbank(cfg).double()).float()              # (F, M)
        self.register_buffer("inverse", inverse, persistent=False)

    def forward(self, log_mel: torch.Tensor) -> torch.Tensor:
        n_frames = log_mel.shape[-1]
        length = n_frames * self.cfg.hop_length
        magnitude = (self.inverse @ log_mel.float().exp()).clamp(min=0)                 # (B, F, T), float32 (STFTs)
        # stft of `length` samples has T + 1 frames; the extra one, centred on the end, repeats T - 1.
        magnitude = torch.cat([magnitude, magnitude[..., -1:]], dim=-1)                 # (B, F, T + 1)
        phase = torch.ones_like(magnitude, dtype=torch.complex64)  # fixed start (zero phase): deterministic
        previous = torch.zeros_like(phase)
        for _ in range(self.cfg.griffin_lim_iters):
            rebuilt = self.mel.stft(self.mel.istft(magnitude * phase, length))          # (B, F, T + 1)
            step = rebuilt - self.momentum / (1 + self.momentum) * previous
            phase = step / step.abs().clamp(min=1e-8)
            previous = rebuilt
        return self.mel.istft(magnitude * phase, length)                                # (B, S)
