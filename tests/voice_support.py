"""Reference recordings for the voice tests: real speech from espeak-ng, the same sound as MP3 or
FLAC (PyAV), and silence."""
from __future__ import annotations

import io
import subprocess
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from omnireel import media

from media_support import encode_wav


def speak(text: str, voice: str, tmp_path: Path) -> bytes:
    """espeak-ng -> WAV bytes (22050 Hz mono)."""
    path = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True, capture_output=True)
    return path.read_bytes()


def transcode(wav: bytes, codec: str, container: str, rate: int | None = None) -> bytes:
    """WAV bytes -> the same sound as MP3 or FLAC bytes (PyAV), resampled to `rate` if given."""
    wave, source_rate = media.decode_audio(wav)
    if rate is not None and rate != source_rate:
        from omnireel.references import resample
        wave = resample(wave, source_rate, rate)
    rate = rate or source_rate
    out = io.BytesIO()
    with av.open(out, "w", format=container) as f:
        stream = f.add_stream(codec, rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(wave[None].astype(np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
        f.mux(stream.encode(frame))
        f.mux(stream.encode(None))
    return out.getvalue()


def silent_wav(seconds: float, rate: int = 16000) -> bytes:
    return encode_wav(np.zeros(int(seconds * rate), np.float32), rate)
