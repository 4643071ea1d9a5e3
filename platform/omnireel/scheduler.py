"""Step-level continuous batching: the denoise scheduler of a backbone host (DESIGN.md §3b).

Jobs wait in a queue; at every step boundary the scheduler retires the jobs that finished, were
cancelled or failed, admits waiting jobs while the batch stays within `max_batch_jobs` and
`max_batch_tokens`, and runs one `Denoiser.step` over every running job. Each job keeps its own
sampler state (its step count, sigmas, guidance, seed and shape), so jobs at different steps run
together and a job's latents are what it gets alone, up to float rounding.

    scheduler = DenoiseScheduler(denoiser, max_batch_jobs=8, max_batch_tokens=16384)
    job = scheduler.submit(plan, text, voice, media, progress=..., should_stop=..., caller=...)   # any thread
    scheduler.run_until_idle()          # the host's compute thread: steps while there is work
    job.future.result()                 # GeneratedLatents, or Cancelled / the job's own error

A backbone host owns one (parallel/inprocess.py at tp=1; every rank of parallel/group.py above).
The in-process host, with many submitters (a Serve replica's concurrent calls, a batch actor's rows
of its calls in flight), calls `scheduler.drive(compute)` after each submit: the loop starts on the
caller's compute thread unless it runs.

Per job: progress(done, steps) after each of its steps; should_stop() before each (a stop raises
model.sampler.Cancelled into that job's future at the next step boundary, the others go on); a
job whose prepare, step or finish raises fails alone: when a batched step raises, each job it did
not advance is stepped alone once, so the error lands on the job that caused it.

How much a step batches is the family's: the omni denoiser packs every job's rows into one
forward (families/omni.py); LTX-2's and Wan's stack the transformer calls of their jobs that agree
in guidance branch, expert and token shape into one call, rows on the batch dimension
(families/stacked_calls.py). `max_batch_tokens` counts a state's `tokens` (omni: layout length x CFG
rows; LTX-2: video + audio tokens x branch rows; Wan: video tokens x CFG rows; 0 for a state that has
none, which `max_batch_jobs` alone bounds). A job larger than `max_batch_tokens` still runs, alone.
max_batch_jobs = 1 turns batching off: one job at a time, in arrival order.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .driver_args import DEFAULT_MAX_BATCH_JOBS, DEFAULT_MAX_BATCH_TOKENS   # the args' defaults, written once
from .model.sampler import Cancelled

RECENT_STEPS = 1024            # StepRecords kept (DenoiseScheduler.recent_steps)
logger = logging.getLogger(__name__)


@dataclass(eq=False)
class DenoiseTask:
    """One job in the scheduler: its inputs until admitted, then its sampler state."""
    inputs: tuple                                   # (plan, text, voice, media)
    progress: Callable[[int, int], None] | None = None
    should_stop: Callable[[], bool] | None = None
    future: Future = field(default_factory=Future)  # GeneratedLatents, or the job's exception
    caller: Any = None                              # who submitted it (e.g. a batch actor's call)
    state: Any = None                               # the Denoiser's state once prepared
    peak_callers: int = 0                           # the most callers whose jobs shared one of its steps

    @property
    def tokens(self) -> int:
        return getattr(self.state, "tokens", 0)


@dataclass(frozen=True)
class StepRecord:
    """What one scheduler step ran (the batch histograms' observations)."""
    jobs: int
    tokens: int
    callers: int = 1         # distinct DenoiseTask.caller values among its jobs


class DenoiseScheduler:
    """A queue of denoise jobs over one Denoiser, stepped together (see the module docstring).
    submit() is thread-safe; run_until_idle() runs on one thread (the host's compute thread)."""

    def __init__(self, denoiser, max_batch_jobs: int = DEFAULT_MAX_BATCH_JOBS,
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, driver: str | None = None):
        """`driver`: the label of the batch size and tokens-per-step histograms (None: no metrics)."""
        if max_batch_jobs < 1 or max_batch_tokens < 1:
            raise ValueError(f"max_batch_jobs ({max_batch_jobs}) and max_batch_tokens ({max_batch_tokens}) "
                             f"must be >= 1")
        self.denoiser = denoiser
        self.max_batch_jobs, self.max_batch_tokens = max_batch_jobs, max_batch_tokens
        self.driver = driver
        self.recent_steps: deque[StepRecord] = deque(maxlen=RECENT_STEPS)   # newest last
        self.isolated_steps = 0        # steps that raised, so each of their jobs was stepped alone
        self.waiting: deque[DenoiseTask] = deque()
        self.running: list[DenoiseTask] = []
        self._lock = threading.Lock()
        self._driving = False

    def submit(self, plan, text, voice, media, progress=None, should_stop=None, caller=None) -> DenoiseTask:
        """Queues one job (from any thread); it joins the batch at the next step boundary. `caller`
        labels who submitted it (StepRecord.callers, DenoiseTask.peak_callers)."""
        task = DenoiseTask((plan, text, voice, media), progress, should_stop, caller=caller)
        with self._lock:
            self.waiting.append(task)
        return task

    def claim_driver(self) -> bool:
        """True if the caller should start run_until_idle (no loop is running or about to): lets many
        submitters share one driving loop without two loops ever running."""
        with self._lock:
            if self._driving:
                return False
            self._driving = True
            return True

    def summary(self) -> dict:
        """Jobs running and waiting, the recent steps as (jobs, tokens), oldest first, and how many
        steps raised and were rerun job by job (any thread)."""
        return {"running": len(self.running), "waiting": len(self.waiting),
                "recent_steps": [(step.jobs, step.tokens) for step in list(self.recent_steps)],
                "isolated_steps": self.isolated_steps}

    def drive(self, executor) -> None:
        """Starts run_until_idle on `executor` (the host's compute thread: anything with submit(fn) ->
        Future) unless a loop already runs; call it after each submit."""
        if self.claim_driver():
            executor.submit(self.run_until_idle).add_done_callback(log_failure)

    @torch.inference_mode()
    def run_until_idle(self) -> None:
        """Steps until no job runs or waits. Ends with the driver released (claim_driver)."""
        while True:
            try:
                while self.step():
                    pass
            finally:
                with self._lock:
                    self._driving = False
            if not (self.waiting and self.claim_driver()):   # a job that came in after the last step
                return

    @torch.inference_mode()
    def step(self) -> bool:
        """One step boundary and one step: retire, admit, step every running job. False when idle."""
        self._retire_stopped()
        self._admit()
        if not self.running:
            return False
        batch = list(self.running)
        before = [task.state.done for task in batch]
        callers = len({task.caller for task in batch})
        for task in batch:
            task.peak_callers = max(task.peak_callers, callers)
        self._record(StepRecord(len(batch), sum(task.tokens for task in batch), callers))
        try:
            self.denoiser.step([task.state for task in batch])
        except Exception:
            self.isolated_steps += 1
            logger.warning("a step of %d jobs raised; stepping each alone", len(batch), exc_info=True)
            for task, done in zip(batch, before):     # isolate the failure: each job not advanced, alone
                if task.state.done == done:
                    self._guard(task, lambda t=task: self.denoiser.step([t.state]))
        for task in batch:
            if task.future.done():
                continue
            state = task.state
            if task.progress is not None:
                self._guard(task, lambda t=task: t.progress(t.state.done, t.state.steps))
            if not task.future.done() and state.done >= state.steps:
                self._guard(task, lambda t=task: t.future.set_result(self.denoiser.finish(t.state)))
        self.running = [task for task in self.running if not task.future.done()]
        return True

    def _record(self, step: StepRecord) -> None:
        self.recent_steps.append(step)
        if self.driver is not None:
            from . import metrics
            metrics.record("omnireel_denoise_batch_jobs", step.jobs, driver=self.driver)
            metrics.record("omnireel_denoise_batch_tokens", step.tokens, driver=self.driver)

    def _retire_stopped(self) -> None:
        """Jobs whose should_stop() is true leave before the step (Cancelled into their futures)."""
        for task in self.running:
            self._cancel_if_stopped(task, f"stopped at step {task.state.done} of {task.state.steps}")
        self.running = [task for task in self.running if not task.future.done()]

    def _admit(self) -> None:
        """Waiting jobs in arrival order while the batch has room (a job never skips one before it)."""
        tokens = sum(task.tokens for task in self.running)
        while len(self.running) < self.max_batch_jobs:
            with self._lock:
                if not self.waiting:
                    return
                task = self.waiting[0]
            if self._cancel_if_stopped(task, "stopped before its first step"):
                self._pop(task)
                continue
            if task.state is None:    # first look: from now on a Future.cancel() cannot race its result
                admitted = task.future.set_running_or_notify_cancel()
                if not admitted or not self._guard(task, lambda t=task: self._prepare(t)):
                    self._pop(task)
                    continue
            if self.running and tokens + task.tokens > self.max_batch_tokens:
                return
            self._pop(task)
            if task.state.done >= task.state.steps:      # nothing to step (0 steps): finish at once
                self._guard(task, lambda t=task: t.future.set_result(self.denoiser.finish(t.state)))
                continue
            self.running.append(task)
            tokens += task.tokens

    def _prepare(self, task: DenoiseTask) -> None:
        task.state = self.denoiser.prepare(*task.inputs)

    def _pop(self, task: DenoiseTask) -> None:
        with self._lock:
            self.waiting.remove(task)

    @staticmethod
    def _cancel_if_stopped(task: DenoiseTask, message: str) -> bool:
        """True if `task` is over: already (its future done or cancelled before admission), or now
        because should_stop() says so (Cancelled) or raised."""
        if task.future.done():
            return True
        try:
            stop = task.should_stop is not None and bool(task.should_stop())
        except Exception as exc:
            task.future.set_exception(exc)
            return True
        if stop:
            task.future.set_exception(Cancelled(message))
        return stop

    @staticmethod
    def _guard(task: DenoiseTask, fn) -> bool:
        """fn(); an exception fails `task` alone. True if it returned."""
        try:
            fn()
            return True
        except Exception as exc:
            if not task.future.done():
                task.future.set_exception(exc)
            return False


def log_failure(future) -> None:
    """A driving loop that raised (its jobs' futures hold their own errors; this is the loop's)."""
    if not future.cancelled() and future.exception() is not None:
        logger.error("denoise scheduler loop failed", exc_info=future.exception())
