"""The batched step of the diffusers families (LTX-2, Wan) under the denoise scheduler, on their tiny
random checkpoints, in this process: jobs of different seeds, step counts and guidance, three of one
shape and one of another, submitted at different steps, each equal to its LocalEngine (solo) result
within 1e-4; one cancelled mid-batch. The jobs of one shape run as one transformer call per guidance
branch (rows stacked: CFG rows and single-row jobs together), the other shape as its own calls; a
job whose call fails leaves alone. Wan 2.2 A14B: jobs on different experts make separate calls;
TI2V-5B: per-token timesteps (image and text-to-video jobs at different steps) stack too."""
from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
from batching_support import PARITY, expected_latents, max_difference

from omnireel.config import GenerationRequest
from omnireel.engine import LocalEngine
from omnireel.model.sampler import Cancelled
from omnireel.scheduler import DenoiseScheduler


@dataclasses.dataclass(frozen=True)
class Scenario:
    """Four jobs (0-2 of one shape, 3 of another), a long one to cancel (of the first shape), and the
    row counts of the transformer calls of the step where jobs 1, 2, 3 and the long one run."""
    jobs: tuple[GenerationRequest, ...]
    long: GenerationRequest
    full_step_rows: list[int]


def ltx2_request(size: str, seed: int, steps: int, **guidance) -> GenerationRequest:
    return GenerationRequest(prompt="a robot dancing in the rain", size=size, seconds=9 / 24, fps=24, seed=seed,
                             steps=steps, **guidance)


def wan_request(size: str, seed: int, steps: int, **guidance) -> GenerationRequest:
    return GenerationRequest(prompt="a red car drives fast through desert", size=size, seconds=9 / 16, fps=16,
                             seed=seed, steps=steps, **guidance)


SCENARIOS = {
    # LTX-2's default guidance runs three branches a step: the CFG batch (2 rows; 1 with CFG off), STG, modality
    "ltx2": Scenario(
        jobs=(ltx2_request("64x64", 1, 2),
              ltx2_request("64x64", 2, 4, guidance_video=1.0, guidance_audio=1.0),
              ltx2_request("64x64", 3, 3, guidance_video=5.0, guidance_audio=2.0),
              ltx2_request("96x64", 4, 3)),
        long=ltx2_request("64x64", 5, 50),
        full_step_rows=[2 + 1 + 2, 3, 3, 2, 1, 1]),   # 64x64: long, 1, 2 per branch; then 96x64: job 3's
    # Wan: one call a step, cond and uncond as two rows (one with CFG off)
    "wan": Scenario(
        jobs=(wan_request("32x32", 1, 2),
              wan_request("32x32", 2, 4, guidance_video=1.0),
              wan_request("32x32", 3, 3, guidance_video=3.0),
              wan_request("48x32", 4, 3)),
        long=wan_request("32x32", 5, 50),
        full_step_rows=[2 + 1 + 2, 2]),
}


@pytest.fixture(scope="module", params=sorted(SCENARIOS))
def family_run(request, ltx2_checkpoint, wan_checkpoint):
    """(scenario, engine, inputs of jobs + the long one, solo latents of the jobs) for one family."""
    torch.set_num_threads(2)
    scenario = SCENARIOS[request.param]
    engine = LocalEngine({"ltx2": ltx2_checkpoint, "wan": wan_checkpoint}[request.param])
    inputs = [engine.denoise_inputs(r) for r in (*scenario.jobs, scenario.long)]
    expected = [expected_latents(engine, x) for x in inputs[:len(scenario.jobs)]]
    return scenario, engine, inputs, expected


@contextlib.contextmanager
def transformer_rows(denoiser):
    """A list that every transformer forward (each Wan expert's too) appends its batch size to, meanwhile."""
    rows: list[int] = []
    modules = getattr(denoiser, "transformers", None) or [denoiser.transformer]
    hook = lambda module, args, kwargs: rows.append(kwargs["hidden_states"].shape[0])   # noqa: E731
    hooks = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules]
    try:
        yield rows
    finally:
        for handle in hooks:
            handle.remove()


def test_jobs_batch_by_shape_and_each_equals_its_solo_run(family_run):
    scenario, engine, inputs, expected = family_run
    denoiser = engine.components["backbone"]
    scheduler = DenoiseScheduler(denoiser, max_batch_jobs=8)
    long = len(scenario.jobs)
    stop = {"long": False}
    progress = {i: [] for i in range(len(inputs))}
    tasks = {}

    def submit(i, **kwargs):
        tasks[i] = scheduler.submit(*inputs[i], progress=lambda done, n, i=i: progress[i].append((done, n)), **kwargs)

    with transformer_rows(denoiser) as rows:
        submit(0)
        submit(long, should_stop=lambda: stop["long"])
        scheduler.step()
        submit(1)
        scheduler.step()                     # job 0's second and last step
        submit(2)
        submit(3)
        rows.clear()
        scheduler.step()                     # long, 1, 2 (one shape) and 3 (another)
        assert rows == scenario.full_step_rows
        stop["long"] = True                  # leaves at the next step boundary
        scheduler.run_until_idle()

    for i, latents in enumerate(expected):
        assert max_difference(tasks[i].future.result(), latents) <= PARITY, scenario.jobs[i]
        assert progress[i] == [(n, scenario.jobs[i].steps) for n in range(1, scenario.jobs[i].steps + 1)]
    with pytest.raises(Cancelled):
        tasks[long].future.result()
    assert progress[long] == [(n, scenario.long.steps) for n in range(1, 4)]    # stopped after 3 of its 50
    assert [step.jobs for step in scheduler.recent_steps][:4] == [2, 3, 4, 3]
    assert all(step.tokens > 0 for step in scheduler.recent_steps)           # the states count their tokens
    assert not scheduler.running and not scheduler.waiting


def test_a_job_whose_call_fails_leaves_the_batch_and_the_others_complete(family_run):
    """A job whose text is one feature too wide fails in the transformer; its batch-mates step on."""
    scenario, engine, inputs, expected = family_run
    plan, text, voice, media = inputs[0]
    wrong = dataclasses.replace(text, captions=[torch.zeros(*c.shape[:-1], c.shape[-1] + 1, dtype=c.dtype)
                                                if c.is_floating_point() else c for c in text.captions])
    scheduler = DenoiseScheduler(engine.components["backbone"])
    good = [scheduler.submit(*inputs[i]) for i in (1, 2)]
    bad = scheduler.submit(plan, wrong, voice, media)
    scheduler.run_until_idle()
    with pytest.raises(RuntimeError):
        bad.future.result()
    for task, i in zip(good, (1, 2)):
        assert max_difference(task.future.result(), expected[i]) <= PARITY


@pytest.fixture(scope="module")
def wan_variants(tmp_path_factory):
    """LocalEngines on tiny Wan 2.2 A14B (two experts) and TI2V-5B (a timestep per token) folders."""
    from tiny_wan import build_tiny_wan

    root = tmp_path_factory.mktemp("wan-batching")
    return {variant: LocalEngine(build_tiny_wan(root / variant, variant)) for variant in ("a14b", "ti2v")}


def test_wan_jobs_on_different_experts_make_separate_calls_and_each_equals_its_solo_run(wan_variants):
    """A14B: job 0 on the low-noise expert while jobs 1 and 2 (one with CFG off) start on the high-noise one."""
    engine = wan_variants["a14b"]
    denoiser = engine.components["backbone"]
    inputs = [engine.denoise_inputs(wan_request("32x32", seed, 2, **guidance))
              for seed, guidance in ((1, {}), (2, {}), (3, {"guidance_video": 1.0}))]
    expected = [expected_latents(engine, x) for x in inputs]
    scheduler = DenoiseScheduler(denoiser)
    with transformer_rows(denoiser) as rows:
        tasks = [scheduler.submit(*inputs[0])]
        scheduler.step()                                   # job 0: expert 0
        tasks += [scheduler.submit(*x) for x in inputs[1:]]
        rows.clear()
        scheduler.step()                                   # job 0: expert 1; jobs 1, 2: expert 0, stacked
        assert rows == [2, 2 + 1]
        scheduler.run_until_idle()
    for task, latents in zip(tasks, expected):
        assert max_difference(task.future.result(), latents) <= PARITY


def test_wan_jobs_with_per_token_timesteps_stack_and_each_equals_its_solo_run(wan_variants):
    """TI2V-5B: (B, S) timesteps; two image-to-video jobs and a text-to-video one, at different steps."""
    import base64

    import numpy as np

    from omnireel import media

    engine = wan_variants["ti2v"]
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    image = "data:image/png;base64," + base64.b64encode(media.encode_png(pixels)).decode()
    requests = [wan_request("32x32", 1, 3, input_reference=image), wan_request("32x32", 2, 2),
                wan_request("32x32", 3, 2, input_reference=image, guidance_video=1.0)]
    inputs = [engine.denoise_inputs(r) for r in requests]
    expected = [expected_latents(engine, x) for x in inputs]
    denoiser = engine.components["backbone"]
    scheduler = DenoiseScheduler(denoiser)
    with transformer_rows(denoiser) as rows:
        tasks = [scheduler.submit(*inputs[0])]
        scheduler.step()
        tasks += [scheduler.submit(*x) for x in inputs[1:]]
        rows.clear()
        scheduler.step()
        assert rows == [2 + 2 + 1]                         # one call: the three jobs' rows
        scheduler.run_until_idle()
    for task, latents in zip(tasks, expected):
        assert max_difference(task.future.result(), latents) <= PARITY
