"""Online jobs: the single-writer JobStore and the JobRunner whose in-flight requests are the jobs.

    Ingress --create--> JobStore --dispatch run(ticket)--> JobRunner --stage graph--> stage deployments
                           ^  start / report_progress / heartbeat / complete / fail / retry  |
                           +-------------------------------------------------------------------+

JobStore (one replica, never scaled) owns every job record. Each transition is written through
storage.py before it is answered, as `<storage>/jobs/<id>.json`, and a restarted store rebuilds
itself from those files. It bounds the jobs it holds (queued + in progress; beyond: QueueFull -> 429)
and dispatches each job as one request to the JobRunner deployment, whose `max_ongoing_requests` /
`max_queued_requests` bound the work in flight (beyond: BackPressureError; the job stays queued and
is offered again). Lifecycle:

    queued --start--> in_progress --complete--> completed
      |                   |--fail, or retry with no attempts left--> failed {code, message}
      |                   '--retry (stage or runner lost, lease expired)--> queued (attempt + 1)
      '--cancel (DELETE)--> failed {code: "cancelled"}          (in_progress too)

Every dispatch carries an attempt number, a fence: a transition from an older attempt is ignored,
so a job retried after its runner vanished is never finished twice. A runner heartbeats its job;
a job whose lease runs out (runner gone, store restarted meanwhile) is retried, so no accepted job
stays in progress. Terminal jobs get `expires_at`; expired records and their artifacts are collected.

Uploads (input_reference, input_video, input_audio, elements) are stored once by the ingress,
content-addressed (`<storage>/uploads/<sha256>`); a record carries their URIs only (`uploads`), and
an upload is deleted with the last job that names it (DELETE of a finished job, or expiry).
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Callable, Literal, Optional

from pydantic import BaseModel
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentResponse

from omnireel import metrics, storage
from omnireel.checkpoint import read_config, read_digest
from omnireel.config import parse_request
from omnireel.model.sampler import Cancelled
from omnireel.parallel.group import RankFailure
from omnireel.plan import plan_request
from omnireel.stages import STAGE_GRAPH, StageTimings, run_graph, run_stage

from .request_parsing import reference_policy
from .stage_replica import DRIVER, NO_JOB, JobTicket

logger = logging.getLogger("ray.serve")

ACTIVE = ("queued", "in_progress")
PROGRESS_START, PROGRESS_DENOISED = 1, 95      # progress while denoising runs from 1 to 95, then 100
PROGRESS_PERSIST_S = 1.0                       # progress alone is written at most this often per job
ORPHAN_UPLOAD_S = 3600.0                       # an upload no job names this long after it was written is
                                               # collected (its ingress died between storing it and the create)
# Failures that mean "a replica went away", not "this request is bad": the job is retried.
REPLICA_LOST = (RayActorError, DeploymentUnavailableError, RankFailure)


def one_line(exc: BaseException) -> str:
    """`Type: message` of the original error (a Ray task error's cause), first line only."""
    cause = getattr(exc, "cause", None) or exc
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"


async def root_cause(response: DeploymentResponse, calls: list[DeploymentResponse]):
    """The value of a chained call; if it failed, the error of the first call upstream of it that
    failed (a decoder fails when the Backbone it waits on died: the cause is the Backbone's death)."""
    try:
        return await response
    except Exception:
        for call in calls[:calls.index(response)]:      # graph order
            try:
                await call
            except Exception as upstream:
                raise upstream
        raise


class Refusal(Exception):
    """An expected "no" from the JobStore: returned as a value (not raised across Ray, which would
    log a traceback per refused request); the caller raises it."""


class QueueFull(Refusal):
    """The store holds its maximum of queued + in-progress jobs (HTTP 429)."""


class IdempotencyConflict(Refusal):
    """An Idempotency-Key reused with a different request (HTTP 409)."""


class UnknownCursor(Refusal):
    """A list cursor (`after`) naming no listed job (HTTP 400)."""


class UploadGone(Refusal):
    """A create names a stored upload that is no longer there (collected with the last job that named
    it after the ingress wrote it): the ingress writes it again and retries."""


class JobError(BaseModel):
    code: str
    message: str


class JobRecord(BaseModel):
    """One job, as persisted. Times are unix seconds (floats; the API shows whole seconds)."""
    id: str
    kind: Literal["video", "image"]
    model: str
    request: dict                      # normalized GenerationRequest (config.normalized)
    key: str                           # artifact key: config.request_key(request, checkpoint digest)
    status: Literal["queued", "in_progress", "completed", "failed"] = "queued"
    progress: int = 0                  # 0..100
    attempt: int = 1                   # the attempt now dispatched (fence for transitions)
    created_at: float
    started_at: Optional[float] = None
    completed_at: Optional[float] = None
    expires_at: Optional[float] = None
    error: Optional[JobError] = None
    artifact: Optional[str] = None     # URI of the MP4 (or PNG) once completed
    idempotency_key: Optional[str] = None
    uploads: list[str] = []            # the stored uploads the request names (URIs; deleted with the last job)

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def generation(self, policy):
        """The GenerationRequest, validated again under the app's ReferencePolicy, which admits this
        job's own stored uploads (and no others)."""
        return parse_request(self.request, policy.admitting(self.uploads))

    def video(self) -> dict:
        """The OpenAI Videos API `Video` object."""
        return {
            "id": self.id, "object": "video", "model": self.model, "status": self.status,
            "progress": self.progress, "created_at": int(self.created_at),
            "completed_at": None if self.completed_at is None else int(self.completed_at),
            "expires_at": None if self.expires_at is None else int(self.expires_at),
            "error": None if self.error is None else self.error.model_dump(),
            "prompt": self.request["prompt"], "seconds": f"{self.request['seconds']:g}",
            "size": self.request["size"], "remixed_from_video_id": None,
        }


class JobBook:
    """The job records: in memory for reads, each change written through to storage first.
    Plain Python (no Ray): the JobStore deployment is its only writer."""

    def __init__(self, storage_uri: str, ttl_s: float, attempts: int, clock: Callable[[], float] = time.time):
        self.storage_uri, self.ttl_s, self.attempts, self.clock = storage_uri, ttl_s, attempts, clock
        self.prefix = storage.join(storage_uri, "jobs")
        self.jobs: dict[str, JobRecord] = {}
        for uri in storage.list_prefix(self.prefix):
            if uri.endswith(".json"):
                record = JobRecord.model_validate_json(storage.read_bytes(uri))
                self.jobs[record.id] = record
        self.idempotent = {r.idempotency_key: r.id for r in self.jobs.values() if r.idempotency_key}
        self._persisted_at: dict[str, float] = {}

    # -- reads --

    def get(self, job_id: str) -> JobRecord | None:
        return self.jobs.get(job_id)

    def count(self, status: str) -> int:
        return sum(1 for r in self.jobs.values() if r.status == status)

    def listing(self, kind: str, after: str | None, limit: int, order: str) -> tuple[list[JobRecord], bool]:
        """One page of `kind` jobs by creation time, after the job `after`; and whether more follow."""
        records = sorted((r for r in self.jobs.values() if r.kind == kind), key=lambda r: (r.created_at, r.id),
                         reverse=order == "desc")
        start = 0
        if after is not None:
            ids = [r.id for r in records]
            if after not in ids:
                raise UnknownCursor(f"after: no video {after!r}")
            start = ids.index(after) + 1
        page = records[start:start + limit]
        return page, start + limit < len(records)

    # -- writes --

    def _save(self, record: JobRecord) -> JobRecord:
        storage.write_bytes(storage.join(self.prefix, f"{record.id}.json"), record.model_dump_json().encode())
        self.jobs[record.id] = record
        self._persisted_at[record.id] = self.clock()
        return record

    def create(self, kind: str, model: str, request: dict, key: str, idempotency_key: str | None,
               max_active: int, uploads: list[str] = ()) -> tuple[JobRecord, bool]:
        """A new queued job, or the job an earlier create with the same Idempotency-Key made.
        `uploads`: the stored uploads its request names, written by the caller (UploadGone if one is
        not there any more)."""
        if idempotency_key in self.idempotent:
            record = self.jobs.get(self.idempotent[idempotency_key])
            if record is not None:
                if record.key != key or record.kind != kind:
                    raise IdempotencyConflict("Idempotency-Key was already used with a different request")
                return record, False
        active = sum(1 for r in self.jobs.values() if r.active)
        if active >= max_active:
            raise QueueFull(f"{active} jobs are queued or in progress (limit {max_active}); retry later")
        missing = [uri for uri in uploads if not storage.exists(uri)]
        if missing:
            raise UploadGone(f"{len(missing)} upload(s) were collected before the job was created")
        prefix = "video" if kind == "video" else "image"
        record = JobRecord(id=f"{prefix}_{uuid.uuid4().hex}", kind=kind, model=model, request=request, key=key,
                           created_at=self.clock(), idempotency_key=idempotency_key, uploads=list(uploads))
        if idempotency_key:
            self.idempotent[idempotency_key] = record.id
        return self._save(record), True

    def current(self, ticket: JobTicket) -> JobRecord | None:
        """The job if `ticket` is its live attempt, else None (finished, cancelled or superseded)."""
        record = self.jobs.get(ticket.job_id)
        return record if record is not None and record.active and record.attempt == ticket.attempt else None

    def start(self, ticket: JobTicket) -> JobRecord | None:
        record = self.current(ticket)
        if record is None or record.status == "in_progress":
            return record
        return self._save(record.model_copy(update={"status": "in_progress", "started_at": self.clock(),
                                                    "progress": PROGRESS_START}))

    def progress(self, ticket: JobTicket, step: int, steps: int) -> bool:
        """Records denoising progress; returns True when the work should stop."""
        record = self.current(ticket)
        if record is None:
            return True
        value = PROGRESS_START + (PROGRESS_DENOISED - PROGRESS_START) * step // max(steps, 1)
        if value > record.progress:
            record = record.model_copy(update={"progress": value})
            if self.clock() - self._persisted_at.get(record.id, 0.0) >= PROGRESS_PERSIST_S or step == steps:
                self._save(record)
            else:
                self.jobs[record.id] = record
        return False

    def complete(self, ticket: JobTicket, artifact: str) -> bool:
        record = self.current(ticket)
        if record is None:
            return False
        now = self.clock()
        self._save(record.model_copy(update={"status": "completed", "progress": 100, "artifact": artifact,
                                             "completed_at": now, "expires_at": now + self.ttl_s}))
        return True

    def fail(self, job_id: str, code: str, message: str) -> JobRecord:
        now = self.clock()
        return self._save(self.jobs[job_id].model_copy(update={
            "status": "failed", "error": JobError(code=code, message=message), "completed_at": now,
            "expires_at": now + self.ttl_s}))

    def retry(self, ticket: JobTicket, code: str, message: str) -> JobRecord | None:
        """Queues the next attempt, or fails the job when its attempts are spent."""
        record = self.current(ticket)
        if record is None:
            return None
        if record.attempt >= self.attempts:
            return self.fail(record.id, code, f"{message} (attempt {record.attempt} of {self.attempts})")
        return self.requeue(record)

    def requeue(self, record: JobRecord) -> JobRecord:
        """The next attempt of an active job, queued (older attempts are fenced off)."""
        return self._save(record.model_copy(update={"status": "queued", "attempt": record.attempt + 1,
                                                    "progress": 0, "started_at": None}))

    def remove(self, job_id: str) -> None:
        """Deletes a job's record and, unless another job still uses them, its artifact and uploads."""
        record = self.jobs.pop(job_id, None)
        if record is None:
            return
        if record.artifact and not any(r.key == record.key and r.artifact for r in self.jobs.values()):
            for uri in (storage.sidecar_uri(self.storage_uri, record.key), record.artifact):
                storage.delete(uri)
        storage.delete(storage.join(self.prefix, f"{job_id}.json"))
        self.release(record.uploads)
        if record.idempotency_key:
            self.idempotent.pop(record.idempotency_key, None)
        self._persisted_at.pop(job_id, None)

    def release(self, uploads) -> None:
        """Deletes the stored uploads among `uploads` that no job names (the last job naming them was
        removed, or the create that wrote them was refused)."""
        named = {uri for r in self.jobs.values() for uri in r.uploads}
        for uri in set(uploads) - named:
            storage.delete(uri)

    def collect(self) -> list[str]:
        """Removes every finished job past its expires_at, and orphaned uploads; returns the jobs' ids."""
        now = self.clock()
        expired = [r.id for r in self.jobs.values()
                   if not r.active and r.expires_at is not None and r.expires_at <= now]
        for job_id in expired:
            self.remove(job_id)
        self.collect_orphans()
        return expired

    def collect_orphans(self, after_s: float = ORPHAN_UPLOAD_S) -> list[str]:
        """Deletes the uploads no job names that were written more than `after_s` ago (wall clock:
        the store's own); returns their URIs. A create that still comes for one gets UploadGone."""
        named = {uri.rsplit("/", 1)[-1] for r in self.jobs.values() for uri in r.uploads}
        orphans = []
        for uri in storage.list_prefix(storage.uploads_prefix(self.storage_uri)):
            if uri.rsplit("/", 1)[-1] not in named and time.time() - storage.modified(uri) > after_s:
                storage.delete(uri)
                orphans.append(uri)
        return orphans


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
        while self.book.current(ticket) is not None:
            try:
                await self.runner.run.remote(ticket)
                return
            except BackPressureError:          # the runners' queue is full: the job waits here
                await asyncio.sleep(0.5)
            except REPLICA_LOST as exc:
                await self.retry(ticket, "worker_lost", f"the JobRunner replica running the job was lost "
                                                        f"({type(exc).__name__})")
                return
            except Exception as exc:
                await self.fail(ticket, "internal_error", f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
                return

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


@serve.deployment(graceful_shutdown_timeout_s=60)
class JobRunner:
    """Runs one job per request: the core's STAGE_GRAPH mapped onto the stage deployments' handles.

    Stages with a deployment are chained as DeploymentResponses (text and voice encoding start
    together, both decoders start on the same latents, and latents never pass through here); a
    stage without one (mux: no model) runs here on the decoders' encoded streams. The artifact is
    written under the shared layout, so a request rendered before (online or in batch) is reused.
    """

    def __init__(self, args, store, stages: dict):
        self.args, self.store, self.stages = args, store, stages     # stages: stage name -> handle
        self.config, self.digest = read_config(args.checkpoint), read_digest(args.checkpoint)
        self.policy = reference_policy(args)      # the allow-list the ingress accepted the request under
        unplaced = [s.name for s in STAGE_GRAPH if s.component is not None and s.name not in stages]
        if unplaced:
            raise ValueError(f"stages {unplaced} need a model but have no deployment")

    async def run(self, ticket: JobTicket) -> str:
        """The whole job; returns how it ended ("completed", "failed", "retried", "stopped", "stale")."""
        record = await self._tell_store("start", ticket)
        if record is None:
            return "stale"
        work = asyncio.create_task(self._render(ticket, record))
        deadline = time.monotonic() + self.args.job_timeout_s
        try:
            while not work.done():
                await asyncio.wait({work}, timeout=self.args.lease_s / 3)
                if work.done():
                    break
                stop = await self._tell_store("heartbeat", ticket)
                if stop or time.monotonic() > deadline:
                    work.cancel()
                    await asyncio.wait({work})
                    if not stop:
                        await self._tell_store("fail", ticket, "timeout",
                                               f"not done within job_timeout_s={self.args.job_timeout_s:g}")
                        return "failed"
                    return "stopped"
            artifact = work.result()
        except Cancelled:                    # the backbone stopped: the job was cancelled or superseded
            return "stopped"
        except REPLICA_LOST as exc:
            await self._tell_store("retry", ticket, "worker_lost", f"a stage replica was lost: {one_line(exc)}")
            return "retried"
        except Exception as exc:
            logger.warning("job %s failed", ticket.job_id, exc_info=exc)
            await self._tell_store("fail", ticket, "generation_failed", one_line(exc))
            return "failed"
        finally:
            work.cancel()
        await self._tell_store("complete", ticket, artifact)
        return "completed"

    async def latents(self, request: dict):
        """The GeneratedLatents of a request through the served stages (the parity check's view)."""
        plan = plan_request(parse_request(request, self.policy), self.config)
        return await self._chain(NO_JOB, plan, until="latents")

    async def ready(self) -> bool:
        return True

    async def _render(self, ticket: JobTicket, record: JobRecord) -> str:
        """Runs the graph for the job; writes artifact then sidecar; returns the artifact URI."""
        plan = plan_request(record.generation(self.policy), self.config)
        prefix, extension = self.args.storage_uri, plan.artifact_extension
        artifact_uri = storage.artifact_uri(prefix, record.key, extension)
        if await asyncio.to_thread(storage.artifact_done, prefix, record.key, extension):
            return artifact_uri                       # rendered before: never render twice
        artifact = await self._chain(ticket, plan)    # EncodedStream: the muxed MP4 (or PNG, M4A)
        sidecar = {"media_type": artifact.media_type, "request": record.request, "checkpoint": self.digest,
                   "steps": plan.steps, "frames": plan.num_frames, "job_id": record.id}
        await asyncio.to_thread(storage.write_artifact, prefix, record.key, extension, artifact.data, sidecar)
        return artifact_uri

    async def _chain(self, ticket: JobTicket, plan, until: str | None = None):
        """STAGE_GRAPH over the handles (the core's run_graph), up to the stage producing `until`
        (default: the last); returns that payload. A stage with a deployment is a DeploymentResponse
        chained into the next calls; one without (mux: no model) is a task here that awaits its
        inputs. Only what a local stage or the caller needs is fetched here."""
        until = until or STAGE_GRAPH[-1].output
        calls: list[DeploymentResponse] = []
        here: list[asyncio.Task] = []

        def call(stage, inputs):
            if stage.name in self.stages:
                calls.append(self.stages[stage.name].run.remote(stage.name, ticket, *inputs))
                return calls[-1]
            here.append(asyncio.ensure_future(self._run_here(stage, inputs, calls)))
            return here[-1]

        try:
            value = run_graph(STAGE_GRAPH, {"plan": plan}, call, until=until)[until]
            return await (root_cause(value, calls) if isinstance(value, DeploymentResponse) else value)
        except BaseException:
            for pending in [*calls, *here]:
                try:
                    pending.cancel()
                except Exception:          # cancelling a call that already failed raises its error
                    pass
            raise

    async def _run_here(self, stage, inputs: list, calls: list[DeploymentResponse]):
        """A stage without a deployment, in this replica, once its inputs have arrived."""
        values = {name: await root_cause(v, calls) if isinstance(v, DeploymentResponse) else v
                  for name, v in zip(stage.inputs, inputs)}
        with StageTimings(DRIVER).measure(stage):
            return await asyncio.to_thread(run_stage, stage, {}, values)

    async def _tell_store(self, method: str, *args, patience_s: float = 120.0):
        """Calls a JobStore transition, riding out a store restart (transitions are idempotent)."""
        deadline = time.monotonic() + patience_s
        while True:
            try:
                return await getattr(self.store, method).remote(*args)
            except REPLICA_LOST:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
