"""A bounded load against an autoscaled app: admission, health and replica counts under overload.

    python benchmarks/load.py [--checkpoint DIR] [--requests 40] [--concurrency 12] [--steps 8]

Starts a local Ray and the app from deployments/serve_config.yaml on 127.0.0.1 (a free port) with
every stage deployment autoscaled between 1 and 2 replicas (fractional CPUs, target_ongoing_requests
1, upscale/downscale delays of a few seconds: `autoscaled_deployments`) and a job store bounded to
`--max-active` jobs. Then `--concurrency` clients share a fixed number of create attempts
(`--requests`): each creates a video, long-polls it until it ends (GET ?wait_s=), and creates the
next; a create refused with 429/503 waits its Retry-After and counts as one attempt. Meanwhile
/healthz is probed every 0.5 s and each deployment's running replicas are sampled every 0.5 s, until
the load has ended and every stage is back at its minimum. Prints accepted / rejected / completed /
failed counts, anything else (a 5xx, a timeout: the goal is none), p50/p95 job latency, health-check
failures after start-up (goal 0) and each stage's replica count timeline.

The same pieces (`autoscaled_deployments`, `drive`, `HealthProbe`, `ReplicaTimeline`) run in
tests/test_serve_load.py against the test session's Serve.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402

from omnireel.stages import STAGE_GRAPH  # noqa: E402

STAGES = tuple(dict.fromkeys(stage.deployment for stage in STAGE_GRAPH if stage.deployment))   # the stage deployments
SCALING = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 1,
           "downscale_delay_s": 4, "metrics_interval_s": 0.5, "look_back_period_s": 2}
# A small app on one machine: fractional CPUs, one torch thread per replica, a job store of 8 jobs.
LOAD_ARGS = {"tp": 1, "threads": 1, "replica_cpus": 0.1, "cpus_per_rank": 0.1, "control_cpus": 0.05,
             "max_active_jobs": 8, "runner_max_ongoing": 8, "runner_max_queued": 4, "lease_s": 10.0,
             "retry_after_s": 1,
             # compute at Ray's nice 15 like the proxy and the ingress: on 2 cores, 8 jobs' compute threads
             # at nice 0 starved the proxy past a 5 s probe timeout (one run of the test, load average 10)
             "compute_niceness": None}
REQUEST = {"prompt": "a paper boat in the rain", "size": "32x32", "seconds": "0.5", "fps": 8, "steps": 8}
ACTIVE = ("queued", "in_progress")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def autoscaled_deployments() -> dict[str, dict]:
    """Deployment options: each stage autoscaled 1..2 with short delays; the rest one replica each."""
    options = {name: {"num_replicas": None, "autoscaling_config": dict(SCALING)} for name in STAGES}
    for name in ("Ingress", "JobStore", "JobRunner"):
        options[name] = {"num_replicas": 1, "autoscaling_config": None}
    return options


# ---- the load ------------------------------------------------------------------------------------

@dataclass
class LoadResult:
    accepted: int = 0
    rejected: list = field(default_factory=list)       # (status code, Retry-After header or None)
    completed: int = 0
    failed: list = field(default_factory=list)         # the error of each job that ended failed
    other: list = field(default_factory=list)          # anything else: a 5xx, a 4xx, a timeout (goal: none)
    latencies: list = field(default_factory=list)      # seconds from create to the job's end, completed jobs
    started_at: float = 0.0
    ended_at: float = 0.0

    def percentile(self, q: float) -> float:
        values = sorted(self.latencies)
        return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else float("nan")


def drive(url: str, requests: int, concurrency: int, body: dict | None = None, api_key: str | None = None,
          wait_s: float = 30.0, seed: int = 0, max_backoff_s: float = 5.0) -> LoadResult:
    """`requests` create attempts shared by `concurrency` clients (see the module docstring);
    returns when every accepted job has ended. `url` is the app's root (the API is at url/v1)."""
    result = LoadResult(started_at=time.monotonic())
    lock = threading.Lock()
    attempts = iter(range(requests))
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {**REQUEST, **(body or {})}

    def next_attempt():
        with lock:
            return next(attempts, None)

    def note(kind: str, value) -> None:
        with lock:
            getattr(result, kind).append(value)

    def client() -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=wait_s + 30) as http:
            while (attempt := next_attempt()) is not None:
                start = time.monotonic()
                try:
                    created = http.post("/v1/videos", json={**body, "seed": seed + attempt})
                except httpx.HTTPError as exc:
                    note("other", f"create: {type(exc).__name__}: {exc}")
                    continue
                if created.status_code in (429, 503):
                    retry_after = created.headers.get("retry-after")
                    note("rejected", (created.status_code, retry_after))
                    time.sleep(min(float(retry_after or max_backoff_s), max_backoff_s))   # as the client is told
                    continue
                if created.status_code != 200:
                    note("other", f"create: {created.status_code} {created.text[:200]}")
                    continue
                with lock:
                    result.accepted += 1
                video = created.json()
                while video["status"] in ACTIVE:
                    try:
                        polled = http.get(f"/v1/videos/{video['id']}", params={"wait_s": wait_s})
                    except httpx.HTTPError as exc:
                        note("other", f"long poll: {type(exc).__name__}: {exc}")
                        break
                    if polled.status_code != 200:
                        note("other", f"long poll: {polled.status_code} {polled.text[:200]}")
                        if polled.status_code == 503:
                            time.sleep(float(polled.headers.get("retry-after", 1)))
                            continue
                        break
                    video = polled.json()
                if video["status"] == "completed":
                    with lock:
                        result.completed += 1
                        result.latencies.append(time.monotonic() - start)
                elif video["status"] == "failed":
                    note("failed", video["error"])

    threads = [threading.Thread(target=client, name=f"load-client-{i}") for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.ended_at = time.monotonic()
    return result


# ---- what is watched while it runs ---------------------------------------------------------------

class HealthProbe(threading.Thread):
    """GET `url` every `period_s` seconds (as a readiness probe does) until stopped; keeps every
    answer that was not a 200 (status or error, body, seconds since the probe started)."""

    def __init__(self, url: str, period_s: float = 0.5, timeout_s: float = 5.0):
        super().__init__(name="health-probe", daemon=True)
        self.url, self.period_s, self.timeout_s = url, period_s, timeout_s
        self.probes, self.failures = 0, []
        self.started_at = time.monotonic()
        self._stop_event = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=self.timeout_s) as http:
            while not self._stop_event.is_set():
                at = time.monotonic() - self.started_at
                try:
                    response = http.get(self.url)
                    if response.status_code != 200:
                        self.failures.append((at, response.status_code, response.text[:300]))
                except httpx.HTTPError as exc:
                    self.failures.append((at, type(exc).__name__, str(exc)[:300]))
                self.probes += 1
                self._stop_event.wait(self.period_s)      # the probe period

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


class ReplicaTimeline(threading.Thread):
    """Running (and starting) replicas of each deployment of `app`, from serve.status(), every
    `period_s` seconds until stopped."""

    def __init__(self, app: str, period_s: float = 0.5):
        super().__init__(name="replica-timeline", daemon=True)
        self.app, self.period_s = app, period_s
        self.samples: list[tuple[float, dict[str, int]]] = []       # (seconds, {deployment: running})
        self.starting: list[dict[str, int]] = []                    # per sample: {deployment: starting}
        self.started_at = time.monotonic()
        self._stop_event = threading.Event()

    def run(self) -> None:
        from ray import serve
        while not self._stop_event.is_set():
            status = serve.status().applications.get(self.app)
            if status is not None:
                self.starting.append({name: d.replica_states.get("STARTING", 0)
                                      for name, d in status.deployments.items()})
                self.samples.append((time.monotonic() - self.started_at, {
                    name: d.replica_states.get("RUNNING", 0) for name, d in status.deployments.items()}))
            self._stop_event.wait(self.period_s)

    def counts(self, deployment: str) -> list[int]:
        """The deployment's replica counts (running + starting: what the autoscaler asked for, less
        replicas stopping), consecutive repeats dropped. On a loaded 2-core machine a new replica can
        take longer to start than the load lasts; the timeline shows which ones ran."""
        out: list[int] = []
        for (_, counts), starting in zip(self.samples, self.starting):
            if deployment in counts:
                count = counts[deployment] + starting.get(deployment, 0)
                if not out or out[-1] != count:
                    out.append(count)
        return out

    def timeline(self, deployment: str) -> str:
        """`running@seconds` at each change, `+n` for replicas starting: `1@0.0 1+1@4.5 2@9.0 1@21.0`."""
        out, last = [], None
        for (at, counts), starting in zip(self.samples, self.starting):
            now = (counts.get(deployment), starting.get(deployment, 0))
            if now != last:
                last = now
                out.append(f"{now[0]}{f'+{now[1]}' if now[1] else ''}@{at:.1f}")
        return " ".join(out)

    def latest(self) -> dict[str, int]:
        """{deployment: running + starting replicas} of the newest sample."""
        (_, running), starting = self.samples[-1], self.starting[-1]
        return {name: count + starting.get(name, 0) for name, count in running.items()}

    def wait_for(self, condition, timeout_s: float) -> bool:
        """Until condition(latest counts: running + starting per deployment) holds (polled each
        sample) or `timeout_s` passes."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.samples and condition(self.latest()):
                return True
            self._stop_event.wait(self.period_s)
        return False

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def scaled_up_and_down(timeline: ReplicaTimeline, deployment: str, low: int = 1, high: int = 2) -> bool:
    """The deployment's replica counts (running + starting) went low -> high -> low, in that order."""
    counts = timeline.counts(deployment)
    try:
        up = counts.index(high, counts.index(low))
        counts.index(low, up)
    except ValueError:
        return False
    return True


def report(result: LoadResult, probe: HealthProbe, timeline: ReplicaTimeline, stages=STAGES) -> list[str]:
    codes = sorted({code for code, _ in result.rejected})
    without = sum(1 for _, retry_after in result.rejected if not retry_after)
    lines = [
        f"accepted {result.accepted}, rejected {len(result.rejected)} ({'/'.join(map(str, codes)) or '-'}; "
        f"{without} without Retry-After), completed {result.completed}, failed {len(result.failed)}, "
        f"other answers {len(result.other)} (goal 0) in {result.ended_at - result.started_at:.1f} s",
        f"job latency (create to end, completed jobs): p50 {result.percentile(0.5):.2f} s, "
        f"p95 {result.percentile(0.95):.2f} s",
        f"health checks: {probe.probes} probes of {probe.url.rsplit('/', 1)[-1]} every {probe.period_s:g} s, "
        f"{len(probe.failures)} failures (goal 0)",
        "replicas over time (running[+starting]@seconds since the load began):",
        *[f"  {name:<13} {timeline.timeline(name)}" for name in stages]]
    lines += [f"  other answer: {o}" for o in result.other[:5]]
    lines += [f"  failed job: {f}" for f in result.failed[:5]]
    lines += [f"  health failure at {at:.1f} s: {code} {body}" for at, code, body in probe.failures[:5]]
    return lines


# ---- the benchmark -------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="checkpoint folder (default: a fresh tiny one)")
    parser.add_argument("--requests", type=int, default=40, help="create attempts in all (the load's bound)")
    parser.add_argument("--concurrency", type=int, default=12, help="clients creating and long-polling at once")
    parser.add_argument("--steps", type=int, default=REQUEST["steps"], help="denoising steps per job")
    parser.add_argument("--max-active", type=int, default=LOAD_ARGS["max_active_jobs"],
                        help="jobs the store holds queued or in progress (429 beyond)")
    parser.add_argument("--settle-s", type=float, default=120.0,
                        help="how long to wait after the load for every stage to scale back down")
    options = parser.parse_args()

    import ray
    from ray import serve

    from omnireel.checkpoint import init_checkpoint
    from omnireel.deployments.app import APP_NAME, configure, load_serve_config, serve_run, wait_until_running

    workdir = tempfile.mkdtemp(prefix="omnireel-bench-load-")
    checkpoint = options.checkpoint or os.path.join(workdir, "tiny")
    if not options.checkpoint:
        init_checkpoint("tiny", checkpoint, seed=0)
    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    port = free_port()
    config = configure(load_serve_config(), deployments=autoscaled_deployments(), host="127.0.0.1", port=port,
                       args={**LOAD_ARGS, "checkpoint": checkpoint, "storage_uri": os.path.join(workdir, "store"),
                             "max_active_jobs": options.max_active})
    started = time.monotonic()
    serve_run(config, ray.get_runtime_context().gcs_address)
    wait_until_running(APP_NAME)
    startup = time.monotonic() - started
    url = f"http://127.0.0.1:{port}"

    timeline, probe = ReplicaTimeline(APP_NAME), HealthProbe(f"{url}/healthz")
    timeline.start()
    probe.start()
    result = drive(url, options.requests, options.concurrency, {"steps": options.steps}, seed=1000)
    settled = timeline.wait_for(lambda counts: all(counts.get(s) == SCALING["min_replicas"] for s in STAGES),
                                options.settle_s)
    probe.stop()
    timeline.stop()

    print(f"preset tiny (or --checkpoint), {os.cpu_count()} CPU cores, app startup {startup:.0f} s; "
          f"{options.requests} create attempts by {options.concurrency} clients, request "
          f"{REQUEST['size']} {REQUEST['seconds']} s at {REQUEST['fps']} fps, {options.steps} steps; "
          f"store limit {options.max_active} jobs; stages autoscaled {SCALING['min_replicas']}..{SCALING['max_replicas']} "
          f"(target_ongoing_requests {SCALING['target_ongoing_requests']}, upscale/downscale delay "
          f"{SCALING['upscale_delay_s']:g}/{SCALING['downscale_delay_s']:g} s)")
    for line in report(result, probe, timeline):
        print(line)
    scaled = [s for s in STAGES if scaled_up_and_down(timeline, s)]
    print(f"scaled 1 -> 2 -> 1: {', '.join(scaled) or 'none'}"
          f"{'' if settled else f' (not every stage back at 1 within {options.settle_s:g} s)'}")
    serve.shutdown()
    ray.shutdown()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
