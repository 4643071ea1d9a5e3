"""Multi-shot planning, end to end from the request: a camera per shot, frame ranges that cover the
clip exactly, the shot mask built from a planned request follows the visibility rule, and a 7th shot
is rejected everywhere."""
from __future__ import annotations

import itertools
import json

import pytest
import torch
from pydantic import ValidationError

from omnireel.cli import main as cli_main
from omnireel.config import GenerationRequest, request_error_message
from omnireel.model.attention import build_attention_mask
from omnireel.model.config import MAX_SHOTS, MODALITY_ID, preset
from omnireel.model.layout import build_layout
from omnireel.plan import first_frame, plan_request

CONFIG = preset("tiny")


def storyboard(seconds, cameras=None):
    cameras = cameras or [None] * len(seconds)
    return [{"prompt": f"shot {i}", "seconds": s, **({"camera": c} if c else {})}
            for i, (s, c) in enumerate(zip(seconds, cameras))]


def test_each_shot_keeps_its_camera():
    request = GenerationRequest(prompt="a chase", fps=24, shots=storyboard(
        [1, 1, 1], ["wide, static", None, "dolly in on the face"]))
    plan = plan_request(request, CONFIG)
    assert [s.camera for s in plan.shots] == ["wide, static", None, "dolly in on the face"]
    assert plan.captions == ("a chase", "shot 0 (camera: wide, static)", "shot 1",
                             "shot 2 (camera: dolly in on the face)")
    one = plan_request(GenerationRequest(prompt="a chase", shots=storyboard([2], ["crane up"])), CONFIG)
    assert one.shots[0].camera == "crane up" and one.captions == ("a chase shot 0 (camera: crane up)",)


@pytest.mark.parametrize("fps", [8, 12, 24, 25, 30, 60])
@pytest.mark.parametrize("seconds", [[1.0, 1.0], [0.7, 1.3, 0.5], [0.5] * 6, [2.2, 0.4, 1.9, 0.3], [3.0, 0.6]])
def test_frame_ranges_cover_the_clip_exactly(fps, seconds):
    request = GenerationRequest(prompt="scene", fps=fps, shots=storyboard(seconds))
    plan = plan_request(request, CONFIG)
    covered = list(itertools.chain.from_iterable(range(s.frame_start, s.frame_end) for s in plan.shots))
    assert covered == list(range(plan.num_frames))                       # every frame once, in order
    latents = list(itertools.chain.from_iterable(range(s.latent_start, s.latent_end) for s in plan.shots))
    assert latents == list(range(plan.latent_frames))
    for shot in plan.shots:
        assert shot.frame_start == first_frame(shot.latent_start, plan.frames_per_latent)      # cuts on latent boundaries
    assert [s.index for s in plan.shots] == list(range(len(seconds)))


def role(layout, t):
    """A token's role in the visibility rule, from its stream, not from the shot-id formula."""
    stream = next(name for name, span in layout.spans.items() if span.start <= t < span.stop)
    shot = int(layout.shot[t])
    if stream == "text" and shot >= 0:
        return "caption", shot
    if stream in ("video", "audio", "motion"):
        return "media", shot
    return "global", None


def visible(a, b) -> bool:
    (ra, sa), (rb, sb) = a, b
    if "caption" in (ra, rb):
        return sa == sb or "global" in (ra, rb)
    return True


def test_the_mask_of_a_planned_request_follows_the_rule():
    request = GenerationRequest(prompt="a storm", seconds=1.5, size="32x32", fps=8,
                                shots=storyboard([0.5, 0.5, 0.5], ["wide", "close", "tilt up"]),
                                voices=[{"character": "ANNA", "voice_id": "v1"}],
                                physics={"bodies": [{"position": [16, 16], "radius": 4}]})
    plan = plan_request(request, CONFIG)
    spec = plan.layout_spec((4, 3, 3, 5), voices=1, refs=1, tracks=1)
    layout = build_layout(spec, CONFIG.backbone)
    mask = build_attention_mask(layout.shot, layout.caption, "cpu")
    roles = [role(layout, t) for t in range(layout.length)]
    expected = torch.tensor([[visible(a, b) for b in roles] for a in roles])
    assert torch.equal(mask, expected)
    # the shot of every media token is the shot of its latent frame / instant
    video_shots = layout.shot[layout.spans["video"]].view(plan.latent_frames, -1)[:, 0]
    for s in plan.shots:
        assert (video_shots[s.latent_start:s.latent_end] == s.index).all()
    assert (layout.shot[layout.modality == MODALITY_ID["motion"]] == video_shots).all()


def test_a_seventh_shot_is_rejected_everywhere(capsys):
    seven = storyboard([0.5] * (MAX_SHOTS + 1))
    with pytest.raises(ValidationError) as caught:
        GenerationRequest(prompt="p", shots=seven)
    assert request_error_message(caught.value) == f"shots: at most {MAX_SHOTS} shots (got {MAX_SHOTS + 1})"
    six = plan_request(GenerationRequest(prompt="p", shots=seven[:MAX_SHOTS]), CONFIG)
    assert len(six.shots) == MAX_SHOTS
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["render", "p", "--shots", json.dumps(seven)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err == f"omnireel: error: shots: at most {MAX_SHOTS} shots (got {MAX_SHOTS + 1})"


# ---- the request's `storyboard` field ----------------------------------------------------------

STORY = "a fox wakes up in its den. then it runs across the snow; it stops at the river"


def test_a_single_prompt_is_planned_by_the_rules_storyboard_by_default():
    request = GenerationRequest(prompt=STORY, seconds=1.5, size="32x32", fps=8)
    assert request.storyboard == "rules"
    plan = plan_request(request, CONFIG)
    assert [s.caption for s in plan.shots] == ["a fox wakes up in its den", "it runs across the snow",
                                               "it stops at the river"]
    assert plan.captions == (STORY, *(s.caption for s in plan.shots))
    covered = list(itertools.chain.from_iterable(range(s.frame_start, s.frame_end) for s in plan.shots))
    assert covered == list(range(plan.num_frames))
    # as many shots as fit: 1 s at 8 fps has room for two (4 frames each), 0.5 s for one
    assert len(plan_request(request.model_copy(update={"seconds": 1.0}), CONFIG).shots) == 2
    one = plan_request(GenerationRequest(prompt=STORY, seconds=0.5, fps=8), CONFIG)
    assert len(one.shots) == 1 and one.captions == (STORY,)
    # no cut cue: one shot, the prompt its only caption (what every request without cues always got)
    plain = plan_request(GenerationRequest(prompt="a fox in the snow", seconds=2, fps=24), CONFIG)
    assert len(plain.shots) == 1 and plain.captions == ("a fox in the snow",)


def test_explicit_shots_images_and_audio_alone_are_not_storyboarded():
    given = plan_request(GenerationRequest(prompt=STORY, fps=8, shots=storyboard([1, 1])), CONFIG)
    assert [s.caption for s in given.shots] == ["shot 0", "shot 1"]
    image = plan_request(GenerationRequest(prompt=STORY, output="image"), CONFIG)
    audio = plan_request(GenerationRequest(prompt=STORY, seconds=1.5, fps=8, mode="audio"), CONFIG)
    assert len(image.shots) == len(audio.shots) == 1 and image.captions == audio.captions == (STORY,)


def test_the_storyboard_field_is_checked_and_keyed():
    from omnireel.config import normalized, request_key
    with pytest.raises(ValidationError) as caught:
        GenerationRequest(prompt="p", storyboard="gpt")
    assert request_error_message(caught.value) == "storyboard: Input should be 'rules' or 'llm' (got 'gpt')"
    for fields, what in (({"output": "image"}, "output 'image'"), ({"mode": "audio"}, "mode 'audio'")):
        with pytest.raises(ValidationError) as caught:
            GenerationRequest(prompt="p", storyboard="llm", **fields)
        assert request_error_message(caught.value).startswith(f"storyboard: 'llm' plans shots, which {what}")
    rules, default = GenerationRequest(prompt="p", storyboard="rules"), GenerationRequest(prompt="p")
    assert "storyboard" not in normalized(rules)             # the default keeps every existing key
    assert request_key(rules, "0" * 64) == request_key(default, "0" * 64)
    llm = GenerationRequest(prompt="p", storyboard="llm", shots=storyboard([2]))
    assert normalized(llm)["storyboard"] == "llm"


class ShotsFromRules:
    """A planner with the LLMShotPlanner's interface that needs no vLLM: resolve_storyboard's contract."""

    def __init__(self):
        self.calls = []

    def plan(self, prompt, seconds, max_shots=MAX_SHOTS, *, fps, seed=0):
        from omnireel.storyboard import plan_shots_rules
        self.calls.append((prompt, seconds, fps, seed))
        return plan_shots_rules(prompt, seconds, max_shots, fps=fps)


def test_an_llm_storyboard_is_planned_once_into_explicit_shots():
    from omnireel.config import normalized
    from omnireel.storyboard import resolve_storyboard
    planner = ShotsFromRules()
    request = GenerationRequest(prompt=STORY, seconds=1.5, fps=8, seed=7, storyboard="llm")
    resolved = resolve_storyboard(request, planner)
    assert planner.calls == [(STORY, 1.5, 8, 7)]
    assert [s.prompt for s in resolved.shots] == ["a fox wakes up in its den", "it runs across the snow",
                                                  "it stops at the river"]
    assert normalized(resolved)["storyboard"] == "llm" and len(normalized(resolved)["shots"]) == 3
    again = GenerationRequest.model_validate(normalized(resolved))        # what a stage replica or pool sees
    assert resolve_storyboard(again, planner) == again and len(planner.calls) == 1
    assert [s.caption for s in plan_request(again, CONFIG).shots] == [s.prompt for s in resolved.shots]
    rules = GenerationRequest(prompt=STORY, seconds=1.5, fps=8)
    assert resolve_storyboard(rules, planner) is rules and len(planner.calls) == 1


def test_an_llm_storyboard_where_it_cannot_run_is_one_line_naming_the_field(tiny_checkpoint, capsys):
    from omnireel.model.text import vllm_installed
    from omnireel.pipelines.manifest import check_columns, check_row
    from omnireel.plan import PlanError
    from omnireel.storyboard import StoryboardError, resolve_storyboard
    if vllm_installed():
        pytest.skip("vLLM is installed here; tests/vllm_suite covers the LLM planner")
    request = GenerationRequest(prompt=STORY, seconds=1.5, fps=8, storyboard="llm")
    expected = "storyboard: 'llm' is not available here: the LLM storyboard planner needs vLLM"
    with pytest.raises(StoryboardError) as caught:
        resolve_storyboard(request)
    assert str(caught.value).startswith(expected) and str(caught.value).endswith("use 'rules' or give shots")
    with pytest.raises(PlanError) as planned:                  # a driver that forgot to resolve it
        plan_request(request, CONFIG)
    assert planned.value.field == "storyboard" and str(planned.value).startswith(expected)
    with pytest.raises(SystemExit) as exit_info:               # the CLI
        cli_main(["render", STORY, "--storyboard", "llm", "--checkpoint", str(tiny_checkpoint)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith(f"omnireel: error: {expected}") and "\n" not in err
    check_columns(["id", "prompt", "storyboard"])              # batch: a manifest column; the row is refused
    row = check_row({"id": "a", "prompt": STORY, "seconds": 1.5, "fps": 8, "storyboard": "llm"}, CONFIG)
    assert row.request is None and row.field == "storyboard" and row.message.startswith(expected)
    row = check_row({"id": "b", "prompt": STORY, "seconds": 1.5, "fps": 8, "storyboard": "rules"}, CONFIG)
    assert row.request is not None and len(plan_request(row.request, CONFIG).shots) == 3


def test_an_app_without_a_planner_model_starts_no_planner_and_refuses_llm_in_one_line(served):
    """No storyboard_model (and no vLLM here): build_app starts no StoryboardPlanner, and a create
    asking for an LLM storyboard is a 400 naming `storyboard`; no job is created."""
    from ray import serve

    from omnireel.deployments.app import APP_NAME
    assert "StoryboardPlanner" not in serve.status().applications[APP_NAME].deployments
    with served.http() as http:
        before = http.get("/v1/videos", params={"limit": 100}).json()["data"]
        response = http.post("/v1/videos", json={"prompt": STORY, "seconds": "1", "size": "32x32", "storyboard": "llm"})
        after = http.get("/v1/videos", params={"limit": 100}).json()["data"]
    error = response.json()["error"]
    assert response.status_code == 400 and (error["param"], error["code"]) == ("storyboard", "storyboard_unavailable")
    assert error["message"].startswith("storyboard: 'llm' is not available here: ") and "\n" not in error["message"]
    assert len(after) == len(before)


def test_batch_validation_leaves_llm_rows_for_the_planner_pool_and_checks_their_other_fields(tmp_path):
    """With a planner pool in the run (plan_llm), validation plans nothing: an LLM row leaves valid and
    without a key (the pool plans and keys it), a bad field of an LLM row is refused at once, and
    every other row is keyed as before."""
    import pyarrow as pa

    from omnireel.pipelines import rows
    from omnireel.pipelines.triage import validate_batch, waiting_for_storyboard
    manifest = pa.Table.from_pylist([
        {"id": "llm", "prompt": STORY, "seconds": 1.5, "fps": 8, "storyboard": "llm", "size": "32x32", "row": 0},
        {"id": "narrow", "prompt": STORY, "seconds": 1.5, "fps": 8, "storyboard": "llm", "size": "30x32", "row": 1},
        {"id": "rules", "prompt": STORY, "seconds": 1.5, "fps": 8, "storyboard": None, "size": "32x32", "row": 2}])
    for plan_llm in (True, False):
        checked = {r["id"]: r for r in rows.from_table(validate_batch(manifest, CONFIG, "0" * 64, str(tmp_path), plan_llm))}
        assert (checked["narrow"]["stage"], checked["narrow"]["field"]) == ("validate", "size")
        assert checked["rules"]["key"] and not checked["rules"]["stage"]
        if plan_llm:
            assert waiting_for_storyboard(checked["llm"]) and json.loads(checked["llm"]["request"])["storyboard"] == "llm"
        else:                                       # no pool: refused, naming the field
            assert (checked["llm"]["stage"], checked["llm"]["field"]) == ("validate", "storyboard")
    assert [waiting_for_storyboard(r) for r in checked.values()] == [False, False, False]
