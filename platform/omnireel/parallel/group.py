"""BackboneGroup: N Ray rank actors running one tensor-parallel backbone, with a batching scheduler on rank 0.

The host (a Serve replica, a Ray Data actor, a script) hands the group a placement group with one
bundle per rank (STRICT_PACK, a GPU per bundle where there are GPUs) or lets the group create one.
Rank actors rendezvous among themselves (rank 0 opens the TCP store and picks the port), load their
shards from the checkpoint by slice, and then serve jobs:

    host                      rank 0                                 rank 1..N-1
    submit(job) --ray.put--> run(job_id, job)  [JobQueue]            run(job_id, job)  [pending]
                             engine, every step: compose a StepPlan (jobs joining, jobs to stop)
                             and broadcast it ----------------------> engine: receive the StepPlan
                             DenoiseScheduler.step(): retire, admit, one batched step, in lockstep
    result() <-- latents ---  RankOutcome(latents)                   RankOutcome(no latents)

A job's inputs go out once (one object in the store, fetched by each rank); each rank keeps a
DenoiseScheduler (scheduler.py) over its shard, and rank 0's StepPlan makes every rank's scheduler
hold the same jobs in the same order and stop the same ones, so the schedulers (deterministic from
there: admission by arrival order, max_batch_jobs and each state's tokens) run the same batch every
step. Concurrent submits join the running batch at a step boundary and leave it when done, cancelled
or failed; only the latents come back, from rank 0. max_batch_jobs 1 (the default) runs one job
at a time. Idle ranks wait on a local condition, never inside a collective, so the process-group
timeout only bounds real collectives.

Failures: the host waits on every rank's result (ray.wait); a rank that dies fails the call at once,
a rank that stops answering fails it after the straggler timeout; either way the survivors are
killed, the call raises RankFailure, and `rebuild()` starts a fresh set of ranks.
"""
from __future__ import annotations

import datetime
import functools
import threading
import time
import traceback
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import ray
import torch
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ..compute import enter_compute
from ..model.sampler import Cancelled
from ..plan import ScenePlan
from ..scheduler import DEFAULT_MAX_BATCH_TOKENS, DenoiseScheduler, DenoiseTask
from ..stages import GeneratedLatents, MediaLatents, TextEmbeddings, VoiceEmbeddings

MAX_QUEUED_JOBS = 32          # jobs in flight per group (each holds one thread on every rank)


@dataclass
class DenoiseJob:
    """The inputs of one `denoise` stage call: what goes out to the ranks, once."""
    plan: ScenePlan
    text: TextEmbeddings
    voice: VoiceEmbeddings
    media: MediaLatents
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    caller: object = None                  # who submitted it (DenoiseTask.caller: StepRecord.callers)


@dataclass
class RankOutcome:
    """What one rank reports for one job."""
    rank: int
    status: str                             # "done" | "cancelled" | "failed" | "broken" (engine gone)
    steps: int                              # denoising steps completed
    latents: GeneratedLatents | None = None  # rank 0 only
    error: str = ""                         # traceback of a failed job
    peak_callers: int = 0                   # DenoiseTask.peak_callers


class RankFailure(RuntimeError):
    """A rank died or stopped answering; the group was shut down and must be rebuilt."""


class JobFailed(RuntimeError):
    """The job itself raised on every rank (bad inputs); the group is still usable."""


class JobCancelled(Cancelled):
    """The job was cancelled; every rank stopped after the same number of steps."""

    def __init__(self, job_id: str, steps_by_rank: list[int], total: int):
        steps = steps_by_rank[0]
        super().__init__(f"job {job_id} cancelled: all {len(steps_by_rank)} ranks stopped after "
                         f"{steps} of {total} steps")
        self.job_id, self.steps, self.total, self.steps_by_rank = job_id, steps, total, steps_by_rank

    def __reduce__(self):   # rebuilt from its arguments, so it crosses Ray (pickling) as itself
        return type(self), (self.job_id, self.steps_by_rank, self.total)


# ---- rank 0's queue ----------------------------------------------------------------------------

class JobQueue:
    """Rank 0's view of the jobs: ids in arrival order not yet named to the batch, cancel flags and
    progress per job."""

    def __init__(self):
        self._cond = threading.Condition()
        self._queue: deque[str] = deque()
        self._cancelled: set[str] = set()
        self._progress: dict[str, tuple[int, int]] = {}

    def add(self, job_id: str) -> None:
        with self._cond:
            self._queue.append(job_id)
            self._cond.notify_all()

    def wait_for_job(self) -> None:
        """Blocks until a job is queued."""
        with self._cond:
            self._cond.wait_for(lambda: self._queue)

    def take_all(self) -> list[str]:
        """Every queued job, oldest first (the queue is left empty)."""
        with self._cond:
            jobs, self._queue = list(self._queue), deque()
            return jobs

    def cancel(self, job_id: str) -> None:
        with self._cond:
            self._cancelled.add(job_id)

    def is_cancelled(self, job_id: str) -> bool:
        with self._cond:
            return job_id in self._cancelled

    def set_progress(self, job_id: str, step: int, total: int) -> None:
        with self._cond:
            self._progress[job_id] = (step, total)

    def progress(self, job_id: str) -> tuple[int, int] | None:
        with self._cond:
            return self._progress.get(job_id)

    def forget(self, job_id: str) -> None:
        with self._cond:
            self._cancelled.discard(job_id)
            self._progress.pop(job_id, None)


@dataclass(frozen=True)
class StepPlan:
    """What rank 0 broadcasts before every step: the jobs joining the batch (in this order) and the
    jobs of the batch to stop. Every rank applies it to its own DenoiseScheduler, which then admits,
    retires and steps the same jobs on every rank."""
    joining: tuple[str, ...]
    stopping: frozenset[str]


# ---- the rank actor ----------------------------------------------------------------------------

@ray.remote(concurrency_groups={"control": 2})
class BackboneRank:
    """One rank: its shard of the backbone and an engine thread that steps a batch of jobs in rank 0's
    order (a DenoiseScheduler over this rank's Denoiser; the engine is a compute thread at `niceness`,
    see compute.py)."""

    def __init__(self, rank: int, world: int, threads: int, niceness: int | None = None,
                 max_batch_jobs: int = 1, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS):
        torch.set_num_threads(threads)
        self.rank, self.world, self.niceness = rank, world, niceness
        self.max_batch_jobs, self.max_batch_tokens = max_batch_jobs, max_batch_tokens
        gpu = bool(ray.get_gpu_ids())
        self.device = torch.device("cuda", 0) if gpu else torch.device("cpu")   # Ray sets CUDA_VISIBLE_DEVICES
        self.backend = "nccl" if gpu else "gloo"
        self.store = None
        self.backbone = None
        self.timeout_s = 60.0
        self.queue = JobQueue() if rank == 0 else None
        self.batch: DenoiseScheduler | None = None   # set up with the backbone
        self._cond = threading.Condition()
        self._jobs: dict[str, DenoiseJob] = {}       # arrived, not yet in the batch
        self._outcomes: dict[str, RankOutcome] = {}  # finished, not yet returned
        self._unstarted = 0                          # jobs arrived here that no broadcast has named yet
        self._broken: str | None = None              # set when the engine thread died
        self._tasks: dict[str, DenoiseTask] = {}     # the batch's jobs (waiting or running): engine thread only
        self._stopping: frozenset[str] = frozenset()  # this step's StepPlan.stopping

    def open_store(self) -> tuple[str, int]:
        """Rank 0: opens the rendezvous store on a free port; returns (address, port)."""
        import torch.distributed as dist
        address = ray.util.get_node_ip_address()
        self.store = dist.TCPStore(address, 0, self.world, is_master=True, wait_for_workers=False)
        return address, self.store.port

    def setup(self, address: tuple[str, int], checkpoint_dir: str, timeout_s: float,
              dtype: str | None, mesh=None) -> int:
        """Joins the process group, loads this rank's shard, starts the engine; returns resident bytes."""
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        from ..families import family_of
        from .tp import resident_parameter_bytes

        self.timeout_s = timeout_s
        timeout = datetime.timedelta(seconds=timeout_s)
        if self.store is None:
            self.store = dist.TCPStore(address[0], address[1], self.world, is_master=False, timeout=timeout)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        dist.init_process_group(self.backend, store=self.store, rank=self.rank, world_size=self.world,
                                timeout=timeout)
        dtype = getattr(torch, dtype) if dtype else None
        if mesh is not None and (mesh.cfg > 1 or mesh.sp > 1):   # a (cfg, sp, tp) mesh (mesh_denoiser.py)
            from .mesh import BackboneMesh
            from .mesh_denoiser import load_mesh_denoiser
            self.backbone = load_mesh_denoiser(checkpoint_dir, BackboneMesh(mesh, self.device.type), self.device, dtype)
        else:
            self.backbone = family_of(checkpoint_dir).load_backbone_shard(   # a Denoiser over this rank's shard
                Path(checkpoint_dir), init_device_mesh(self.device.type, (self.world,)), self.device, dtype)
        self.batch = DenoiseScheduler(self.backbone, self.max_batch_jobs, self.max_batch_tokens)
        threading.Thread(target=self._engine, name=f"backbone-rank{self.rank}", daemon=True).start()
        return resident_parameter_bytes(self.backbone.module)

    def run(self, job_id: str, job: DenoiseJob) -> RankOutcome:
        """Queues `job` here and blocks until this rank has run it (in the batch rank 0 composes)."""
        with self._cond:
            if self._broken:
                return RankOutcome(self.rank, "broken", 0, error=self._broken)
            self._jobs[job_id] = job
            self._unstarted += 1
            self._cond.notify_all()
        if self.queue is not None:
            self.queue.add(job_id)
        with self._cond:
            self._cond.wait_for(lambda: job_id in self._outcomes or self._broken)
            return self._outcomes.pop(job_id, None) or RankOutcome(self.rank, "broken", 0, error=self._broken)

    @ray.method(concurrency_group="control")
    def cancel(self, job_id: str) -> None:
        self.queue.cancel(job_id)

    @ray.method(concurrency_group="control")
    def progress(self, job_id: str) -> tuple[int, int] | None:
        return self.queue.progress(job_id)

    @ray.method(concurrency_group="control")
    def batching(self) -> dict:
        """This rank's batch (DenoiseScheduler.summary)."""
        return self.batch.summary()

    # -- engine thread: the only thread that runs collectives --

    def _engine(self) -> None:
        enter_compute(None, self.niceness)   # torch's thread count is the process's, set in __init__
        try:
            while True:
                plan = self._next_step()
                for job_id in plan.joining:
                    self._join(job_id)
                self._stopping = plan.stopping
                self.batch.step()            # retire, admit, one step: the same jobs on every rank
        except BaseException:  # a broken process group: every waiting and later call fails
            with self._cond:
                self._broken = f"rank {self.rank}: engine stopped:\n{traceback.format_exc()}"
                self._cond.notify_all()

    def _next_step(self) -> StepPlan:
        """Rank 0 composes the next step (StepPlan) and broadcasts it. An idle rank first waits for work
        outside any collective: rank 0 on its queue, the others until a job arrives here too."""
        import torch.distributed as dist
        if not self._tasks:
            if self.queue is not None:
                self.queue.wait_for_job()
            else:
                with self._cond:
                    self._cond.wait_for(lambda: self._unstarted > 0)
        message = [None]
        if self.queue is not None:
            joining = tuple(self.queue.take_all())
            message = [StepPlan(joining, frozenset(j for j in (*self._tasks, *joining) if self.queue.is_cancelled(j)))]
        dist.broadcast_object_list(message, src=0, device=self.device)
        return message[0]

    def _join(self, job_id: str) -> None:
        """The job joins this rank's scheduler (it reaches the batch at the scheduler's next admission)."""
        with self._cond:   # the host sent every rank this job; it may reach this rank a little later
            if not self._cond.wait_for(lambda: job_id in self._jobs, timeout=self.timeout_s):
                raise RuntimeError(f"job {job_id} never reached rank {self.rank}")
            job = self._jobs.pop(job_id)
            self._unstarted -= 1
        progress = None if self.queue is None else functools.partial(self.queue.set_progress, job_id)
        task = self.batch.submit(job.plan, job.text, job.voice, job.media, progress=progress,
                                 should_stop=lambda: job_id in self._stopping, caller=job.caller)
        self._tasks[job_id] = task
        task.future.add_done_callback(lambda future: self._finished(job_id, future))

    def _finished(self, job_id: str, future) -> None:
        """A job left the batch (done, stopped, or failed alone): its outcome goes to the waiting run()."""
        task = self._tasks.pop(job_id)
        steps = task.state.done if task.state is not None else 0
        error = future.exception()
        if error is None:
            outcome = RankOutcome(self.rank, "done", steps, future.result() if self.rank == 0 else None,
                                  peak_callers=task.peak_callers)
        elif isinstance(error, Cancelled):
            outcome = RankOutcome(self.rank, "cancelled", steps)
        else:
            outcome = RankOutcome(self.rank, "failed", steps, error="".join(traceback.format_exception(error)))
        with self._cond:
            self._outcomes[job_id] = outcome
            self._cond.notify_all()
        if self.queue is not None:
            self.queue.forget(job_id)


# ---- the host side -----------------------------------------------------------------------------

class DenoiseCall:
    """One submitted job: poll `progress()`, `cancel()`, and `result()` for the latents."""

    def __init__(self, group: "BackboneGroup", job: DenoiseJob, refs: list, generation: int):
        self.group, self.job_id, self.steps = group, job.job_id, job.plan.steps
        self.generation = generation   # of the group's ranks it was sent to
        self.peak_callers = 0          # once done: the most callers whose jobs shared one of its steps
        self._refs = refs              # one per rank

    def progress(self) -> tuple[int, int] | None:
        """(steps done, steps) as rank 0 last reported, or None before the first step."""
        return self.group.progress(self.job_id)

    def cancel(self) -> None:
        self.group.cancel(self.job_id)

    def result(self, timeout: float | None = None, *, on_poll: Callable[[], None] | None = None,
               poll_s: float = 0.05) -> GeneratedLatents:
        """Waits for every rank; rank 0's latents, or JobCancelled / JobFailed / RankFailure."""
        return self.group._collect(self, timeout, on_poll, poll_s)


class BackboneGroup:
    """N rank actors running one TP-sharded backbone; `submit(job)` runs a whole denoising loop, batched
    with the other jobs in flight.

    placement_group: the host's placement group, one bundle per rank (rank i -> bundle i); when None
    the group creates a STRICT_PACK one from `bundles(tp, use_gpu)` and removes it on shutdown.
    From a Serve replica pass `ray.util.get_current_placement_group()` (the replica's own bundles,
    e.g. declared with `placement_group_bundles=BackboneGroup.bundles(tp, gpu, host={"CPU": 1})`).
    mesh: a (cfg, sp, tp) MeshShape (parallel/mesh.py) whose tp is `tp`; the group then has
    cfg x sp x tp ranks (and bundles), each running its part through the mesh denoiser.
    max_batch_jobs / max_batch_tokens: how many concurrently submitted jobs one step batches
    (scheduler.py); 1 job: one at a time, in arrival order.
    """

    def __init__(self, checkpoint_dir: str | Path, tp: int, placement_group: PlacementGroup | None = None, *,
                 use_gpu: bool | None = None, cpus_per_rank: float = 1, threads: int | None = None,
                 dtype: str | None = None, pg_timeout_s: float = 60.0, start_timeout_s: float = 300.0,
                 niceness: int | None = None, mesh=None, max_batch_jobs: int = 1,
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS):
        from ..checkpoint import read_config
        from ..families import family_of
        from .mesh import MeshShape
        from .mesh_denoiser import check_family_mesh

        self.checkpoint_dir = str(checkpoint_dir)
        self.config = read_config(checkpoint_dir)
        self.mesh = mesh or MeshShape(tp=tp)          # (cfg, sp, tp): parallel/mesh.py
        if self.mesh.tp != tp:
            raise ValueError(f"--tp={tp} and the mesh's tp ({self.mesh.describe()}) differ")
        check_family_mesh(family_of(checkpoint_dir).name, self.config, self.mesh)   # before any actor starts
        self.tp = tp
        self.ranks = self.mesh.ranks
        self.owns_placement_group = placement_group is None
        if use_gpu is None:
            use_gpu = (any(b.get("GPU", 0) for b in placement_group.bundle_specs) if placement_group
                       else ray.cluster_resources().get("GPU", 0) >= self.ranks)
        self.use_gpu = use_gpu
        self.placement_group = placement_group or self.create_placement_group(self.ranks, use_gpu, cpus_per_rank,
                                                                              timeout_s=start_timeout_s)
        if len(self.placement_group.bundle_specs) < self.ranks:
            raise ValueError(f"placement group has {len(self.placement_group.bundle_specs)} bundles; "
                             f"{self.mesh.describe()} needs one per rank ({self.ranks})")
        self.cpus_per_rank = cpus_per_rank
        self.threads = threads or torch.get_num_threads()
        self.dtype = dtype
        self.niceness = niceness             # of each rank's engine thread (None: Ray's)
        self.pg_timeout_s = pg_timeout_s
        if max_batch_jobs < 1 or max_batch_tokens < 1:
            raise ValueError(f"max_batch_jobs ({max_batch_jobs}) and max_batch_tokens ({max_batch_tokens}) "
                             f"must be >= 1")
        self.max_batch_jobs, self.max_batch_tokens = max_batch_jobs, max_batch_tokens   # rank 0's batch
        self.start_timeout_s = start_timeout_s
        self.straggler_timeout_s = pg_timeout_s + 30.0   # how long ranks may finish apart
        self._lock = threading.Lock()
        self._in_flight: dict[str, object] = {}   # job_id -> rank 0's result ref
        self._ranks: list = []
        self._generation = 0                      # of the ranks: one more at every start
        self._broken: str | None = None
        self.resident_parameter_bytes: list[int] = []
        try:
            self._start()
        except BaseException:
            if self.owns_placement_group:
                remove_placement_group(self.placement_group)
            raise

    # -- placement --

    @staticmethod
    def bundles(tp: int, use_gpu: bool, cpus_per_rank: float = 1, host: dict | None = None) -> list[dict]:
        """One bundle per rank; `host` (the replica's own resources) joins bundle 0."""
        rank = {"CPU": cpus_per_rank, **({"GPU": 1} if use_gpu else {})}
        out = [dict(rank) for _ in range(tp)]
        for key, value in (host or {}).items():
            out[0][key] = out[0].get(key, 0) + value
        return out

    @classmethod
    def create_placement_group(cls, tp: int, use_gpu: bool, cpus_per_rank: float = 1,
                               timeout_s: float = 300.0) -> PlacementGroup:
        pg = placement_group(cls.bundles(tp, use_gpu, cpus_per_rank), strategy="STRICT_PACK")
        if not pg.wait(timeout_s):
            remove_placement_group(pg)
            raise RuntimeError(f"no node could place {tp} ranks ({cls.bundles(tp, use_gpu, cpus_per_rank)[0]} "
                               f"each, STRICT_PACK) within {timeout_s:g}s")
        return pg

    # -- lifecycle --

    def _start(self) -> None:
        ranks = [BackboneRank.options(
            num_cpus=self.cpus_per_rank, num_gpus=1 if self.use_gpu else 0,
            max_concurrency=MAX_QUEUED_JOBS + 2, max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                self.placement_group, placement_group_bundle_index=i,
                placement_group_capture_child_tasks=True),
        ).remote(i, self.ranks, self.threads, self.niceness, self.max_batch_jobs, self.max_batch_tokens)
            for i in range(self.ranks)]
        self._ranks = ranks
        self._generation += 1
        try:
            address = self._wait_all([ranks[0].open_store.remote()], self.start_timeout_s, "open its store")[0]
            setup = [r.setup.remote(address, self.checkpoint_dir, self.pg_timeout_s, self.dtype, self.mesh)
                     for r in ranks]
            self.resident_parameter_bytes = self._wait_all(setup, self.start_timeout_s, "load its shard")
        except BaseException:
            self._kill()
            raise
        self._broken = None

    def _wait_all(self, refs: list, timeout_s: float, what: str) -> list:
        """Every ref's value, or RankFailure naming the first rank that failed or did not answer."""
        deadline = time.monotonic() + timeout_s
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                rank = refs.index(pending[0])
                raise RankFailure(f"BackboneGroup(tp={self.tp}): rank {rank} did not {what} within {timeout_s:g}s")
            try:
                ray.get(ready[0])
            except Exception as exc:
                raise RankFailure(f"BackboneGroup(tp={self.tp}): rank {refs.index(ready[0])} failed to {what}: "
                                  f"{exc}") from exc
        return ray.get(refs)

    def _kill(self) -> None:
        for rank in self._ranks:
            ray.kill(rank, no_restart=True)
        self._ranks = []

    def _fail(self, message: str, cause: BaseException | None = None, generation: int | None = None):
        """Kills every rank (survivors may sit in a collective) and raises RankFailure. A call's failure
        (`generation`: of the ranks it was sent to) that comes in after a rebuild leaves the fresh
        ranks alone: another call in flight on the old ranks saw them fail, and one rebuilt them."""
        with self._lock:
            if generation is None or generation == self._generation:
                self._broken = message
                self._kill()
        raise RankFailure(f"{message}; the group was shut down, call rebuild()") from cause

    def rebuild(self) -> None:
        """Starts a fresh set of ranks in the same placement group (after a failure, or any time)."""
        with self._lock:
            self._kill()
            self._in_flight.clear()
            self._broken = "rebuilding"            # until _start succeeds, submit() refuses
        if self.placement_group is None:   # shut down: a group that owned its placement group makes a new one
            self.placement_group = self.create_placement_group(self.ranks, self.use_gpu, self.cpus_per_rank,
                                                               timeout_s=self.start_timeout_s)
        self._start()

    def shutdown(self) -> None:
        with self._lock:
            self._kill()
            self._broken = "shut down"
        if self.owns_placement_group and self.placement_group is not None:
            remove_placement_group(self.placement_group)
            self.placement_group = None

    @property
    def broken(self) -> bool:
        """True after a RankFailure (or shutdown) until rebuild() succeeds."""
        return self._broken is not None

    @property
    def rank_actors(self) -> list:
        return list(self._ranks)

    # -- jobs --

    def submit(self, job: DenoiseJob) -> DenoiseCall:
        """Sends `job` to every rank (its inputs travel once, through the object store)."""
        with self._lock:
            if self._broken:
                raise RankFailure(f"BackboneGroup(tp={self.tp}) is not running ({self._broken}); call rebuild()")
            if len(self._in_flight) >= MAX_QUEUED_JOBS:   # forget finished calls nobody collected
                done, _ = ray.wait(list(self._in_flight.values()), num_returns=len(self._in_flight), timeout=0)
                self._in_flight = {k: r for k, r in self._in_flight.items() if r not in done}
            if len(self._in_flight) >= MAX_QUEUED_JOBS:
                raise RuntimeError(f"BackboneGroup(tp={self.tp}) already has {MAX_QUEUED_JOBS} jobs in flight; "
                                   f"wait for a result before submitting more")
            job_ref = ray.put(job)
            refs = [rank.run.remote(job.job_id, job_ref) for rank in self._ranks]
            self._in_flight[job.job_id] = refs[0]
        return DenoiseCall(self, job, refs, self._generation)

    def cancel(self, job_id: str) -> None:
        """Flags `job_id` on rank 0; every rank stops at the start of the same step."""
        if self._ranks:
            ray.get(self._ranks[0].cancel.remote(job_id), timeout=self.pg_timeout_s)

    def progress(self, job_id: str) -> tuple[int, int] | None:
        if not self._ranks:
            return None
        return ray.get(self._ranks[0].progress.remote(job_id), timeout=self.pg_timeout_s)

    def batching(self) -> dict:
        """What rank 0's scheduler holds and ran (BackboneRank.batching); every rank runs the same."""
        return ray.get(self._ranks[0].batching.remote(), timeout=self.pg_timeout_s) if self._ranks else {}

    def denoise(self, plan: ScenePlan, text: TextEmbeddings, voice: VoiceEmbeddings, media: MediaLatents,
                progress: Callable[[int, int], None] | None = None,
                should_stop: Callable[[], bool] | None = None) -> GeneratedLatents:
        """The `denoise` stage's contract, run on the group: forwards progress, turns should_stop into cancel."""
        call = self.submit(DenoiseJob(plan, text, voice, media))
        seen = None
        stopping = False

        def poll():
            nonlocal seen, stopping
            try:
                if progress is not None:
                    now = call.progress()
                    if now is not None and now != seen:
                        seen = now
                        progress(*now)
                if should_stop is not None and not stopping and should_stop():
                    stopping = True
                    call.cancel()
            except ray.exceptions.RayActorError:   # rank 0 is gone: the wait on its result reports it
                pass

        latents = call.result(on_poll=poll if (progress or should_stop) else None)
        if progress is not None and seen != (plan.steps, plan.steps):
            progress(plan.steps, plan.steps)     # the last step can finish between two polls
        return latents

    def _collect(self, call: DenoiseCall, timeout: float | None, on_poll, poll_s: float) -> GeneratedLatents:
        try:
            return self._wait_for_ranks(call, timeout, on_poll, poll_s)
        finally:
            with self._lock:
                self._in_flight.pop(call.job_id, None)

    def _wait_for_ranks(self, call: DenoiseCall, timeout: float | None, on_poll, poll_s: float):
        refs = call._refs
        outcomes: dict[int, RankOutcome] = {}
        start = time.monotonic()
        first_done = None
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=poll_s if on_poll else 1.0)
            for ref in ready:
                rank = refs.index(ref)
                try:
                    outcomes[rank] = ray.get(ref)
                except ray.exceptions.RayActorError as exc:   # the actor died (or was killed)
                    self._fail(f"BackboneGroup(tp={self.tp}): rank {rank} died during job {call.job_id} "
                               f"({type(exc).__name__})", exc, call.generation)
                except ray.exceptions.TaskCancelledError:     # the caller's task was cancelled (a Serve
                    call.cancel()                             # request's children are): the ranks stay,
                    raise Cancelled(f"job {call.job_id} cancelled: its caller was")   # the job stops
                except ray.exceptions.RayError as exc:
                    self._fail(f"BackboneGroup(tp={self.tp}): rank {rank} raised on job {call.job_id}: {exc}", exc,
                               call.generation)
                first_done = first_done or time.monotonic()
            now = time.monotonic()
            if pending and first_done and now - first_done > self.straggler_timeout_s:
                late = [refs.index(r) for r in pending]
                self._fail(f"BackboneGroup(tp={self.tp}): ranks {late} did not finish job {call.job_id} within "
                           f"{self.straggler_timeout_s:g}s of the others", generation=call.generation)
            if pending and timeout is not None and now - start > timeout:
                call.cancel()
                raise TimeoutError(f"job {call.job_id} not done within {timeout:g}s (cancelled)")
            if pending and on_poll is not None:
                on_poll()
        return self._verdict(call, [outcomes[r] for r in range(len(refs))])

    def _verdict(self, call: DenoiseCall, outcomes: list[RankOutcome]) -> GeneratedLatents:
        statuses = {o.status for o in outcomes}
        steps = {o.steps for o in outcomes}
        if len(statuses) > 1 or len(steps) > 1 or "broken" in statuses:   # collectives no longer line up
            summary = ", ".join(f"rank {o.rank} {o.status} after {o.steps} steps" for o in outcomes)
            errors = "".join(o.error for o in outcomes)
            self._fail(f"BackboneGroup(tp={self.tp}): ranks diverged on job {call.job_id} ({summary})\n{errors}",
                       generation=call.generation)
        status = statuses.pop()
        if status == "cancelled":
            raise JobCancelled(call.job_id, [o.steps for o in outcomes], call.steps)
        if status == "failed":
            raise JobFailed(f"job {call.job_id} failed on every rank:\n{outcomes[0].error}")
        call.peak_callers = outcomes[0].peak_callers
        return outcomes[0].latents
