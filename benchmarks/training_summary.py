"""The shipped demo model's training run, from its log and its checkpoint: training time, loss per stage
(mean of the first and last 50 steps), the held-out backbone losses, and parameters per part.

    python benchmarks/training_summary.py [--log docs/demo_training_log.jsonl] [--checkpoint DIR]

The log is the run's log.jsonl (`omnireel train --recipe demo` writes one line per step and one per
evaluation), shipped in docs/. Training time adds up the gaps between consecutive lines shorter than
a minute, so the pauses of a stopped and resumed run do not count; a resumed step logged twice counts
once (its last line).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAUSE_S = 60.0


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def training_seconds(lines: list[dict]) -> float:
    times = [line["time"] for line in lines if "time" in line]
    return sum(b - a for a, b in zip(times, times[1:]) if 0 <= b - a < PAUSE_S)


def stage_losses(lines: list[dict]) -> dict[str, list[float]]:
    """{stage: losses in step order}, the last line of each step."""
    by_step: dict[str, dict[int, float]] = {}
    for line in lines:
        if "loss" in line:
            by_step.setdefault(line["stage"], {})[line["step"]] = line["loss"]
    return {stage: [steps[s] for s in sorted(steps)] for stage, steps in by_step.items()}


def part_parameters(checkpoint: Path) -> dict[str, int]:
    from safetensors import safe_open

    counts: dict[str, int] = {}
    with safe_open(checkpoint / "model.safetensors", framework="pt") as weights:
        for name in weights.keys():
            shape = weights.get_slice(name).get_shape()
            size = 1
            for n in shape:
                size *= n
            counts[name.split(".", 1)[0]] = counts.get(name.split(".", 1)[0], 0) + size
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", type=Path, default=REPO / "docs" / "demo_training_log.jsonl")
    parser.add_argument("--checkpoint", type=Path, default=REPO / "platform" / "omnireel" / "checkpoints" / "demo")
    args = parser.parse_args()
    lines = read_log(args.log)
    print(f"training time {training_seconds(lines) / 60:.1f} min ({args.log.name})")
    for stage, losses in stage_losses(lines).items():
        first, last = losses[:50], losses[-50:]
        print(f"  {stage:<8} {len(losses):5d} steps, loss mean of 50: {sum(first) / len(first):.3f} -> "
              f"{sum(last) / len(last):.3f}")
    evals = [(line["step"], line["eval_loss"]) for line in lines if "eval_loss" in line]
    print("  held-out backbone loss: " + ", ".join(f"{loss:.3f}@{step}" for step, loss in evals))
    counts = part_parameters(args.checkpoint)
    print(f"parameters {sum(counts.values()) / 1e6:.2f} M: " + ", ".join(
        f"{part} {n / 1e6:.2f} M" for part, n in sorted(counts.items(), key=lambda kv: -kv[1])) +
        f"; {(args.checkpoint / 'model.safetensors').stat().st_size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
