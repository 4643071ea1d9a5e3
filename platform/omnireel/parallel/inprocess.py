"""The backbone host for tp=1: the backbone in the caller's own process, behind BackboneGroup's API.

At tensor-parallel degree 1 there is nothing to coordinate, so a Serve replica or a Ray Data actor
runs the `denoise` stage itself (as vLLM's single-process executor does at tp=1) instead of
driving one rank actor: no object-store hop for the inputs, no broadcast of the job id and of the
stop flag each step, no progress polling. The caller takes the rank's resources (see
`host_resources`). `open_backbone` picks this or a BackboneGroup by the TP degree; both offer

    call = host.submit(DenoiseJob(plan, text, voice, media))   # any thread; joins the running batch
    call.progress()  call.cancel()  call.result(timeout=, on_poll=)   # -> GeneratedLatents
    host.denoise(plan, text, voice, media, progress=, should_stop=)   # submit + result
    host.batching()  host.cancel(job_id)  host.progress(job_id)  host.broken  host.rebuild()  host.shutdown()

The host owns its DenoiseScheduler (scheduler.py): every submit queues a job there, and the step
loop runs on the caller's compute thread (`compute`, a compute.ComputeThread: the thread with the
stage's torch threads and niceness) while there is work, so concurrent submits share steps. With
no compute thread the loop runs on the thread waiting for a result (a script, a test).
"""
from __future__ import annotations

import concurrent.futures
import threading
import time
from pathlib import Path
from typing import Callable

import ray
import torch
from ray.util.placement_group import PlacementGroup

from ..plan import ScenePlan
from ..scheduler import DEFAULT_MAX_BATCH_TOKENS, DenoiseScheduler
from ..stages import GeneratedLatents, MediaLatents, TextEmbeddings, VoiceEmbeddings
from .group import BackboneGroup, DenoiseJob
from .mesh import MeshShape


class InProcessCall:
    """One job submitted to an InProcessBackbone: the calls of the group's DenoiseCall."""

    def __init__(self, host: "InProcessBackbone", job: DenoiseJob,
                 progress: Callable[[int, int], None] | None = None, should_stop: Callable[[], bool] | None = None):
        self.host, self.job_id, self.steps = host, job.job_id, job.plan.steps
        self.cancelled = False
        self.done: tuple[int, int] | None = None     # (steps done, steps) after its last step
        self._progress, self._should_stop = progress, should_stop
        self.task = host.scheduler.submit(job.plan, job.text, job.voice, job.media, progress=self._report,
                                          should_stop=self._stop, caller=job.caller)

    def _report(self, step: int, steps: int) -> None:     # on the compute thread, after each of its steps
        self.done = (step, steps)
        if self._progress is not None:
            self._progress(step, steps)

    def _stop(self) -> bool:                                # on the compute thread, before each of its steps
        return self.cancelled or (self._should_stop is not None and self._should_stop())

    @property
    def peak_callers(self) -> int:
        """The most callers whose jobs shared one of this job's steps (DenoiseTask.peak_callers)."""
        return self.task.peak_callers

    def progress(self) -> tuple[int, int] | None:
        """(steps done, steps) after its last step, or None before the first."""
        return self.done

    def cancel(self) -> None:
        """It leaves the batch at the next step boundary (model.sampler.Cancelled into result())."""
        self.cancelled = True

    def result(self, timeout: float | None = None, *, on_poll: Callable[[], None] | None = None,
               poll_s: float = 0.05) -> GeneratedLatents:
        """The latents, or Cancelled / the job's own error. on_poll() runs every poll_s while it waits;
        past `timeout` the job is cancelled and TimeoutError raised."""
        future = self.task.future
        self.host.drive_here()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not future.done():
            wait = poll_s if on_poll is not None else None
            if deadline is not None:
                left = max(0.0, deadline - time.monotonic())
                wait = left if wait is None else min(wait, left)
            concurrent.futures.wait([future], timeout=wait)
            if future.done():
                break
            if deadline is not None and time.monotonic() >= deadline:
                self.cancel()
                raise TimeoutError(f"job {self.job_id} not done within {timeout:g}s (cancelled)")
            if on_poll is not None:
                on_poll()
        return future.result()


class InProcessBackbone:
    """The whole backbone on this process's device and its DenoiseScheduler, stepped on `compute`."""

    tp = 1
    broken = False        # no rank can die apart from this process

    def __init__(self, checkpoint_dir: str | Path, *, dtype: str | None = None, compute=None,
                 max_batch_jobs: int = 1, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
                 driver: str | None = None):
        """compute: the thread the step loop runs on (anything with submit(fn) -> Future and a
        `native_id`: a compute.ComputeThread); None: the thread that waits for a result.
        driver: the label of the scheduler's batch histograms (None: no metrics)."""
        from ..stages import load_components

        self.checkpoint_dir = str(checkpoint_dir)
        self.device = torch.device("cuda", 0) if ray.is_initialized() and ray.get_gpu_ids() else torch.device("cpu")
        self.backbone = load_components(self.checkpoint_dir, ["backbone"], self.device, dtype=dtype)["backbone"]
        self.scheduler = DenoiseScheduler(self.backbone, max_batch_jobs, max_batch_tokens, driver=driver)
        self.compute = compute
        self._calls: dict[str, InProcessCall] = {}    # job_id -> call, until its result is set
        self._lock = threading.Lock()

    def submit(self, job: DenoiseJob, *, progress: Callable[[int, int], None] | None = None,
               should_stop: Callable[[], bool] | None = None) -> InProcessCall:
        """Queues `job` (from any thread); it joins the running batch at the next step boundary.
        progress(i, n) and should_stop() run on the compute thread at each of its steps."""
        call = InProcessCall(self, job, progress, should_stop)
        with self._lock:
            self._calls[job.job_id] = call
        call.task.future.add_done_callback(lambda _: self._forget(job.job_id))
        if self.compute is not None:
            self.scheduler.drive(self.compute)       # the loop starts on the compute thread unless it runs
        return call

    def drive_here(self) -> None:
        """Without a compute thread, runs the step loop on this thread unless it runs elsewhere; on the
        compute thread itself waiting would never end (the loop runs after this call), so it refuses."""
        if self.compute is None:
            if self.scheduler.claim_driver():
                self.scheduler.run_until_idle()
        elif threading.get_native_id() == self.compute.native_id:
            raise RuntimeError("a denoise result cannot be awaited on the compute thread that steps it")

    def _forget(self, job_id: str) -> None:
        with self._lock:
            self._calls.pop(job_id, None)

    def cancel(self, job_id: str) -> None:
        """`job_id` leaves the batch at the next step boundary (nothing if it is over)."""
        with self._lock:
            call = self._calls.get(job_id)
        if call is not None:
            call.cancel()

    def progress(self, job_id: str) -> tuple[int, int] | None:
        with self._lock:
            call = self._calls.get(job_id)
        return None if call is None else call.progress()

    @property
    def max_batch_jobs(self) -> int:
        """The most jobs one step holds (the scheduler's bound; a BackboneGroup has the same attribute)."""
        return self.scheduler.max_batch_jobs

    def batching(self) -> dict:
        """What the scheduler holds and ran (DenoiseScheduler.summary)."""
        return self.scheduler.summary()

    def denoise(self, plan: ScenePlan, text: TextEmbeddings, voice: VoiceEmbeddings, media: MediaLatents,
                progress=None, should_stop=None) -> GeneratedLatents:
        """The `denoise` stage, batched with the other jobs in flight; a stop raises
        model.sampler.Cancelled at the start of a step."""
        return self.submit(DenoiseJob(plan, text, voice, media), progress=progress, should_stop=should_stop).result()

    def rebuild(self) -> None:
        """Nothing to restart: no rank can die apart from this process."""

    def shutdown(self) -> None:
        self.backbone = None


def host_resources(ranks: int, use_gpu: bool, cpus_per_rank: float, host_cpus: float) -> dict:
    """What the host itself asks Ray for: with one rank it is the rank (its CPUs and its GPU); above,
    only its own CPUs, while the ranks take `BackboneGroup.bundles(...)` of its placement group."""
    if ranks == 1:
        return {"num_cpus": host_cpus + cpus_per_rank, "num_gpus": 1 if use_gpu else 0}
    return {"num_cpus": host_cpus, "num_gpus": 0}


def open_backbone(checkpoint_dir: str | Path, tp: int, placement_group: PlacementGroup | None = None, *,
                  use_gpu: bool | None = None, cpus_per_rank: float = 1, threads: int | None = None,
                  dtype: str | None = None, niceness: int | None = None, mesh: MeshShape | None = None,
                  max_batch_jobs: int = 1, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
                  compute=None, driver: str | None = None):
    """The backbone host for `tp` (or a (cfg, sp, tp) `mesh`), batching concurrent submits up to
    `max_batch_jobs` / `max_batch_tokens`: in this process with one rank (its step loop on the
    caller's `compute` thread; `driver` labels its batch histograms), else a BackboneGroup of rank
    actors whose engine threads are compute threads at `niceness` and whose rank 0 batches."""
    mesh = mesh or MeshShape(tp=tp)
    if mesh.ranks == 1:
        return InProcessBackbone(checkpoint_dir, dtype=dtype, compute=compute, max_batch_jobs=max_batch_jobs,
                                 max_batch_tokens=max_batch_tokens, driver=driver)
    return BackboneGroup(checkpoint_dir, mesh.tp, placement_group, use_gpu=use_gpu, cpus_per_rank=cpus_per_rank,
                         threads=threads, dtype=dtype, niceness=niceness, mesh=mesh,
                         max_batch_jobs=max_batch_jobs, max_batch_tokens=max_batch_tokens)
