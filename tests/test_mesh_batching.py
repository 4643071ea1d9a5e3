"""BackboneGroup batching on a (cfg=2, sp=2) mesh (gloo, CPU), for each family that takes the mesh and
batches with a different step (omni: one packed forward, its CFG rows spread over the cfg ranks and
its packed sequence split over the sp ranks; Wan: stacked transformer calls, of two sizes, spread
shape by shape): four jobs of different sizes, seeds, step counts and guidance, submitted at
different times while two long jobs run, step together in rank 0's batch (every rank runs the same
StepPlan) and each returns its LocalEngine latents (within 1e-4); no batched step fell back to
stepping its jobs one by one; one long job, cancelled mid-batch, leaves at the next step on every
rank while the others complete. cfg2 x sp2 covers both axes in one group of four ranks per family
(LTX-2 batches through the same stacked calls as Wan)."""
from __future__ import annotations

import pytest
from batching_support import JOBS, LONG, PARITY, SECOND_LONG, expected_latents, max_difference, wait_until_running

ray = pytest.importorskip("ray")

from omnireel.engine import LocalEngine  # noqa: E402
from omnireel.parallel.group import BackboneGroup, DenoiseJob, JobCancelled  # noqa: E402
from omnireel.parallel.mesh import MeshShape  # noqa: E402

MESH = MeshShape(cfg=2, sp=2)
RANK_THREADS = 1        # four ranks share the two test cores
RANK_CPUS = 0.25        # of Ray's 8 logical CPUs, beside the shared Serve app (conftest.ray_session)
RANK_NICENESS = 17      # above Ray's 15, so no CAP_SYS_NICE is needed


def wan_jobs():
    """test_diffusers_batching's Wan jobs (three of 32x32, one of 48x32) and two long 32x32 ones."""
    from test_diffusers_batching import SCENARIOS

    scenario = SCENARIOS["wan"]
    long = scenario.long.model_copy(update={"steps": LONG.steps})
    return scenario.jobs, (long, long.model_copy(update={"seed": 6}))


@pytest.fixture(scope="module", params=["omni", "wan"])
def family(request, ray_session, tiny_checkpoint, tiny_engine, wan_checkpoint):
    """(group on the mesh, jobs, the two long jobs, inputs of jobs + long ones, LocalEngine latents of the jobs)."""
    if request.param == "omni":
        checkpoint, engine, jobs, longs = tiny_checkpoint, tiny_engine, JOBS, (LONG, SECOND_LONG)
    else:
        checkpoint, engine = wan_checkpoint, LocalEngine(wan_checkpoint)
        jobs, longs = wan_jobs()
    inputs = [engine.denoise_inputs(r) for r in (*jobs, *longs)]
    expected = [expected_latents(engine, x) for x in inputs[:len(jobs)]]
    group = BackboneGroup(checkpoint, MESH.tp, mesh=MESH, threads=RANK_THREADS, cpus_per_rank=RANK_CPUS,
                          pg_timeout_s=30.0, niceness=RANK_NICENESS, max_batch_jobs=8)
    yield group, jobs, longs, inputs, expected
    group.shutdown()


def test_jobs_submitted_at_different_times_batch_on_the_mesh_each_equal_to_local_engine_and_one_cancelled(family):
    group, jobs, longs, inputs, expected = family
    long_jobs = [group.submit(DenoiseJob(*x)) for x in inputs[len(jobs):]]
    wait_until_running(group.batching, 2)                  # both long ones step: every later job joins them
    first = {i: group.submit(DenoiseJob(*inputs[i])) for i in (0, 1)}
    results = {0: first[0].result()}
    long_jobs[0].cancel()                                  # leaves at the next step boundary; the rest go on
    with pytest.raises(JobCancelled) as stopped:
        long_jobs[0].result()
    later = {i: group.submit(DenoiseJob(*inputs[i])) for i in (2, 3)}
    results.update({1: first[1].result(), **{i: later[i].result() for i in (2, 3)}})
    still = long_jobs[1].progress()                        # the other long one ran beside all of them
    long_jobs[1].cancel()
    with pytest.raises(JobCancelled) as second:
        long_jobs[1].result()

    for i, latents in enumerate(expected):
        assert max_difference(results[i], latents) <= PARITY, jobs[i]
    assert len(set(stopped.value.steps_by_rank)) == 1 and stopped.value.steps < longs[0].steps
    assert still is not None and still[0] < longs[1].steps and second.value.steps < longs[1].steps
    state = group.batching()
    assert state["running"] == state["waiting"] == 0
    assert state["isolated_steps"] == 0                    # every step ran its jobs as one batch
    jobs_per_step = [n for n, _ in state["recent_steps"]]
    assert max(jobs_per_step) >= 3                          # job 0 with both long ones
    assert sum(jobs_per_step) == sum(r.steps for r in jobs) + stopped.value.steps + second.value.steps
