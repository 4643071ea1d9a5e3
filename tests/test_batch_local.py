"""The batch pipeline on the local filesystem (one run, on the session's Ray): valid rows become MP4s
with sidecars and results, invalid rows become error rows naming the field, a row repeating another's
request shares its one artifact, a row equals LocalEngine's render, the totals reach a real
Pushgateway, and a rerun skips every row."""
from __future__ import annotations

import json
import re
import urllib.request
from typing import NamedTuple

import numpy as np
import pytest

from omnireel import media, storage
from omnireel.config import GenerationRequest
from omnireel.pipelines import rows
from omnireel.pipelines.render import LATENTS_EXTENSION, BatchOptions, BatchSummary, run_batch

from batch_support import (OPTIONS, artifacts, free_port, manifest_rows, placement_groups, read_parquet, start_server,
                           stop, write_manifest)

VALID = ("kite", "boat", "fox", "chase", "kite-again")
INVALID = {"narrow": "size", "long": "seconds"}


def local_rows() -> list[dict]:
    """manifest_rows() and, last, a row with kite's request under another id (the same artifact key)."""
    rows = manifest_rows()
    return [*rows, {**rows[0], "id": "kite-again"}]


@pytest.fixture(scope="module")
def pushgateway():
    port = free_port()
    process = start_server(["prometheus-pushgateway", f"--web.listen-address=127.0.0.1:{port}",
                            "--persistence.file=", "--log.level=warn"], f"http://127.0.0.1:{port}/-/ready")
    yield f"127.0.0.1:{port}"
    stop(process)


@pytest.fixture(scope="module")
def local_run(ray_session, tiny_checkpoint, tmp_path_factory, pushgateway):
    root = tmp_path_factory.mktemp("batch")
    manifest = write_manifest(str(root / "manifest.parquet"), local_rows())
    out = str(root / "out")
    options = OPTIONS.model_copy(update={"save_latents": True, "pushgateway": pushgateway})
    before = set(placement_groups(ray_session))
    summary = run_batch(manifest, out, tiny_checkpoint, options)
    created = {k: v for k, v in placement_groups(ray_session).items() if k not in before}
    return LocalRun(summary, manifest, out, options, created)


class LocalRun(NamedTuple):
    summary: BatchSummary
    manifest: str
    out: str
    options: BatchOptions
    placement_groups: dict[str, str]      # name -> state, of the groups the run created


def test_valid_rows_become_mp4s_and_invalid_rows_name_their_field(local_run):
    summary, out = local_run.summary, local_run.out
    assert local_run.placement_groups == {}      # at tp=1 the denoise actor is the rank: no placement group
    assert (summary.rows, summary.rendered, summary.invalid, summary.failed, summary.skipped) == (7, 5, 2, 0, 0)
    assert summary.videos == 4                   # kite-again shares kite's artifact, rendered once
    found = artifacts(out)
    assert len(found["mp4"]) == 4 and len(found["json"]) == 4 and len(found[LATENTS_EXTENSION]) == 4

    results = read_parquet(storage.join(out, "results.parquet"))
    assert sorted(r["id"] for r in results) == sorted(VALID)
    manifest = {r["id"]: r for r in local_rows()}
    by_id = {r["id"]: r for r in results}
    assert (by_id["kite-again"]["uri"], by_id["kite-again"]["row"]) == (by_id["kite"]["uri"], 6)
    for result in results:
        source = manifest[result["id"]]
        assert (result["seconds"], result["size"], result["fps"], result["seed"]) == \
            (source["seconds"], source["size"], source["fps"], source["seed"])
        assert result["uri"] in found["mp4"] and result["frames"] == 4 and result["steps"] == 2
        assert result["denoise_seconds"] > 0 and result["encode_text_seconds"] > 0 and result["write_seconds"] >= 0
        sidecar = json.loads(storage.read_bytes(storage.sidecar_uri(out, result["key"])))
        assert sidecar["uri"] == result["uri"] and sidecar["key"] == result["key"]
        data = storage.read_bytes(result["uri"])
        assert len(data) == result["bytes"]
        assert {s["type"] for s in media.probe(data)} == {"video", "audio"}
        assert media.decode_video(data).shape == (4, 32, 32, 3)

    errors = read_parquet(storage.join(out, "errors.parquet"))
    assert {e["id"]: e["field"] for e in errors} == INVALID
    for error in errors:
        assert error["stage"] == "validate" and error["message"].startswith(error["field"] + ":")
        assert error["row"] == [r["id"] for r in local_rows()].index(error["id"])


@pytest.mark.parametrize("row_id", ["fox", "chase"])
def test_a_row_equals_local_engine(local_run, tiny_engine, row_id):
    out = local_run.out
    fields = {k: v for k, v in next(r for r in manifest_rows() if r["id"] == row_id).items() if k != "id"}
    if isinstance(fields.get("shots"), str):
        fields["shots"] = json.loads(fields["shots"])
    expected = tiny_engine.render(GenerationRequest(**fields))
    [result] = [r for r in read_parquet(storage.join(out, "results.parquet")) if r["id"] == row_id]

    latents = rows.decode_payload("latents", storage.read_bytes(
        storage.artifact_uri(out, result["key"], LATENTS_EXTENSION)))
    assert (latents.video - expected.latents.video).abs().max() <= 1e-4
    assert (latents.audio - expected.latents.audio).abs().max() <= 1e-4
    assert psnr(media.decode_video(storage.read_bytes(result["uri"])), media.decode_video(expected.artifact.data)) >= 40


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def test_run_totals_reach_the_pushgateway(local_run, pushgateway):
    out = local_run.out
    with urllib.request.urlopen(f"http://{pushgateway}/metrics", timeout=10) as response:
        text = response.read().decode()
    pushed = {m[1]: float(m[3]) for m in re.finditer(r'^(omnireel_batch_\w+)\{([^}]*)\} (\S+)$', text, re.M)
              if 'job="omnireel_batch"' in m[2] and f'output="{out}"' in m[2]}
    assert pushed["omnireel_batch_manifest_rows"] == 7
    assert pushed["omnireel_batch_rows_rendered"] == 5
    assert pushed["omnireel_batch_rows_invalid"] == 2
    assert pushed["omnireel_batch_rows_failed"] == 0
    assert pushed["omnireel_batch_videos_per_hour"] > 0
    assert 0 < pushed["omnireel_batch_denoise_busy_ratio"] <= 1


def test_rerun_skips_every_row(local_run, tiny_checkpoint):
    manifest, out, options = local_run.manifest, local_run.out, local_run.options
    before = {uri: (storage.filesystem(uri)[0].modified(uri), storage.read_bytes(uri))
              for uri in artifacts(out)["mp4"]}
    summary = run_batch(manifest, out, tiny_checkpoint, options)
    assert (summary.rendered, summary.skipped, summary.invalid, summary.failed, summary.videos) == (0, 5, 2, 0, 0)
    after = artifacts(out)
    assert len(after["mp4"]) == 4 and len(after["json"]) == 4
    assert {uri: (storage.filesystem(uri)[0].modified(uri), storage.read_bytes(uri)) for uri in after["mp4"]} == before
    assert sorted(r["id"] for r in read_parquet(storage.join(out, "results.parquet"))) == sorted(VALID)
    assert len(read_parquet(storage.join(out, "errors.parquet"))) == 2


@pytest.mark.parametrize("pool", ["encode", "decode"])
def test_a_pool_actor_loads_and_runs_on_its_compute_thread(ray_session, tiny_checkpoint, pool):
    """Like a Serve replica, a pool actor runs its model work on a compute thread at the batch's
    nice value (17 here: above Ray's 15, so no CAP_SYS_NICE is needed), the rest of it at Ray's."""
    import os

    import ray

    from omnireel.compute import compute_threads
    from omnireel.pipelines.render import POOL_ACTORS

    actor = ray.remote(POOL_ACTORS[pool]).options(num_cpus=0.25).remote(str(tiny_checkpoint), threads=1, niceness=17)
    try:
        main, compute = ray.get(actor.__ray_call__.remote(
            lambda self: (os.getpriority(os.PRIO_PROCESS, os.getpid()), compute_threads())), timeout=120)
        assert compute and set(compute.values()) == {17}, compute
        assert main != 17
    finally:
        ray.kill(actor)
