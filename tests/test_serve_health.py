"""Health endpoints on the session's shared app: /livez (liveness: the ingress answers), /readyz
(readiness: started, and the API can answer) and /healthz (every deployment has a running replica,
as the Serve controller sees it). A killed deployment is named by /healthz until its replacement
runs, while readiness and liveness stay 200; a busy JobRunner is never reported as missing. The
load-side checks (probes every 0.5 s while the store is full, autoscaling) are in test_serve_load.py.
"""
from __future__ import annotations

import time

from omnireel.deployments.app import DEPLOYMENTS

from serve_support import DONE, LONG, create, kill, wait_done


def poll(http, path: str, until, timeout_s: float = 120.0):
    """GETs `path` until `until(response)`, every 0.2 s, within a deadline; returns that response."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = http.get(path)
        if until(response) or time.monotonic() > deadline:
            return response
        time.sleep(0.2)


def test_livez_readyz_and_healthz_answer_200_naming_every_deployment(served):
    with served.http(key=None) as http:              # no API key: probes carry none
        assert http.get("/livez").json() == {"status": "alive"}
        assert http.get("/readyz").json()["status"] == "ready"
        health = poll(http, "/healthz", lambda r: r.status_code == 200)
    assert health.status_code == 200, health.text
    deployments = health.json()["deployments"]
    assert set(deployments) == {d.name for d in DEPLOYMENTS}
    assert all(d["running"] >= 1 for d in deployments.values()), deployments


def test_healthz_stays_200_while_the_job_runner_is_at_its_limit(served):
    """The shared app's JobRunner runs 2 jobs and queues 1: three long jobs fill it. Health comes
    from the controller, not from a call queued behind those jobs (what answered 503 before)."""
    with served.http() as http:
        videos = [create(http, **LONG, seed=700 + i) for i in range(3)]
        wait_done(http, videos[1]["id"], until=lambda v: v["status"] != "queued")
        answers = [http.get("/healthz") for _ in range(6)]
        for video in videos:
            http.delete(f"/v1/videos/{video['id']}")
        for video in videos:
            assert wait_done(http, video["id"])["status"] in DONE
    assert [a.status_code for a in answers] == [200] * 6, [a.text for a in answers]


def test_a_killed_deployment_is_named_by_healthz_until_it_runs_again(served):
    with served.http(key=None) as http:
        assert poll(http, "/healthz", lambda r: r.status_code == 200).status_code == 200
        kill("AudioDecoder")
        down = poll(http, "/healthz", lambda r: r.status_code == 503)
        ready, live = http.get("/readyz"), http.get("/livez")
        back = poll(http, "/healthz", lambda r: r.status_code == 200, timeout_s=240)
    assert down.status_code == 503, down.text
    assert down.json()["status"] == "unhealthy" and list(down.json()["unhealthy"]) == ["AudioDecoder"], down.text
    assert "no running replica" in down.json()["unhealthy"]["AudioDecoder"]
    assert int(down.headers["retry-after"]) > 0
    # A stage being replaced leaves jobs queued, not refused: still ready, and alive.
    assert ready.status_code == 200 and live.status_code == 200, (ready.text, live.text)
    assert back.status_code == 200, back.text


def test_the_rayservice_probes_keep_liveness_off_the_app_and_readiness_on_readyz():
    from pathlib import Path

    import yaml

    manifest = Path(__file__).resolve().parents[1] / "k8s" / "rayservice.yaml"
    cluster = yaml.safe_load(manifest.read_text())["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    workers = [g["template"]["spec"]["containers"][0] for g in cluster["workerGroupSpecs"]]

    def command(probe: dict) -> str:
        return " ".join(probe["exec"]["command"])

    for container in [head, *workers]:
        live = command(container["livenessProbe"])
        assert "local_raylet_healthz" in live and ":8000" not in live      # the node, never the app
    assert ":8000" not in command(head["readinessProbe"])                    # KubeRay submits the app once the head is ready
    for container in workers:
        ready = command(container["readinessProbe"])
        assert "local_raylet_healthz" in ready and "localhost:8000/readyz" in ready
        assert "/healthz" not in ready.replace("raylet_healthz", "").replace("gcs_healthz", "")
