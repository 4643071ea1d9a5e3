"""Four denoise jobs of different sizes, seeds, step counts, guidance and shot counts, their inputs
made by LocalEngine's own stages (LocalEngine.denoise_inputs), and the LocalEngine latents each must
equal (within 1e-4) when denoised in a batch: shared by the scheduler, the group and the Backbone replica tests (the
`inputs` and `expected` fixtures are imported by the modules that use them)."""
from __future__ import annotations

import time
from typing import Callable

import pytest

from omnireel.config import GenerationRequest, Shot

PARITY = 1e-4           # "equal to LocalEngine" (DESIGN.md §2)
JOBS = (
    GenerationRequest(prompt="a red ball bounces", size="32x32", seconds=0.5, fps=8, seed=1, steps=3),
    GenerationRequest(prompt="waves at night", size="64x32", seconds=1.0, fps=8, seed=2, steps=6,
                      guidance_video=1.0, guidance_audio=1.0, shots=[Shot(prompt="calm", seconds=0.5),
                                                                     Shot(prompt="a storm", seconds=0.5)]),
    GenerationRequest(prompt="a kite in the wind", size="32x48", seconds=0.5, fps=12, seed=3, steps=4,
                      guidance_video=5.0, guidance_audio=2.0),
    GenerationRequest(prompt="a dog, then a cat", size="48x48", seconds=1.0, fps=8, seed=4, steps=5),
)
LONG = GenerationRequest(prompt="a long slow pan", size="32x32", seconds=0.5, fps=8, seed=5, steps=100)
"""A job to cancel mid-batch: far from done when the others are."""
SECOND_LONG = LONG.model_copy(update={"seed": 6})


def expected_latents(engine, inputs: tuple):
    """The oracle: LocalEngine's denoise stage alone on the same inputs."""
    from omnireel.stages import denoise
    return denoise(engine.components["backbone"], *inputs)


def max_difference(found, expected) -> float:
    assert found.video.shape == expected.video.shape and found.audio.shape == expected.audio.shape
    pairs = [(found.video, expected.video), (found.audio, expected.audio)]
    return max((a - b).abs().max().item() for a, b in pairs if a.numel())          # Wan's audio is empty


@pytest.fixture(scope="module")
def inputs(tiny_engine):
    """The denoise inputs of JOBS and LONG, in that order (a test module imports this fixture)."""
    return [tiny_engine.denoise_inputs(request) for request in (*JOBS, LONG)]


@pytest.fixture(scope="module")
def expected(tiny_engine, inputs):
    """LocalEngine's latents for each of JOBS."""
    return [expected_latents(tiny_engine, x) for x in inputs[:len(JOBS)]]


def wait_until_running(batching: Callable[[], dict], jobs: int, timeout_s: float = 120.0) -> None:
    """Polls a scheduler's summary (`batching()`: a replica's or a group's) until `jobs` jobs are
    running (they were submitted, not timed)."""
    deadline = time.monotonic() + timeout_s
    while batching()["running"] < jobs:
        assert time.monotonic() < deadline, f"{jobs} jobs never ran together"
        time.sleep(0.01)
