"""BackboneGroup at tp=2 (gloo, CPU) batches: four jobs of different sizes, seeds, step counts and
guidance, submitted at different times, run together in rank 0's batch (every rank runs the same
StepPlan) and each returns its LocalEngine latents (within 1e-4); a fifth, cancelled mid-batch,
leaves at the next step on every rank while the others complete; a rank killed mid-batch fails every
call in the batch (none hangs) and the rebuilt group batches again."""
from __future__ import annotations

import pytest
from batching_support import JOBS, LONG, PARITY, expected, inputs, max_difference  # noqa: F401 (fixtures)

ray = pytest.importorskip("ray")

from omnireel.parallel.group import BackboneGroup, DenoiseJob, JobCancelled, RankFailure  # noqa: E402

TP = 2
RANK_THREADS = 1        # two ranks share the two test cores
RANK_NICENESS = 17      # above Ray's 15, so no CAP_SYS_NICE is needed


@pytest.fixture(scope="module")
def group(ray_session, tiny_checkpoint):
    g = BackboneGroup(tiny_checkpoint, TP, threads=RANK_THREADS, pg_timeout_s=30.0, niceness=RANK_NICENESS,
                      max_batch_jobs=8)
    yield g
    g.shutdown()


def test_jobs_submitted_at_different_times_batch_on_the_group_each_equal_to_local_engine_and_one_cancelled(
        group, inputs, expected):

    long_job = group.submit(DenoiseJob(*inputs[4]))
    first = group.submit(DenoiseJob(*inputs[0]))
    results = {0: first.result()}                          # job 0 done: the long one still runs
    later = {i: group.submit(DenoiseJob(*inputs[i])) for i in (1, 2)}   # join the long job's batch
    results[1] = later[1].result()
    long_job.cancel()                                      # leaves at the next step boundary
    later[3] = group.submit(DenoiseJob(*inputs[3]))
    results.update({i: later[i].result() for i in (2, 3)})
    with pytest.raises(JobCancelled) as stopped:
        long_job.result()
    assert len(set(stopped.value.steps_by_rank)) == 1 and stopped.value.steps < LONG.steps

    for i, latents in enumerate(expected):
        assert max_difference(results[i], latents) <= PARITY, JOBS[i]
    state = group.batching()
    assert state["running"] == state["waiting"] == 0
    jobs_per_step = [jobs for jobs, _ in state["recent_steps"]]
    assert max(jobs_per_step) >= 3                          # jobs ran together
    assert sum(jobs_per_step) == sum(r.steps for r in JOBS) + stopped.value.steps   # each job's steps, once


def test_a_rank_killed_mid_batch_fails_every_call_in_it_and_the_rebuilt_group_batches_again(group, inputs, expected):
    calls = [group.submit(DenoiseJob(*inputs[4])) for _ in range(2)]      # two long jobs, one batch

    def kill_rank_1_once_running():
        progress = calls[0].progress()
        if progress is not None and progress[0] >= 1 and len(group.rank_actors) == TP:
            ray.kill(group.rank_actors[1])

    with pytest.raises(RankFailure, match=r"rank 1 died"):
        calls[0].result(on_poll=kill_rank_1_once_running)
    with pytest.raises(RankFailure):                       # the other job of the batch fails too, at once
        calls[1].result()

    group.rebuild()
    again = [group.submit(DenoiseJob(*inputs[i])) for i in (0, 2)]
    assert max_difference(again[0].result(), expected[0]) <= PARITY
    assert max_difference(again[1].result(), expected[2]) <= PARITY
