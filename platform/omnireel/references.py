"""Reference media named in requests: read within limits, checked before decoding, decoded.

A reference is what `config.MediaReference` admitted: an inline upload (a data: URI), an
allow-listed URI, a stored upload (the Serve app's `<storage>/uploads/<sha256>`: the stages read its
bytes here, where they need them), or a local path from a trusted caller. Every read goes through storage.py, is
refused above MAX_UPLOAD_BYTES, and is probed (container header only) for its streams and duration
before any frame or sample is decoded (DESIGN.md §4, the trust boundary).
"""
from __future__ import annotations

import io

import av
import numpy as np

from . import media, storage
from .config import MAX_INPUT_SECONDS, MAX_UPLOAD_BYTES, data_uri_bytes


class MediaReferenceError(ValueError):
    """A reference that cannot be used; the message says why (the caller prefixes the field)."""


def read_reference(reference: str, max_bytes: int = MAX_UPLOAD_BYTES) -> bytes:
    """The bytes behind a reference, refusing anything larger than `max_bytes` before reading it."""
    if reference.startswith("data:"):
        data = data_uri_bytes(reference)
    else:
        try:
            fs, path = storage.filesystem(reference)
            size = fs.size(path)
            if size is not None and size > max_bytes:
                raise MediaReferenceError(f"must be at most {max_bytes} bytes (got {size})")
            data = storage.read_bytes(reference)
        except (FileNotFoundError, OSError) as e:
            raise MediaReferenceError(f"cannot read {reference[:200]}: {e}") from None
    if len(data) > max_bytes:
        raise MediaReferenceError(f"must be at most {max_bytes} bytes (got {len(data)})")
    return data


def probe_stream(data: bytes, kind: str, max_seconds: float | None = MAX_INPUT_SECONDS,
                 formats: tuple[str, ...] | None = None) -> dict:
    """The first `kind` ("video" | "audio") stream of `data`, from its header; refuses other media,
    other container formats (if `formats` is given) and streams longer than `max_seconds`."""
    try:
        with av.open(io.BytesIO(data)) as container:
            format_names = set(container.format.name.split(","))
        streams = media.probe(data)
    except (av.FFmpegError, ValueError, IndexError) as e:
        raise MediaReferenceError(f"not a readable {kind} file ({type(e).__name__})") from None
    if formats is not None and not format_names & set(formats):
        raise MediaReferenceError(f"format {sorted(format_names)[0]!r} is not accepted; use one of "
                             f"{', '.join(formats)}")
    found = [s for s in streams if s["type"] == kind]
    if not found:
        raise MediaReferenceError(f"has no {kind} stream")
    stream = found[0]
    if max_seconds is not None and stream["duration"] is not None and stream["duration"] > max_seconds:
        raise MediaReferenceError(f"must be at most {max_seconds:g} s long (got {stream['duration']:.2f} s)")
    return stream


def resample(wave: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """float32 (S,) mono at `rate` -> float32 (S * target_rate / rate,) at `target_rate` (libswresample)."""
    if rate == target_rate or wave.size == 0:
        return wave.astype(np.float32)
    resampler = av.AudioResampler(format="flt", layout="mono", rate=target_rate)
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave, dtype=np.float32)[None], format="flt",
                                       layout="mono")
    frame.sample_rate = rate
    chunks = [out.to_ndarray()[0] for f in (frame, None) for out in resampler.resample(f)]
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)


def load_audio(reference_or_bytes: str | bytes, sample_rate: int, max_seconds: float | None = MAX_INPUT_SECONDS,
               formats: tuple[str, ...] | None = None) -> np.ndarray:
    """Audio reference -> float32 (S,) mono at `sample_rate`, checked before it is decoded."""
    data = reference_or_bytes if isinstance(reference_or_bytes, bytes) else read_reference(reference_or_bytes)
    probe_stream(data, "audio", max_seconds, formats)
    try:
        wave, rate = media.decode_audio(data)
    except (av.FFmpegError, ValueError, IndexError) as e:
        raise MediaReferenceError(f"audio cannot be decoded ({type(e).__name__})") from None
    return resample(wave, rate, sample_rate)


def load_frames(reference: str, width: int, height: int, max_frames: int | None = None,
                fps: float | None = None) -> np.ndarray:
    """Image or video reference -> uint8 (T, height, width, 3), resized (center crop to the aspect,
    then scaled). With `fps`, a video is resampled in time to that rate (nearest frame)."""
    data = read_reference(reference)
    stream = probe_stream(data, "video")
    try:
        frames = media.decode_video(data)                                   # (T, H, W, 3)
    except (av.FFmpegError, ValueError, IndexError) as e:
        raise MediaReferenceError(f"frames cannot be decoded ({type(e).__name__})") from None
    if fps is not None and stream["duration"] and frames.shape[0] > 1:
        source_fps = frames.shape[0] / stream["duration"]
        keep = np.arange(int(stream["duration"] * fps + 1e-6))
        frames = frames[np.minimum(np.round(keep * source_fps / fps).astype(int), frames.shape[0] - 1)]
    if max_frames is not None:
        frames = frames[:max_frames]
    return np.stack([_fit(frame, width, height) for frame in frames])


def _fit(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 (H, W, 3) -> (height, width, 3): center crop to the target aspect, then bilinear resize."""
    import torch
    h, w, _ = frame.shape
    if w * height > h * width:                      # too wide: crop columns
        crop = round(h * width / height)
        frame = frame[:, (w - crop) // 2:(w - crop) // 2 + crop]
    elif w * height < h * width:                    # too tall: crop rows
        crop = round(w * height / width)
        frame = frame[(h - crop) // 2:(h - crop) // 2 + crop]
    x = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float()  # (1, 3, h, w)
    x = torch.nn.functional.interpolate(x, size=(height, width), mode="bilinear", antialias=True,
                                        align_corners=False)
    return x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
