"""The denoise scheduler alone, in this process: N identical small jobs denoised with batching off
(max_batch_jobs 1) and on (max_batch_jobs N), jobs/minute of the denoise stage, side by side.

    python benchmarks/batching.py [--jobs 8] [--repeats 3] [--threads 2] [--size 32x32] [--steps 4]

The jobs' inputs (text, voice, media) are made once by LocalEngine's stages on a fresh tiny
checkpoint (or --checkpoint); off and on alternate, each repeated --repeats times (medians).
This is the ceiling step-level batching can give the served path, where the other stages' time
and the jobs' arrival (one at a time through single-replica encoders) bound the batch size.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))   # batching_support.denoise_inputs

import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="checkpoint folder (default: a fresh tiny one)")
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", default="32x32")
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=4)
    options = parser.parse_args()

    from batching_support import denoise_inputs

    from omnireel.checkpoint import init_checkpoint
    from omnireel.config import GenerationRequest
    from omnireel.engine import LocalEngine
    from omnireel.scheduler import DenoiseScheduler

    torch.set_num_threads(options.threads)
    checkpoint = options.checkpoint or os.path.join(tempfile.mkdtemp(prefix="omnireel-bench-batching-"), "tiny")
    if not options.checkpoint:
        init_checkpoint("tiny", checkpoint, seed=0)
    engine = LocalEngine(checkpoint)
    inputs = [denoise_inputs(engine, GenerationRequest(prompt="a paper boat drifting down a rainy street",
                                                       size=options.size, seconds=options.seconds, fps=8,
                                                       steps=options.steps, seed=seed))
              for seed in range(options.jobs)]
    denoiser = engine.components["backbone"]

    def seconds(max_batch_jobs: int) -> float:
        scheduler = DenoiseScheduler(denoiser, max_batch_jobs=max_batch_jobs)
        tasks = [scheduler.submit(*x) for x in inputs]
        start = time.perf_counter()
        scheduler.run_until_idle()
        elapsed = time.perf_counter() - start
        for task in tasks:
            task.future.result()
        return elapsed

    seconds(options.jobs)                                                           # warm-up
    runs = {1: [], options.jobs: []}
    for _ in range(options.repeats):
        for max_batch_jobs in runs:
            runs[max_batch_jobs].append(seconds(max_batch_jobs))
    off, on = (statistics.median(runs[m]) for m in (1, options.jobs))
    tokens = denoiser.prepare(*inputs[0]).tokens
    print(f"preset {engine.config.name}, torch threads {options.threads}, {os.cpu_count()} CPU cores; "
          f"{options.jobs} jobs of {options.size}, {options.seconds:g} s, {options.steps} steps ({tokens} tokens a "
          f"step with CFG); median of {options.repeats}")
    print(f"denoise jobs/minute, batching off (max_batch_jobs 1) / on (max_batch_jobs {options.jobs}): "
          f"{60 * options.jobs / off:.1f} / {60 * options.jobs / on:.1f} ({off / on:.2f}x); "
          f"seconds {off:.3f} / {on:.3f}")


if __name__ == "__main__":
    main()
