"""Media encoding, checked with the real ffprobe binary: H.264 + AAC MP4, PNG, WAV."""
import io
import json
import subprocess

import av
import numpy as np
import pytest
import torch

from omnireel import media

from media_support import encode_wav

SR = 24000


def gradient_frames(n_frames: int, height: int = 64, width: int = 96) -> np.ndarray:
    """Smooth moving colour ramps: uint8 (T, H, W, 3)."""
    t, y, x = np.meshgrid(np.arange(n_frames), np.arange(height), np.arange(width), indexing="ij")
    rgb = np.stack([x * 2 + t * 3, y * 3, (x + y + t * 5) % 256], axis=-1)  # (T, H, W, 3)
    return (rgb % 256).astype(np.uint8)


def tone(n_samples: int) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * 440 * np.arange(n_samples) / SR)).astype(np.float32)


def ffprobe(path) -> list[dict]:
    result = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-show_streams", "-of", "json", str(path)],
        capture_output=True, text=True, check=True)
    return json.loads(result.stdout)["streams"]


def packet_payloads(data: bytes, kind: str) -> list[bytes]:
    with av.open(io.BytesIO(data)) as container:
        stream = getattr(container.streams, kind)[0]
        return [bytes(packet) for packet in container.demux(stream) if packet.size]


def test_video_to_uint8():
    frames = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 4).expand(3, 2, 1, 4)  # (3, T, H, W)
    out = media.video_to_uint8(frames)
    assert out.shape == (2, 1, 4, 3) and out.dtype == np.uint8
    assert out[0, 0, :, 0].tolist() == [0, 128, 255, 255]


@pytest.mark.parametrize("seconds, fps", [(2, 24), (1.5, 30), (1, 8), (0.5, 60)])
def test_mp4_with_h264_and_aac(tmp_path, seconds, fps):
    n_frames = round(seconds * fps)
    frames = gradient_frames(n_frames)
    video = media.encode_video(frames, fps)
    audio = media.encode_audio(tone(round(n_frames / fps * SR)), SR)
    muxed = media.mux(video, audio)
    (tmp_path / "clip.mp4").write_bytes(muxed)

    streams = ffprobe(tmp_path / "clip.mp4")
    assert sorted(s["codec_type"] for s in streams) == ["audio", "video"]
    v = next(s for s in streams if s["codec_type"] == "video")
    a = next(s for s in streams if s["codec_type"] == "audio")
    assert (v["codec_name"], v["pix_fmt"], v["width"], v["height"]) == ("h264", "yuv420p", 96, 64)
    assert int(v["nb_read_frames"]) == n_frames
    assert float(v["duration"]) == pytest.approx(n_frames / fps, abs=1e-3)
    assert (a["codec_name"], int(a["sample_rate"]), a["channels"]) == ("aac", SR, 1)
    assert media.decode_audio(muxed)[0].shape[0] == round(n_frames / fps * SR)   # exact to the sample
    assert muxed.index(b"moov") < muxed.index(b"mdat")  # faststart

    # mux copies packets: the payloads are byte-identical to the separate encodes.
    assert packet_payloads(muxed, "video") == packet_payloads(video, "video")
    assert packet_payloads(muxed, "audio") == packet_payloads(audio, "audio")

    # PyAV reads back what ffprobe saw.
    assert [(s["type"], s["codec"]) for s in media.probe(muxed)] == [("video", "h264"), ("audio", "aac")]
    decoded = media.decode_video(muxed)
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames).mean() < 4  # crf 18 on smooth ramps
    wave, rate = media.decode_audio(muxed)
    assert rate == SR and len(wave) == round(n_frames / fps * SR)


def test_png_round_trip():
    image = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    png = media.encode_png(image)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert np.array_equal(media.decode_video(png), image[None])


def test_wav_round_trip():
    wave = tone(SR // 2)
    wav = encode_wav(wave, SR)
    decoded, rate = media.decode_audio(wav)
    assert rate == SR and decoded.dtype == np.float32 and decoded.shape == wave.shape
    assert np.abs(decoded - wave).max() <= 1 / 32767
    [stream] = media.probe(wav)
    assert (stream["type"], stream["codec"], stream["sample_rate"]) == ("audio", "pcm_s16le", SR)
    assert stream["duration"] == pytest.approx(0.5, abs=1e-3)
