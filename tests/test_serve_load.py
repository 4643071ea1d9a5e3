"""Under load: health that stays true, admission that holds, autoscaling that is seen.

A second app (benchmarks/load.py's settings: every stage deployment autoscaled 1..2 on fractional
CPUs with delays of a few seconds, a job store of 8 jobs, a JobRunner taking 4 at a time with 4
more queued) runs beside the shared one in the session's Serve, at /load on the same port. While
jobs run and the store is full, /healthz and /readyz are probed every 0.5 s: no answer but 200;
creates beyond the store get 429/503 with Retry-After; every accepted job completes; a long poll
answers by its own wait. Then benchmarks/load.py's bounded load (a fixed number of create attempts
from 10 clients) scales the loaded stage (the Backbone: every job's denoising) from 1 replica to 2
and, once the load is over, back to 1.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from serve_support import app_beside, load_benchmark

LOAD_APP = "omnireel-load"
load = load_benchmark()


@pytest.fixture(scope="module")
def loaded(served, ray_session, tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    args = {**load.LOAD_ARGS, "checkpoint": str(tiny_checkpoint), "storage_uri": str(root / "store"),
            "voices_uri": str(root / "voices")}
    with app_beside(served, ray_session, LOAD_APP, "/load", args, load.autoscaled_deployments()) as url:
        yield url


def probes(url: str) -> list:
    started = [load.HealthProbe(f"{url}/healthz"), load.HealthProbe(f"{url}/readyz")]
    for probe in started:
        probe.start()
    return started


def test_a_bounded_load_scales_the_backbone_1_to_2_to_1_with_no_health_failure(loaded):
    timeline = load.ReplicaTimeline(LOAD_APP)
    timeline.start()
    health = load.HealthProbe(f"{loaded}/healthz")
    health.start()
    # 60 create attempts from 9 clients (one more than the store holds), 24 steps a job: long enough
    # for a second Backbone replica to start while the load lasts.
    result = load.drive(loaded, requests=60, concurrency=9, body={"steps": 24}, seed=2000)
    scaled = timeline.wait_for(lambda counts: load.scaled_up_and_down(timeline, "Backbone"), timeout_s=180)
    health.stop()
    timeline.stop()
    print("\n".join(load.report(result, health, timeline)))
    assert result.other == [] and result.failed == [], (result.other, result.failed)
    assert result.accepted and result.completed == result.accepted
    assert all(code in (429, 503) and int(after) > 0 for code, after in result.rejected), result.rejected
    assert health.failures == []
    assert scaled, timeline.timeline("Backbone")


def test_health_stays_200_while_8_jobs_run_and_creates_beyond_the_store_get_429_or_503(loaded):
    health = probes(loaded)
    limit = load.LOAD_ARGS["max_active_jobs"]
    with httpx.Client(base_url=loaded, timeout=60) as http:
        # A burst of 12 creates against a store of 8 (jobs long enough that none ends during it).
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda seed: http.post("/v1/videos", json={**load.REQUEST, "steps": 24,
                                                                                "seed": 500 + seed}), range(12)))
        accepted = [a.json()["id"] for a in answers if a.status_code == 200]
        refused = [a for a in answers if a.status_code != 200]
        assert len(accepted) >= limit and refused, [a.text for a in answers]
        for response in refused:                  # the store is full: refused, with when to come back
            assert response.status_code in (429, 503), response.text
            assert int(response.headers["retry-after"]) > 0
            assert response.json()["error"]["code"] in ("queue_full", "unavailable")
        queued = http.get(f"/v1/videos/{accepted[-1]}").json()
        # A long poll answers by its own wait (plus WAIT_MARGIN_S), the job still going: a client
        # whose timeout is the wait plus a margin never times out.
        assert queued["status"] in ("queued", "in_progress")
        polled = http.get(f"/v1/videos/{accepted[-1]}", params={"wait_s": 1}, timeout=1 + 10)
        assert polled.status_code == 200
        finals = []
        for video_id in accepted:
            video = http.get(f"/v1/videos/{video_id}", params={"wait_s": 60}, timeout=60 + 10).json()
            while video["status"] in load.ACTIVE:
                video = http.get(f"/v1/videos/{video_id}", params={"wait_s": 60}, timeout=60 + 10).json()
            finals.append(video)
    for probe in health:
        probe.stop()
    assert [v["status"] for v in finals] == ["completed"] * len(accepted), [v["error"] for v in finals]
    for probe in health:
        print(f"{probe.url}: {probe.probes} probes, failures {probe.failures}")
        assert probe.probes >= 2 and probe.failures == []
