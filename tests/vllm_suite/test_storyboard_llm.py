"""The LLM storyboard planner on vLLM: a tiny random-weight decoder (load_format="dummy") whose
output is constrained by the bounded storyboard schema must always parse into valid shots."""
from __future__ import annotations

import pytest

from omnireel.config import GenerationRequest, Shot
from omnireel.model.config import MAX_SHOTS, preset
from omnireel.plan import PlanError, plan_request
from omnireel.storyboard import (LLMShotPlanner, StoryboardError, min_shot_seconds, resolve_storyboard,
                                 storyboard_max_bytes)

from vllm_support import write_tiny_decoder

PROMPT_CHARS, CAMERA_CHARS = 40, 20
MAX_TOKENS = storyboard_max_bytes(MAX_SHOTS, PROMPT_CHARS, CAMERA_CHARS)   # the JSON always finishes
TOO_LONG = "!" * 1990 + " a storm"      # 1991 WordPiece tokens: each "!" is one


@pytest.fixture(scope="module")
def planner(tmp_path_factory):
    folder = write_tiny_decoder(tmp_path_factory.mktemp("tiny-decoder"))
    planner = LLMShotPlanner(folder, load_format="dummy", dtype="float32", temperature=1.0,
                             prompt_chars=PROMPT_CHARS, camera_chars=CAMERA_CHARS, max_tokens=MAX_TOKENS)
    yield planner
    planner.close()


def assert_plannable(prompt: str, seconds: float, fps: int, shots: list[Shot], max_shots: int) -> None:
    """Valid shots that add up to `seconds` and each get latent frames of their own in the plan."""
    assert 1 <= len(shots) <= max_shots
    assert all(isinstance(shot, Shot) and 1 <= len(shot.prompt) <= PROMPT_CHARS for shot in shots)
    assert all(shot.camera is None or len(shot.camera) <= CAMERA_CHARS for shot in shots)
    assert abs(sum(shot.seconds for shot in shots) - seconds) <= 1e-9
    assert min(shot.seconds for shot in shots) >= min_shot_seconds(fps) - 1e-9
    request = GenerationRequest(prompt=prompt, seconds=seconds, fps=fps, size="64x64", shots=shots)
    plan = plan_request(request, preset("tiny"))
    assert len(plan.shots) == len(shots)
    assert all(shot.latent_end > shot.latent_start for shot in plan.shots)


@pytest.mark.parametrize("seed", range(6))
def test_llm_storyboards_parse_into_valid_shots(planner, seed):
    prompt = "A fox wakes in its den, runs across a frozen lake and looks back as snow falls."
    seconds, fps = [(8.0, 24), (2.0, 24), (20.0, 8), (1.0, 16), (5.5, 30), (0.5, 24)][seed]
    shots = planner.plan(prompt, seconds, fps=fps, seed=seed)
    print(f"\nseed {seed}: {len(shots)} shots, seconds {[round(shot.seconds, 3) for shot in shots]}")
    assert_plannable(prompt, seconds, fps, shots, MAX_SHOTS)


def test_max_shots_bounds_the_storyboard(planner):
    for seed in range(4):
        shots = planner.plan("a storm rolls over the harbour", 6.0, max_shots=2, fps=24, seed=seed)
        assert_plannable("a storm rolls over the harbour", 6.0, 24, shots, 2)
    shots = planner.plan("a storm rolls over the harbour", 0.4, fps=24, seed=0)   # room for 2 only
    assert_plannable("a storm rolls over the harbour", 0.4, 24, shots, 2)


def test_output_cut_at_max_tokens_is_a_one_line_error(planner):
    with pytest.raises(StoryboardError, match=r"^storyboard: the LLM's JSON was cut at max_tokens=8$"):
        planner.plan("a storm rolls over the harbour", 4.0, fps=24, max_tokens=8)


def test_a_request_asking_for_an_llm_storyboard_is_planned_into_explicit_shots(planner):
    request = GenerationRequest(prompt="a kite climbs over the dunes then falls into the sea", storyboard="llm",
                                seconds=4.0, fps=24, size="64x64", seed=3)
    resolved = resolve_storyboard(request, planner)
    assert resolved.shots and resolved.storyboard == "llm"
    assert_plannable(request.prompt, 4.0, 24, resolved.shots, MAX_SHOTS)
    assert plan_request(resolved, preset("tiny")).shots        # plans as any request with shots does
    with pytest.raises(PlanError, match="storyboard"):        # never planned: refused, naming the field
        plan_request(request, preset("tiny"))
    assert resolve_storyboard(resolved, planner) is resolved   # explicit shots: nothing to plan


def test_many_requests_plan_in_one_call_and_a_prompt_too_long_is_refused_alone(planner):
    from omnireel.storyboard import StoryboardTask
    tasks = [StoryboardTask("a kite over the dunes", 1.0, 16, 1), StoryboardTask(TOO_LONG, 1.0, 16, 2),
             StoryboardTask("waves at night then a lighthouse", 2.0, 8, 3)]
    # a cap that leaves the planner's 8192-token context room for the short prompts only (~250 tokens
    # with the instructions, through the tokenizer's chat template), not for the long one (~2230)
    first, refused, last = planner.plan_many(tasks, max_tokens=7900)
    assert_plannable(tasks[0].prompt, 1.0, 16, first, MAX_SHOTS)
    assert_plannable(tasks[2].prompt, 2.0, 8, last, MAX_SHOTS)
    assert isinstance(refused, StoryboardError)
    assert str(refused).startswith("storyboard: the prompt takes ") and "of the planner's 8192" in str(refused)
