"""`omnireel bench backbone --family ltx2`: the step's FLOPs on a meta-device build (the tiny config
here; benchmarks/backbone.py prints the real 48-layer one), and one-line errors for bad sizes."""
import subprocess
import sys

from omnireel.families.ltx2 import meta_transformer, step_flops
from omnireel.parallel.bench_ltx2 import LTX2StepShape, run, transformer_config


def test_flops_grow_with_the_clip_and_every_branch_counts():
    short = step_flops(meta_transformer(transformer_config("tiny")), **LTX2StepShape(64, 64, 9, text_tokens=16).geometry())
    longer = step_flops(meta_transformer(transformer_config("tiny")), **LTX2StepShape(64, 64, 17, text_tokens=16).geometry())
    assert set(short) == {"cond_uncond", "stg", "modality", "step"}
    assert short["step"] == short["cond_uncond"] + short["stg"] + short["modality"] and short["modality"] > 0
    assert longer["step"] > short["step"]
    lines = run("tiny", LTX2StepShape(64, 64, 9, text_tokens=16), steps=1)
    assert "FLOPs per step" in lines[1] and "2 layers" in lines[0]


def test_bad_sizes_are_one_line_errors():
    proc = subprocess.run([sys.executable, "-m", "omnireel.cli", "bench", "backbone", "--family", "ltx2",
                           "--preset", "real", "--frames", "120"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == "omnireel: error: --frames: must be 1 + 8k, e.g. 121 (got 120)"
