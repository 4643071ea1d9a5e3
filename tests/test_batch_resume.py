"""Resume: a driver SIGKILLed after some rows (the RayJob entrypoint in its own process, joined to
this session's Ray) completes on a rerun through `omnireel batch`, with exactly one output per valid
row; bad command lines get one line and exit 2 before any Ray work."""
from __future__ import annotations

import re
import subprocess
import time

import pytest

from omnireel import media, storage
from omnireel.cli import main as cli_main

from batch_support import REPO, SMALL, artifacts, driver_env, python, read_parquet, write_manifest

ROWS = 6


def test_killed_run_completes_on_rerun(ray_session, tiny_checkpoint, tmp_path, capsys):
    manifest = write_manifest(str(tmp_path / "manifest.parquet"),
                              [dict(id=f"clip{i}", prompt=f"clip number {i}", seed=i, **{**SMALL, "steps": 6})
                               for i in range(ROWS)])
    out = str(tmp_path / "out")
    args = [manifest, "--out", out, "--checkpoint", str(tiny_checkpoint), "--threads", "1"]
    env = driver_env(ray_session)

    with open(tmp_path / "killed.log", "wb") as log:
        killed = subprocess.Popen(python("-m", "omnireel.pipelines.render", *args, "-q"), env=env, cwd=REPO,
                                  stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while not artifacts(out).get("json"):          # the first row is done: kill the driver now
                assert killed.poll() is None, (tmp_path / "killed.log").read_text()
                assert time.monotonic() < deadline, "no row finished within 300 s"
                time.sleep(0.05)
        finally:
            killed.kill()
            killed.wait()

    cli_main(["batch", *args])                               # the rerun: `omnireel batch`, on this session's Ray
    rerun = capsys.readouterr()
    assert "rendering" in rerun.err                          # the progress bar
    rendered, done = map(int, re.search(r"(\d+) rendered, (\d+) already done", rerun.out).groups())
    assert rendered >= 1 and done >= 1 and rendered + done == ROWS, rerun.out   # it was killed midway

    found = artifacts(out)
    assert len(found["mp4"]) == ROWS and len(found["json"]) == ROWS
    results = read_parquet(storage.join(out, "results.parquet"))
    assert sorted(r["id"] for r in results) == [f"clip{i}" for i in range(ROWS)]
    assert sorted(r["uri"] for r in results) == sorted(found["mp4"])
    for result in results:
        assert media.decode_video(storage.read_bytes(result["uri"])).shape == (4, 32, 32, 3)
    assert read_parquet(storage.join(out, "errors.parquet")) == []


@pytest.mark.parametrize("extra,words", [
    (["--tp", "3"], "--tp: tp=3 must divide"),
    (["--sp", "3"], "--sp=3 must divide the heads per tensor-parallel rank"),
    (["--tp", "2", "--max-batch-jobs", "33"], "--max-batch-jobs: at most 32 when a denoise actor has 2 ranks (got 33)"),
])                                # a flag's own limits: tests/test_driver_args.py
def test_bad_options_exit_2_with_one_line(tiny_checkpoint, tmp_path, capsys, extra, words):
    manifest = write_manifest(str(tmp_path / "m.parquet"), [{"id": "a", "prompt": "x"}])
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["batch", manifest, "--out", str(tmp_path / "out"), "--checkpoint", str(tiny_checkpoint), *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1


@pytest.mark.parametrize("rows,words", [
    (None, "manifest: cannot read"),
    ([{"id": "a", "prompt": "x", "sead": 1}], "manifest: unknown column(s) sead"),
    ([{"id": "a", "seed": 1}], "manifest: missing required column(s) prompt"),
])
def test_bad_manifests_exit_2_with_one_line(tiny_checkpoint, tmp_path, capsys, rows, words):
    manifest = str(tmp_path / "m.parquet")
    if rows is not None:
        write_manifest(manifest, rows)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["batch", manifest, "--out", str(tmp_path / "out"), "--checkpoint", str(tiny_checkpoint)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
