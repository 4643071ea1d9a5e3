"""`omnireel bench backbone --family ltx2`: FLOPs of diffusers' LTX-2 transformer from a meta-device
build (the tiny config here; the real 48-layer one is what benchmarks/backbone.py prints)."""
import subprocess
import sys

from omnireel.parallel.bench_ltx2 import LTX2StepShape, flops_per_step


def test_flops_follow_the_rows_and_the_tokens():
    one, video, audio = flops_per_step("tiny", LTX2StepShape(width=64, height=64, frames=9, rows=1, text_tokens=16))
    four, _, _ = flops_per_step("tiny", LTX2StepShape(width=64, height=64, frames=9, rows=4, text_tokens=16))
    longer, video2, _ = flops_per_step("tiny", LTX2StepShape(width=64, height=64, frames=17, rows=1, text_tokens=16))
    assert (video, audio) == (2 * 2 * 2, 9) and video2 == 3 * 2 * 2       # (1 + 8/8) x 2 x 2 latents; 25 audio/s
    assert one > 0 and four == 4 * one and longer > one


def test_bad_sizes_are_one_line_errors():
    proc = subprocess.run([sys.executable, "-m", "omnireel.cli", "bench", "backbone", "--family", "ltx2",
                           "--preset", "real", "--frames", "120"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == "omnireel: error: --frames: must be 1 + 8k, e.g. 121 (got 120)"
