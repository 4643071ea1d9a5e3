"""One Backbone replica batches, at tp=1 (on itself) and at tp=2 (on its group's rank 0, gloo): four
jobs of different sizes, seeds, step counts and guidance, sent at different times as concurrent
`run` calls, join one running batch and each returns its LocalEngine latents (within 1e-4); two long
ones, running before the others come and cancelled by their caller mid-batch, leave at the next step
while the others complete. The replica is
its own small Serve app beside the shared one."""
from __future__ import annotations

import pytest
from batching_support import JOBS, LONG, PARITY, SECOND_LONG, expected_latents, max_difference, wait_until_running

ray = pytest.importorskip("ray")

from ray import serve  # noqa: E402
from ray.serve.exceptions import RequestCancelledError  # noqa: E402

from omnireel.deployments.app import bind_stage_deployment, wait_until_running as wait_until_app_running  # noqa: E402
from omnireel.deployments.args import AppArgs  # noqa: E402
from omnireel.deployments.backbone import Backbone  # noqa: E402
from omnireel.deployments.stage_replica import NO_JOB  # noqa: E402
from omnireel.stages import BACKBONE_STAGE  # noqa: E402

APP = "batching"


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def backbone(request, served, tiny_checkpoint):
    """A Backbone deployment alone (no job store: NO_JOB calls report nothing), in the session's Serve;
    at tp=2 each rank takes one torch thread (the two share the test cores)."""
    tp = request.param
    args = AppArgs(checkpoint=str(tiny_checkpoint), tp=tp, threads=3 - tp, replica_cpus=0.25, cpus_per_rank=0.25,
                   max_batch_jobs=8).resolved()
    serve.run(bind_stage_deployment(Backbone, BACKBONE_STAGE, args, None), name=APP, route_prefix=None,
              blocking=False)
    try:
        wait_until_app_running(APP, timeout_s=600)
        yield serve.get_deployment_handle("Backbone", APP)
    finally:
        serve.delete(APP)


def test_concurrent_jobs_join_one_batch_each_equal_to_local_engine_and_a_cancelled_one_leaves(backbone,
                                                                                              tiny_engine):
    inputs = [tiny_engine.denoise_inputs(request) for request in (*JOBS, LONG, SECOND_LONG)]
    expected = [expected_latents(tiny_engine, x) for x in inputs[:len(JOBS)]]

    def run(x):
        return backbone.run.remote(BACKBONE_STAGE.name, NO_JOB, *x)

    long_jobs = [run(inputs[4]), run(inputs[5])]
    wait_until_running(lambda: backbone.batching.remote().result(), 2)   # both long ones step: later jobs join
    results = {0: run(inputs[0]).result(timeout_s=300)}
    later = {1: run(inputs[1]), 2: run(inputs[2])}
    results[1] = later[1].result(timeout_s=300)
    for long_job in long_jobs:
        long_job.cancel()                                  # leaves at the next step boundary
    later[3] = run(inputs[3])
    results.update({i: later[i].result(timeout_s=300) for i in (2, 3)})
    for long_job in long_jobs:
        with pytest.raises(RequestCancelledError):
            long_job.result(timeout_s=300)

    for i, latents in enumerate(expected):
        assert max_difference(results[i], latents) <= PARITY, JOBS[i]
    state = backbone.batching.remote().result()
    steps = state["recent_steps"][1:]                      # after the warm-up: two one-step jobs, one step
    assert state["running"] == state["waiting"] == 0
    assert max(jobs for jobs, _ in steps) >= 3             # jobs ran together: job 0 with both long ones
    assert sum(jobs for jobs, _ in steps) < sum(r.steps for r in JOBS) + 2 * LONG.steps   # the long jobs stopped

