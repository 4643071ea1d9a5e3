"""GenerationRequest: every bad input names its field and limit; good input normalizes as documented."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from omnireel.config import (MAX_PROMPT_CHARS, GenerationRequest, normalized, request_error_message,
                             request_key)

DIGEST = "0" * 64


def shots(*seconds: float) -> list[dict]:
    return [{"prompt": f"shot {i}", "seconds": s} for i, s in enumerate(seconds)]


def error_of(**fields) -> str:
    with pytest.raises(ValidationError) as caught:
        GenerationRequest(**fields)
    message = request_error_message(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("fields, expected", [
    ({}, "prompt: required"),
    ({"prompt": ""}, "prompt: must not be empty or blank"),
    ({"prompt": "  \n\t "}, "prompt: must not be empty or blank"),
    ({"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "prompt: must be at most 2000 characters (got 2001)"),
    ({"prompt": "a", "seconds": 0}, "seconds: must be > 0 and <= 20 (got 0)"),
    ({"prompt": "a", "seconds": -1.5}, "seconds: must be > 0 and <= 20 (got -1.5)"),
    ({"prompt": "a", "seconds": 25}, "seconds: must be > 0 and <= 20 (got 25)"),
    ({"prompt": "a", "seconds": float("nan")}, "seconds: must be > 0 and <= 20 (got nan)"),
    ({"prompt": "a", "size": "256"}, 'size: must be "WxH"'),
    ({"prompt": "a", "size": "axb"}, 'size: must be "WxH"'),
    ({"prompt": "a", "size": "250x256"}, "size: width and height must be multiples of 16 (got 250x256)"),
    ({"prompt": "a", "size": "16x256"}, "size: width and height must be within [32, 1920] (got 16x256)"),
    ({"prompt": "a", "size": "256x2048"}, "size: width and height must be within [32, 1920] (got 256x2048)"),
    ({"prompt": "a", "fps": 0}, "fps: must be >= 1 and <= 60 (got 0)"),
    ({"prompt": "a", "fps": 61}, "fps: must be >= 1 and <= 60 (got 61)"),
    ({"prompt": "a", "steps": 0}, "steps: must be >= 1 and <= 100 (got 0)"),
    ({"prompt": "a", "steps": 101}, "steps: must be >= 1 and <= 100 (got 101)"),
    ({"prompt": "a", "seed": -1}, "seed: must be >= 0 and < 9223372036854775808 (got -1)"),
    ({"prompt": "a", "seed": 2**63}, "seed: must be >= 0 and < 9223372036854775808"),
    ({"prompt": "a", "guidance_video": 31}, "guidance_video: must be >= 0 and <= 30 (got 31)"),
    ({"prompt": "a", "guidance_audio": -1}, "guidance_audio: must be >= 0 and <= 30 (got -1)"),
    ({"prompt": "a", "shots": shots(*[1] * 7)}, "shots: at most 6 shots (got 7)"),
    ({"prompt": "a", "seconds": 3, "shots": shots(1, 1)},
     "shots: seconds add up to 2 but must equal seconds (3) within 1e-06"),
    ({"prompt": "a", "shots": shots(10, 11)}, "shots: seconds add up to 21 but must be <= 20"),
    ({"prompt": "a", "shots": [{"prompt": " ", "seconds": 1}]}, "shots.0.prompt: must not be empty or blank"),
    ({"prompt": "a", "shots": [{"prompt": "b", "seconds": 0}]}, "shots.0.seconds: must be > 0 and <= 20"),
    ({"prompt": "a", "shots": [{"prompt": "b", "seconds": 1, "camera": "c" * 201}]},
     "shots.0.camera: must be at most 200 characters (got 201)"),
    ({"prompt": "a", "shots": shots(1) + ["not a shot"]}, "shots.1: Input should be a valid dictionary"),
    ({"prompt": "a", "shots": [{"prompt": "b", "seconds": 1, "zoom": 2}]},
     "shots.0.zoom: unknown field; allowed: prompt, seconds, camera"),
    ({"prompt": "a", "language": "fr"}, "language: Input should be 'en', 'zh', 'ja', 'ko' or 'es' (got 'fr')"),
    ({"prompt": "a", "output": "gif"}, "output: Input should be 'video' or 'image' (got 'gif')"),
    ({"prompt": "a", "quality": "hd"}, "quality: unknown field; allowed: prompt, seconds, size"),
    ({"prompt": "a", "seconds": 0.01, "fps": 24},
     "seconds, fps: round(seconds * fps) must be >= 1 frame (got round(0.01 * 24) = 0)"),
])
def test_bad_input_names_field_and_limit(fields, expected):
    assert expected in error_of(**fields)


def test_every_violation_is_listed_on_one_line():
    message = error_of(prompt="", fps=0, language="fr")
    assert message.count("; ") == 2
    assert message.startswith("prompt: ")
    assert "fps: must be >= 1 and <= 60" in message and "language: " in message


def test_defaults_are_filled():
    request = GenerationRequest(prompt="  a red fox  ")
    assert normalized(request) == {
        "prompt": "a red fox", "seconds": 2.0, "size": "256x256", "fps": 24, "seed": 0,
        "steps": None, "guidance_video": None, "guidance_audio": None, "language": "en",
        "shots": [], "output": "video",
    }
    assert (request.width, request.height, request.frames) == (256, 256, 48)


def test_openai_style_strings_are_accepted():
    request = GenerationRequest(prompt="a", seconds="4", size="1280X720")
    assert (request.seconds, request.size, request.width, request.height) == (4.0, "1280x720", 1280, 720)


def test_seconds_default_to_the_shots_sum():
    request = GenerationRequest(prompt="a", shots=shots(1.5, 2.25))
    assert request.seconds == 3.75
    assert normalized(request)["shots"] == [
        {"prompt": "shot 0", "seconds": 1.5, "camera": None},
        {"prompt": "shot 1", "seconds": 2.25, "camera": None}]


def test_explicit_seconds_may_match_shots_within_tolerance():
    request = GenerationRequest(prompt="a", seconds=0.3, shots=shots(0.1, 0.2))
    assert request.seconds == 0.3


def test_image_output_is_one_frame():
    assert GenerationRequest(prompt="a", output="image").frames == 1


def test_equal_requests_share_a_key():
    spelled_out = GenerationRequest(prompt="a fox ", seconds=2, size="256x256", fps=24, seed=0, language="en")
    implicit = GenerationRequest(prompt="a fox")
    assert normalized(spelled_out) == normalized(implicit)
    assert request_key(spelled_out, DIGEST) == request_key(implicit, DIGEST)
    derived = GenerationRequest(prompt="a", shots=shots(0.1, 0.2))  # seconds = 0.30000000000000004
    explicit = GenerationRequest(prompt="a", seconds=0.3, shots=shots(0.1, 0.2))
    assert request_key(derived, DIGEST) == request_key(explicit, DIGEST)


def test_key_depends_on_request_and_checkpoint():
    request = GenerationRequest(prompt="a fox")
    key = request_key(request, DIGEST)
    assert len(key) == 64 and int(key, 16) >= 0
    assert request_key(GenerationRequest(prompt="a fox", seed=1), DIGEST) != key
    assert request_key(request, "1" * 64) != key


def test_storage_never_imports_config():
    """The dependency goes one way: config.py validates references against storage's allow-list, so
    storage.py (and canonical.py, which both use) must import nothing of config.py, not even lazily."""
    import ast
    import importlib

    for name in ("omnireel.storage", "omnireel.canonical"):
        tree = ast.parse(open(importlib.import_module(name).__file__).read())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        assert not {"config", "omnireel.config"} & imported, f"{name} imports config"
