"""The job book: every online job's record, its transitions, expiry, and the uploads' reference
bookkeeping. Plain Python (no Ray): the JobStore deployment (job_store.py) is its only writer.

Lifecycle of a record:

    queued --start--> in_progress --complete--> completed
      |                   |--fail, or retry with no attempts left--> failed {code, message}
      |                   '--retry (stage or runner lost, lease expired)--> queued (attempt + 1)
      '--cancel (DELETE)--> failed {code: "cancelled"}          (in_progress too)

Every dispatch carries an attempt number, a fence: a transition from an older attempt is ignored,
so a job retried after its runner vanished is never finished twice. Terminal jobs get `expires_at`;
expired records and their artifacts are collected. Each change is written through storage.py
(`<storage>/jobs/<id>.json`) before it is answered, and a book built on the same storage rebuilds
itself from those files.

Uploads (input_reference, input_video, input_audio, elements) are stored once by the ingress,
content-addressed (`<storage>/uploads/<sha256>`); a record carries their URIs only (`uploads`), and
an upload is deleted with the last job that names it (DELETE of a finished job, or expiry).
"""
from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Callable, Literal, Optional

from pydantic import BaseModel

from omnireel import storage
from omnireel.config import parse_request

if TYPE_CHECKING:
    from .stage_replica import JobTicket

ACTIVE = ("queued", "in_progress")
PROGRESS_START, PROGRESS_DENOISED = 1, 95      # progress while denoising runs from 1 to 95, then 100
PROGRESS_PERSIST_S = 1.0                       # progress alone is written at most this often per job
ORPHAN_UPLOAD_S = 3600.0                       # an upload no job names this long after it was written is
                                               # collected (its ingress died between storing it and the create)


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
