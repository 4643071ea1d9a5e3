"""The Backbone deployment: the backbone stage (the denoise engine) on the replica's backbone host (parallel/inprocess.py
`open_backbone`): at tp=1 the replica runs the backbone itself; above, a BackboneGroup of TP rank actors.

Above tp=1 each replica owns its group: the replica is declared with `placement_group_bundles` (one bundle
per rank, the replica's own CPUs joined to bundle 0, STRICT_PACK; see app.py) and hands its
placement group to the group, which places rank i in bundle i, as Ray Serve LLM does for vLLM.

The replica batches through its host's one API, whatever the rank count: every `run` call hands
its job to `host.denoise` from a thread of its own, and the host batches the jobs in flight (up to
`max_batch_jobs` / `max_batch_tokens`; max_batch_jobs 1 is one job at a time): at tp=1 its
DenoiseScheduler (omnireel/scheduler.py), whose step loop runs on the replica's compute thread while
there is work, so concurrent jobs join the running batch at the next step boundary and leave it
when done; above, the group's rank 0 scheduler the same way (parallel/group.py).

Progress and cancel: every denoising step is reported to the JobStore, whose answer says whether
to stop (the job was cancelled, or this attempt is stale); the group turns that into a cancel that
every rank sees at the same step. A rank that dies fails the call with RankFailure (the JobRunner
retries the job) after the group is rebuilt here.
"""
from __future__ import annotations

import asyncio
import functools
import logging
from concurrent.futures import ThreadPoolExecutor

from ray import serve
from ray.util import get_current_placement_group

from omnireel import metrics
from omnireel.checkpoint import read_config
from omnireel.parallel.group import MAX_QUEUED_JOBS, DenoiseJob, RankFailure
from omnireel.parallel.inprocess import open_backbone
from omnireel.stages import BACKBONE_STAGE, StageTimings

from .stage_replica import DRIVER, NO_JOB, JobTicket, compute_thread, warmup_values

logger = logging.getLogger("ray.serve")
PROGRESS_REPORT_TIMEOUT_S = 10.0


class JobSignals:
    """The `progress(i, n)` and `should_stop()` hooks of one job, called from the thread that runs
    denoising (or polls the group). Reports go to the JobStore from the replica's event loop, so a
    step never waits on the store: one report is in flight at a time and the newest step replaces
    one not yet sent. The store's answer (stop or not) is what should_stop() returns from then on."""

    def __init__(self, store, ticket: JobTicket, loop: asyncio.AbstractEventLoop):
        self.store, self.ticket, self.loop = store, ticket, loop
        self.stop = False
        self.steps_done = 0
        self._unsent: tuple[int, int] | None = None     # the newest (step, steps) not yet reported
        self._sending = False

    def progress(self, step: int, steps: int) -> None:
        metrics.record("omnireel_denoise_steps", step - self.steps_done, driver=DRIVER)
        self.steps_done = step
        if self.ticket != NO_JOB:
            self.loop.call_soon_threadsafe(self._report, step, steps)

    def should_stop(self) -> bool:
        return self.stop

    def _report(self, step: int, steps: int) -> None:   # on the event loop
        self._unsent = (step, steps)
        if not self._sending:
            self._sending = True
            self.loop.create_task(self._send())

    async def _send(self) -> None:
        try:
            while self._unsent is not None:
                (step, steps), self._unsent = self._unsent, None
                try:
                    stop = await asyncio.wait_for(self.store.report_progress.remote(self.ticket, step, steps),
                                                  PROGRESS_REPORT_TIMEOUT_S)
                    self.stop = self.stop or stop
                except Exception as exc:   # the store is restarting: keep denoising, report the next step
                    logger.warning("progress report for %s failed: %s", self.ticket.job_id, exc)
        finally:
            self._sending = False


@serve.deployment
class Backbone:
    def __init__(self, args, store):
        self.store = store
        self.compute = compute_thread(args, [BACKBONE_STAGE.name])   # steps the backbone at tp=1, loads the group above
        self.host = self.compute.run(open_backbone, args.checkpoint, args.tp, get_current_placement_group(),
                                     use_gpu=args.use_gpu, cpus_per_rank=args.cpus_per_rank,
                                     threads=self.compute.threads, dtype=args.dtype, niceness=args.compute_niceness,
                                     mesh=args.mesh, max_batch_jobs=args.max_batch_jobs,
                                     max_batch_tokens=args.max_batch_tokens, compute=self.compute, driver=DRIVER)
        self.calls = ThreadPoolExecutor(max(MAX_QUEUED_JOBS, 2 * args.max_batch_jobs),   # a thread per job in flight
                                        thread_name_prefix="backbone-call")       # (max_ongoing_requests, app.py)
        values = warmup_values(read_config(args.checkpoint))
        self._warm_up(*[values[name] for name in BACKBONE_STAGE.inputs])

    def _warm_up(self, *inputs) -> None:
        """The smallest job twice at once on the backbone host (once where batching is off), so its
        batched step has run too before the replica reports ready."""
        calls = [self.host.submit(DenoiseJob(*inputs)) for _ in range(min(2, self.host.max_batch_jobs))]
        for call in calls:
            call.result()

    async def run(self, stage_name: str, ticket: JobTicket, *inputs):
        """The backbone stage: (plan, text, voice, media) -> GeneratedLatents, on the backbone host."""
        if stage_name != BACKBONE_STAGE.name:
            raise ValueError(f"Backbone does not run stage {stage_name!r}")
        signals = JobSignals(self.store, ticket, asyncio.get_running_loop())
        try:
            with StageTimings(DRIVER).measure(BACKBONE_STAGE):   # a thread per call waits while the host batches
                return await asyncio.get_running_loop().run_in_executor(   # not to_thread: the request's context
                    self.calls, functools.partial(self.host.denoise, *inputs, progress=signals.progress,   # stays
                                                  should_stop=signals.should_stop))   # here, so a cancel does not
                                                                                      # cancel rank calls
        except RankFailure:
            await self.compute.call(self._rebuild)       # a fresh set of ranks for the next job
            raise
        except asyncio.CancelledError:   # the caller gave up: stop at the next step
            signals.stop = True
            raise

    def _rebuild(self) -> None:
        """After a RankFailure: every call in flight failed with it; the first to get here rebuilds."""
        if self.host.broken:
            self.host.rebuild()

    async def batching(self) -> dict:
        """What the host's scheduler (at tp=1; above, its group's rank 0) holds and ran: jobs running
        and waiting, and the recent steps as (jobs, tokens), oldest first."""
        return await asyncio.to_thread(self.host.batching)

    async def ready(self) -> bool:
        return True

    def __del__(self):
        host = getattr(self, "host", None)
        if host is not None:
            host.shutdown()
        if hasattr(self, "calls"):
            self.calls.shutdown(wait=False, cancel_futures=True)
        if hasattr(self, "compute"):
            self.compute.shutdown()
