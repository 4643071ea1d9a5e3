"""The Serve app against LocalEngine: end-to-end HTTP latency at concurrency 1 (as a ratio) and
jobs/minute at concurrency 1, 4 and 8, with step-level batching off and on.

    python benchmarks/serve.py [--checkpoint DIR] [--repeats 5] [--concurrency 1,4,8] [--batch-jobs 8]
                               [--rounds 2] [--throughput-only] [--set ARG=VALUE ...]

Jobs/minute (smallest request) is measured on two copies of the app side by side in one Serve, runs
interleaved (off, on, on, off, ... --rounds runs of each per concurrency, jobs/minute over all of
them): batching off (max_batch_jobs 1, at /unbatched: the Backbone replica denoises one job at a
time) and on (max_batch_jobs --batch-jobs, at /: concurrent jobs share each denoising step),
printed side by side with their ratio.

Latency is measured for two requests on the same (tiny by default) checkpoint: the default request
(a prompt only: 256x256, 2 s at 24 fps, 8 steps), the one the ratio target is for, and the smallest
useful one (32x32, 0.5 s at 8 fps, 4 steps), whose few tens of milliseconds of compute expose the
fixed cost per job of the served path (HTTP, job store transitions, one Serve hop per stage on the
critical path, the client's polling), printed as "overhead" (HTTP minus LocalEngine).

Starts a local Ray and the app from deployments/serve_config.yaml (one replica per deployment, the
same torch thread count as the LocalEngine run), on a free port. One HTTP job = POST /v1/videos,
GET /v1/videos/{id}?wait_s=60 (a long poll: answered when the job ends; --poll-s S polls instead)
until completed, GET .../content; every job has its own seed, so no
artifact is reused. On a 2-core machine the concurrency figures show contention, not scaling.

CPU per job: during each jobs/minute run, the CPU seconds of every process of the local cluster (by
deployment of the app under test, the proxy, the client, the rest), per job, batching off and on.
Where the machine's cores are the limit, this says where a job's cost is, and the "denoise bound"
(total / (total - Backbone)) is the most any batching of the denoiser could give end to end.
`--threads` above 1 gives every replica an OpenMP team: on a machine with fewer cores than replicas
x threads its spin-waits show up here as compute stages' CPU.

Per stage (default request): each stage deployment called alone through its handle with
LocalEngine's inputs, against the same stage in this process (so one Serve hop is included), to
show where the served path loses time. `--set ARG=VALUE` overrides a build_app arg as `omnireel serve
--set` does, e.g. `--set compute_niceness=null` (the compute threads at Ray's nice 15) or
`--set stage_threads={}` (decode_audio on `--threads` too), for comparison.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402



UNBATCHED_APP = "omnireel-unbatched"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_job(url: str, body: dict, poll_s: float = 0.0) -> float:
    """Seconds from POST to the downloaded MP4; the job is polled every `poll_s` seconds, or with
    one long poll (GET ...?wait_s=60, answered when the job ends) when it is 0."""
    start = time.perf_counter()
    with httpx.Client(base_url=url, timeout=600) as http:
        video = http.post("/v1/videos", json=body).raise_for_status().json()
        while video["status"] not in ("completed", "failed"):
            if poll_s:
                time.sleep(poll_s)
            video = http.get(f"/v1/videos/{video['id']}", params={"wait_s": 0 if poll_s else 60}
                             ).raise_for_status().json()
        if video["status"] != "completed":
            raise RuntimeError(f"job failed: {video['error']}")
        http.get(f"/v1/videos/{video['id']}/content").raise_for_status()
    return time.perf_counter() - start


def cpu_seconds_by_process() -> dict[int, tuple[str, float]]:
    """pid -> (what it is, user + system CPU seconds so far) of this process and every process under
    it: the local Ray cluster ray.init started (GCS, raylet, Serve's controller, proxy and replicas)."""
    me = psutil.Process()
    out = {}
    for process in [me, *me.children(recursive=True)]:
        try:
            title = " ".join(process.cmdline()) or process.name()
            times = process.cpu_times()
        except psutil.Error:                  # ended since the listing
            continue
        out[process.pid] = ("client" if process.pid == me.pid else title, times.user + times.system)
    return out


def cpu_by_deployment(before: dict, after: dict, app: str) -> dict[str, float]:
    """CPU seconds spent between two cpu_seconds_by_process snapshots, by `app`'s deployment (from
    the replicas' process titles, ray::ServeReplica:APP:NAME or NAME.method while a call runs), the
    rest as client / proxy / other."""
    spent: dict[str, float] = {}
    for pid, (title, seconds) in after.items():
        prefix = f"ray::ServeReplica:{app}:"
        name = (title[len(prefix):].split()[0].split(".")[0] if title.startswith(prefix) else   # NAME.method
                "proxy" if title.startswith("ray::ProxyActor") else
                "client" if title == "client" else
                None if title.startswith("ray::ServeReplica:") else "other")   # the other app: idle
        if name:
            spent[name] = spent.get(name, 0.0) + seconds - before.get(pid, (title, 0.0))[1]
    return spent


def stage_by_stage(engine, request, repeats: int) -> dict[str, tuple[float, float]]:
    """stage -> (median seconds of the stage deployment called alone through its handle, median
    seconds of the same stage in this process), on LocalEngine's payloads for `request`."""
    from ray import serve

    from omnireel.deployments.app import APP_NAME
    from omnireel.deployments.stage_replica import NO_JOB
    from omnireel.stages import STAGE_GRAPH, run_stage

    values = {"plan": engine.plan(request)}
    for stage in STAGE_GRAPH:
        values[stage.output] = run_stage(stage, engine.components, values)
    out = {}
    for stage in STAGE_GRAPH:
        if not stage.deployment:            # runs in the JobRunner
            continue
        handle = serve.get_deployment_handle(stage.deployment, APP_NAME)
        inputs = [values[name] for name in stage.inputs]
        served, local = [], []
        for _ in range(repeats):            # interleaved, like the jobs
            start = time.perf_counter()
            handle.run.remote(stage.name, NO_JOB, *inputs).result()
            served.append(time.perf_counter() - start)
            start = time.perf_counter()
            run_stage(stage, engine.components, values)
            local.append(time.perf_counter() - start)
        out[stage.name] = (statistics.median(served), statistics.median(local))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="checkpoint folder (default: a fresh tiny one)")
    parser.add_argument("--repeats", type=int, default=5, help="jobs per latency measurement")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, LocalEngine and every replica")
    parser.add_argument("--poll-s", type=float, default=0.0,
                        help="poll the job every this many seconds instead of one long poll (wait_s)")
    parser.add_argument("--set", action="append", metavar="ARG=VALUE", help="a build_app arg (YAML value), repeatable")
    parser.add_argument("--concurrency", default="1,4,8", help="client counts of the jobs/minute runs")
    parser.add_argument("--batch-jobs", type=int, default=8, help="max_batch_jobs of the batching-on run")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each app per concurrency (off and on alternate)")
    parser.add_argument("--throughput-only", action="store_true", help="only the jobs/minute runs")
    options = parser.parse_args()

    import ray

    from omnireel.checkpoint import init_checkpoint
    from omnireel.config import GenerationRequest
    from omnireel.deployments.app import (APP_NAME, DEPLOYMENTS, configure, load_serve_config, parse_set, serve_run,
                                          wait_until_running)
    from omnireel.engine import LocalEngine

    workdir = tempfile.mkdtemp(prefix="omnireel-bench-serve-")
    checkpoint = options.checkpoint or os.path.join(workdir, "tiny")
    if not options.checkpoint:
        init_checkpoint("tiny", checkpoint, seed=0)
    prompt = {"prompt": "a paper boat drifting down a rainy street"}
    requests = {"default": prompt,
                "smallest": {**prompt, "size": "32x32", "seconds": "0.5", "fps": 8, "steps": 4}}

    torch.set_num_threads(options.threads)
    engine = LocalEngine(checkpoint)
    engine.render(GenerationRequest(**requests["smallest"], seed=0))            # warm-up

    ray.init(num_cpus=max(8, os.cpu_count() or 1), include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    port = free_port()
    one_each = {d.name: {"num_replicas": 1, "autoscaling_config": None} for d in DEPLOYMENTS}
    concurrencies = [int(c) for c in options.concurrency.split(",")]

    def app_config(max_batch_jobs: int) -> dict:
        return configure(load_serve_config(), deployments=one_each, host="127.0.0.1", port=port, args={
            "checkpoint": checkpoint, "storage_uri": os.path.join(workdir, "store"), "threads": options.threads,
            "replica_cpus": 0.25, "cpus_per_rank": 0.25, "control_cpus": 0.05, "max_active_jobs": 64,
            "runner_max_ongoing": max(8, max(concurrencies)), "max_batch_jobs": max_batch_jobs,
            **parse_set(options.set)})

    config = app_config(options.batch_jobs)
    unbatched_app = {**app_config(1)["applications"][0], "name": UNBATCHED_APP, "route_prefix": "/unbatched"}
    config["applications"].append(unbatched_app)          # the same app beside it, batching off
    started = time.perf_counter()
    serve_run(config, ray.get_runtime_context().gcs_address)
    wait_until_running(APP_NAME)
    wait_until_running(UNBATCHED_APP)
    startup = time.perf_counter() - started
    url = f"http://127.0.0.1:{port}"
    seed = iter(range(1000, 10**6))
    latency = {}
    for name, request in ({} if options.throughput_only else requests).items():
        http_job(url, {**request, "seed": next(seed)}, options.poll_s)                          # warm-up
        engine.render(GenerationRequest(**request, seed=next(seed)))
        local, served, stages = [], [], []
        for _ in range(options.repeats):    # interleaved, so both see the same machine load
            start = time.perf_counter()
            stages.append(engine.render(GenerationRequest(**request, seed=next(seed))).timings)
            local.append(time.perf_counter() - start)
            served.append(http_job(url, {**request, "seed": next(seed)}, options.poll_s))
        latency[name] = (GenerationRequest(**request), statistics.median(local), statistics.median(served),
                         {stage: statistics.median(t[stage] for t in stages) for stage in stages[0]})

    per_stage = {} if options.throughput_only else stage_by_stage(
        engine, GenerationRequest(**requests["default"], seed=next(seed)), options.repeats)

    def timed_jobs(app_url: str, concurrency: int) -> tuple[int, float]:
        """(jobs, seconds) of 2 x concurrency (at least 8) smallest jobs from `concurrency` clients."""
        jobs = max(8, 2 * concurrency)
        bodies = [{**requests["smallest"], "seed": next(seed)} for _ in range(jobs)]
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(lambda body: http_job(app_url, body, options.poll_s), bodies))
        return jobs, time.perf_counter() - start

    from ray import serve

    batched, unbatched, batch_sizes, cpu_per_job = {}, {}, {}, {}
    apps = {"off": f"{url}/unbatched", "on": url}
    backbone, steps_seen = serve.get_deployment_handle("Backbone", APP_NAME), [0]

    def new_steps() -> list[int]:
        """Jobs per step of the batching replica's steps since the last call (its recent 1024 steps)."""
        steps = [jobs for jobs, _ in backbone.batching.remote().result()["recent_steps"]]
        new = steps[-(len(steps) - steps_seen[0]):] if len(steps) > steps_seen[0] else []
        steps_seen[0] = len(steps)
        return new

    for app_url in apps.values():                                                          # warm-up
        http_job(app_url, {**requests["smallest"], "seed": next(seed)}, options.poll_s)
    new_steps()
    for concurrency in concurrencies:       # off, on, on, off, ...: both see the same machine load
        totals = {"off": [0, 0.0], "on": [0, 0.0]}
        cpu = {"off": {}, "on": {}}
        for mode in ["off", "on", "on", "off"] * (options.rounds // 2) + ["off", "on"] * (options.rounds % 2):
            before = cpu_seconds_by_process()
            jobs, seconds = timed_jobs(apps[mode], concurrency)
            spent = cpu_by_deployment(before, cpu_seconds_by_process(), APP_NAME if mode == "on" else UNBATCHED_APP)
            totals[mode][0] += jobs
            totals[mode][1] += seconds
            for name, cpu_s in spent.items():
                cpu[mode][name] = cpu[mode].get(name, 0.0) + cpu_s
        cpu_per_job[concurrency] = {mode: {name: cpu_s / totals[mode][0] for name, cpu_s in cpu[mode].items()}
                                    for mode in cpu}
        unbatched[concurrency], batched[concurrency] = (60 * totals[m][0] / totals[m][1] for m in ("off", "on"))
        batch_sizes[concurrency] = new_steps()

    polling = f"polling every {options.poll_s:g} s" if options.poll_s else "long poll"
    app_args = config["applications"][0]["args"]
    print(f"preset {engine.config.name}, torch threads {options.threads} (stage_threads {app_args.get('stage_threads')}), "
          f"compute_niceness {app_args.get('compute_niceness')}, {os.cpu_count()} CPU cores, app startup "
          f"{startup:.0f} s; median of {options.repeats} jobs, LocalEngine and HTTP runs interleaved, {polling}")
    for name, (request, local_s, served_s, stages) in latency.items():
        target = " (target <= 1.10)" if name == "default" else ""
        print(f"latency at concurrency 1, {name} request ({request.size}, {request.seconds:g} s at {request.fps} fps, "
              f"{engine.plan(request).steps} steps): LocalEngine {local_s:.3f} s, HTTP end to end {served_s:.3f} s, "
              f"ratio {served_s / local_s:.2f}{target}, overhead {1000 * (served_s - local_s):.0f} ms")
        print("  LocalEngine stages: " + ", ".join(f"{stage} {t:.3f} s" for stage, t in stages.items()))
    if per_stage:
        print("per stage, default request, served (one handle call) / LocalEngine: " + ", ".join(
            f"{stage} {served_s:.3f}/{local_s:.3f} s" + (f" ({served_s / local_s:.2f})" if local_s >= 0.05 else "")
            for stage, (served_s, local_s) in per_stage.items()))
    smallest = GenerationRequest(**requests["smallest"])
    print(f"jobs/minute (smallest request: {smallest.size}, {smallest.seconds:g} s at {smallest.fps} fps, "
          f"{engine.plan(smallest).steps} steps), batching off (max_batch_jobs 1) / on (max_batch_jobs "
          f"{options.batch_jobs}): " + ", ".join(
              f"concurrency {c}: {unbatched[c]:.1f} / {batched[c]:.1f} ({batched[c] / unbatched[c]:.2f}x)"
              for c in concurrencies))
    print("  mean jobs per denoising step, batching on: " + ", ".join(
        f"concurrency {c}: {sum(sizes) / max(1, len(sizes)):.2f}" for c, sizes in batch_sizes.items()))
    print(f"CPU milliseconds per job (all processes of the local cluster, {os.cpu_count()} cores), batching off / on; "
          "'denoise bound': the most batching could give if denoising cost nothing (total / (total - Backbone)):")
    for c, modes in cpu_per_job.items():
        names = sorted(modes["off"], key=lambda n: -modes["off"][n])
        total = {mode: sum(modes[mode].values()) for mode in modes}
        bound = total["off"] / max(1e-9, total["off"] - modes["off"].get("Backbone", 0.0))
        print(f"  concurrency {c}: total {1000 * total['off']:.0f} / {1000 * total['on']:.0f}, " + ", ".join(
            f"{n} {1000 * modes['off'][n]:.0f} / {1000 * modes['on'].get(n, 0.0):.0f}" for n in names)
              + f"; denoise bound {bound:.2f}x")
    serve.shutdown()
    ray.shutdown()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
