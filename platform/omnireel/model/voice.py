"""Speaker encoder: a recording -> one unit-length speaker embedding (DESIGN.md §3, voice tokens).

The network and weights are Resemblyzer's GE2E encoder (Wan et al. 2018, "Generalized End-to-End
Loss for Speaker Verification"): a 3-layer LSTM over 40-band mel frames, a linear layer and a ReLU,
L2-normalized. The weights are the `pretrained.pt` the `resemblyzer` package ships; only that file
is read (the package itself is never imported, so librosa, webrtcvad and scipy are not needed). The
front end is re-implemented here in torch to match the one the weights were trained with:

  16 kHz mono -> volume up to -30 dBFS -> long silences trimmed (energy VAD in 30 ms windows,
  smoothed and dilated as Resemblyzer does with webrtcvad) -> power mel spectrogram (25 ms Hann
  window, 10 ms hop, 40 Slaney-normalized bands, no log) -> 1.6 s partials at 1.3 per second ->
  mean of the partial embeddings, L2-normalized.

Dimension names: S samples (16 kHz), F = 201 STFT bins, M = 40 mel bands, T mel frames (100/s),
P partial utterances, D = 256 embedding width.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch
from torch import nn

from .audio import hz_to_mel, mel_filterbank, mel_to_hz
from .config import AudioCodecConfig

SAMPLE_RATE = 16000
WINDOW = 400                 # 25 ms
HOP = 160                    # 10 ms: 100 mel frames per second
N_MELS = 40
PARTIAL_FRAMES = 160         # 1.6 s per partial utterance
PARTIAL_RATE = 1.3           # partials per second
MIN_COVERAGE = 0.75          # keep a padded last partial only if it is at least this full
EMBEDDING_DIM = 256
HIDDEN, LAYERS = 256, 3
TARGET_DBFS = -30.0          # volume normalization (increase only)
VAD_WINDOW = 480             # 30 ms
VAD_SMOOTHING = 8            # windows in the moving average
VAD_MAX_SILENCE = 6          # windows of silence kept around speech
VAD_FLOOR_DB = 40.0          # a window is speech when within this many dB of the loudest window
SILENCE_DBFS = -60.0         # quieter than this overall is silence
WEIGHTS_PACKAGE = "resemblyzer"


def ge2e_weights_path() -> Path:
    """The GE2E `pretrained.pt` shipped in the `resemblyzer` package (found without importing it)."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the speaker encoder's weights come with the {WEIGHTS_PACKAGE!r} package: "
                                f"pip install --no-deps {WEIGHTS_PACKAGE}")
    path = Path(next(iter(spec.submodule_search_locations))) / "pretrained.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {WEIGHTS_PACKAGE!r} package")
    return path


def slaney_filterbank() -> torch.Tensor:
    """librosa.filters.mel(sr=16000, n_fft=400, n_mels=40): triangles of area-normalized height (M, F)."""
    cfg = AudioCodecConfig(sample_rate=SAMPLE_RATE, n_fft=WINDOW, hop_length=HOP, n_mels=N_MELS)
    nyquist = torch.tensor(SAMPLE_RATE / 2, dtype=torch.float64)
    edges = mel_to_hz(torch.linspace(0, float(hz_to_mel(nyquist)), N_MELS + 2, dtype=torch.float64))
    area = 2.0 / (edges[2:] - edges[:-2])                                   # (M,) Slaney norm
    return (mel_filterbank(cfg).double() * area[:, None]).float()


def dbfs(wave: torch.Tensor) -> float:
    """Loudness of a wave in [-1, 1], in dB relative to full scale (-inf for digital silence)."""
    rms = float(wave.double().pow(2).mean().sqrt()) if wave.numel() else 0.0
    return 20 * math.log10(rms) if rms > 0 else -math.inf


def normalize_volume(wave: torch.Tensor) -> torch.Tensor:
    """Raise the volume to TARGET_DBFS (never lower it)."""
    level = dbfs(wave)
    return wave if not math.isfinite(level) or level >= TARGET_DBFS else wave * 10 ** ((TARGET_DBFS - level) / 20)


def speech_mask(wave: torch.Tensor) -> torch.Tensor:
    """(S,) -> (S',) bool, S' = S rounded down to whole VAD windows: True where speech (or a short
    pause inside speech) is. Energy VAD: a window is voiced within VAD_FLOOR_DB of the loudest one."""
    n = wave.shape[0] // VAD_WINDOW
    if n == 0:
        return torch.zeros(0, dtype=torch.bool)
    windows = wave[: n * VAD_WINDOW].double().view(n, VAD_WINDOW)            # (n, 480)
    level = 10 * torch.log10(windows.pow(2).mean(1) + 1e-12)                 # (n,) dB
    voiced = (level > level.max() - VAD_FLOOR_DB) & (level > SILENCE_DBFS)   # (n,)
    # moving average over VAD_SMOOTHING windows, rounded (as Resemblyzer smooths webrtcvad's flags)
    padded = torch.cat([torch.zeros((VAD_SMOOTHING - 1) // 2), voiced.double(), torch.zeros(VAD_SMOOTHING // 2)])
    smooth = padded.unfold(0, VAD_SMOOTHING, 1).mean(1).round().bool()      # (n,)
    # dilate by VAD_MAX_SILENCE windows each side
    width = VAD_MAX_SILENCE + 1
    padded = torch.cat([torch.zeros(width // 2), smooth.double(), torch.zeros((width - 1) // 2)])
    dilated = padded.unfold(0, width, 1).amax(1).bool()                      # (n,)
    return dilated.repeat_interleave(VAD_WINDOW)


def partial_slices(n_samples: int) -> list[slice]:
    """Mel-frame slices of the partial utterances covering n_samples (Resemblyzer's rule)."""
    n_frames = math.ceil((n_samples + 1) / HOP)
    step = round(SAMPLE_RATE / PARTIAL_RATE / HOP)
    slices = [slice(i, i + PARTIAL_FRAMES) for i in range(0, max(1, n_frames - PARTIAL_FRAMES + step + 1), step)]
    last = slices[-1]
    coverage = (n_samples - last.start * HOP) / (PARTIAL_FRAMES * HOP)
    if coverage < MIN_COVERAGE and len(slices) > 1:
        slices = slices[:-1]
    return slices


class SpeakerEncoder(nn.Module):
    """GE2E: mel partials (P, T, M) -> unit embeddings (P, D); `embed` runs the whole front end."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(N_MELS, HIDDEN, LAYERS, batch_first=True)
        self.linear = nn.Linear(HIDDEN, EMBEDDING_DIM)
        self.register_buffer("window", torch.hann_window(WINDOW), persistent=False)   # (400,)
        self.register_buffer("filterbank", slaney_filterbank(), persistent=False)      # (M, F)

    @classmethod
    def pretrained(cls, path: str | Path | None = None) -> "SpeakerEncoder":
        encoder = cls()
        state = torch.load(path or ge2e_weights_path(), map_location="cpu", weights_only=True)["model_state"]
        ours = {k: v for k, v in state.items() if k.startswith(("lstm.", "linear."))}  # not the GE2E loss's
        encoder.load_state_dict(ours, strict=False)
        missing = set(encoder.state_dict()) - set(ours)
        if missing:
            raise ValueError(f"speaker encoder weights lack {sorted(missing)}")
        return encoder.eval().requires_grad_(False)

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        """(P, T, M) power mel frames -> (P, D) non-negative unit vectors."""
        _, (hidden, _) = self.lstm(mels)
        raw = torch.relu(self.linear(hidden[-1]))
        return raw / raw.norm(dim=1, keepdim=True).clamp(min=1e-12)

    def mel(self, wave: torch.Tensor) -> torch.Tensor:
        """(S,) at 16 kHz -> (1 + S // HOP, M) power mel frames."""
        spec = torch.stft(wave, WINDOW, HOP, window=self.window, center=True, pad_mode="reflect",
                          return_complex=True)                                # (F, T)
        return (self.filterbank @ spec.abs().pow(2)).T                        # (T, M)

    def preprocess(self, wave: torch.Tensor) -> torch.Tensor:
        """(S,) at 16 kHz -> the speech only, at a normalized volume: (S',)."""
        wave = normalize_volume(wave.float())
        mask = speech_mask(wave)
        return wave[: mask.shape[0]][mask]

    @torch.inference_mode()
    def embed(self, wave: torch.Tensor) -> torch.Tensor:
        """A preprocessed utterance (S,) at 16 kHz -> its speaker embedding (D,), unit length."""
        slices = partial_slices(wave.shape[0])
        length = slices[-1].stop * HOP
        wave = torch.nn.functional.pad(wave.float(), (0, max(0, length - wave.shape[0])))
        mel = self.mel(wave)                                                  # (T, M)
        partials = torch.stack([mel[s] for s in slices])                      # (P, 160, M)
        mean = self(partials).mean(0)
        return mean / mean.norm()
