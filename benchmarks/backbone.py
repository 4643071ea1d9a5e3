"""Backbone benchmark: per-step time, tokens/s, achieved TFLOP/s, and with --check-parity the max abs
difference of TP=N against TP=1 on the same weights and inputs.

    python benchmarks/backbone.py --preset small --tp 2 --steps 5 --tokens 1024 --check-parity

At --tp 1 it imports only torch and omnireel.model (plus the two-line omnireel package inits), so it
runs on a GPU machine without Ray. The figures are printed; nothing here asserts a timing.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import omnireel  # noqa: F401
except ImportError:   # a plain checkout: use the source root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from omnireel.parallel.bench import DTYPES, bench_backbone  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", help="model preset (tiny, small, wan14b)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up)")
    parser.add_argument("--tokens", type=int, default=1024, help="packed sequence length, about")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--check-parity", action="store_true", help="compare TP=N with TP=1")
    args = parser.parse_args(argv)
    try:
        bench_backbone(args.preset, args.tp, args.steps, args.tokens, args.dtype, args.check_parity)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
