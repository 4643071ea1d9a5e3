"""The denoise scheduler (continuous batching) on the tiny omni checkpoint, in this process: jobs of
different shapes, seeds, step counts and guidance join and leave one running batch at step
boundaries and each ends equal to LocalEngine; a cancelled or failing job leaves alone; the batch
stays within max_batch_jobs / max_batch_tokens; the packed forward's GPU mask (FlexAttention) is
the per-job CPU one."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from batching_support import JOBS, LONG, PARITY, expected, inputs, max_difference  # noqa: F401 (fixtures)

from omnireel.model.sampler import Cancelled
from omnireel.scheduler import DenoiseScheduler


def test_jobs_submitted_at_different_times_batch_together_and_each_equals_local_engine(tiny_engine, inputs,
                                                                                         expected):
    scheduler = DenoiseScheduler(tiny_engine.components["backbone"], max_batch_jobs=8)
    stop = {"long": False}
    progress = {i: [] for i in range(len(inputs))}
    tasks = {}

    def submit(i, **kwargs):
        tasks[i] = scheduler.submit(*inputs[i], progress=lambda done, n, i=i: progress[i].append((done, n)), **kwargs)

    submit(0)
    submit(4, should_stop=lambda: stop["long"])      # the long job, cancelled mid-batch below
    scheduler.step()
    submit(1)
    scheduler.step()
    submit(2)
    scheduler.step()                                 # job 0's third and last step
    stop["long"] = True                              # leaves at the next step boundary
    submit(3)
    scheduler.run_until_idle()

    for i, latents in enumerate(expected):
        assert max_difference(tasks[i].future.result(), latents) <= PARITY, JOBS[i]
        assert progress[i] == [(n, JOBS[i].steps) for n in range(1, JOBS[i].steps + 1)]
    with pytest.raises(Cancelled):
        tasks[4].future.result()
    assert progress[4] == [(n, LONG.steps) for n in range(1, 4)]     # stopped after 3 of its 40 steps
    sizes = [step.jobs for step in scheduler.recent_steps]
    assert sizes[:4] == [2, 3, 4, 3]                # joined and left at step boundaries
    assert not scheduler.running and not scheduler.waiting


def test_the_batch_stays_within_its_bounds_and_a_large_job_runs_alone(tiny_engine, inputs, expected):
    tokens = [tiny_engine.components["backbone"].prepare(*x).tokens for x in inputs[:4]]
    scheduler = DenoiseScheduler(tiny_engine.components["backbone"], max_batch_jobs=3,
                                 max_batch_tokens=max(tokens) + min(tokens))
    tasks = [scheduler.submit(*x) for x in inputs[:4]]
    scheduler.run_until_idle()
    for task, latents in zip(tasks, expected):
        assert max_difference(task.future.result(), latents) <= PARITY
    assert all(step.jobs <= 3 for step in scheduler.recent_steps)
    assert all(step.tokens <= max(tokens) + min(tokens) or step.jobs == 1 for step in scheduler.recent_steps)

    alone = DenoiseScheduler(tiny_engine.components["backbone"], max_batch_tokens=1)   # every job is too large
    tasks = [alone.submit(*inputs[i]) for i in (0, 2)]
    alone.run_until_idle()
    assert [step.jobs for step in alone.recent_steps] == [1] * (JOBS[0].steps + JOBS[2].steps)
    assert max_difference(tasks[1].future.result(), expected[2]) <= PARITY


def test_a_job_that_fails_leaves_the_batch_and_the_others_complete(tiny_engine, inputs, expected):
    plan, text, voice, media = inputs[0]
    wrong = dataclasses.replace(text, captions=[torch.zeros(c.shape[0], c.shape[1] + 1) for c in text.captions])
    scheduler = DenoiseScheduler(tiny_engine.components["backbone"])
    good = scheduler.submit(*inputs[2])
    bad = scheduler.submit(plan, wrong, voice, media)     # prepares, then its first forward fails
    scheduler.run_until_idle()
    with pytest.raises(RuntimeError):
        bad.future.result()
    assert max_difference(good.future.result(), expected[2]) <= PARITY


def test_the_flex_attention_mask_of_a_packed_batch_equals_the_per_job_attention():
    """The GPU path (one FlexAttention BlockMask: same row + the shot rule), run eagerly on the CPU."""
    from omnireel.model.attention import PackedMask, dense_shot_mask, flex_packed_mask, joint_attention

    torch.manual_seed(0)
    shot_a, caption_a = torch.tensor([-1, 0, 0, 0, 0]), torch.zeros(5, dtype=torch.bool)   # one shot
    shot_b, caption_b = torch.tensor([-1, 0, 1, 0, 0, 1, 1]), torch.tensor([0, 1, 1, 0, 0, 0, 0]).bool()
    segments = ((0, 1, 5, None), (5, 2, 7, dense_shot_mask(shot_b, caption_b)))   # 1 row of 5, 2 rows of 7
    q, k, v = (torch.randn(1, 2, 19, 16) for _ in range(3))
    per_job = joint_attention(q, k, v, PackedMask(segments))
    flex = joint_attention(q, k, v, flex_packed_mask(segments, torch.cat([shot_a, shot_b.repeat(2)]),
                                                     torch.cat([caption_a, caption_b.repeat(2)]), "cpu"))
    assert (per_job - flex).abs().max().item() <= 1e-5
