"""The manifest's rows, triaged as Ray Data stages on blocks: the driver never holds the manifest.

    ManifestSource   read tasks, one per Parquet row group, each row numbered in manifest order from
                     the footers' row counts (read on the driver: O(files + row groups), not rows)
      -> validate    tasks, VALIDATE_ROWS rows a call: manifest.check_row, the artifact key, the done check
                     (a row waiting for its LLM storyboard leaves valid but without a key)
      -> storyboard  only where rows may ask for one (a `storyboard` column) and a planner model is
                     configured: an actor pool (StoryboardPlanners), one vLLM engine per actor,
                     PLAN_ROWS rows a call; the waiting rows of a call are planned in one engine
                     call, then keyed and checked as validate does; the other rows pass untouched
      -> first ids   sort by id, then per block: a row after the first of its id is refused
                     ("id: duplicate of row N")
    = triaged rows (BASE rows, rows.py), materialized in the object store; then read twice:
      settled(triaged)  refused rows (-> errors file) and done rows (-> results file)
      leaders(triaged)  the rows to render, one per artifact key: sort by key, then per block the first
                        row of each key, carrying the others as `members`, which share its outcome

Why a sort and not a small actor holding every id seen: "the first row of an id" (or of a key) is a
global fact no block settles alone, and blocks arrive out of order, so an actor would need every row
before answering any, and would hold every id in one process (10 M ids: ~1.5 GB). A sort (Ray Data's
sort-based shuffle: tasks, no aggregator actors holding CPUs beside the model pools) puts every row
of an id in one block, which then decides alone (the way map_groups works, without its per-group
call: ~0.5 ms a group here); the rows stay on the workers, spilling to disk past the object store,
and the driver holds block references and a sample of the sort keys only.
"""
from __future__ import annotations

import functools

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data.block import BlockMetadata
from ray.data.context import ShuffleStrategy
from ray.data.datasource import Datasource, ReadTask

from omnireel import storage
from omnireel.canonical import canonical_json
from omnireel.config import GenerationRequest, normalized, request_key
from omnireel.plan import PlanError, artifact_extension, plan_request
from omnireel.storyboard import LLMShotPlanner, StoryboardError, StoryboardTask, needs_llm_plan, planned_shots

from . import rows
from .manifest import ManifestError, check_columns, check_row

READ_ROWS = 8192          # rows per block read from the manifest
VALIDATE_ROWS = 512       # rows per validation call
PLAN_ROWS = 64            # rows per planner-pool call (its waiting rows: one engine call)
PLANNER_CPUS = 2          # a CPU vLLM engine: its engine core keeps one core, its worker takes the rest. Not 1,
                          # the validate tasks' CPUs: with equal resources Ray Data fuses validate into the pool


def arrow_filesystem(uri: str):
    """(pyarrow filesystem, path) over storage.py's fsspec filesystem for `uri`."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem
    fs, path = storage.filesystem(uri)
    return PyFileSystem(FSSpecHandler(fs)), path


def manifest_dataset(manifest: str):
    """The manifest as a pyarrow dataset (footers only); ManifestError if it is not readable Parquet."""
    import pyarrow.dataset
    filesystem, path = arrow_filesystem(manifest)
    try:
        return pyarrow.dataset.dataset(path, filesystem=filesystem, format="parquet")
    except (OSError, pa.ArrowInvalid) as e:
        raise ManifestError(f"manifest: cannot read {manifest} as Parquet ({rows.one_line(e)})") from None


def check_manifest(manifest: str) -> None:
    """ManifestError unless `manifest` is readable Parquet with the manifest's columns."""
    check_columns(manifest_dataset(manifest).schema.names)


# ---- reading, numbered -------------------------------------------------------------------------

class ManifestSource(Datasource):
    """The manifest's rows with a `row` column: their position in the manifest (after --limit), from 0.
    Row numbers come from the Parquet footers, so every read task knows its first row alone."""

    def __init__(self, manifest: str, limit: int | None = None):
        super().__init__()
        self.manifest = manifest
        self.parts: list[tuple[str, int, int, int, int]] = []   # (file, row group, first row, rows, bytes)
        filesystem, _ = arrow_filesystem(manifest)
        first = 0
        for path in sorted(manifest_dataset(manifest).files):          # manifest order: path order
            with filesystem.open_input_file(path) as f:
                metadata = pq.ParquetFile(f).metadata
            for group in range(metadata.num_row_groups):
                n = metadata.row_group(group).num_rows
                if limit is not None:
                    n = min(n, limit - first)
                if n > 0:
                    self.parts.append((path, group, first, n, metadata.row_group(group).total_byte_size))
                first += n

    def estimate_inmemory_data_size(self) -> int:
        return sum(part[4] for part in self.parts)

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        return [ReadTask(functools.partial(read_part, self.manifest, path, group, first, n),
                         BlockMetadata(num_rows=n, size_bytes=size, exec_stats=None, input_files=[path]))
                for path, group, first, n, size in self.parts]


def read_part(manifest: str, path: str, group: int, first: int, n: int):
    """Blocks of one row group's first `n` rows, each with its `row` numbers."""
    filesystem, _ = arrow_filesystem(manifest)
    with filesystem.open_input_file(path) as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=READ_ROWS, row_groups=[group]):
            batch = batch.slice(0, n)
            if not batch.num_rows:
                return
            yield pa.Table.from_batches([batch]).append_column("row", pa.array(range(first, first + batch.num_rows),
                                                                                 pa.int64()))
            first, n = first + batch.num_rows, n - batch.num_rows


# ---- validation -------------------------------------------------------------------------------

def validate_batch(batch: pa.Table, config, digest: str, out: str, plan_llm: bool = False) -> pa.Table:
    """Numbered manifest rows -> BASE rows: refused (stage "validate", field, message), waiting for
    their LLM storyboard (with `plan_llm`: valid, no key yet), or keyed, with the sidecar record
    when the artifact is already done."""
    checked_rows = []
    for raw in batch.to_pylist():
        row = raw.pop("row")
        checked = check_row(raw, config, plan_llm)
        if checked.request is None:
            checked_rows.append({"row": row, "id": checked.id, "stage": "validate", "field": checked.field,
                                 "message": checked.message})
        elif plan_llm and needs_llm_plan(checked.request):
            checked_rows.append({"row": row, "id": checked.id,
                                 "request": canonical_json(normalized(checked.request)).decode()})
        else:
            checked_rows.append({"row": row, "id": checked.id, **keyed(checked.request, digest, out)})
    return rows.to_table(checked_rows)


def keyed(request: GenerationRequest, digest: str, out: str) -> dict:
    """A valid row's key, request and done record (see done_record)."""
    key = request_key(request, digest)
    return {"key": key, "request": canonical_json(normalized(request)).decode(),
            "record": done_record(out, key, artifact_extension(request.output, request.mode))}


def waiting_for_storyboard(row: dict) -> bool:
    """A valid row without a key: validate_batch left it for the planner pool."""
    return not row["stage"] and not row["key"]


class StoryboardPlanners:
    """The planner pool's actor: ONE LLMShotPlanner (one vLLM engine, stopped with the actor). Each
    call plans its waiting rows in one engine call and keys them; a row the planner refuses, or
    whose planned shots the checkpoint cannot render, leaves refused (stage "storyboard", naming
    the field); every other row passes untouched."""

    def __init__(self, model: str, config, digest: str, out: str):
        self.planner = LLMShotPlanner(model)
        self.config, self.digest, self.out = config, digest, out

    def __call__(self, batch: pa.Table) -> pa.Table:
        checked = rows.from_table(batch)
        waiting = [row for row in checked if waiting_for_storyboard(row)]
        requests = [GenerationRequest.model_validate_json(row["request"]) for row in waiting]
        outcomes = self.planner.plan_many([StoryboardTask.of(request) for request in requests])
        for row, request, outcome in zip(waiting, requests, outcomes):
            try:
                planned = request.model_copy(update={"shots": planned_shots(outcome)})
                plan_request(planned, self.config)
            except StoryboardError as e:                 # its message names `storyboard`
                row.update(stage="storyboard", field="storyboard", message=str(e))
            except PlanError as e:
                row.update(stage="storyboard", field=e.field, message=str(e))
            else:
                row.update(keyed(planned, self.digest, self.out))
        return rows.to_table(checked)

    def __del__(self):
        planner = getattr(self, "planner", None)
        if planner is not None:
            planner.close()


def done_record(out: str, key: str, extension: str) -> str:
    """The sidecar record (JSON) of a done artifact, else "": done iff the artifact and its sidecar exist."""
    try:
        record = storage.read_bytes(storage.sidecar_uri(out, key)).decode()
    except FileNotFoundError:
        return ""
    return record if storage.exists(storage.artifact_uri(out, key, extension)) else ""


def flag_duplicates(block: pa.Table) -> pa.Table:
    """Rows sorted by id (so a block holds every row of each of its ids): each row after the first
    of its id, in manifest order, is refused, naming the first."""
    first_row: dict[str, int] = {}
    checked = sorted(rows.from_table(block), key=lambda r: r["row"])
    for row in checked:
        if not row["stage"] and row["id"] in first_row:
            row.update(stage="validate", field="id", message=f"id: duplicate of row {first_row[row['id']]}")
        if row["id"]:
            first_row.setdefault(row["id"], row["row"])
    return rows.to_table(checked)


def lead(block: pa.Table) -> pa.Table:
    """Rows to render sorted by key (a block holds every row of each of its keys): the first row of a
    key renders, carrying the key's later rows as its `members`."""
    leaders: dict[str, dict] = {}
    for row in sorted(rows.from_table(block), key=lambda r: r["row"]):
        if row["key"] in leaders:
            leaders[row["key"]]["members"].append({"row": row["row"], "id": row["id"]})
        else:
            leaders[row["key"]] = row
    return rows.to_table(list(leaders.values()))


# ---- the datasets -----------------------------------------------------------------------------

def triaged(manifest: str, out: str, config, digest: str, limit: int | None = None,
            storyboard_model: str | None = None, planners: int = 1) -> ray.data.Dataset:
    """Every manifest row (after --limit) validated, LLM storyboards planned by `planners` actors on
    `storyboard_model` (None: such rows are refused), duplicate ids refused; materialized (object store)."""
    ds = ray.data.read_datasource(ManifestSource(manifest, limit))
    context = ds.context                         # the datasets derived from this one share it
    context.enable_progress_bars = False
    context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED     # tasks, not aggregator actors
    # Ray Data's issue detectors call ray_remote_args_fn outside actor creation (at start and every
    # 30 s); each call would make a placement group no denoise actor uses, holding tp CPUs or GPUs.
    context.issue_detectors_config.detectors = []
    plan_llm = storyboard_model is not None and "storyboard" in manifest_dataset(manifest).schema.names
    ds = ds.map_batches(validate_batch, batch_size=VALIDATE_ROWS, batch_format="pyarrow",
                        fn_args=(config, digest, out, plan_llm))
    if plan_llm:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
        ds = ds.map_batches(StoryboardPlanners, compute=ray.data.ActorPoolStrategy(size=planners),
                            batch_size=PLAN_ROWS, batch_format="pyarrow", num_cpus=1 if use_gpu else PLANNER_CPUS,
                            num_gpus=1 if use_gpu else 0,
                            fn_constructor_args=(storyboard_model, config, digest, out))
    # the sort puts every row of an id in one block; batch_size=None: a block is one call (as map_groups)
    return ds.sort("id").map_batches(flag_duplicates, batch_size=None, batch_format="pyarrow").materialize()


def pending(table: pa.Table) -> pa.Array:
    """Which rows are to render: valid and not done."""
    return pc.and_(pc.equal(table["stage"], ""), pc.equal(table["record"], ""))


def settled(triaged: ray.data.Dataset) -> ray.data.Dataset:
    """The triaged rows that need no rendering: refused ones and done ones."""
    return triaged.map_batches(lambda t: t.filter(pc.invert(pending(t))), batch_format="pyarrow")


def leaders(triaged: ray.data.Dataset) -> ray.data.Dataset:
    """The rows to render, one per artifact key, the rest of the key's rows as its `members`."""
    todo = triaged.map_batches(lambda t: t.filter(pending(t)), batch_format="pyarrow")
    return todo.sort("key").map_batches(lead, batch_size=None, batch_format="pyarrow")
