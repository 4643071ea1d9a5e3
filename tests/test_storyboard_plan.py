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
        assert shot.frame_start == first_frame(shot.latent_start)        # cuts on latent boundaries
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
