"""Backbone benchmark: per-step time, tokens/s, achieved TFLOP/s, and with --check-parity the max abs
difference of TP=N against TP=1 on the same weights and inputs.

    python benchmarks/backbone.py --preset small --tp 2 --steps 5 --tokens 1024 --check-parity

At --tp 1 it imports only torch, omnireel.model and pydantic (its flags are DriverArgs' fields, as
`omnireel bench backbone`'s; plus the two-line omnireel package inits), so it runs on a GPU machine
without Ray. The figures are printed; nothing here asserts a timing.
"""
from __future__ import annotations

import sys
from pathlib import Path

try:
    import omnireel  # noqa: F401
except ImportError:   # a plain checkout: use the source root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from omnireel.cli import OneLineParser, add_backbone_bench_arguments  # noqa: E402
from omnireel.parallel.bench import run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    add_backbone_bench_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
