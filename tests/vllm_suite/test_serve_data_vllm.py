"""The vllm text backend inside both Ray drivers, side by side in one Ray session, on the tiny
checkpoint whose config.json says `text.backend = "vllm"` (same weights as `tiny_checkpoint`):

- the Serve app (tp=1): its TextEncoder replica runs vLLM (the engine's processes live under that
  replica, their threads unpinned: see VLLMTextEncoder's docstring), the latents through the served
  stages and an HTTP job's MP4 match LocalEngine on the torch backend, and serve.shutdown() leaves
  no engine process behind;
- the Ray Data batch pipeline, run while the app starts: its encode actor runs vLLM the same way,
  each row's latents and MP4 match LocalEngine on the torch backend, and no engine process outlives
  the run;
- the LLM storyboard planner as a stage of its own in both (on `planner_model`, a tiny real decoder
  folder): a create asking for `storyboard: "llm"` is planned once by the StoryboardPlanner replica
  (its engine under that replica, none under the ingress) and the job carries the shots; a batch
  row asking for one is planned by the planner pool's actor, and a row the planner refuses is an
  errors row naming `storyboard`.

Two vLLM engines on one node at once is the case the thread rule is for: pinned ("auto"), both
workers would share the same cores. The Ray workers run this interpreter (the .venv-vllm one):
ray.init is called from it, and test_engine_thread_env_in_and_out_of_ray checks it.
"""
from __future__ import annotations

import json
import math
import os
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from omnireel import media, storage
from omnireel.config import GenerationRequest, normalized

from batch_support import manifest_rows, read_parquet, write_manifest
from test_render_vllm import LATENT_TOLERANCE
from vllm_support import engine_processes, ray_ancestry, thread_cpus, title

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

FIELDS = dict(prompt="a fox crosses a frozen lake at dawn", size="32x32", seconds=0.5, fps=16, steps=2, seed=3,
              shots=[{"prompt": "the fox wakes in its den", "seconds": 0.25},
                     {"prompt": "it runs across the ice", "camera": "tracking shot", "seconds": 0.25}])
# CPUs (logical): the app 5 x 0.2 (stage replicas) + 0.2 + 0.2 (Backbone replica, its rank in it)
# + 3 x 0.05 (control) + 0.1 (StoryboardPlanner) = 1.65; the batch 2 (the planner pool, while it
# triages) then 1 (encode) + 0.25 (denoise) + 1 (decode) = 2.25: within ray_session's 8, so both run at once.
SERVE_ARGS = dict(tp=1, threads=2, replica_cpus=0.2, cpus_per_rank=0.2, control_cpus=0.05)
BATCH_ROWS = ("kite", "chase")      # batch_support's rows: one shot, two shots (three captions in all)
TOO_LONG = "!" * 1990 + " a storm"  # ~2000 tokens: leaves the planner's 2048-token context no room to answer
LLM_FIELDS = dict(prompt="a kite climbs over the dunes then falls into the sea", size="32x32", seconds=0.5,
                  fps=16, steps=2, seed=5, storyboard="llm")    # room for two shots
LLM_ROWS = [dict(id="dunes", **LLM_FIELDS), dict(id="storm", **{**LLM_FIELDS, "prompt": TOO_LONG})]
PLANNER_CPUS = 0.1
BATCH_CPUS_PER_RANK = 0.25
PSNR_DB = 40.0                      # decoded frames vs LocalEngine's, as tests/test_serve_app.py asks
ENGINE_EXIT_S = 60.0                # slack for engine processes to exit after their host is torn down
REPLICA = re.compile(r"ServeReplica:omnireel:(\w+)")   # a replica's title: ray::ServeReplica:omnireel:NAME[.method]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def max_abs(a, b) -> float:
    return (a - b).abs().max().item()


def unpinned() -> set[frozenset[int]]:
    """What every thread of an unpinned engine worker may run on: all the CPUs this machine lets
    this process (and so Ray's workers, started from it) use. vLLM's "auto" binding would pin the
    worker's threads to part of them (on 2 cores: core 0, core 1 being kept for the engine core)."""
    return {frozenset(os.sched_getaffinity(0))}


class EngineWatch(threading.Thread):
    """Samples, while the module runs, the processes that this session's Ray workers start with
    multiprocessing (vLLM's engine core, a child of the worker, and its model worker, a grandchild):
    pid -> Engine (its process, its title, the Ray worker above it and how many levels up, the CPU
    sets its threads may run on, gathered over every sample). A process is seen from its start,
    before vLLM titles it (VLLM::EngineCore, VLLM::Worker) or if it never does (see vllm_support.is_engine)."""

    @dataclass
    class Engine:
        process: psutil.Process
        title: str
        host: str
        depth: int
        cpus: set

    def __init__(self, interval_s: float = 0.2):
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.seen: dict[int, EngineWatch.Engine] = {}
        self.samples, self.errors = 0, []

    def sample(self) -> None:
        for process in engine_processes():
            try:
                name = title(process)
                host, depth = ray_ancestry(process)
                if host is None:                 # an engine of this process (LocalEngine), not a driver's
                    continue
                cpus = thread_cpus(process)
            except psutil.Error:                 # it exited meanwhile
                continue
            with self.lock:
                engine = self.seen.setdefault(process.pid, self.Engine(process, name, host, depth, set()))
                engine.title = name                  # the latest: vLLM's name once it has set it
                engine.cpus.update(cpus)
        self.samples += 1

    def run(self) -> None:
        while not self.done.wait(self.interval_s):
            try:
                self.sample()
            except Exception as exc:             # kept for the report; the next sample tries again
                self.errors.append(repr(exc))

    def engines(self, host: str) -> list[Engine]:
        """The engines seen under Ray workers whose title matches the regular expression `host`."""
        with self.lock:
            return [e for e in self.seen.values() if re.search(host, e.host)]

    def __repr__(self) -> str:
        with self.lock:
            seen = [(pid, e.title[:40], e.host, e.depth) for pid, e in self.seen.items()]
        return (f"EngineWatch({self.samples} samples, alive={self.is_alive()}, errors={self.errors[-3:]}, "
                f"seen={seen})")


class BatchRun(threading.Thread):
    """run_batch in a thread: the batch pipeline runs while the Serve app starts and is tested."""

    def __init__(self, checkpoint: Path, root: Path, planner_model: Path):
        super().__init__(daemon=True)
        self.checkpoint, self.out, self.planner_model = checkpoint, str(root / "out"), str(planner_model)
        self.manifest = write_manifest(str(root / "manifest.parquet"),
                                       [row for row in manifest_rows() if row["id"] in BATCH_ROWS] + LLM_ROWS)
        self.summary, self.error = None, None

    def run(self) -> None:
        from omnireel.pipelines.render import BatchOptions, run_batch
        try:
            self.summary = run_batch(self.manifest, self.out, str(self.checkpoint), BatchOptions(
                threads=2, save_latents=True, cpus_per_rank=BATCH_CPUS_PER_RANK,
                voices_uri=str(Path(self.out).parent / "voices"), storyboard_model=self.planner_model))
        except BaseException as exc:          # handed to the test that asks for the result
            self.error = exc

    def result(self, timeout_s: float = 600.0):
        self.join(timeout_s)
        assert not self.is_alive(), f"the batch run did not finish within {timeout_s:g}s"
        if self.error is not None:
            raise self.error
        return self.summary


@dataclass
class Drivers:
    url: str                  # the Serve app's HTTP address
    batch: BatchRun
    watch: EngineWatch


@pytest.fixture(scope="module")
def drivers(ray_session, vllm_checkpoint, planner_model, tmp_path_factory):
    """The batch run (in a thread) and the Serve app, started together on the vllm-backend checkpoint."""
    from ray import serve

    from omnireel.deployments.app import APP_NAME, DEPLOYMENTS, configure, load_serve_config, serve_run, \
        wait_until_running

    root = tmp_path_factory.mktemp("vllm-drivers")
    watch = EngineWatch()
    watch.start()
    batch = BatchRun(vllm_checkpoint, root / "batch", planner_model)
    port = free_port()
    one_each = {d.name: {"num_replicas": 1, "autoscaling_config": None} for d in DEPLOYMENTS}
    config = configure(load_serve_config(), deployments=one_each, host="127.0.0.1", port=port, args={
        **SERVE_ARGS, "checkpoint": str(vllm_checkpoint), "storage_uri": str(root / "store"),
        "voices_uri": str(root / "voices"), "storyboard_model": str(planner_model), "planner_cpus": PLANNER_CPUS})
    try:
        # Serve's controller and proxy first: serve_run gives the proxy 60 s to start, which the batch's
        # worker processes, all starting at once on 2 cores, could take from it. The replicas and the
        # batch's pools then load side by side.
        serve_run(config, ray_session.get_runtime_context().gcs_address)
        batch.start()
        wait_until_running(APP_NAME, timeout_s=600)
        yield Drivers(f"http://127.0.0.1:{port}", batch, watch)
    finally:                # the session's Ray goes on: leave no app (and no engine) behind
        serve.shutdown()
        if batch.is_alive():
            batch.join(600)
        watch.done.set()
        watch.join()


def test_engine_thread_env_in_and_out_of_ray(ray_session):
    """The rule VLLMTextEncoder starts its engine with (no engine needed to check it), and the
    interpreter Ray's workers run."""
    from omnireel.model.text import VLLM_BIND_ENV, vllm_cpu_thread_env

    def in_worker(explicit: str | None = None) -> tuple[str, dict]:
        if explicit is not None:
            os.environ[VLLM_BIND_ENV] = explicit
        try:
            return sys.prefix, vllm_cpu_thread_env()
        finally:
            os.environ.pop(VLLM_BIND_ENV, None)

    assert vllm_cpu_thread_env() == {}                   # a driver (CLI, LocalEngine): vLLM's default
    remote = ray_session.remote(in_worker)
    prefix, env = ray_session.get(remote.options(num_cpus=2).remote())
    assert prefix == sys.prefix                          # Ray's workers run this venv
    threads = os.environ.get("OMP_NUM_THREADS", "2")    # Ray's: the task's CPUs, unless the user set it
    assert env == {VLLM_BIND_ENV: "nobind", "OMP_NUM_THREADS": threads}   # no binding, the worker's threads
    assert ray_session.get(remote.options(num_cpus=1).remote("0"))[1] == {}   # the user's choice stands


# ---- the Serve app ---------------------------------------------------------------------------------

Placed = list[tuple[int, psutil.Process]]   # (levels below the replica: 1 the engine core, 2 its worker, process)


def replica_engines() -> dict[str, Placed]:
    """The live vLLM engine processes under Serve replicas: deployment name -> where each sits.
    Told apart by place, not by title: vLLM's titles may never appear (see vllm_support.is_engine)."""
    found: dict[str, Placed] = {}
    for process in engine_processes():
        try:
            host, depth = ray_ancestry(process)
        except psutil.Error:
            continue
        if replica := REPLICA.search(host or ""):
            found.setdefault(replica[1], []).append((depth, process))
    return found


def describe(engines: dict[str, Placed]) -> dict[str, list[str]]:
    """engines, readable in an assertion message: each process as "pid title"."""
    def shown(process: psutil.Process) -> str:
        try:
            return f"{process.pid} {title(process)[:60]}"
        except psutil.Error:
            return f"{process.pid} (gone)"
    return {name: [f"{depth}: {shown(p)}" for depth, p in placed] for name, placed in engines.items()}


def depths(placed: Placed) -> list[int]:
    return sorted(depth for depth, _ in placed)


VLLM_REPLICAS = ["StoryboardPlanner", "TextEncoder"]   # the deployments that hold a vLLM engine


def settled_replica_engines(timeout_s: float = 120.0) -> dict[str, Placed]:
    """replica_engines() once the engine core and its worker of each of VLLM_REPLICAS are there, or
    after `timeout_s` (a look taken just as the app turns RUNNING could race the processes' last steps)."""
    deadline = time.monotonic() + timeout_s
    while True:
        engines = replica_engines()
        if all(len(engines.get(name, [])) >= 2 for name in VLLM_REPLICAS) or time.monotonic() > deadline:
            return engines
        time.sleep(1.0)


def test_text_encoder_replica_runs_vllm_with_unpinned_threads(drivers):
    engines = settled_replica_engines()
    assert sorted(engines) == VLLM_REPLICAS, describe(engines)   # only the text encoder and the planner run vLLM
    for name in VLLM_REPLICAS:
        assert depths(engines[name]) == [1, 2], describe(engines)    # its engine core, the core's worker
        [worker] = [process for depth, process in engines[name] if depth == 2]
        assert thread_cpus(worker) == unpinned(), name


def test_served_job_and_latents_match_the_torch_backend(drivers, tiny_engine):
    from ray import serve

    from omnireel.deployments.app import APP_NAME

    assert tiny_engine.config.text.backend == "hf"
    request = GenerationRequest(**FIELDS)
    local = tiny_engine.render(request)

    runner = serve.get_deployment_handle("JobRunner", APP_NAME)
    latents = runner.latents.remote(normalized(request)).result(timeout_s=120)
    video, audio = max_abs(latents.video, local.latents.video), max_abs(latents.audio, local.latents.audio)
    print(f"\nserved (vllm) vs local (torch) latents: max abs video {video:.2e}, audio {audio:.2e}")
    assert video <= LATENT_TOLERANCE and audio <= LATENT_TOLERANCE
    assert local.latents.video.abs().max() > 0.1

    with httpx.Client(base_url=drivers.url, timeout=120) as http:
        response = http.post("/v1/videos", json={**FIELDS, "seconds": str(FIELDS["seconds"])})
        assert response.status_code == 200, response.text
        video_id = response.json()["id"]
        deadline = time.monotonic() + 240
        while (job := http.get(f"/v1/videos/{video_id}").json())["status"] not in ("completed", "failed"):
            assert time.monotonic() < deadline, f"job not done in 240 s: {job}"
            time.sleep(0.1)
        assert job["status"] == "completed", job
        mp4 = http.get(f"/v1/videos/{video_id}/content").content
    streams = {s["type"]: s for s in media.probe(mp4)}
    assert (streams["video"]["codec"], streams["video"]["width"], streams["video"]["height"]) == ("h264", 32, 32)
    assert streams["video"]["frames"] == 8 and streams["audio"]["codec"] == "aac"
    assert psnr(media.decode_video(mp4), media.decode_video(local.artifact.data)) >= PSNR_DB


def test_served_llm_storyboard_is_planned_once_by_the_planner_deployment(drivers):
    from ray import serve

    from omnireel.deployments.app import APP_NAME
    from omnireel.storyboard import StoryboardTask, validate_shots

    planner = serve.get_deployment_handle("StoryboardPlanner", APP_NAME)
    assert planner.stats.remote().result(timeout_s=60) == {"requests": 0, "batches": 0}
    with httpx.Client(base_url=drivers.url, timeout=120) as http:
        response = http.post("/v1/videos", json={**LLM_FIELDS, "seconds": str(LLM_FIELDS["seconds"])})
        assert response.status_code == 200, response.text
        video_id = response.json()["id"]
        refused = http.post("/v1/videos", json={**LLM_FIELDS, "prompt": TOO_LONG, "seconds": "0.5"})
        deadline = time.monotonic() + 240
        while (job := http.get(f"/v1/videos/{video_id}").json())["status"] not in ("completed", "failed"):
            assert time.monotonic() < deadline, f"job not done in 240 s: {job}"
            time.sleep(0.1)
    assert job["status"] == "completed", job
    error = refused.json()["error"]
    assert refused.status_code == 400 and (error["param"], error["code"]) == ("storyboard", "storyboard_unavailable")
    assert error["message"].startswith("storyboard: the prompt takes ") and "\n" not in error["message"]
    # two creates, two plans (the refused one included), none by any stage: each planned once, at admission
    assert planner.stats.remote().result(timeout_s=60)["requests"] == 2

    store = serve.get_deployment_handle("JobStore", APP_NAME)
    record = store.get.remote(video_id).result(timeout_s=60)
    shots = record.request["shots"]
    assert 1 <= len(shots) <= 2 and abs(sum(shot["seconds"] for shot in shots) - 0.5) < 1e-9
    request = GenerationRequest(**LLM_FIELDS)
    again = planner.plan.remote(StoryboardTask.of(request)).result(timeout_s=120)   # greedy: the same storyboard
    assert normalized(request.model_copy(update={"shots": validate_shots(again["shots"])}))["shots"] == shots
    assert not drivers.watch.engines(r"ServeReplica:omnireel:Ingress"), drivers.watch   # the ingress never built one


def test_serve_shutdown_stops_the_engine(drivers):
    from ray import serve

    engines = settled_replica_engines()
    for name in VLLM_REPLICAS:
        assert depths(engines.get(name, [])) == [1, 2], describe(engines)
    engines = [process for name in VLLM_REPLICAS for _, process in engines[name]]
    serve.shutdown()
    gone, alive = psutil.wait_procs(engines, timeout=ENGINE_EXIT_S)
    assert not alive, f"serve.shutdown() left vLLM processes running: {[(p.pid, title(p)) for p in alive]}"


# ---- the batch pipeline ------------------------------------------------------------------------------

def test_batch_rows_through_vllm_match_the_torch_backend(drivers, tiny_engine):
    from omnireel.pipelines import rows
    from omnireel.pipelines.render import LATENTS_EXTENSION

    summary = drivers.batch.result()
    assert (summary.rows, summary.rendered, summary.failed, summary.invalid) == (4, 3, 0, 1), \
        read_parquet(summary.errors_uri)
    [refused] = read_parquet(summary.errors_uri)          # the planner pool refused the too-long prompt
    assert (refused["id"], refused["stage"], refused["field"]) == ("storm", "storyboard", "storyboard"), refused
    assert refused["message"].startswith("storyboard: the prompt takes "), refused

    encode = drivers.watch.engines(r"MapBatches\(EncodePool\)")
    # the planner pool's own actors (validation not fused into them: it stays in parallel tasks)
    planners = drivers.watch.engines(r"MapWorker\(MapBatches\(StoryboardPlanners\)\)")
    for engines in (encode, planners):
        assert sorted(e.depth for e in engines) == [1, 2], drivers.watch     # the engine core, its worker
        [worker] = [e for e in engines if e.depth == 2]
        assert worker.cpus == unpinned()
    assert not drivers.watch.engines(r"DenoisePool|DecodePool|validate")   # only those two actors run vLLM

    out = drivers.batch.out
    results = {r["id"]: r for r in read_parquet(summary.results_uri)}
    manifest = {r["id"]: r for r in manifest_rows()}
    for row_id in BATCH_ROWS:
        fields = {k: v for k, v in manifest[row_id].items() if k != "id"}
        if isinstance(fields.get("shots"), str):
            fields["shots"] = json.loads(fields["shots"])
        local = tiny_engine.render(GenerationRequest(**fields))
        result = results[row_id]
        latents = rows.decode_payload("latents", storage.read_bytes(
            storage.artifact_uri(out, result["key"], LATENTS_EXTENSION)))
        video, audio = max_abs(latents.video, local.latents.video), max_abs(latents.audio, local.latents.audio)
        print(f"\nbatch row {row_id} (vllm) vs local (torch) latents: max abs video {video:.2e}, audio {audio:.2e}")
        assert video <= LATENT_TOLERANCE and audio <= LATENT_TOLERANCE
        data = storage.read_bytes(result["uri"])
        assert {s["type"] for s in media.probe(data)} == {"video", "audio"}
        assert psnr(media.decode_video(data), media.decode_video(local.artifact.data)) >= PSNR_DB

    # the LLM row: rendered with the planner's shots, as LocalEngine renders the same planned request
    planned = json.loads(storage.read_bytes(storage.sidecar_uri(out, results["dunes"]["key"])))["request"]
    assert planned["storyboard"] == "llm" and 1 <= len(planned["shots"]) <= 2
    local = tiny_engine.render(GenerationRequest(**planned))
    latents = rows.decode_payload("latents", storage.read_bytes(
        storage.artifact_uri(out, results["dunes"]["key"], LATENTS_EXTENSION)))
    assert max_abs(latents.video, local.latents.video) <= LATENT_TOLERANCE

    gone, alive = psutil.wait_procs([e.process for e in encode + planners], timeout=ENGINE_EXIT_S)
    assert not alive, f"the batch run left vLLM processes running: {[(p.pid, title(p)) for p in alive]}"
