"""The Serve app the serve tests share: started once per test session (conftest.py's `served`), with
`omnireel serve` from the repo's Serve config YAML plus test overrides (two ingress replicas, small
queues and upload limits, a TP=2 Backbone whose two ranks live in the replica's own placement group),
inside the session's Ray; and the helpers those tests use to talk to it."""
from __future__ import annotations

import math
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import openai
import yaml

KEY = "sk-test-omnireel"
TINY = {"size": "32x32", "seconds": "0.5", "fps": 8, "steps": 2}   # 4 frames, 2 denoising steps
LONG = {"size": "64x64", "seconds": "1", "fps": 8, "steps": 60}     # long enough to watch and to kill
ARGS = dict(api_keys=[KEY], tp=2, threads=2, replica_cpus=0.25, cpus_per_rank=0.25, control_cpus=0.05,
            max_body_bytes=256 << 10, max_upload_bytes=64 << 10, max_upload_seconds=1.0,
            allowed_buckets=["omnireel-inputs"], max_active_jobs=3, runner_max_ongoing=2, runner_max_queued=1,
            lease_s=10.0, retry_after_s=2)
DONE = ("completed", "failed")


@dataclass
class Served:
    url: str
    storage: Path            # AppArgs.storage_uri: jobs and artifacts
    voices: Path             # AppArgs.voices_uri: the voice registry

    def http(self, key: str | None = KEY) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"} if key else {},
                            timeout=120)

    def openai(self, max_retries: int = 2) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=max_retries, timeout=120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(ray_module, checkpoint: Path, root: Path):
    """The app on a free loopback port, submitted with `omnireel serve --non-blocking` to the session's
    Ray; shut down on exit (the session's Ray goes on to other tests: leave no app behind)."""
    from ray import serve

    from omnireel.deployments.app import DEPLOYMENTS, configure, load_serve_config

    port = free_port()
    deployments = {d.name: {"num_replicas": 1, "autoscaling_config": None, "health_check_period_s": 1}
                   for d in DEPLOYMENTS}
    deployments["Ingress"]["num_replicas"] = 2
    config = configure(load_serve_config(), args={**ARGS, "checkpoint": str(checkpoint),
                                                  "storage_uri": str(root / "store"),
                                                  "voices_uri": str(root / "voices")},
                       deployments=deployments, host="127.0.0.1", port=port)
    (root / "serve.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    try:
        proc = subprocess.run([sys.executable, "-m", "omnireel.cli", "serve", "--config", str(root / "serve.yaml"),
                               "--address", ray_module.get_runtime_context().gcs_address, "--non-blocking"],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        assert f"http://127.0.0.1:{port}/v1" in proc.stdout
        yield Served(f"http://127.0.0.1:{port}", root / "store", root / "voices")
    finally:
        serve.shutdown()


def openai_render(served: Served, fields: dict) -> bytes:
    """`fields` (a request: prompt, size, seconds and the extra fields) posted with the official openai
    client, waited for until completed, and its MP4 downloaded."""
    client = served.openai()
    extra = {k: v for k, v in fields.items() if k not in ("prompt", "size", "seconds")}
    video = client.videos.create(prompt=fields["prompt"], size=fields["size"], seconds=str(fields["seconds"]),
                                 extra_body=extra)
    with served.http() as http:
        assert wait_done(http, video.id)["status"] == "completed"
    return client.videos.download_content(video.id).read()


def create(http: httpx.Client, **fields) -> dict:
    response = http.post("/v1/videos", json={"prompt": "a paper boat in the rain", **TINY, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def wait_done(http: httpx.Client, video_id: str, timeout_s: float = 240.0, until=lambda v: v["status"] in DONE):
    """Polls the video until `until(video)`; 503 (the store restarting) is waited out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = http.get(f"/v1/videos/{video_id}")
        if response.status_code != 503:
            assert response.status_code == 200, response.text
            if until(response.json()):
                return response.json()
        time.sleep(0.1)
    raise AssertionError(f"video {video_id} not done within {timeout_s:g}s: {response.text}")


def served_latents(request, app: str | None = None):
    """The GeneratedLatents of `request` (a GenerationRequest) through the served stages of `app`
    (default: the shared app)."""
    from ray import serve

    from omnireel.config import normalized
    from omnireel.deployments.app import APP_NAME

    runner = serve.get_deployment_handle("JobRunner", app or APP_NAME)
    return runner.latents.remote(normalized(request)).result(timeout_s=120)


def serve_actor(deployment: str) -> str:
    import ray

    from omnireel.deployments.app import APP_NAME

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::{APP_NAME}#{deployment}#")]
    assert names, f"no {deployment} replica"
    return names[0]


def kill(deployment: str) -> str:
    import ray
    name = serve_actor(deployment)
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    return name


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)


# ---- a second app beside the shared one (the load and health-under-load tests) ---------------------

def load_benchmark():
    """benchmarks/load.py as a module: the load driver, health probe and replica timeline it prints
    from are the ones the load tests assert on."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "load.py"
    spec = importlib.util.spec_from_file_location("omnireel_load_benchmark", path)
    if spec.name not in sys.modules:
        sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules[spec.name]


def submit(config: dict, path: Path, ray_module) -> None:
    """Submits a whole Serve config as `serve run --non-blocking` does (declarative: apps it leaves
    out are deleted), from a subprocess (the CLI starts its own Ray client)."""
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    code = ("import sys, yaml; from omnireel.deployments.app import serve_run; "
            "serve_run(yaml.safe_load(open(sys.argv[1])), sys.argv[2])")
    proc = subprocess.run([sys.executable, "-c", code, str(path), ray_module.get_runtime_context().gcs_address],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


@contextmanager
def app_beside(served: Served, ray_module, name: str, route_prefix: str, args: dict, deployments: dict):
    """Another OmniReel app, `name` at `route_prefix`, in the session's Serve beside the shared one:
    the shared app's own config (written by running_app, so that app is left as it is) plus this one;
    on exit the shared config alone again, which deletes it. Yields the app's root URL."""
    import copy

    from ray import serve

    from omnireel.deployments.app import configure, load_serve_config, wait_until_running

    root = served.storage.parent
    shared = yaml.safe_load((root / "serve.yaml").read_text())
    app = configure(load_serve_config(), args=args, deployments=deployments)["applications"][0]
    app.update(name=name, route_prefix=route_prefix)
    both = copy.deepcopy(shared)
    both["applications"].append(app)
    try:
        submit(both, root / f"serve-with-{name}.yaml", ray_module)
        wait_until_running(name, timeout_s=600)
        yield f"{served.url}{route_prefix}"
    finally:
        submit(shared, root / "serve.yaml", ray_module)
        deadline = time.monotonic() + 120
        while name in serve.status().applications and time.monotonic() < deadline:
            time.sleep(0.5)


@contextmanager
def checkpoint_app(served: Served, checkpoint: Path, name: str, root: Path, **overrides):
    """build_app on `checkpoint` (any family) at tp=1 (or the AppArgs `overrides`), as its own Serve
    application `name` at route /name beside the shared one; deleted on exit."""
    from ray import serve

    from omnireel.deployments.app import build_app, wait_until_running

    args = {**ARGS, "tp": 1, "checkpoint": str(checkpoint), "storage_uri": str(root / "store"),
            "voices_uri": str(root / "voices"), **overrides}
    serve.run(build_app(args), name=name, route_prefix=f"/{name}", blocking=False)
    try:
        wait_until_running(name, timeout_s=600)
        yield Served(f"{served.url}/{name}", root / "store", root / "voices")
    finally:
        serve.delete(name)
