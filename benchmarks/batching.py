"""The denoise scheduler alone, in this process: N small jobs of one shape (seeds 0..N-1) denoised
with batching off (max_batch_jobs 1) and on (max_batch_jobs N), jobs/minute of the denoise stage,
side by side.

    python benchmarks/batching.py [--family omni|ltx2|wan] [--jobs 8] [--repeats 3] [--threads 2]
                                  [--size WxH] [--seconds S] [--fps N] [--steps 4]

The jobs' inputs (text, voice, media) are made once by LocalEngine's stages (denoise_inputs) on a
fresh tiny checkpoint of the family (omni: the `tiny` preset; ltx2 / wan: the tiny random diffusers
folders of benchmarks/tiny_ltx2.py and benchmarks/tiny_wan.py, the tests' too), or on --checkpoint;
off and on alternate,
each repeated --repeats times (medians). Each family's default request is its smallest tiny one.
This is the ceiling step-level batching can give the served path, where the other stages' time
and the jobs' arrival (one at a time through single-replica encoders) bound the batch size.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import tiny_ltx2  # noqa: E402  (beside this script)
import tiny_wan  # noqa: E402
import torch  # noqa: E402

# family -> (prompt its tiny tokenizer knows, size, seconds, fps): the smallest request of its tiny checkpoint
REQUESTS = {"omni": ("a paper boat drifting down a rainy street", "32x32", 0.5, 8),
            **{family: tuple(module.ROBOT[key] for key in ("prompt", "size", "seconds", "fps"))
               for family, module in (("ltx2", tiny_ltx2), ("wan", tiny_wan))}}


def tiny_checkpoint(family: str, directory: str) -> str:
    """A fresh tiny checkpoint of `family` under `directory`."""
    if family == "ltx2":
        return str(tiny_ltx2.build_tiny_ltx2(Path(directory) / "tiny-ltx2"))
    if family == "wan":
        return str(tiny_wan.build_tiny_wan(Path(directory) / "tiny-wan"))
    from omnireel.checkpoint import init_checkpoint
    path = os.path.join(directory, "tiny")
    init_checkpoint("tiny", path, seed=0)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="checkpoint folder (default: a fresh tiny one)")
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--family", choices=sorted(REQUESTS), default="omni",
                        help="the tiny checkpoint made when --checkpoint is not given, and the default request")
    parser.add_argument("--size", help="WxH (default: the family's smallest)")
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--fps", type=int)
    parser.add_argument("--steps", type=int, default=4)
    options = parser.parse_args()

    from omnireel.config import GenerationRequest
    from omnireel.engine import LocalEngine
    from omnireel.scheduler import DenoiseScheduler

    torch.set_num_threads(options.threads)
    checkpoint = options.checkpoint or tiny_checkpoint(options.family,
                                                       tempfile.mkdtemp(prefix="omnireel-bench-batching-"))
    engine = LocalEngine(checkpoint)
    prompt, size, length, fps = REQUESTS[engine.family.name]
    size, length, fps = options.size or size, options.seconds or length, options.fps or fps
    inputs = [engine.denoise_inputs(GenerationRequest(prompt=prompt, size=size, seconds=length, fps=fps,
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
    name = getattr(engine.config, "name", "tiny random diffusers folder")
    print(f"family {engine.family.name} ({name}), torch threads {options.threads}, {os.cpu_count()} CPU cores; "
          f"{options.jobs} jobs of {size}, {length:g} s at {fps} fps, {options.steps} steps ({tokens} tokens a "
          f"step, guidance rows included); median of {options.repeats}")
    print(f"denoise jobs/minute, batching off (max_batch_jobs 1) / on (max_batch_jobs {options.jobs}): "
          f"{60 * options.jobs / off:.1f} / {60 * options.jobs / on:.1f} ({off / on:.2f}x); "
          f"seconds {off:.3f} / {on:.3f}")


if __name__ == "__main__":
    main()
