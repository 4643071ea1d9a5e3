"""The job store's records (JobBook, no Ray): every transition on disk, rebuilt after a restart,
attempts fenced, retries bounded, Idempotency-Keys, the bounded queue, expiry and collection."""
from __future__ import annotations

import pytest

from omnireel import storage
from omnireel.deployments.job_book import IdempotencyConflict, JobBook, QueueFull, UploadGone
from omnireel.deployments.stage_replica import JobTicket

REQUEST = {"prompt": "a fox", "seconds": 0.5, "size": "32x32"}
TTL_S = 100.0


class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


def book(tmp_path, clock, attempts=2) -> JobBook:
    return JobBook(str(tmp_path), ttl_s=TTL_S, attempts=attempts, clock=clock)


def create(jobs: JobBook, key="k1", idempotency_key=None, max_active=10):
    return jobs.create("video", "omnireel-tiny", REQUEST, key, idempotency_key, max_active)


def test_every_transition_is_on_disk_and_a_new_book_rebuilds_it(tmp_path, clock):
    jobs = book(tmp_path, clock)
    record, created = create(jobs)
    assert created and record.status == "queued" and record.attempt == 1
    ticket = JobTicket(record.id, 1)
    assert book(tmp_path, clock).get(record.id).status == "queued"
    jobs.start(ticket)
    assert book(tmp_path, clock).get(record.id).status == "in_progress"
    assert jobs.progress(ticket, 2, 4) is False
    assert 1 < jobs.get(record.id).progress < 95
    artifact = storage.artifact_uri(str(tmp_path), "k1")
    assert jobs.complete(ticket, artifact)
    again = book(tmp_path, clock).get(record.id)
    assert (again.status, again.progress, again.artifact) == ("completed", 100, artifact)
    assert again.expires_at == clock.now + TTL_S
    assert again.video()["seconds"] == "0.5" and again.video()["object"] == "video"


def test_a_stale_attempt_cannot_finish_a_retried_job(tmp_path, clock):
    jobs = book(tmp_path, clock, attempts=2)
    record, _ = create(jobs)
    first = JobTicket(record.id, 1)
    jobs.start(first)
    retried = jobs.retry(first, "worker_lost", "runner gone")
    assert (retried.status, retried.attempt) == ("queued", 2)
    assert jobs.start(first) is None and jobs.progress(first, 1, 4) is True   # fenced off: stop
    assert not jobs.complete(first, "file:///x.mp4")
    second = JobTicket(record.id, 2)
    jobs.start(second)
    failed = jobs.retry(second, "worker_lost", "runner gone again")            # attempts spent
    assert failed.status == "failed" and failed.error.code == "worker_lost"
    assert "attempt 2 of 2" in failed.error.message


def test_idempotency_key_returns_the_same_job_and_refuses_another_request(tmp_path, clock):
    jobs = book(tmp_path, clock)
    record, created = create(jobs, idempotency_key="abc")
    again, created_again = create(jobs, idempotency_key="abc")
    assert created and not created_again and again.id == record.id
    assert create(book(tmp_path, clock), idempotency_key="abc")[0].id == record.id   # after a restart too
    with pytest.raises(IdempotencyConflict):
        create(jobs, key="another request", idempotency_key="abc")


def test_the_queue_is_bounded_by_active_jobs(tmp_path, clock):
    jobs = book(tmp_path, clock)
    first, _ = create(jobs, max_active=2)
    create(jobs, max_active=2)
    with pytest.raises(QueueFull, match="limit 2"):
        create(jobs, max_active=2)
    jobs.fail(first.id, "cancelled", "cancelled by a DELETE request")
    create(jobs, max_active=2)                       # a finished job frees its place


def test_expired_jobs_and_their_artifacts_are_collected(tmp_path, clock):
    jobs = book(tmp_path, clock)
    done, _ = create(jobs, key="k1")
    shared, _ = create(jobs, key="k1")               # the same request: one artifact for both
    artifact = storage.artifact_uri(str(tmp_path), "k1")
    storage.write_bytes(artifact, b"mp4")
    storage.write_bytes(storage.sidecar_uri(str(tmp_path), "k1"), b"{}")
    for record in (done, shared):
        jobs.start(JobTicket(record.id, 1))
        jobs.complete(JobTicket(record.id, 1), artifact)
    clock.now += TTL_S / 2
    running, _ = create(jobs, key="k2")
    assert jobs.collect() == []
    clock.now += TTL_S / 2
    jobs.remove(shared.id)                           # a DELETE: the other job still uses the artifact
    assert storage.exists(artifact)
    assert jobs.collect() == [done.id]
    assert not storage.exists(artifact) and not storage.exists(storage.sidecar_uri(str(tmp_path), "k1"))
    assert set(book(tmp_path, clock).jobs) == {running.id}


def test_an_upload_goes_with_the_last_job_that_names_it(tmp_path, clock):
    """Collected on expiry, or released by a create that was refused; a create whose upload was
    collected meanwhile is refused (UploadGone: the ingress writes it again)."""
    jobs = book(tmp_path, clock)
    upload, other = (storage.upload_uri(str(tmp_path), data) for data in (b"clip", b"tone"))
    for uri in (upload, other):
        storage.write_once(uri, uri.encode())
    first, _ = jobs.create("video", "omnireel-tiny", REQUEST, "k1", None, 10, [upload, other])
    jobs.fail(first.id, "cancelled", "cancelled by a DELETE request")
    clock.now += TTL_S / 2
    second, _ = jobs.create("video", "omnireel-tiny", REQUEST, "k2", None, 10, [upload])
    jobs.fail(second.id, "cancelled", "cancelled by a DELETE request")
    clock.now += TTL_S / 2
    assert jobs.collect() == [first.id]
    assert storage.exists(upload) and not storage.exists(other)        # `second` still names `upload`
    jobs.release([upload])                                             # a refused create: kept, a job names it
    assert storage.exists(upload)
    clock.now += TTL_S
    assert jobs.collect() == [second.id] and not storage.exists(upload)
    with pytest.raises(UploadGone):
        jobs.create("video", "omnireel-tiny", REQUEST, "k1", None, 10, [upload])
    storage.write_once(upload, b"clip")
    jobs.release([upload])                                             # no job names it: deleted
    assert not storage.exists(upload) and jobs.jobs == {}


def test_an_upload_no_job_names_is_collected_after_a_while(tmp_path, clock):
    """Its ingress died between storing it and creating the job: collected once ORPHAN_UPLOAD_S
    have passed since it was written (here: none, then at once); one a job names stays."""
    jobs = book(tmp_path, clock)
    named, orphan = (storage.upload_uri(str(tmp_path), data) for data in (b"named", b"orphan"))
    for uri in (named, orphan):
        storage.write_once(uri, b"x")
    jobs.create("video", "omnireel-tiny", REQUEST, "k1", None, 10, [named])
    assert jobs.collect_orphans(after_s=3600.0) == []
    assert jobs.collect_orphans(after_s=-1.0) == [orphan]
    assert storage.exists(named) and not storage.exists(orphan)


def test_a_store_call_rides_out_a_lost_replica_and_then_raises_the_loss_itself():
    """riding_out_restarts (the ingress's and the runner's store calls): a lost store replica is
    retried until the call answers; past the patience the caller sees the RayActorError itself (not
    tenacity's RetryError), and any other error is not retried at all."""
    import asyncio

    from ray.exceptions import RayActorError

    from omnireel.deployments.job_store import riding_out_restarts

    async def call(failures: list, patience_s: float):
        async for attempt in riding_out_restarts(patience_s, wait_s=0.001):
            with attempt:
                calls.append(1)
                if failures:
                    raise failures.pop(0)
                return "answered"

    calls = []
    assert asyncio.run(call([RayActorError(), RayActorError()], patience_s=60)) == "answered" and len(calls) == 3
    calls.clear()
    with pytest.raises(RayActorError):
        asyncio.run(call([RayActorError()] * 10_000, patience_s=0.0))
    assert len(calls) == 1
    calls.clear()
    with pytest.raises(QueueFull):
        asyncio.run(call([QueueFull("full"), RayActorError()], patience_s=60))
    assert len(calls) == 1
