"""The Backbone deployment: the `denoise` stage on a BackboneGroup of TP rank actors.

Each replica owns its group: the replica is declared with `placement_group_bundles` (one bundle
per rank, the replica's own CPUs joined to bundle 0, STRICT_PACK; see app.py) and hands its
placement group to the group, which places rank i in bundle i, as Ray Serve LLM does for vLLM.

Progress and cancel: every denoising step is reported to the JobStore, whose answer says whether
to stop (the job was cancelled, or this attempt is stale); the group turns that into a cancel that
every rank sees at the same step. A rank that dies fails the call with RankFailure (the JobRunner
retries the job) after the group is rebuilt here.
"""
from __future__ import annotations

import asyncio
import logging
import time

from ray import serve
from ray.util import get_current_placement_group

from omnireel import metrics
from omnireel.checkpoint import read_config
from omnireel.model.sampler import Cancelled
from omnireel.parallel.group import BackboneGroup, JobCancelled, RankFailure

from .stage_replica import DRIVER, NO_JOB, STAGES, JobTicket, set_threads, warmup_values

logger = logging.getLogger("ray.serve")
DENOISE = STAGES["denoise"]
PROGRESS_REPORT_TIMEOUT_S = 10.0


class JobSignals:
    """The `progress(i, n)` and `should_stop()` hooks of one job, called from the group's poll
    thread: each step goes to the JobStore, whose answer (stop or not) should_stop() returns."""

    def __init__(self, store, ticket: JobTicket):
        self.store, self.ticket = store, ticket
        self.stop = False
        self.steps_done = 0

    def progress(self, step: int, steps: int) -> None:
        metrics.record("omnireel_denoise_steps", step - self.steps_done, driver=DRIVER)
        self.steps_done = step
        if self.ticket == NO_JOB:
            return
        try:
            self.stop = self.stop or self.store.report_progress.remote(self.ticket, step, steps).result(
                timeout_s=PROGRESS_REPORT_TIMEOUT_S)
        except Exception as exc:   # the store is restarting: keep denoising, report the next step
            logger.warning("progress report for %s failed: %s", self.ticket.job_id, exc)

    def should_stop(self) -> bool:
        return self.stop


@serve.deployment
class Backbone:
    def __init__(self, args, store):
        set_threads(args.threads)
        self.store = store
        self.group = BackboneGroup(args.checkpoint, args.tp, get_current_placement_group(), use_gpu=args.use_gpu,
                                   cpus_per_rank=args.cpus_per_rank, threads=args.threads)
        values = warmup_values(read_config(args.checkpoint))
        self.group.denoise(*[values[name] for name in DENOISE.inputs])

    async def run(self, stage_name: str, ticket: JobTicket, *inputs):
        """The denoise stage: (plan, text, voice, media) -> GeneratedLatents, on the TP group."""
        if stage_name != DENOISE.name:
            raise ValueError(f"Backbone does not run stage {stage_name!r}")
        signals = JobSignals(self.store, ticket)
        start = time.perf_counter()
        try:
            latents = await asyncio.to_thread(self.group.denoise, *inputs, progress=signals.progress,
                                              should_stop=signals.should_stop)
        except JobCancelled as exc:   # as the plain Cancelled: JobCancelled does not survive pickling
            raise Cancelled(str(exc)) from None
        except RankFailure:
            await asyncio.to_thread(self.group.rebuild)   # a fresh set of ranks for the next job
            raise
        except asyncio.CancelledError:   # the caller gave up: stop the ranks at the next step
            signals.stop = True
            raise
        metrics.record("omnireel_stage_seconds", time.perf_counter() - start, stage=DENOISE.name, driver=DRIVER)
        return latents

    async def ready(self) -> bool:
        return True

    def __del__(self):
        group = getattr(self, "group", None)
        if group is not None:
            group.shutdown()
