"""BackboneGroup: two Ray rank actors (gloo) return LocalEngine's latents, whether the group makes
its own placement group or runs in a host's (as in a Serve replica); cancel stops every rank at the
same step; a killed rank fails the call quickly and a rebuilt group works again."""
from __future__ import annotations

import time

import pytest
import torch

from omnireel.config import GenerationRequest, Shot
from omnireel.stages import STAGE_GRAPH, run_stage

ray = pytest.importorskip("ray")

from omnireel.parallel.group import BackboneGroup, DenoiseJob, JobCancelled, RankFailure  # noqa: E402

TP = 2
RANK_THREADS = 1        # two ranks share the two test cores
RANK_NICENESS = 17      # of each rank's engine thread: above Ray's 15, so no CAP_SYS_NICE is needed
PARITY = 1e-4           # "equal to LocalEngine" (DESIGN.md §2)
KILL_BOUND_S = 20.0     # a dead rank must fail the call well within this


def request(steps: int | None = None, seed: int = 7) -> GenerationRequest:
    return GenerationRequest(prompt="a red fox in the snow", size="64x48", fps=8, seed=seed, steps=steps,
                             shots=[Shot(prompt="the fox runs", seconds=0.5),
                                    Shot(prompt="the fox stops and looks up", seconds=0.5)])


def denoise_job(engine, req: GenerationRequest) -> DenoiseJob:
    """The denoise stage's inputs, made by LocalEngine's own stages."""
    values = {"plan": engine.plan(req)}
    for stage in STAGE_GRAPH:
        if stage.name == "denoise":
            break
        values[stage.output] = run_stage(stage, engine.components, values)
    return DenoiseJob(values["plan"], values["text"], values["voice"], values["media"])


def assert_same_latents(found, expected):
    assert found.video.shape == expected.video.shape and found.audio.shape == expected.audio.shape
    assert (found.video - expected.video).abs().max().item() <= PARITY
    assert (found.audio - expected.audio).abs().max().item() <= PARITY


@pytest.fixture(scope="module")
def expected(tiny_engine):
    """LocalEngine's latents for `request()`: the oracle."""
    return tiny_engine.render(request()).latents


@pytest.fixture(scope="module")
def group(ray_session, tiny_checkpoint):
    """A group that creates its own placement group (as a Ray Data actor's would)."""
    g = BackboneGroup(tiny_checkpoint, TP, threads=RANK_THREADS, pg_timeout_s=30.0, niceness=RANK_NICENESS)
    yield g
    g.shutdown()


def test_a_degree_that_does_not_divide_the_heads_is_rejected_before_any_actor_starts(tiny_checkpoint):
    with pytest.raises(ValueError, match=r"tp=3 must divide backbone.heads=4"):
        BackboneGroup(tiny_checkpoint, 3)


@ray.remote(num_cpus=1)
class Host:
    """Stands in for a Serve replica: it lives in bundle 0 of its placement group and spawns the ranks
    into that same group (the replica's `placement_group_bundles`)."""

    def __init__(self, checkpoint: str):
        from ray.util import get_current_placement_group
        self.group = BackboneGroup(checkpoint, TP, placement_group=get_current_placement_group(),
                                   threads=RANK_THREADS)

    def denoise(self, job: DenoiseJob):
        steps = []
        latents = self.group.denoise(job.plan, job.text, job.voice, job.media, progress=lambda i, n: steps.append(i))
        return latents, steps


def test_a_group_in_its_hosts_placement_group_returns_local_engine_latents(
        ray_session, tiny_checkpoint, tiny_engine, expected):
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = placement_group(BackboneGroup.bundles(TP, use_gpu=False, host={"CPU": 1}), strategy="STRICT_PACK")
    assert pg.wait(60)
    host = Host.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
        pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)).remote(str(tiny_checkpoint))
    try:
        latents, steps = ray.get(host.denoise.remote(denoise_job(tiny_engine, request())), timeout=120)
    finally:
        ray.kill(host)            # its rank actors go with it
        remove_placement_group(pg)
    assert_same_latents(latents, expected)
    total = tiny_engine.config.sampler.steps
    assert steps == sorted(steps) and steps[-1] == total and all(1 <= i <= total for i in steps)


def test_a_group_of_two_returns_local_engine_latents(group, tiny_engine, expected):
    assert len(group.rank_actors) == TP
    job = denoise_job(tiny_engine, request())
    assert_same_latents(group.denoise(job.plan, job.text, job.voice, job.media), expected)


def test_each_ranks_engine_is_a_compute_thread_at_the_groups_nice_value(group):
    import os

    from omnireel.compute import compute_threads
    for rank in group.rank_actors:
        main, compute = ray.get(rank.__ray_call__.remote(
            lambda self: (os.getpriority(os.PRIO_PROCESS, os.getpid()), compute_threads())))
        assert compute and set(compute.values()) == {RANK_NICENESS}, compute
        assert main != RANK_NICENESS          # the rest of the rank's process keeps Ray's nice value


def test_cancel_stops_every_rank_at_the_same_step(group, tiny_engine, expected):
    long_job = denoise_job(tiny_engine, request(steps=100))
    queued_job = denoise_job(tiny_engine, request(steps=100, seed=8))
    running = group.submit(long_job)
    queued = group.submit(queued_job)
    group.cancel(queued_job.job_id)           # cancelled while still behind the running job

    def cancel_after_two_steps():
        progress = running.progress()
        if progress is not None and progress[0] >= 2:
            running.cancel()

    with pytest.raises(JobCancelled) as stopped:
        running.result(on_poll=cancel_after_two_steps)
    assert len(stopped.value.steps_by_rank) == TP and len(set(stopped.value.steps_by_rank)) == 1
    assert 2 <= stopped.value.steps < 100

    with pytest.raises(JobCancelled) as never_ran:
        queued.result()
    assert never_ran.value.steps_by_rank == [0] * TP

    assert_same_latents(group.submit(denoise_job(tiny_engine, request())).result(), expected)   # still in step


def test_a_killed_rank_fails_the_call_quickly_and_a_rebuilt_group_works(group, tiny_engine, expected):
    job = denoise_job(tiny_engine, request(steps=100))
    other_job = denoise_job(tiny_engine, request(steps=100, seed=8))
    killed_at, others = [], []

    def kill_rank_1(step, steps):
        if not killed_at:
            others.append(group.submit(other_job))    # a second call in flight on the same ranks
            ray.kill(group.rank_actors[1])
            killed_at.append(time.monotonic())

    with pytest.raises(RankFailure, match=r"rank 1 died during job .*call rebuild\(\)"):
        group.denoise(job.plan, job.text, job.voice, job.media, progress=kill_rank_1)
    assert killed_at and time.monotonic() - killed_at[0] < KILL_BOUND_S

    with pytest.raises(RankFailure, match=r"rebuild\(\)"):
        group.submit(denoise_job(tiny_engine, request()))

    group.rebuild()
    with pytest.raises(RankFailure):   # the other call, sent to the old ranks, fails when collected...
        others[0].result()
    assert not group.broken            # ...and leaves the rebuilt ranks alone
    assert_same_latents(group.submit(denoise_job(tiny_engine, request())).result(), expected)


def test_resident_bytes_per_rank_are_half_the_split_part_plus_the_replicated_part(group):
    from omnireel.model.backbone import OmniBackbone
    from tp_support import parameter_bytes_split
    with torch.device("meta"):
        split, replicated = parameter_bytes_split(OmniBackbone(group.config.backbone))
    assert group.resident_parameter_bytes == [split // TP + replicated] * TP
