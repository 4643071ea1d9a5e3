"""The batch pipeline against a real S3 API (moto's server on loopback, fake credentials), driven the
way a RayJob drives it: `python -m omnireel.pipelines.render` joins the cluster and hands its storage
environment to the job. Manifest, artifacts, sidecars, results and errors all live in a bucket; a row
whose reference image does not exist fails at run time naming the stage; a rerun skips done rows."""
from __future__ import annotations

import os
import re
import subprocess

import pytest

from omnireel import media, storage

from batch_support import (REPO, SMALL, artifacts, driver_env, free_port, manifest_rows, placement_groups, python,
                           read_parquet, start_server, stop, write_manifest)

BUCKET = "omnireel-batch"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server; this process's environment points s3fs at it while the module runs."""
    port = free_port()
    process = start_server(python("-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)), f"http://127.0.0.1:{port}/")
    with pytest.MonkeyPatch.context() as env:
        for name, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            env.setenv(name, value)
        fs, _ = storage.filesystem(f"s3://{BUCKET}")
        fs.mkdir(BUCKET)
        try:
            yield f"s3://{BUCKET}"
        finally:
            fs.clear_instance_cache()      # the next S3FileSystem reads a fresh environment
            stop(process)


def batch(ray_session, checkpoint, manifest: str, out: str, *extra: str) -> tuple[int, ...]:
    """Runs the RayJob entrypoint; (rendered, already done, failed, invalid) from its summary line."""
    proc = subprocess.run(python("-m", "omnireel.pipelines.render", manifest, "--out", out, "--checkpoint",
                                 str(checkpoint), "--threads", "1", *extra),
                          env={**driver_env(ray_session), **{k: v for k, v in os.environ.items() if k.startswith("AWS_")}},
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return tuple(map(int, re.search(r"(\d+) rendered, (\d+) already done, (\d+) failed, (\d+) invalid",
                                    proc.stdout).groups()))


def test_batch_on_s3(s3, ray_session, tiny_checkpoint):
    missing = f"{s3}/references/missing.png"
    rows = manifest_rows() + [dict(id="ghost", prompt="a ghost", seed=7, elements=[missing], **SMALL)]
    manifest = write_manifest(f"{s3}/manifests/prompts.parquet", rows)
    out = f"{s3}/renders"

    before = set(placement_groups(ray_session))
    assert batch(ray_session, tiny_checkpoint, manifest, out, "--tp", "2") == (4, 0, 1, 2)   # a group of 2 ranks
    created = {k: v for k, v in placement_groups(ray_session).items() if k not in before}
    assert list(created.values()) == ["REMOVED"]     # one per denoise actor, removed after the run
    found = artifacts(out)
    assert len(found["mp4"]) == 4 and len(found["json"]) == 4 and set(found) == {"mp4", "json"}
    results = read_parquet(f"{out}/results.parquet")
    assert sorted(r["id"] for r in results) == ["boat", "chase", "fox", "kite"]
    for result in results:
        assert result["uri"].startswith(f"{out}/artifacts/") and result["uri"] in found["mp4"]
        assert media.decode_video(storage.read_bytes(result["uri"])).shape == (4, 32, 32, 3)

    errors = {e["id"]: e for e in read_parquet(f"{out}/errors.parquet")}
    assert {i: (e["stage"], e["field"]) for i, e in errors.items()} == {
        "narrow": ("validate", "size"), "long": ("validate", "seconds"), "ghost": ("encode_media", "")}
    assert "elements.0" in errors["ghost"]["message"] and "missing.png" in errors["ghost"]["message"]

    # a rerun of the first six rows (--limit leaves the failing one out) skips every row
    assert batch(ray_session, tiny_checkpoint, manifest, out, "--limit", "6") == (0, 4, 0, 2)
    assert artifacts(out) == found
    assert sorted(r["id"] for r in read_parquet(f"{out}/results.parquet")) == ["boat", "chase", "fox", "kite"]
