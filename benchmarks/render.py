"""Wall time and peak memory of `omnireel render` on the embedded default (small preset).

Runs the real command in a child process (model load included, as a user sees it), then one
in-process render for the per-stage breakdown. Prints figures; asserts nothing.

    python benchmarks/render.py [--seconds 2] [--size 256x256] [--fps 24] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", default="2")
    p.add_argument("--size", default="256x256")
    p.add_argument("--fps", default="24")
    p.add_argument("--checkpoint", default=None, help="default: the embedded small checkpoint")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()

    import torch

    from omnireel.checkpoint import default_checkpoint, load_checkpoint
    checkpoint = args.checkpoint or str(default_checkpoint())   # created once, outside the timing
    model = load_checkpoint(checkpoint)
    params = {name: sum(t.numel() for t in part.parameters()) for name, part in model.named_children()}
    print(f"checkpoint: {checkpoint} (preset {model.config.name}, default steps {model.config.sampler.steps})")
    print("parameters: " + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in params.items())
          + f", total {sum(params.values()) / 1e6:.2f} M (text encoder MiniLM-L6 22.7 M, frozen, not counted)")
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, threads {args.threads}")

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench.mp4")
        cmd = [sys.executable, "-m", "omnireel.cli", "render", "-o", out, "-q", "--checkpoint", checkpoint,
               "--seconds", args.seconds, "--size", args.size, "--fps", args.fps, "--threads", str(args.threads)]
        start = time.perf_counter()
        subprocess.run(cmd, check=True)
        wall = time.perf_counter() - start
        peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        size_kib = os.path.getsize(out) / 1024
    print(f"omnireel render --seconds {args.seconds} --size {args.size} --fps {args.fps}: "
          f"wall {wall:.1f} s (process start + model load + render), peak RSS {peak_mib:.0f} MiB, MP4 {size_kib:.0f} KiB")

    from omnireel.config import GenerationRequest
    from omnireel.engine import LocalEngine
    torch.set_num_threads(args.threads)
    engine = LocalEngine(checkpoint)
    request = GenerationRequest(prompt="a paper boat in the rain", seconds=float(args.seconds), size=args.size,
                                fps=int(args.fps))
    engine.render(request)   # warm-up
    result = engine.render(request)
    print("stages (warm, in-process): " + ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items())
          + f"; total {sum(result.timings.values()):.2f} s")


if __name__ == "__main__":
    main()
