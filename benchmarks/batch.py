"""Batch throughput: the Ray Data pipeline against a sequential LocalEngine loop over the same manifest.

Prints videos/hour of both (end to end: from nothing loaded to every MP4 written), their ratio, the
pipeline's render-phase throughput, the fraction of the warm window (first denoise start to last
denoise end) that the denoise actors spent running the backbone, and the mean denoise time per row
in each (on a small CPU box the pipeline's stages compete for the same cores).

    python benchmarks/batch.py [--preset tiny|small] [--rows 8] [--size 64x64] [--seconds 1] [--steps 4]
                               [--replicas 1] [--tp 1] [--cpus 4] [--threads N] [--compute-niceness N|none]
"""
from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from omnireel import storage
from omnireel.checkpoint import init_checkpoint
from omnireel.config import GenerationRequest
from omnireel.engine import LocalEngine
from omnireel.pipelines.render import BatchOptions, run_batch

PROMPTS = ["a red kite over a green hill", "a paper boat in the rain", "a fox in the snow",
           "waves on a beach at dusk", "a train crossing a bridge", "a candle in a dark room"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--size", default="64x64")
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray instance")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads everywhere")
    parser.add_argument("--compute-niceness", default="0",
                        help="nice value of the pool actors' compute threads, or 'none' (Ray's 15)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="omnireel-batch-bench-"))
    checkpoint = work / args.preset
    init_checkpoint(args.preset, checkpoint, seed=0)
    rows = [dict(id=f"row{i}", prompt=PROMPTS[i % len(PROMPTS)], seed=i, seconds=args.seconds, size=args.size,
                 fps=args.fps, steps=args.steps) for i in range(args.rows)]
    manifest = str(work / "manifest.parquet")
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    storage.write_bytes(manifest, buffer.getvalue())

    start = time.perf_counter()                       # sequential: load, then render and write each row
    engine = LocalEngine(checkpoint)
    loop_start = time.perf_counter()
    sequential_denoise = []
    for row in rows:
        result = engine.render(GenerationRequest(**{k: v for k, v in row.items() if k != "id"}))
        storage.write_bytes(str(work / "sequential" / f"{row['id']}.mp4"), result.artifact.data)
        sequential_denoise.append(result.timings["denoise"])
    sequential_s, loop_s = time.perf_counter() - start, time.perf_counter() - loop_start

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    start = time.perf_counter()                       # pipeline: validation, actor start-up, rendering, outputs
    summary = run_batch(manifest, str(work / "pipeline"), str(checkpoint),
                        BatchOptions(tp=args.tp, replicas=args.replicas, threads=args.threads,
                                     compute_niceness=None if args.compute_niceness == "none"
                                     else int(args.compute_niceness)))
    pipeline_s = time.perf_counter() - start
    ray.shutdown()
    assert summary.rendered == args.rows, summary
    pipeline_denoise = [r["denoise_seconds"] for r in pq.read_table(summary.results_uri).to_pylist()]

    per_hour = lambda seconds: 3600.0 * args.rows / seconds  # noqa: E731
    print(f"batch: {args.rows} rows, preset {args.preset}, {args.size}, {args.seconds:g} s at {args.fps} fps, "
          f"{args.steps} steps; tp={args.tp}, {args.replicas} denoise actor(s), {args.threads} torch threads, "
          f"Ray with {args.cpus} logical CPUs")
    print(f"sequential LocalEngine: {sequential_s:.1f} s end to end = {per_hour(sequential_s):.0f} videos/hour "
          f"(loop alone {loop_s:.1f} s = {per_hour(loop_s):.0f} videos/hour)")
    print(f"Ray Data pipeline:      {pipeline_s:.1f} s end to end = {per_hour(pipeline_s):.0f} videos/hour "
          f"(render phase {summary.render_seconds:.1f} s = {summary.videos_per_hour:.0f} videos/hour)")
    print(f"ratio pipeline / sequential (end to end): {sequential_s / pipeline_s:.2f}x")
    print(f"denoise busy once warm: {summary.denoise_busy:.2f} of the window; denoise per row: "
          f"{sum(pipeline_denoise) / len(pipeline_denoise):.2f} s in the pipeline, "
          f"{sum(sequential_denoise) / len(sequential_denoise):.2f} s in LocalEngine")


if __name__ == "__main__":
    main()
