"""The JobStore deployment: the single writer of job state, over the job book (job_book.py).

    Ingress --create--> JobStore --dispatch run(ticket)--> JobRunner --stage graph--> stage deployments
                           ^  start / report_progress / heartbeat / complete / fail / retry  |
                           +-------------------------------------------------------------------+

JobStore (one replica, never scaled) owns every job record; its methods are the transitions, each
persisted through storage.py by the JobBook before it is answered, and a restarted store rebuilds
itself from storage. It bounds the jobs it holds (queued + in progress; beyond: QueueFull -> 429)
and dispatches each job as one request to the JobRunner deployment (job_runner.py), whose
`max_ongoing_requests` / `max_queued_requests` bound the work in flight (beyond: BackPressureError;
the job stays queued and is offered again). A runner heartbeats its job; a job whose lease runs out
(runner gone, store restarted meanwhile) is retried, so no accepted job stays in progress.
"""
from __future__ import annotations

import asyncio
import logging
import time

from ray import serve
from ray.serve.exceptions import BackPressureError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_fixed

from omnireel import metrics

from .job_book import ACTIVE, JobBook, JobRecord, Refusal
from .stage_replica import DRIVER, REPLICA_LOST, JobTicket

logger = logging.getLogger("ray.serve")
OFFER_WAIT_S = 0.5          # a job the runners' full queue refused is offered again this much later


def riding_out_restarts(patience_s: float, wait_s: float) -> AsyncRetrying:
    """The retry of a call to the JobStore (from the ingress or a runner): again every `wait_s` while
    the store's replica is lost (it restarts; its transitions are idempotent), for up to `patience_s`;
    then the last REPLICA_LOST error is raised. Any other error is raised at once."""
    return AsyncRetrying(retry=retry_if_exception_type(REPLICA_LOST), stop=stop_after_delay(patience_s),
                         wait=wait_fixed(wait_s), reraise=True)


@serve.deployment(max_ongoing_requests=1000, health_check_period_s=2, graceful_shutdown_timeout_s=5)
class JobStore:
    """The single writer of job state (see the module docstring). Its methods are the transitions."""

    def __init__(self, args):
        self.args = args
        self.book = JobBook(args.storage_uri, args.video_ttl_s, args.job_attempts)
        self.runner = None                               # JobRunner handle, looked up on first dispatch
        self.dispatches: dict[str, asyncio.Task] = {}    # job id -> the task awaiting its runner request
        self.leases: dict[str, float] = {}               # job id -> monotonic deadline of its heartbeat
        self.finished: dict[str, asyncio.Event] = {}     # job id -> set when the job ends (for wait())
        for record in [r for r in self.book.jobs.values() if r.active]:   # rebuilt after a restart
            if record.status == "queued":   # its earlier dispatch died with the old store: fence it off
                self._dispatch(self.book.requeue(record))
            else:                           # its runner may live on: give it a lease to report in
                self._renew(record.id)
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    # -- transitions (called by the ingress, the runner and the backbone) --

    async def create(self, kind: str, model: str, request: dict, key: str, idempotency_key: str | None,
                     uploads: list[str] = ()) -> tuple[JobRecord, bool] | Refusal:
        try:
            record, created = self.book.create(kind, model, request, key, idempotency_key,
                                               self.args.max_active_jobs, uploads)
        except Refusal as refusal:
            return refusal
        if created:
            metrics.record("omnireel_jobs", status="queued")
            self._dispatch(record)
        return record, created

    async def start(self, ticket: JobTicket) -> JobRecord | None:
        was = self.book.current(ticket)
        record = self.book.start(ticket)
        if record is not None:
            self._renew(record.id)
            if was is not None and was.status == "queued":
                metrics.record("omnireel_jobs", status="in_progress")
                metrics.record("omnireel_queue_wait_seconds", record.started_at - record.created_at, driver=DRIVER)
        return record

    async def report_progress(self, ticket: JobTicket, step: int, steps: int) -> bool:
        """Returns True when the work should stop (cancelled, superseded or gone)."""
        stop = self.book.progress(ticket, step, steps)
        if not stop:
            self._renew(ticket.job_id)
        return stop

    async def heartbeat(self, ticket: JobTicket) -> bool:
        """Renews the job's lease; returns True when the work should stop."""
        if self.book.current(ticket) is None:
            return True
        self._renew(ticket.job_id)
        return False

    async def complete(self, ticket: JobTicket, artifact: str) -> bool:
        done = self.book.complete(ticket, artifact)
        if done:
            self._ended(ticket.job_id)
        return done

    async def fail(self, ticket: JobTicket, code: str, message: str) -> None:
        if self.book.current(ticket) is not None:
            self.book.fail(ticket.job_id, code, message)
            self._ended(ticket.job_id)

    async def retry(self, ticket: JobTicket, code: str, message: str) -> None:
        record = self.book.retry(ticket, code, message)
        if record is None:
            return
        if record.status == "queued":
            logger.warning("job %s: %s; retrying as attempt %d", record.id, message, record.attempt)
            self.leases.pop(record.id, None)
            self._dispatch(record)
        else:
            self._ended(record.id)

    async def release(self, uploads: list[str]) -> None:
        """Uploads a refused create wrote: deleted unless a job names them."""
        self.book.release(uploads)

    async def delete(self, job_id: str) -> JobRecord | None:
        """Cancels an active job (it ends failed, code "cancelled"); removes a finished one with its
        artifact. Returns the record as it was, or None for an unknown id."""
        record = self.book.get(job_id)
        if record is None:
            return None
        if record.active:
            self.book.fail(job_id, "cancelled", "cancelled by a DELETE request")
            self._ended(job_id)
        else:
            self.book.remove(job_id)
        return record

    # -- reads --

    async def get(self, job_id: str) -> JobRecord | None:
        return self.book.get(job_id)

    async def listing(self, kind: str, after: str | None, limit: int,
                      order: str) -> tuple[list[JobRecord], bool] | Refusal:
        try:
            return self.book.listing(kind, after, limit, order)
        except Refusal as refusal:
            return refusal

    async def wait(self, job_id: str, timeout_s: float) -> JobRecord | None:
        """The job once it has ended, or as it stands after `timeout_s`."""
        record = self.book.get(job_id)
        if record is not None and record.active:
            event = self.finished.setdefault(job_id, asyncio.Event())
            try:
                await asyncio.wait_for(event.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
        return self.book.get(job_id)

    async def ready(self) -> bool:
        return True

    def check_health(self) -> None:
        """Serve's health check (beside the request queue): the store is unhealthy once its watch loop
        (lease expiry, collection) has stopped; the controller then replaces the replica."""
        if self._watcher.done():
            raise RuntimeError("the job store's watch loop has stopped: leases and expiry are not checked")

    # -- dispatch, leases, collection --

    def _dispatch(self, record: JobRecord) -> None:
        earlier = self.dispatches.get(record.id)
        if earlier is not None and earlier is not asyncio.current_task():
            earlier.cancel()                   # a superseded attempt's request is cancelled
        ticket = JobTicket(record.id, record.attempt)
        self.dispatches[record.id] = asyncio.get_running_loop().create_task(self._run(ticket))

    async def _run(self, ticket: JobTicket) -> None:
        """Offers the job to the JobRunner until it takes it, then waits for the runner to return."""
        if self.runner is None:
            self.runner = serve.get_deployment_handle("JobRunner", serve.get_replica_context().app_name)
        try:    # the runners' queue is full (BackPressureError): the job waits here, and is offered again
            async for offer in AsyncRetrying(retry=retry_if_exception_type(BackPressureError),
                                             wait=wait_fixed(OFFER_WAIT_S)):
                with offer:
                    if self.book.current(ticket) is None:      # cancelled or superseded meanwhile
                        return
                    await self.runner.run.remote(ticket)
        except REPLICA_LOST as exc:
            await self.retry(ticket, "worker_lost", f"the JobRunner replica running the job was lost "
                                                    f"({type(exc).__name__})")
        except Exception as exc:
            await self.fail(ticket, "internal_error", f"{type(exc).__name__}: {str(exc).splitlines()[0]}")

    def _renew(self, job_id: str) -> None:
        self.leases[job_id] = time.monotonic() + self.args.lease_s

    def _ended(self, job_id: str) -> None:
        record = self.book.get(job_id)
        metrics.record("omnireel_jobs", status=record.status)
        self.leases.pop(job_id, None)
        task = self.dispatches.pop(job_id, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()                      # a cancelled job: the runner request is cancelled too
        event = self.finished.pop(job_id, None)
        if event is not None:
            event.set()

    async def _watch(self) -> None:
        """Once a second: retry jobs whose lease ran out, collect expired jobs, export gauges."""
        collected_at = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            try:
                now = time.monotonic()
                for job_id, deadline in list(self.leases.items()):
                    record = self.book.get(job_id)
                    if record is None or record.status != "in_progress":
                        self.leases.pop(job_id, None)
                    elif deadline < now:
                        await self.retry(JobTicket(job_id, record.attempt), "worker_lost",
                                         f"no word from the runner for {self.args.lease_s:g}s")
                if now - collected_at >= self.args.collect_interval_s:
                    collected_at = now
                    for job_id in self.book.collect():
                        self.dispatches.pop(job_id, None)
                for status in ACTIVE:
                    metrics.record("omnireel_jobs_active", self.book.count(status), status=status)
            except Exception:
                logger.exception("job store watch loop")
