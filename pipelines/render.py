"""The Ray Data batch pipeline: a Parquet manifest -> one artifact (MP4) + sidecar per valid row.

    triage.py: read (numbered) -> validate -> duplicate ids      (Ray Data tasks on blocks; materialized)
               (-> storyboard: an actor pool, one vLLM engine each, for rows asking for an LLM storyboard)
      -> settled rows (refused, done)                            -> driver: errors / results files
      -> rows to render, one per artifact key (its other rows ride along as `members`), in one-row blocks
        -> encode pool   (actors: the stages before denoise)
        -> denoise pool  (a fixed number of actors, each taking DENOISE_CALLS_PER_ACTOR calls at once;
                          each runs the backbone at tp=1, else drives a BackboneGroup in its own
                          placement group)
        -> decode pool   (actors: the stages after denoise, then the artifact and its sidecar, each atomic)
        -> driver: results.parquet (from the sidecars), errors.parquet, metrics, the Pushgateway

The driver never holds the manifest: it streams blocks out of Ray Data into the two Parquet files
(pyarrow ParquetWriters, FLUSH_ROWS rows at a time), so its memory does not grow with the manifest
(`benchmarks/batch.py --validate-only` prints its peak RSS at two manifest lengths).

The pools are STAGE_GRAPH cut by each stage's `pool`; each runs its stages with run_graph, and rows
cross pools through the one converter in rows.py. A row failing in a stage leaves with `stage` and
`message` set and the rest go on. Artifacts use the layout shared with online jobs
(storage.artifact_uri / sidecar_uri of config.request_key). A row is done iff its artifact and its
sidecar exist, so a rerun skips done rows and a killed run completes on rerun.

Run standalone (a RayJob's entrypoint): `python -m omnireel.pipelines.render MANIFEST --out URI ...`
takes the same arguments as `omnireel batch`; it connects to $RAY_ADDRESS or starts a local Ray.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import threading
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from omnireel import metrics, storage
from omnireel.checkpoint import default_checkpoint, read_config, read_digest
from omnireel.compute import ComputeThread
from omnireel.canonical import canonical_json
from omnireel.config import GenerationRequest
from omnireel.families import family_of
from omnireel.parallel.group import MAX_QUEUED_JOBS, BackboneGroup, DenoiseJob
from omnireel.parallel.inprocess import host_resources, open_backbone
from omnireel.parallel.mesh import MeshShape
from omnireel.parallel.mesh_denoiser import check_family_mesh
from omnireel.plan import plan_request
from omnireel.scheduler import DEFAULT_MAX_BATCH_JOBS, DEFAULT_MAX_BATCH_TOKENS
from omnireel.stages import STAGE_GRAPH, Stage, StageTimings, close_components, load_components, run_graph, run_stage
from omnireel.storyboard import llm_unavailable, planner_model
from omnireel.voices import default_voice_prefix

from . import rows, triage
from .args import BatchOptions
from .manifest import ManifestError
from .rows import one_line
from .triage import check_manifest

DRIVER = "batch"                                    # the `driver` label of stage metrics
LATENTS_EXTENSION = "latents.safetensors"
STORAGE_ENV_PREFIXES = ("AWS_", "FSSPEC_", "GOOGLE_", "GCSFS_")
PUSH_JOB = "omnireel_batch"


def check_mesh_fits(checkpoint: str, config, mesh: MeshShape) -> None:
    """The mesh's limits for this checkpoint's family (heads divisible, sp/cfg implemented), before any
    actor starts: ValueError naming the flag."""
    check_family_mesh(family_of(checkpoint).name, config, mesh)


@dataclass(frozen=True)
class BatchSummary:
    rows: int                 # manifest rows read
    rendered: int             # rows whose artifact was rendered by this run
    skipped: int              # rows already done before this run
    failed: int               # rows that failed at run time (errors.parquet names the stage)
    invalid: int              # rows refused by validation (errors.parquet names the field)
    pending: int              # with validate_only: rows valid and not done (a run would render them)
    videos: int               # artifacts rendered by this run (rows with equal requests share one)
    render_seconds: float     # wall time of the render phase
    denoise_busy: float       # fraction of the warm window the denoise actors were running the backbone
    denoise_rows_in_flight: float   # rows a denoise actor held in its batch on average while busy
    denoise_rows_joined: int  # rows that shared a denoising step with a row of another denoise call
    results_uri: str
    errors_uri: str

    @property
    def videos_per_hour(self) -> float:
        return 3600.0 * self.videos / self.render_seconds if self.render_seconds > 0 else 0.0

    def totals(self) -> dict[str, float]:
        """What the driver pushes to the Pushgateway (as omnireel_batch_<name>)."""
        return {"manifest_rows": self.rows, "rows_rendered": self.rendered, "rows_skipped": self.skipped,
                "rows_failed": self.failed, "rows_invalid": self.invalid, "videos_per_hour": self.videos_per_hour,
                "render_seconds": self.render_seconds, "denoise_busy_ratio": self.denoise_busy}


# ---- the stage graph, cut into pools ---------------------------------------------------------

def graph_pools(graph: tuple[Stage, ...] = STAGE_GRAPH) -> dict[str, tuple[Stage, ...]]:
    """STAGE_GRAPH cut into its stages' `pool`s, in graph order (encode, denoise, decode)."""
    pools: dict[str, tuple[Stage, ...]] = {}
    for stage in graph:
        pools[stage.pool] = (*pools.get(stage.pool, ()), stage)
    return pools


POOLS = graph_pools()


def carried(pool: str | None) -> tuple[str, ...]:
    """Payload columns leaving `pool` (None: entering the first): made there or before, used after."""
    names = list(POOLS)
    k = names.index(pool) if pool else -1
    made = {stage.output for p in names[:k + 1] for stage in POOLS[p]}
    used = {name for p in names[k + 1:] for stage in POOLS[p] for name in stage.inputs}
    return tuple(sorted(made & used))


class StopRow(Exception):
    """A row's stage failed: the row leaves the pool with the stage's name and message."""


# ---- the pools (Ray Data actors: pyarrow batch of rows in, pyarrow batch out) --------------------

class StagePool:
    """Runs one pool's stages, in graph order, for each row of a batch; timings and errors per row.
    Loading and every batch run on the actor's compute thread (compute.py), as in a Serve replica."""

    pool = ""

    def __init__(self, checkpoint: str, threads: int | None = None, voices: str | None = None,
                 niceness: int | None = None, dtype: str | None = None):
        self.compute = ComputeThread(threads, niceness)
        self.checkpoint, self.voices, self.dtype = checkpoint, voices, dtype
        self.config = read_config(checkpoint)
        self.stages = POOLS[self.pool]
        names = list(POOLS)
        self.needs = carried(names[names.index(self.pool) - 1] if self.pool != names[0] else None)
        self.gives = carried(self.pool)
        self.components = self.compute.run(self.load, {stage.component for stage in self.stages} - {None})

    def load(self, names: set[str]) -> dict:
        return load_components(self.checkpoint, names, "cuda" if ray.get_gpu_ids() else "cpu", voices=self.voices,
                               dtype=self.dtype)

    def __del__(self):
        close_components(getattr(self, "components", {}))
        if hasattr(self, "compute"):
            self.compute.shutdown()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.compute.run(lambda: rows.to_table([self.run_row(row) for row in rows.from_table(batch)],
                                                      self.gives))

    def run_row(self, row: dict) -> dict:
        if row["stage"]:                                  # failed upstream: passes through
            return row
        request = GenerationRequest.model_validate_json(row["request"])
        values = {"request": request, "plan": plan_request(request, self.config), **rows.from_row(row, self.needs)}
        timings = StageTimings(DRIVER)
        failed: dict = {}

        def call(stage, inputs):
            started = time.time()
            try:
                output = self.call(stage, dict(zip(stage.inputs, inputs)), row)
            except Exception as exc:
                failed.update(stage=stage.name, message=one_line(exc))
                raise StopRow from None
            if stage.on_backbone:
                row.update(denoise_start=started, denoise_end=time.time())
            return output

        row = dict(row)
        try:
            run_graph(self.stages, values, call, hooks=[timings])
        except StopRow:
            return {**row, **failed}
        return self.finish({**row, "timings": json.dumps({**json.loads(row["timings"]), **timings.seconds})}, values)

    def call(self, stage: Stage, values: dict, row: dict):
        """`stage` over `values`; a pool may add fields of its own to the `row` being run."""
        return run_stage(stage, self.components, values)

    def finish(self, row: dict, values: dict) -> dict:
        return rows.to_row(row, {name: values[name] for name in self.gives})


class EncodePool(StagePool):
    """The stages before denoise: encode_text, encode_voice, encode_media."""

    pool = "encode"


class BusyClock:
    """Seconds during which at least one row was denoising on this actor: calls in flight at once
    overlap, and their time counts once."""

    def __init__(self):
        self._lock = threading.Lock()
        self._rows = 0                 # rows denoising now
        self._since = 0.0              # when _rows last went from 0 to 1
        self._seconds = 0.0            # busy seconds not yet taken, up to _since or the last idle

    @contextlib.contextmanager
    def row(self):
        """Counts the actor busy while the block runs."""
        with self._lock:
            if self._rows == 0:
                self._since = time.time()
            self._rows += 1
        try:
            yield
        finally:
            with self._lock:
                self._rows -= 1
                if self._rows == 0:
                    self._seconds += time.time() - self._since

    def take(self) -> float:
        """The busy seconds since the last take (a running stretch up to now)."""
        with self._lock:
            now = time.time()
            seconds = self._seconds + (now - self._since if self._rows else 0.0)
            self._seconds, self._since = 0.0, now
            return seconds


class DenoisePool(StagePool):
    """The denoise stage on this actor's backbone host (parallel/inprocess.py `open_backbone`): at
    tp=1 the actor runs the backbone itself (the host's DenoiseScheduler, stepped on the actor's
    compute thread); above, a BackboneGroup whose ranks are child actors captured into the actor's
    placement group (its rank-0 scheduler). The pool calls the host's one API either way.

    A call's rows (up to max_batch_jobs: the pool's batch_size) are denoised together: each row runs
    on a thread of its own and submits its job, which joins the running batch at the next step
    boundary. Ray Data sends an actor DENOISE_CALLS_PER_ACTOR calls at once, so the next call's rows
    join a running batch as the first call's rows finish; the scheduler holds at most max_batch_jobs
    of them in its batch, the others wait in its queue. A row that fails leaves with its error; the
    others go on. Each row records `denoise_callers`, the most calls whose rows shared one of its
    steps (2: a row of another call joined its batch)."""

    pool = "denoise"

    def __init__(self, checkpoint: str, threads: int | None = None, mesh: MeshShape = MeshShape(),
                 cpus_per_rank: float = 1, niceness: int | None = None, dtype: str | None = None,
                 max_batch_jobs: int = DEFAULT_MAX_BATCH_JOBS, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS):
        super().__init__(checkpoint, threads, niceness=niceness, dtype=dtype)
        self.host = self.compute.run(open_backbone, checkpoint, mesh.tp, ray.util.get_current_placement_group(),
                                     cpus_per_rank=cpus_per_rank, threads=threads, dtype=dtype, niceness=niceness,
                                     mesh=mesh, max_batch_jobs=max_batch_jobs, max_batch_tokens=max_batch_tokens,
                                     compute=self.compute, driver=DRIVER)
        self.busy = BusyClock()
        self.calls = itertools.count()         # labels this actor's calls (the scheduler's `caller`)

    def load(self, names):
        return {}                         # the backbone lives on the host

    def __del__(self):
        host = getattr(self, "host", None)
        if host is not None:
            host.shutdown()
        super().__del__()

    def __call__(self, batch: pa.Table) -> pa.Table:
        todo = rows.from_table(batch)
        caller = next(self.calls)
        with ThreadPoolExecutor(max_workers=len(todo), thread_name_prefix="denoise-row") as threads:
            done = list(threads.map(lambda row: self.run_row({**row, "denoise_call": caller}), todo))
        denoised = [row for row in done if row["denoise_end"] > 0]
        if denoised:                         # the rows share the actor's busy time since the last call ended
            busy = self.busy.take()
            done = [{**row, "denoise_busy": busy / len(denoised)} if row["denoise_end"] > 0 else row
                    for row in done]
        self.rebuild_if_broken()             # a rank died: its rows failed; the next call gets fresh ranks
        return rows.to_table(done, self.gives)

    def call(self, stage, values, row):
        """Submits the row's job to the host, labelled with its call (row["denoise_call"]), and waits
        for it; sets row["denoise_callers"]."""
        inputs = [values[name] for name in stage.inputs]        # the stage's contract
        self.rebuild_if_broken()
        with self.busy.row():
            job = self.host.submit(DenoiseJob(*inputs, caller=row["denoise_call"]))
            latents = job.result()                # a RankFailure fails the row (the group is rebuilt)
        row["denoise_callers"] = job.peak_callers
        metrics.record("omnireel_denoise_steps", values["plan"].steps, driver=DRIVER)
        return latents

    def rebuild_if_broken(self) -> None:
        """A fresh set of ranks after a RankFailure, decided on the compute thread, one call at a time:
        the first call there rebuilds, the others find the group running (a broken group's ranks are
        gone, so no other call's rows run on them)."""
        if self.host.broken:
            self.compute.run(lambda: self.host.broken and self.host.rebuild())


class DecodePool(StagePool):
    """decode_video, decode_audio, mux; then the artifact, (the latents,) and last the sidecar record."""

    pool = "decode"

    def __init__(self, checkpoint: str, threads: int | None = None, out: str = "", save_latents: bool = False,
                 niceness: int | None = None, dtype: str | None = None):
        super().__init__(checkpoint, threads, niceness=niceness, dtype=dtype)
        self.out, self.save_latents = out, save_latents
        self.digest = read_digest(checkpoint)

    def finish(self, row, values):
        start = time.perf_counter()
        plan, artifact, key = values["plan"], values["artifact"], row["key"]
        try:
            if self.save_latents:
                storage.write_bytes(storage.artifact_uri(self.out, key, LATENTS_EXTENSION),
                                    rows.encode_payload(values["latents"]))
            timings = {**json.loads(row["timings"]), "write": time.perf_counter() - start}
            record = storage.write_artifact(
                self.out, key, plan.artifact_extension, artifact.data,
                {"media_type": artifact.media_type, "request": json.loads(row["request"]),
                 "checkpoint": self.digest, "steps": plan.steps, "frames": plan.num_frames, "timings": timings})
        except Exception as exc:
            return {**row, "stage": "write", "message": one_line(exc)}
        return {**row, "timings": json.dumps(timings), "record": canonical_json(record).decode()}


POOL_ACTORS = {"encode": EncodePool, "denoise": DenoisePool, "decode": DecodePool}


@dataclass(frozen=True)
class DenoisePlacement:
    """The denoise pool's ray_remote_args_fn (called once per actor, as ray.data.llm does for TP): a fresh
    STRICT_PACK placement group of one bundle per rank, with child-task capture so the actor's
    BackboneGroup ranks land in it. Named `<tag>-…` so the driver removes them after the run."""
    tag: str
    bundles: tuple

    def __call__(self) -> dict:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        pg = placement_group([dict(b) for b in self.bundles], strategy="STRICT_PACK",
                             name=f"{self.tag}-{uuid.uuid4().hex[:8]}")
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_capture_child_tasks=True)}


def remove_placement_groups(tag: str) -> None:
    from ray.util import get_placement_group, placement_group_table, remove_placement_group
    for info in placement_group_table().values():
        if info["name"].startswith(tag) and info["state"] != "REMOVED":
            remove_placement_group(get_placement_group(info["name"]))


# ---- the render pipeline ----------------------------------------------------------------------

POOL_ROWS = 1       # rows per encode/decode call and per block entering a pool: those stages run a row at a time
                    # (the denoise pool takes up to max_batch_jobs rows per call and denoises them together)
DENOISE_CALLS_PER_ACTOR = 2   # denoise calls an actor runs at once: the next call's rows join the running batch


def denoise_calls_per_actor(options: BatchOptions) -> int:
    """DENOISE_CALLS_PER_ACTOR, or 1 where that many calls' rows would overflow a group's job limit
    (MAX_QUEUED_JOBS: every row of a call is in flight on the group)."""
    if options.mesh.ranks > 1 and DENOISE_CALLS_PER_ACTOR * options.max_batch_jobs > MAX_QUEUED_JOBS:
        return 1
    return DENOISE_CALLS_PER_ACTOR


def render(todo: ray.data.Dataset, checkpoint: str, out: str, options: BatchOptions, tag: str) -> Iterator[dict]:
    """Streams the rows to render (triage.leaders) through the three pools; yields each row as it
    leaves the decode pool. They enter the pools in blocks of POOL_ROWS rows, so a call ends with
    its rows (the next pool starts on them at once) and rows spread over a pool's actors; a denoise
    call takes up to max_batch_jobs rows (what Ray Data has ready) and denoises them as one batch,
    and a denoise actor runs denoise_calls_per_actor calls at once (threads: the UDF runs concurrently),
    so one call's rows join the batch of another's still running."""
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    ds = todo.repartition(target_num_rows_per_block=POOL_ROWS)           # streaming: splits blocks, no shuffle
    common = dict(batch_format="pyarrow", zero_copy_batch=True)
    for pool, actors, rows_per_call, kwargs, resources in (
            ("encode", ray.data.ActorPoolStrategy(size=options.encoders), POOL_ROWS,
             {"voices": options.voices_uri or default_voice_prefix()}, pool_resources("encode", use_gpu)),
            ("denoise", ray.data.ActorPoolStrategy(size=options.replicas, enable_true_multi_threading=True,
                                                   max_concurrent_calls_per_actor=denoise_calls_per_actor(options)),
             options.max_batch_jobs,
             {"mesh": options.mesh, "cpus_per_rank": options.cpus_per_rank,
              "max_batch_jobs": options.max_batch_jobs, "max_batch_tokens": options.max_batch_tokens},
             denoise_resources(options, use_gpu, tag)),
            ("decode", ray.data.ActorPoolStrategy(size=options.decoders), POOL_ROWS,
             {"out": out, "save_latents": options.save_latents}, pool_resources("decode", use_gpu))):
        with warnings.catch_warnings():   # deprecated in Ray 2.60, still how ray.data.llm places TP engines
            warnings.filterwarnings("ignore", message=".*ray_remote_args_fn.*deprecated")
            ds = ds.map_batches(POOL_ACTORS[pool], compute=actors,
                                fn_constructor_kwargs={"checkpoint": checkpoint, "threads": options.threads,
                                                       "niceness": options.compute_niceness,
                                                       "dtype": options.dtype, **kwargs},
                                batch_size=rows_per_call, **common, **resources)
        if rows_per_call > POOL_ROWS:     # a batch's rows leave as one block: split it for the next pool's actors
            ds = ds.repartition(target_num_rows_per_block=POOL_ROWS)
    for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield from rows.from_table(block)


def denoise_resources(options: BatchOptions, use_gpu: bool, tag: str) -> dict:
    """A denoise actor's resources: with one rank the actor is the rank (parallel/inprocess.py); above,
    it takes nothing itself and gets a placement group of one bundle per mesh rank."""
    ranks = options.mesh.ranks
    if ranks == 1:
        return host_resources(1, use_gpu, options.cpus_per_rank, host_cpus=0)
    bundles = tuple(BackboneGroup.bundles(ranks, use_gpu, options.cpus_per_rank))
    return {"num_cpus": 0, "num_gpus": 0, "ray_remote_args_fn": DenoisePlacement(tag, bundles)}


def pool_resources(pool: str, use_gpu: bool) -> dict:
    """An actor's resources from its stages' declared resources (a GPU only where the cluster has one)."""
    stages = POOLS[pool]
    return {"num_cpus": max(stage.resources.get("CPU", 0) for stage in stages) or 1,
            "num_gpus": 1 if use_gpu and any(stage.resources.get("GPU") for stage in stages) else 0}


@dataclass
class DenoiseWindow:
    """The denoise actors' busy fraction, from rendered rows as they come: backbone time (each row's
    share of its denoise call's span) over the warm window (first denoise start to last end), per actor."""
    start: float = math.inf
    end: float = 0.0
    busy: float = 0.0
    in_flight: float = 0.0    # the rows' own denoise seconds, summed
    joined: int = 0           # rows that shared a step with a row of another denoise call

    def add(self, row: dict) -> None:
        if row["denoise_end"] > 0:
            self.start, self.end = min(self.start, row["denoise_start"]), max(self.end, row["denoise_end"])
            self.busy += row["denoise_busy"]
            self.in_flight += row["denoise_end"] - row["denoise_start"]
            self.joined += row["denoise_callers"] > 1

    def rows_in_flight(self) -> float:
        """Rows an actor had in its batch on average while busy (1: one at a time)."""
        return self.in_flight / self.busy if self.busy > 0 else 0.0

    def fraction(self, replicas: int) -> float:
        if self.end == 0:               # no row reached the backbone
            return 0.0
        window = self.end - self.start
        return self.busy / (replicas * window) if window > 0 else 1.0


# ---- outputs ----------------------------------------------------------------------------------

RESULT_SCHEMA = pa.schema([
    ("id", pa.string()), ("row", pa.int64()), ("key", pa.string()), ("uri", pa.string()),
    ("seconds", pa.float64()), ("size", pa.string()), ("fps", pa.int64()), ("seed", pa.int64()),
    ("steps", pa.int64()), ("frames", pa.int64()), ("bytes", pa.int64()),
    *((f"{name}_seconds", pa.float64()) for name in [*(stage.name for stage in STAGE_GRAPH), "write"]),
])
ERROR_SCHEMA = pa.schema([("id", pa.string()), ("row", pa.int64()), ("stage", pa.string()),
                          ("field", pa.string()), ("message", pa.string())])


def result_row(row: dict, record: dict) -> dict:
    request = record["request"]
    timings = {f"{name}_seconds": seconds for name, seconds in record.get("timings", {}).items()}
    return {"id": row["id"], "row": row["row"], "key": row["key"], "uri": record["uri"],
            "seconds": request["seconds"], "size": request["size"], "fps": request["fps"], "seed": request["seed"],
            "steps": record["steps"], "frames": record["frames"], "bytes": record["bytes"], **timings}


FLUSH_ROWS = 4096    # rows an output file holds in the driver before it writes them (one row group)


@contextlib.contextmanager
def parquet_rows(uri: str, schema: pa.Schema):
    """Yields add(row): rows go into a Parquet file at `uri` FLUSH_ROWS at a time, through a
    ParquetWriter on storage.open_write, committed whole when the block ends (never half a file)."""
    held: list[dict] = []
    with storage.open_write(uri) as f:
        writer = pq.ParquetWriter(f, schema)

        def flush() -> None:
            writer.write_table(pa.Table.from_pylist([{name: r.get(name) for name in schema.names} for r in held],
                                                    schema=schema))
            held.clear()

        def add(row: dict) -> None:
            held.append(row)
            if len(held) >= FLUSH_ROWS:
                flush()

        yield add
        if held:
            flush()
        writer.close()


# ---- the driver -------------------------------------------------------------------------------

def run_batch(manifest: str, out: str, checkpoint: str | None = None, options: BatchOptions | None = None,
              progress: Callable[[int, int], None] | None = None) -> BatchSummary:
    """Renders every valid, not yet done row of `manifest` under `out` (with options.validate_only,
    none: the rows are only triaged); writes results.parquet and errors.parquet there, streaming;
    returns the counts. Ray must be initialized, with workers that reach the manifest and `out`
    (`connect` hands them the driver's storage environment)."""
    options = options or BatchOptions()
    checkpoint = str(checkpoint or options.checkpoint or default_checkpoint())
    config, digest = read_config(checkpoint), read_digest(checkpoint)
    check_mesh_fits(checkpoint, config, options.mesh)

    check_manifest(manifest)
    storyboard_model = planner_model(options.storyboard_model)     # None where it cannot run: llm rows refused
    triaged = triage.triaged(manifest, out, config, digest, options.limit,
                             None if llm_unavailable(storyboard_model) else storyboard_model, options.planners)
    total = triaged.count()                                   # from the blocks' metadata
    counts = dict.fromkeys(("rendered", "skipped", "failed", "invalid"), 0)
    window, videos = DenoiseWindow(), 0
    results_uri, errors_uri = storage.join(out, "results.parquet"), storage.join(out, "errors.parquet")
    tag = f"omnireel-batch-{uuid.uuid4().hex[:8]}"
    with parquet_rows(results_uri, RESULT_SCHEMA) as results, parquet_rows(errors_uri, ERROR_SCHEMA) as errors:
        def settle(outcome: str, row: dict) -> None:
            counts[outcome] += 1
            if row["record"]:
                results(result_row(row, json.loads(row["record"])))
            else:
                errors(row)

        for block in triage.settled(triaged).iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in rows.from_table(block):
                settle("invalid" if row["stage"] else "skipped", row)
        todo = total - counts["invalid"] - counts["skipped"]
        start = time.perf_counter()
        if todo and not options.validate_only:
            try:
                for row in render(triage.leaders(triaged), checkpoint, out, options, tag):
                    outcome = "failed" if row["stage"] else "rendered"
                    metrics.record("omnireel_batch_rows", outcome=outcome)
                    window.add(row)
                    videos += outcome == "rendered"
                    for shared in (row, *({**row, **member} for member in row["members"])):
                        settle(outcome, shared)                   # rows of one key share its outcome
                    if progress is not None:
                        progress(counts["rendered"] + counts["failed"], todo)
            finally:
                remove_placement_groups(tag)
        render_seconds = time.perf_counter() - start
    for outcome_name in ("skipped", "invalid"):
        if counts[outcome_name]:
            metrics.record("omnireel_batch_rows", counts[outcome_name], outcome=outcome_name)

    summary = BatchSummary(rows=total, **counts, pending=todo if options.validate_only else 0, videos=videos,
                           render_seconds=render_seconds, denoise_busy=window.fraction(options.replicas),
                           denoise_rows_in_flight=window.rows_in_flight(), denoise_rows_joined=window.joined,
                           results_uri=results_uri, errors_uri=errors_uri)
    metrics.record("omnireel_batch_videos_per_hour", summary.videos_per_hour)
    metrics.record("omnireel_batch_denoise_busy_ratio", summary.denoise_busy)
    if options.pushgateway:
        metrics.push_totals(options.pushgateway, PUSH_JOB, summary.totals(), grouping={"output": out})
    return summary


# ---- command line -----------------------------------------------------------------------------

def storage_environment() -> dict[str, str]:
    """The driver's object-store settings (endpoint, credentials, e.g. AWS_ENDPOINT_URL)."""
    return {k: v for k, v in os.environ.items() if k.startswith(STORAGE_ENV_PREFIXES)}


def connect() -> None:
    """Ray for a standalone driver: the cluster at $RAY_ADDRESS if set, else a fresh local one. The
    driver's storage environment becomes the job's, so every task and actor (Ray Data's own listing
    tasks included) reaches the same object store."""
    if not ray.is_initialized():
        env = storage_environment()
        local = {} if os.environ.get("RAY_ADDRESS") else {"include_dashboard": False}
        ray.init(logging_level="WARNING", log_to_driver=False,
                 runtime_env={"env_vars": env} if env else None, **local)


def command(args) -> None:
    """`omnireel batch` (and this module run as a script): a progress bar, then one summary line."""
    from tqdm import tqdm

    from omnireel.cli import fail, flag_values

    options = flag_values(args, BatchOptions)
    ranks = options.mesh.ranks
    if ranks > 1 and options.max_batch_jobs > MAX_QUEUED_JOBS:     # every row of a denoise call is in flight on the group
        fail(f"--max-batch-jobs: at most {MAX_QUEUED_JOBS} when a denoise actor has {ranks} ranks "
             f"(got {options.max_batch_jobs})")
    try:
        checkpoint = str(options.checkpoint or default_checkpoint())
        config = read_config(checkpoint)
    except (FileNotFoundError, ValueError) as e:
        fail(f"--checkpoint: {e}", code=1)
    try:
        check_mesh_fits(checkpoint, config, options.mesh)
    except ValueError as e:                   # the mesh's messages name their flag; the family's TP check's not
        fail(str(e) if str(e).startswith("--") else f"--tp: {e}")
    try:
        check_manifest(args.manifest)
    except ManifestError as e:
        fail(str(e))
    connect()
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    with tqdm(desc="rendering", unit="row", disable=args.quiet or options.validate_only) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)
        summary = run_batch(args.manifest, args.out, checkpoint, options, progress)
    if not args.quiet and options.validate_only:
        print(f"{summary.pending} to render, {summary.skipped} already done, {summary.invalid} invalid of "
              f"{summary.rows} rows; errors: {summary.errors_uri}")
    elif not args.quiet:
        print(f"{summary.rendered} rendered, {summary.skipped} already done, {summary.failed} failed, "
              f"{summary.invalid} invalid of {summary.rows} rows; {summary.videos_per_hour:.0f} videos/hour; "
              f"results: {summary.results_uri}; errors: {summary.errors_uri}")


if __name__ == "__main__":
    import sys

    from omnireel.cli import main
    main(["batch", *sys.argv[1:]])
