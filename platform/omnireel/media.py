"""Media bytes in and out, with PyAV: MP4 (H.264 + AAC), PNG, audio files in (WAV, MP3, ...), and a stream probe.

Frames are numpy uint8 (T, H, W, 3) RGB; waves are numpy float32 (S,) mono in [-1, 1] (encode_audio
also takes (2, S) stereo). Video and
audio are encoded separately and `mux` only copies their packets into one MP4, so each encoder can
run where its data is and muxing costs no re-encode.
"""
from __future__ import annotations

import io
import tempfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def _write_mp4(fill) -> bytes:
    """Run `fill(container)` on a new MP4 output and return the file's bytes.

    faststart (moov atom first: playable while downloading) rewrites the finished file by name, so
    the MP4 goes through a temporary file rather than an in-memory buffer.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "out.mp4"
        with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"}) as out:
            fill(out)
        return path.read_bytes()


def video_to_uint8(frames) -> np.ndarray:
    """Tensor (3, T, H, W) in [-1, 1] -> numpy uint8 (T, H, W, 3)."""
    pixels = ((frames.detach().float().clamp(-1, 1) + 1) * 127.5).round()  # (3, T, H, W) in [0, 255]
    return pixels.permute(1, 2, 3, 0).to("cpu").numpy().astype(np.uint8)  # (T, H, W, 3)


def encode_video(frames: np.ndarray, fps: int) -> bytes:
    """uint8 (T, H, W, 3) RGB -> MP4 bytes with one H.264 (yuv420p) stream of T frames at `fps`."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames (T, H, W, 3), got {frames.dtype} {frames.shape}")
    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"H.264 yuv420p needs even width and height, got {width}x{height}")

    def fill(out):
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        for i, rgb in enumerate(frames):  # rgb: (H, W, 3)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))  # flush the encoder

    return _write_mp4(fill)


def encode_audio(wave: np.ndarray, sample_rate: int) -> bytes:
    """float32 (S,) mono or (channels, S) with 1 or 2 channels (stereo) -> M4A (MP4) bytes with one AAC stream."""
    samples = np.ascontiguousarray(np.clip(wave, -1, 1), dtype=np.float32)
    samples = samples[None, :] if samples.ndim == 1 else samples  # (channels, S)
    if samples.ndim != 2 or samples.shape[0] not in (1, 2):
        raise ValueError(f"expected a wave (S,) or (1 or 2 channels, S), got {wave.shape}")
    layout = "mono" if samples.shape[0] == 1 else "stereo"

    def fill(out):
        stream = out.add_stream("aac", rate=sample_rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout=layout)
        frame.sample_rate, frame.pts, frame.time_base = sample_rate, 0, Fraction(1, sample_rate)
        out.mux(stream.encode(frame))  # the codec context cuts it into AAC-sized frames
        out.mux(stream.encode(None))

    return _write_mp4(fill)


def mux(video_mp4: bytes, audio_m4a: bytes) -> bytes:
    """Copy the packets of one video stream and one audio stream into a single MP4 (no re-encode)."""
    with av.open(io.BytesIO(video_mp4)) as vin, av.open(io.BytesIO(audio_m4a)) as ain:
        sources = [(vin, vin.streams.video[0]), (ain, ain.streams.audio[0])]

        def fill(out):
            targets = [out.add_stream_from_template(stream) for _, stream in sources]
            for (container, source), target in zip(sources, targets):
                for packet in container.demux(source):
                    if packet.dts is None:  # the demuxer's end-of-stream marker
                        continue
                    packet.stream = target
                    out.mux(packet)  # interleaved write: the muxer orders packets by time

        return _write_mp4(fill)


def encode_png(frame: np.ndarray) -> bytes:
    """uint8 (H, W, 3) RGB -> PNG bytes."""
    height, width, _ = frame.shape
    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt = width, height, "rgb24"
    image = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame, dtype=np.uint8), format="rgb24")
    return b"".join(bytes(packet) for packet in [*codec.encode(image), *codec.encode(None)])


def decode_video(data: bytes) -> np.ndarray:
    """Any video or image bytes PyAV reads (MP4, PNG, ...) -> uint8 (T, H, W, 3) RGB."""
    with av.open(io.BytesIO(data)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]  # (H, W, 3)
    return np.stack(frames)


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Any audio bytes PyAV reads (WAV, MP3, FLAC, M4A, ...) -> (float32 (S,) mono, sample_rate)."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        sample_rate = stream.codec_context.sample_rate
        to_mono = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        chunks = [resampled.to_ndarray()[0]  # packed mono: (1, n) -> (n,)
                  for frame in [*container.decode(stream), None]
                  for resampled in to_mono.resample(frame)]  # None flushes the resampler
        wave = np.concatenate(chunks) if chunks else np.zeros(0)
        if stream.duration is not None:  # AAC/MP3 decoders emit their last frame whole: trim it
            wave = wave[:round(stream.duration * stream.time_base * sample_rate)]
    return wave.astype(np.float32), sample_rate


def probe(data: bytes) -> list[dict]:
    """Streams of a media file: type, codec, width, height, frames, duration (s), sample_rate."""
    with av.open(io.BytesIO(data)) as container:
        streams = []
        for stream in container.streams:
            if stream.duration is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / av.time_base
            else:
                duration = None
            audio = stream.type == "audio"
            streams.append({
                "type": stream.type,
                "codec": stream.codec_context.name,
                "width": None if audio else stream.codec_context.width,
                "height": None if audio else stream.codec_context.height,
                "frames": stream.frames,
                "duration": duration,
                "sample_rate": stream.codec_context.sample_rate if audio else None,
            })
    return streams
