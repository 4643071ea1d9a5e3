"""Helpers of the batch tests: manifests, servers started on loopback, reading outputs back."""
from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from omnireel import storage
from omnireel.pipelines.render import BatchOptions

REPO = Path(__file__).resolve().parents[1]
TEST_THREADS = 2          # as conftest sets for the test process (parity needs the same count)
OPTIONS = BatchOptions(threads=TEST_THREADS)
SMALL = dict(seconds=0.5, size="32x32", fps=8, steps=2)


def manifest_rows() -> list[dict]:
    """Six rows: four valid (one with two shots, given as a JSON string), two invalid."""
    return [
        dict(id="kite", prompt="a red kite over a green hill", seed=1, **SMALL),
        dict(id="boat", prompt="a paper boat in the rain", seed=2, **SMALL),
        dict(id="fox", prompt="a fox in the snow", seed=3, language="ja", **SMALL),
        dict(id="chase", prompt="a chase", seed=4, **SMALL,
             shots='[{"prompt": "a wide street", "seconds": 0.25}, {"prompt": "a face", "seconds": 0.25}]'),
        dict(id="narrow", prompt="too narrow", seed=5, **{**SMALL, "size": "30x32"}),
        dict(id="long", prompt="too long", seed=6, **{**SMALL, "seconds": 99.0}),
    ]


def write_manifest(uri: str, rows: list[dict]) -> str:
    """Rows as one Parquet file; a column any row has is a column (null where a row lacks it)."""
    columns = list(dict.fromkeys(name for row in rows for name in row))
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([{name: row.get(name) for name in columns} for row in rows]), buffer)
    storage.write_bytes(uri, buffer.getvalue())
    return uri


def read_parquet(uri: str) -> list[dict]:
    return pq.read_table(io.BytesIO(storage.read_bytes(uri))).to_pylist()


def artifacts(out: str) -> dict[str, list[str]]:
    """extension -> URIs of every artifact file under `out` (hidden temporary files left out)."""
    fs, path = storage.filesystem(storage.join(out, "artifacts"))
    protocol = out.split("://", 1)[0] + "://" if "://" in out else ""
    found: dict[str, list[str]] = {}
    for name in (fs.find(path) if fs.exists(path) else []):
        base = name.rsplit("/", 1)[-1]
        if not base.startswith("."):
            found.setdefault(base.split(".", 1)[1], []).append(protocol + name)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """Polls `url` until it answers 200 (the server is up); fails if the process exits first."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode} before {url} answered")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout_s:g}s")
        time.sleep(0.1)


def start_server(args: list[str], ready_url: str) -> subprocess.Popen:
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_http(ready_url, process)
    except BaseException:
        stop(process)
        raise
    return process


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def driver_env(ray_module) -> dict:
    """Environment for a driver subprocess that joins this test session's Ray cluster."""
    return {**os.environ, "RAY_ADDRESS": ray_module.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def placement_groups(ray_module) -> dict[str, str]:
    """The batch pipeline's placement groups in this session: name -> state."""
    return {info["name"]: info["state"] for info in ray_module.util.placement_group_table().values()
            if info["name"].startswith("omnireel-batch-")}


def family_batch(root: Path, checkpoint, manifest_rows: list[dict]):
    """A family's batch run over `manifest_rows` (latents saved beside each artifact): (summary, out)."""
    from omnireel.pipelines.render import run_batch

    manifest = write_manifest(str(root / "manifest.parquet"), manifest_rows)
    out = str(root / "out")
    return run_batch(manifest, out, checkpoint, OPTIONS.model_copy(update={"save_latents": True})), out


def saved_latents(out: str, key: str):
    """The GeneratedLatents a batch run with save_latents wrote for artifact `key`."""
    from omnireel.pipelines import rows
    from omnireel.pipelines.render import LATENTS_EXTENSION

    return rows.decode_payload("latents", storage.read_bytes(storage.artifact_uri(out, key, LATENTS_EXTENSION)))


def the_rendered_row(out: str):
    """The one results row of a batch run and its saved GeneratedLatents."""
    (result,) = read_parquet(storage.join(out, "results.parquet"))
    return result, saved_latents(out, result["key"])
