"""Batch throughput: the Ray Data pipeline against a sequential LocalEngine loop over the same manifest;
with --validate-only, the driver's peak memory over two manifest lengths.

Prints videos/hour of both (end to end: from nothing loaded to every MP4 written), their ratio, the
pipeline's render-phase throughput, the fraction of the warm window (first denoise start to last
denoise end) that the denoise actors spent running the backbone, and the mean denoise time per row
in each (on a small CPU box the pipeline's stages compete for the same cores).

    python benchmarks/batch.py [--preset tiny|small] [--rows 8] [--size 64x64] [--seconds 1] [--steps 4]
                               [--replicas 1] [--tp 1] [--cpus 4] [--threads N] [--compute-niceness N|none]
    python benchmarks/batch.py --validate-only --rows 100000 [--compare 10000] [--cpus 4]

--validate-only triages a generated manifest of tiny rows (a tenth too narrow, a tenth repeating an
id, the rest valid) with run_batch(validate_only=True), each length in a fresh driver process, and
prints each driver's peak RSS (ru_maxrss: imports and Ray included) and its growth over the RSS it
had just before run_batch, side by side: the goal is the same figure at both lengths (within 10 %).
"""
from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
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
    parser.add_argument("--validate-only", action="store_true",
                        help="print the driver's peak RSS triaging --rows and --compare rows, rendering nothing")
    parser.add_argument("--compare", type=int, help="with --validate-only: the shorter manifest (default rows / 10)")
    parser.add_argument("--driver", nargs=2, metavar=("MANIFEST", "CHECKPOINT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.driver:
        return validate_driver(*args.driver, args.cpus)
    if args.validate_only:
        return validate_only(args)

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


def generated_manifest(uri: str, rows: int) -> None:
    """`rows` tiny rows: row i % 10 == 3 too narrow, == 5 repeats the id five rows up, the rest valid."""
    ids = [f"row{i - 5}" if i % 10 == 5 else f"row{i}" for i in range(rows)]
    table = pa.table({"id": ids, "prompt": [PROMPTS[i % len(PROMPTS)] for i in range(rows)],
                      "seed": list(range(rows)), "seconds": [0.5] * rows, "fps": [8] * rows, "steps": [2] * rows,
                      "size": ["30x32" if i % 10 == 3 else "32x32" for i in range(rows)]})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(uri, buffer.getvalue())


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024        # Linux: KiB


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20


def validate_driver(manifest: str, checkpoint: str, cpus: int) -> None:
    """One driver process: Ray, then run_batch(validate_only) over `manifest`; prints a JSON line."""
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    before = current_rss_mib()
    start = time.perf_counter()
    summary = run_batch(manifest, str(Path(manifest).parent / "out"), checkpoint, BatchOptions(validate_only=True))
    seconds = time.perf_counter() - start
    print(json.dumps({"rows": summary.rows, "invalid": summary.invalid, "pending": summary.pending,
                      "seconds": seconds, "before_mib": before, "peak_mib": peak_rss_mib()}))
    ray.shutdown()


def validate_only(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="omnireel-batch-validate-"))
    checkpoint = work / "tiny"
    init_checkpoint("tiny", checkpoint, seed=0)
    lengths = [args.compare or max(1, args.rows // 10), args.rows]
    figures = []
    for rows in lengths:
        manifest = work / f"rows-{rows}" / "manifest.parquet"
        generated_manifest(str(manifest), rows)
        proc = subprocess.run([sys.executable, __file__, "--driver", str(manifest), str(checkpoint),
                               "--cpus", str(args.cpus)], capture_output=True, text=True, check=True)
        figures.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"batch --validate-only: tiny rows (a tenth invalid, a tenth repeated ids), Ray with {args.cpus} "
          f"logical CPUs, one fresh driver process per manifest")
    print(f"{'rows':>9} {'invalid':>8} {'to render':>9} {'seconds':>8} {'driver RSS before':>17} "
          f"{'driver peak RSS':>15} {'growth':>8}")
    for f in figures:
        print(f"{f['rows']:>9} {f['invalid']:>8} {f['pending']:>9} {f['seconds']:>8.1f} {f['before_mib']:>13.0f} MiB "
              f"{f['peak_mib']:>11.0f} MiB {f['peak_mib'] - f['before_mib']:>4.0f} MiB")
    small, large = figures
    print(f"peak RSS {large['rows']} rows / {small['rows']} rows: {large['peak_mib'] / small['peak_mib']:.3f}")


if __name__ == "__main__":
    main()
