"""End to end on the tiny preset: `omnireel render` writes an MP4 whose streams ffprobe confirms."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from omnireel import media
from omnireel.cli import main as cli_main
from omnireel.config import GenerationRequest

REPO = Path(__file__).resolve().parents[1]


def ffprobe(path) -> dict:
    out = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-show_streams", "-of", "json", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return {s["codec_type"]: s for s in json.loads(out)["streams"]} | {"count": len(json.loads(out)["streams"])}


def run_cli(*args, check=True):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "omnireel.cli", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_cli_render_writes_h264_and_aac(tiny_checkpoint, tmp_path):
    out = tmp_path / "clip.mp4"
    proc = run_cli("render", "a paper boat in the rain", "-o", str(out), "--checkpoint", str(tiny_checkpoint),
                   "--seconds", "1", "--size", "64x32", "--fps", "12", "--steps", "4")
    assert "denoising" in proc.stderr          # the progress bar
    streams = ffprobe(out)
    assert streams["count"] == 2
    v, a = streams["video"], streams["audio"]
    assert (v["codec_name"], v["width"], v["height"], int(v["nb_read_frames"])) == ("h264", 64, 32, 12)
    assert a["codec_name"] == "aac"
    wave, rate = media.decode_audio(out.read_bytes())
    assert wave.shape[0] == rate                                 # 12 frames at 12 fps: 1 s, to the sample


@pytest.mark.parametrize("seconds,fps", [(0.5, 24), (1.5, 8), (0.4, 30), (1.0, 25)])
def test_render_streams_for_several_lengths_and_rates(tiny_checkpoint, tmp_path, seconds, fps):
    out = tmp_path / "clip.mp4"
    cli_main(["render", "waves on a beach", "-o", str(out), "--checkpoint", str(tiny_checkpoint), "-q",
              "--seconds", str(seconds), "--size", "32x48", "--fps", str(fps), "--steps", "2"])
    streams = ffprobe(out)
    v, a = streams["video"], streams["audio"]
    frames = round(seconds * fps)
    assert (v["codec_name"], v["width"], v["height"]) == ("h264", 32, 48)
    assert int(v["nb_read_frames"]) == frames
    assert abs(float(v["duration"]) - frames / fps) < 1e-3
    assert a["codec_name"] == "aac"
    wave, rate = media.decode_audio(out.read_bytes())
    assert wave.shape[0] == round(frames / fps * rate)           # the frames' duration, to the sample


def test_image_output_is_a_png(tiny_checkpoint, tmp_path):
    out = tmp_path / "still.png"
    cli_main(["render", "a lighthouse at dusk", "--image", "-o", str(out), "--checkpoint", str(tiny_checkpoint),
              "-q", "--size", "48x32", "--steps", "2"])
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(data[16:20], "big") == 48 and int.from_bytes(data[20:24], "big") == 32


def small_request(**overrides):
    fields = dict(prompt="a red kite over a green hill", seconds=0.5, size="32x32", fps=8, steps=3, seed=7)
    return GenerationRequest(**{**fields, **overrides})


def test_same_seed_same_latents_other_seed_differs(tiny_engine):
    a = tiny_engine.render(small_request()).latents
    b = tiny_engine.render(small_request()).latents
    c = tiny_engine.render(small_request(seed=8)).latents
    assert torch.equal(a.video, b.video) and torch.equal(a.audio, b.audio)
    assert (a.video - c.video).abs().max() > 1e-2 and (a.audio - c.audio).abs().max() > 1e-2


def test_conditioning_is_wired_a_different_prompt_changes_the_output(tiny_engine):
    a = tiny_engine.render(small_request()).latents
    b = tiny_engine.render(small_request(prompt="a submarine in a dark trench")).latents
    assert (a.video - b.video).abs().max() > 1e-3 and (a.audio - b.audio).abs().max() > 1e-3


def test_cancel_stops_denoising(tiny_engine):
    from omnireel.model.sampler import Cancelled
    seen = []
    with pytest.raises(Cancelled):
        tiny_engine.render(small_request(steps=6), progress=lambda i, n: seen.append(i),
                           should_stop=lambda: len(seen) >= 2)
    assert seen == [1, 2]


BAD_INPUTS = [
    (["render", ""], "prompt"),
    (["render", "x" * 2001], "prompt"),
    (["render", "p", "--seconds", "0"], "seconds"),
    (["render", "p", "--seconds", "25"], "seconds"),
    (["render", "p", "--size", "250x256"], "size"),
    (["render", "p", "--size", "big"], "size"),
    (["render", "p", "--size", "4096x256"], "size"),
    (["render", "p", "--fps", "0"], "fps"),
    (["render", "p", "--fps", "61"], "fps"),
    (["render", "p", "--steps", "0"], "steps"),
    (["render", "p", "--steps", "101"], "steps"),
    (["render", "p", "--seed", "-1"], "seed"),
    (["render", "p", "--language", "fr"], "language"),
    (["render", "p", "--shots", json.dumps([{"prompt": "s", "seconds": 0.25}] * 7), "--seconds", "1.75"], "shots"),
    (["render", "p", "--shots", "[{"], "--shots"),
]


@pytest.mark.parametrize("argv,field", BAD_INPUTS, ids=[f for _, f in BAD_INPUTS])
def test_bad_input_is_one_line_naming_the_field(argv, field, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("omnireel: error: ") and field in err


def test_bad_input_from_the_real_command_has_no_traceback():
    proc = run_cli("render", "p", "--seconds", "-3", "--fps", "99", check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "seconds" in lines[0] and "fps" in lines[0]


def test_missing_checkpoint_is_one_line(tmp_path):
    proc = run_cli("render", "p", "--checkpoint", str(tmp_path / "nope"), check=False)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_stdlib_platform_is_not_shadowed_from_the_repo_root():
    proc = subprocess.run([sys.executable, "-c", "import platform; print(platform.system())"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "Linux"


def test_a_bfloat16_engine_renders_what_float32_does_to_bfloat16_precision(tiny_checkpoint, tiny_engine, tmp_path):
    """--dtype bfloat16 on the omni family: the backbone's time embedding and the vocoder's STFTs
    once failed on mixed float types; the latents follow float32's (bf16 rounding only)."""
    from omnireel.engine import LocalEngine

    engine = LocalEngine(tiny_checkpoint, dtype="bfloat16")
    assert next(engine.components["backbone"].module.parameters()).dtype == torch.bfloat16
    half, full = engine.render(small_request()), tiny_engine.render(small_request())
    for a, b in ((half.latents.video, full.latents.video), (half.latents.audio, full.latents.audio)):
        a, b = a.float().flatten(), b.float().flatten()
        assert torch.isfinite(a).all() and torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.99
    path = tmp_path / "bf16.mp4"
    path.write_bytes(half.artifact.data)
    streams = ffprobe(path)
    assert streams["video"]["codec_name"] == "h264" and streams["audio"]["codec_name"] == "aac"
