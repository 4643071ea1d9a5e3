"""Batch throughput: the Ray Data pipeline with batching off and on, against a sequential LocalEngine
loop over the same manifest; with --validate-only, the driver's peak memory over two manifest lengths.

Prints jobs/minute and videos/hour of each (end to end: from nothing loaded to every MP4 written;
and the pipeline's render phase), the ratio batching on / off and pipeline / sequential, the fraction
of the warm window (first denoise start to last denoise end) that the denoise actors spent running
the backbone, the rows a denoise actor held in its batch on average, the rows that shared a step
with a row of another denoise call (a denoise actor runs two calls at once), and the mean denoise
time per row in each (on a small CPU box the pipeline's stages compete for the same cores). Batching off is
max_batch_jobs 1 (one row per denoise call), on is --batch-jobs; the pipeline runs interleave off,
on, on, off (--repeats pairs) on one Ray, each into a fresh output, and each figure is over its runs.

    python benchmarks/batch.py [--preset tiny|small] [--rows 8] [--size 64x64] [--seconds 1] [--steps 4]
                               [--replicas 1] [--tp 1] [--batch-jobs 8] [--repeats 1] [--cpus 4]
                               [--threads N] [--compute-niceness N|none]

--tp, --replicas, --threads and --compute-niceness are `omnireel batch`'s own flags (BatchOptions'
fields: the same help, limits and one-line errors); --threads left out is this process's torch
threads, in the sequential loop and in every pool actor alike.
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
from omnireel.cli import OneLineParser
from omnireel.config import GenerationRequest
from omnireel.driver_args import add_flags
from omnireel.engine import LocalEngine
from omnireel.pipelines.render import BatchOptions, run_batch

BATCH_FLAGS = ("tp", "replicas", "threads", "compute_niceness")   # BatchOptions' fields, as `omnireel batch` flags
PROMPTS = ["a red kite over a green hill", "a paper boat in the rain", "a fox in the snow",
           "waves on a beach at dusk", "a train crossing a bridge", "a candle in a dark room"]


def main() -> None:
    parser = OneLineParser(description=__doc__.split("\n")[0],
                           epilog="Here --threads left out is this process's torch threads, in the sequential "
                                  "loop and every pool actor alike.")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--size", default="64x64")
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    add_flags(parser, BatchOptions, BATCH_FLAGS, defaults=True)
    parser.add_argument("--batch-jobs", type=int, default=8, help="max_batch_jobs of the batching-on runs")
    parser.add_argument("--repeats", type=int, default=1, help="(off, on, on, off) sequences to run")
    parser.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray instance")
    parser.add_argument("--validate-only", action="store_true",
                        help="print the driver's peak RSS triaging --rows and --compare rows, rendering nothing")
    parser.add_argument("--compare", type=int, help="with --validate-only: the shorter manifest (default rows / 10)")
    parser.add_argument("--driver", nargs=2, metavar=("MANIFEST", "CHECKPOINT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch_jobs < 2:
        parser.error(f"--batch-jobs: must be >= 2 (got {args.batch_jobs}): the batching-on runs hold more "
                     "than one row per denoise call")
    args.threads = args.threads or torch.get_num_threads()           # the same threads in every driver
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
    runs: dict[int, list[tuple[float, object]]] = {1: [], args.batch_jobs: []}   # max_batch_jobs -> (s, summary)
    for k, max_batch_jobs in enumerate([1, args.batch_jobs, args.batch_jobs, 1] * args.repeats):
        start = time.perf_counter()                   # pipeline: validation, actor start-up, rendering, outputs
        summary = run_batch(manifest, str(work / f"pipeline-{k}"), str(checkpoint),
                            BatchOptions(**{name: getattr(args, name) for name in BATCH_FLAGS},
                                         max_batch_jobs=max_batch_jobs))
        runs[max_batch_jobs].append((time.perf_counter() - start, summary))
        assert summary.rendered == args.rows, summary
    ray.shutdown()

    rendered = args.rows * len(runs[1])                # rows per setting, over its runs
    per_hour = lambda rows, seconds: 3600.0 * rows / seconds  # noqa: E731
    print(f"batch: {args.rows} rows, preset {args.preset}, {args.size}, {args.seconds:g} s at {args.fps} fps, "
          f"{args.steps} steps; tp={args.tp}, {args.replicas} denoise actor(s), {args.threads} torch threads, "
          f"Ray with {args.cpus} logical CPUs; {len(runs[1])} pipeline runs per setting, interleaved")
    print(f"sequential LocalEngine:         {sequential_s:.1f} s end to end = {60 * args.rows / sequential_s:.1f} "
          f"jobs/minute = {per_hour(args.rows, sequential_s):.0f} videos/hour (loop alone {loop_s:.1f} s = "
          f"{per_hour(args.rows, loop_s):.0f} videos/hour)")
    figures = {}
    for max_batch_jobs, label in ((1, "off"), (args.batch_jobs, "on ")):
        total = sum(seconds for seconds, _ in runs[max_batch_jobs])
        render = sum(summary.render_seconds for _, summary in runs[max_batch_jobs])
        summaries = [summary for _, summary in runs[max_batch_jobs]]
        denoise = [r["denoise_seconds"] for summary in summaries
                   for r in pq.read_table(summary.results_uri).to_pylist()]
        figures[max_batch_jobs] = (total, render)
        print(f"pipeline, batching {label} (max_batch_jobs {max_batch_jobs}): {total / len(summaries):.1f} s end to "
              f"end = {60 * rendered / total:.1f} jobs/minute = {per_hour(rendered, total):.0f} videos/hour; render "
              f"phase {render / len(summaries):.1f} s = {60 * rendered / render:.1f} jobs/minute = "
              f"{per_hour(rendered, render):.0f} videos/hour; denoise busy "
              f"{sum(s.denoise_busy for s in summaries) / len(summaries):.2f} of the window, "
              f"{sum(s.denoise_rows_in_flight for s in summaries) / len(summaries):.2f} rows in flight, "
              f"{sum(s.denoise_rows_joined for s in summaries)} rows joined another call's batch, "
              f"denoise per row {sum(denoise) / len(denoise):.2f} s")
    (off_total, off_render), (on_total, on_render) = figures[1], figures[args.batch_jobs]
    print(f"ratio batching on / off: {off_total / on_total:.2f}x end to end, {off_render / on_render:.2f}x render "
          f"phase (jobs/minute)")
    print(f"ratio pipeline (batching on) / sequential (end to end): "
          f"{sequential_s / (on_total / len(runs[1])):.2f}x; denoise per row in LocalEngine: "
          f"{sum(sequential_denoise) / len(sequential_denoise):.2f} s")


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
