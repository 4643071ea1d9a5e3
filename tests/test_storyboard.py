"""Storyboard planners without vLLM: the rule-based planner, and the checks applied to an LLM's JSON."""
from __future__ import annotations

import json

import pytest

from omnireel.config import MAX_PROMPT_CHARS, SECONDS_TOLERANCE, GenerationRequest, Shot
from omnireel.model.config import MAX_SHOTS, preset
from omnireel.plan import plan_request
from omnireel.storyboard import (StoryboardError, allocate_seconds, min_shot_seconds, parse_storyboard,
                                 plan_shots_rules, shots_that_fit, split_prompt, storyboard_max_bytes,
                                 storyboard_schema)

TINY = preset("tiny")
STORY = ("A fox wakes in its den. It sniffs the cold air; then it steps into the snow, and then it "
         "runs across the frozen lake! Crows scatter from a pine. The fox stops at the far shore. "
         "It looks back at the den. Snow begins to fall. Night comes.")


def assert_plannable(prompt: str, seconds: float, fps: int, shots: list[Shot]) -> None:
    """The shots add up to `seconds`, and the plan gives every shot latent frames of its own."""
    assert all(isinstance(shot, Shot) for shot in shots)
    assert 1 <= len(shots) <= MAX_SHOTS
    assert abs(sum(shot.seconds for shot in shots) - seconds) <= 1e-9
    request = GenerationRequest(prompt=prompt, seconds=seconds, fps=fps, size="64x64",
                                shots=shots if len(shots) > 1 else [])
    plan = plan_request(request, TINY)
    assert len(plan.shots) == len(shots)
    assert all(shot.latent_end > shot.latent_start for shot in plan.shots)
    assert plan.shots[-1].frame_end == plan.num_frames


def test_splits_at_sentences_semicolons_and_then():
    assert split_prompt("A cat sleeps. Then it wakes up; it jumps down and then runs away!") == [
        "A cat sleeps", "it wakes up", "it jumps down", "runs away"]
    assert split_prompt("一只猫在睡觉。然后它醒了！") == ["一只猫在睡觉", "然后它醒了"]
    assert split_prompt("It costs 2.5 dollars, nothing else") == ["It costs 2.5 dollars, nothing else"]
    assert split_prompt("Athens at dawn... !") == ["Athens at dawn"]


def test_rules_planner_gives_one_shot_per_cue_with_seconds_by_length():
    shots = plan_shots_rules("A short one. A much much longer second sentence here.", 3.0, fps=24)
    assert [shot.prompt for shot in shots] == ["A short one", "A much much longer second sentence here"]
    assert shots[1].seconds > shots[0].seconds
    assert shots[1].seconds / shots[0].seconds == pytest.approx(39 / 11)
    assert_plannable("A short one. A much much longer second sentence here.", 3.0, 24, shots)


def test_rules_planner_keeps_a_prompt_without_cues_whole():
    shots = plan_shots_rules("  a red paper boat drifting down a rainy gutter.  ", 2.0, fps=24)
    assert shots == [Shot(prompt="a red paper boat drifting down a rainy gutter.", seconds=2.0)]


def test_rules_planner_merges_down_to_max_shots():
    assert len(split_prompt(STORY)) == 9
    shots = plan_shots_rules(STORY, 8.0, fps=24)
    assert len(shots) == MAX_SHOTS
    assert ", then " in " ".join(shot.prompt for shot in shots)   # merged neighbours
    assert_plannable(STORY, 8.0, 24, shots)
    assert len(plan_shots_rules(STORY, 8.0, max_shots=3, fps=24)) == 3


@pytest.mark.parametrize("seconds, fps", [(seconds, fps) for fps in (1, 8, 24, 60)
                                          for seconds in (0.1, 0.25, 0.5, 1.0, 2.0, 5.5, 20.0)
                                          if round(seconds * fps) >= 1])   # a request with a frame
def test_every_rules_storyboard_plans_with_a_latent_frame_per_shot(seconds, fps):
    shots = plan_shots_rules(STORY, seconds, fps=fps)
    assert len(shots) == min(MAX_SHOTS, shots_that_fit(seconds, fps))
    assert all(shot.seconds >= min_shot_seconds(fps) - 1e-9 for shot in shots) or len(shots) == 1
    assert_plannable(STORY, seconds, fps, shots)


def test_rules_planner_rejects_a_blank_prompt():
    with pytest.raises(StoryboardError, match="shots.0.prompt: must not be empty"):
        plan_shots_rules("   ", 2.0, fps=24)


def test_rules_planner_keeps_prompts_within_the_limit():
    prompt = ("a. " * (MAX_PROMPT_CHARS // 3)).strip()   # 666 one-letter sentences
    shots = plan_shots_rules(prompt, 6.0, max_shots=2, fps=24)   # merged with ", then " they outgrow it
    assert len(shots) == 2 and all(len(shot.prompt) <= MAX_PROMPT_CHARS for shot in shots)


def test_allocate_seconds_is_proportional_above_the_minimum_and_exact():
    assert allocate_seconds([1.0, 3.0], 2.0, 0.1) == [0.5, 1.5]
    shares = allocate_seconds([1.0, 100.0, 1.0], 1.0, 0.2)
    assert shares == [0.2, 0.6, 0.2] and sum(shares) == 1.0
    shares = allocate_seconds([0.7, 0.1, 5.0, 2.0], 3.3, 0.5)
    assert sum(shares) == pytest.approx(3.3, abs=1e-12)
    assert min(shares) >= 0.5 - 1e-12
    assert shares[2] / shares[3] == pytest.approx(2.5)


def test_parse_storyboard_rescales_the_llm_seconds_to_the_request():
    text = json.dumps({"shots": [{"prompt": "a fox wakes", "seconds": 3},
                                 {"prompt": "it runs", "camera": "tracking shot", "seconds": 1}]})
    shots = parse_storyboard(text, 2.0, fps=24)
    assert [shot.prompt for shot in shots] == ["a fox wakes", "it runs"]
    assert shots[1].camera == "tracking shot"
    assert [shot.seconds for shot in shots] == [1.5, 0.5]
    request = GenerationRequest(prompt="a fox", seconds=2.0, shots=shots)
    assert abs(sum(shot.seconds for shot in request.shots) - 2.0) <= SECONDS_TOLERANCE


@pytest.mark.parametrize("text, message", [
    ("not json", "not valid JSON"),
    ("[1, 2]", 'expected a JSON object {"shots"'),
    ('{"shots": []}', "shots: List should have at least 1 item"),
    ('{"shots": [{"prompt": "  ", "seconds": 1}]}', "shots.0.prompt: must not be empty"),
    ('{"shots": [{"prompt": "a", "seconds": 1, "lens": "50mm"}]}', "shots.0.lens: unknown field"),
    ('{"shots": [{"prompt": "a"}]}', "shots.0.seconds: required"),
    ('{"shots": [{"prompt": "a", "seconds": -1}]}', "shots.0.seconds: must be > 0"),
    (json.dumps({"shots": [{"prompt": f"shot {i}", "seconds": 1} for i in range(7)]}), "at most 6 shots"),
    (json.dumps({"shots": [{"prompt": f"shot {i}", "seconds": 1} for i in range(3)]}),
     "at most 2 shots fit in 0.4 s at 24 fps"),
])
def test_parse_storyboard_rejects_bad_output_with_one_line(text, message):
    seconds = 0.4 if "0.4 s" in message else 8.0
    with pytest.raises(StoryboardError, match=message) as caught:
        parse_storyboard(text, seconds, fps=24)
    assert "\n" not in str(caught.value)


def test_schema_is_bounded():
    jsonschema = pytest.importorskip("jsonschema")
    schema = storyboard_schema(3, prompt_chars=40, camera_chars=20, min_seconds=0.25)
    jsonschema.Draft202012Validator.check_schema(schema)
    good = {"shots": [{"prompt": "a" * 40, "camera": "pan", "seconds": 20}]}
    jsonschema.validate(good, schema)
    for bad in ({"shots": []},
                {"shots": [{"prompt": "a", "seconds": 1}] * 4},
                {"shots": [{"prompt": "a" * 41, "seconds": 1}]},
                {"shots": [{"prompt": "a", "camera": "c" * 21, "seconds": 1}]},
                {"shots": [{"prompt": "a", "seconds": 0.2}]},
                {"shots": [{"prompt": "a", "seconds": 1, "extra": 1}]}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    longest = json.dumps({"shots": [{"prompt": "\U0001F600" * 40, "camera": "\U0001F600" * 20,
                                     "seconds": 0.2500001}] * 3}, separators=(",", ":"))
    assert len(longest.encode()) <= storyboard_max_bytes(3, 40, 20)
