"""Media the tests make: WAV recordings (voices, input_audio uploads, soundtracks). The package only
reads audio (media.decode_audio, through PyAV); writing WAV is something only tests need."""
from __future__ import annotations

import io
import wave as wavlib

import numpy as np


def encode_wav(wave: np.ndarray, sample_rate: int) -> bytes:
    """float32 (S,) mono in [-1, 1] -> 16-bit PCM WAV bytes."""
    pcm = np.round(np.clip(wave, -1, 1) * 32767).astype("<i2")  # (S,) little-endian int16
    buf = io.BytesIO()
    with wavlib.open(buf, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(pcm.tobytes())
    return buf.getvalue()
