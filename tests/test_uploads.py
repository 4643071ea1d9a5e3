"""Uploads are stored once, content-addressed (`<storage>/uploads/<sha256>`), and travel as that URI:
never as bytes in a job record, a list page, the ScenePlan or a stage payload; an upload is deleted
with the last job that names it, and a request may not name one itself.

The 10 MiB test runs the Serve app's code in this process, not through the session's app (whose
64 KiB upload limit it would break, and whose replicas are other processes): the ingress's admission
(request_parsing.admit_request, then storage.write_once for each upload, as Ingress._create does),
the JobStore's records (JobBook: create, start, progress, complete, listing, remove), the runner's
view of a job (JobRecord.generation -> plan_request) and every stage of STAGE_GRAPH on the tiny
checkpoint. Its storage is a counting fsspec filesystem: a LocalFileSystem subclass registered under
its own protocol, `counting://`, that counts every file opened for writing.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import pickle
import struct
from collections import Counter

import fsspec
import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem
from pydantic import ValidationError

from omnireel import media, storage
from omnireel.config import normalized, parse_request, request_error_message, request_key
from omnireel.deployments.args import AppArgs
from omnireel.deployments.job_book import JobBook
from omnireel.deployments.request_parsing import APIError, admit_request, reference_policy
from omnireel.deployments.stage_replica import JobTicket
from omnireel.stages import STAGE_GRAPH, run_graph, run_stage

UPLOAD_BYTES = 10 * 2**20
SMALL = 64 << 10          # what a record, a list page, the plan or a stage payload may weigh here


class CountingFileSystem(LocalFileSystem):
    """The local filesystem under `counting://`, counting the files opened for writing, by path."""
    protocol = ("counting",)
    writes: Counter = Counter()

    def __init__(self, **kwargs):
        super().__init__(auto_mkdir=True, **kwargs)      # an object store needs no folders made first

    def _open(self, path, mode="rb", **kwargs):
        if set(mode) & set("wax"):
            CountingFileSystem.writes[self._strip_protocol(path)] += 1
        return super()._open(path, mode, **kwargs)


fsspec.register_implementation("counting", CountingFileSystem, clobber=True)


def video_upload(size: int) -> bytes:
    """A real MP4 (32x32, 8 frames at 8 fps) of exactly `size` bytes: a top-level `free` box of
    random bytes after its streams (demuxers skip it; random bytes make the payload unmistakable)."""
    frames = np.random.default_rng(0).integers(0, 255, (8, 32, 32, 3), dtype=np.uint8)
    clip = media.encode_video(frames, fps=8)
    pad = size - len(clip)
    return clip + struct.pack(">I4s", pad, b"free") + os.urandom(pad - 8)


def carries(blob: bytes, upload: bytes, data_url: str) -> bool:
    """Whether `blob` holds (part of) the upload, raw or as the data URL's base64."""
    return upload[-256:] in blob or upload[1 << 20:(1 << 20) + 256] in blob or data_url[-256:].encode() in blob


def test_a_10_mib_upload_is_stored_once_and_travels_as_its_uri(tmp_path, tiny_engine):
    args = AppArgs(storage_uri=f"counting://{tmp_path}/store", max_upload_bytes=16 << 20)
    policy = reference_policy(args)
    upload = video_upload(UPLOAD_BYTES)
    data_url = "data:video/mp4;base64," + base64.b64encode(upload).decode()
    fields = {"prompt": "waves roll in", "size": "32x32", "seconds": "0.5", "fps": 8, "steps": 1, "seed": 2}
    CountingFileSystem.writes.clear()
    ticks = iter(range(10**6))
    book = JobBook(args.storage_uri, ttl_s=100.0, attempts=2, clock=lambda: 2.0 * next(ticks))  # all progress persists

    def admit():                            # Ingress._create: validate, store the uploads, create the job
        request, uploads = admit_request({**fields, "input_video": data_url}, "video", args, policy)
        for uri, data in uploads.items():
            storage.write_once(uri, data)
        record, _ = book.create("video", "omnireel-tiny", normalized(request), request_key(request, "digest"),
                                None, 10, sorted(uploads))
        return record, uploads

    record, uploads = admit()
    [uri] = uploads
    assert uri == storage.join(args.storage_uri, "uploads", hashlib.sha256(upload).hexdigest())
    assert record.uploads == [uri] and record.request["input_video"] == uri
    assert storage.read_bytes(uri) == upload

    ticket = JobTicket(record.id, 1)        # every transition rewrites the record
    book.start(ticket)
    for step in range(1, 5):
        book.progress(ticket, step, 4)
    plan = tiny_engine.plan(book.get(record.id).generation(policy))           # the runner's view
    assert plan.input_video == uri
    values = run_graph(STAGE_GRAPH, {"plan": plan},
                       lambda stage, inputs: run_stage(stage, tiny_engine.components, dict(zip(stage.inputs, inputs))))
    assert values["media"].video is not None                                   # the upload was read and encoded
    artifact = storage.write_artifact(args.storage_uri, record.key, "mp4", values["artifact"].data, {})["uri"]
    book.complete(ticket, artifact)
    second, again = admit()                 # the same bytes again: the same object, not written again
    assert list(again) == [uri] and second.id != record.id

    path = storage.filesystem(uri)[1]
    assert CountingFileSystem.writes[path] == 1
    written = [p for p in CountingFileSystem.writes if p != path]
    records = storage.filesystem(storage.join(book.prefix, f"{record.id}.json"))[1]
    assert CountingFileSystem.writes[records] == 7          # create, start, 4 x progress, complete
    for p in written:                       # records (each transition), sidecar, artifact: none holds the upload
        assert os.path.getsize(p) < SMALL and not carries(open(p, "rb").read(), upload, data_url), p
    page, _ = book.listing("video", None, 20, "desc")
    for blob in (pickle.dumps(page), json.dumps([r.video() for r in page]).encode(),   # the store's answer, the API's
                 *(r.model_dump_json().encode() for r in page)):
        assert len(blob) < SMALL and not carries(blob, upload, data_url)
    for name, payload in values.items():    # the ScenePlan sent to every stage (and TP rank), each payload
        blob = pickle.dumps(payload)
        assert len(blob) < SMALL and not carries(blob, upload, data_url), name

    book.remove(record.id)                  # another job still names it
    assert storage.exists(uri)
    book.remove(second.id)                  # the last one: the upload goes with it
    assert not storage.exists(uri) and CountingFileSystem.writes[path] == 1


@pytest.mark.parametrize("field,value", [
    ("input_video", "s3://omnireel-inputs/uploads/" + "ab" * 32),             # an allow-listed bucket
    ("input_audio", "https://media.example.com/any/uploads/" + "0f" * 32),
    ("input_reference", "s3://omnireel-inputs/serve//./uploads/" + "cd" * 32),
    ("elements", ["s3://omnireel-inputs/a.png", {"image_url": "gs://b/uploads/" + "ef" * 32}]),
])
def test_a_request_may_not_name_a_stored_upload(tmp_path, field, value):
    args = AppArgs(storage_uri=str(tmp_path / "store"))
    with pytest.raises(APIError) as caught:
        admit_request({"prompt": "p", field: value}, "video", args, reference_policy(args))
    param = "elements.1" if field == "elements" else field
    assert caught.value.status == 400 and caught.value.param == param
    assert caught.value.message.startswith(f"{param}: names a stored upload")


def test_only_the_jobs_own_uploads_are_admitted(tmp_path):
    """The app's own store by path (any name under it), and another upload than the job's."""
    args = AppArgs(storage_uri=str(tmp_path / "store"))
    policy = reference_policy(args)
    mine, other = (storage.upload_uri(args.storage_uri, data) for data in (b"mine", b"other"))
    assert parse_request({"prompt": "p", "input_video": mine}, policy.admitting([mine])).input_video == mine
    for refused in (other, storage.join(args.storage_uri, "uploads", "x.mp4")):
        with pytest.raises(ValidationError) as caught:
            parse_request({"prompt": "p", "input_video": refused}, policy.admitting([mine]))
        assert request_error_message(caught.value).startswith("input_video: names a stored upload")
