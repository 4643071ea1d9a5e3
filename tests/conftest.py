"""Shared fixtures: one tiny checkpoint, one LocalEngine, one Ray and one running Serve app per test
session, fixed thread count."""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# A batch whose pools cannot be placed fails in 5 minutes, naming the operators, not in Ray's 30.
os.environ.setdefault("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", "300")

# benchmarks/' helper modules (tiny_ltx2, tiny_wan: the tiny random diffusers folders), after tests/ own
sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))

import pytest  # noqa: E402
import torch  # noqa: E402

TEST_THREADS = 2
torch.set_num_threads(TEST_THREADS)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from omnireel.checkpoint import init_checkpoint
    directory = tmp_path_factory.mktemp("ckpt") / "tiny"
    init_checkpoint("tiny", directory, seed=0)
    return directory


@pytest.fixture(scope="session")
def ltx2_checkpoint(tmp_path_factory):
    """A tiny random LTX-2 diffusers folder (benchmarks/tiny_ltx2.py), built once."""
    from tiny_ltx2 import build_tiny_ltx2
    return build_tiny_ltx2(tmp_path_factory.mktemp("ltx2") / "tiny-ltx2")


@pytest.fixture(scope="session")
def wan_checkpoint(tmp_path_factory):
    """A tiny random Wan 2.1 text-to-video diffusers folder (benchmarks/tiny_wan.py), built once."""
    from tiny_wan import build_tiny_wan
    return build_tiny_wan(tmp_path_factory.mktemp("wan") / "tiny-wan")


@pytest.fixture(scope="session")
def ltx2_robot_reference(ltx2_checkpoint):
    """LTX2Pipeline's own (pipe, video, audio) latents for tiny_ltx2.ROBOT: what the Serve and the
    batch tests compare the served and rendered latents with."""
    from ltx2_support import reference_latents
    from tiny_ltx2 import ROBOT

    from omnireel.config import GenerationRequest
    return reference_latents(ltx2_checkpoint, GenerationRequest(**ROBOT))


@pytest.fixture(scope="session")
def vllm_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint (same weights) with `text.backend = "vllm"` written into its config.json."""
    import dataclasses

    from omnireel.checkpoint import load_checkpoint, save_checkpoint

    model = load_checkpoint(tiny_checkpoint)
    config = dataclasses.replace(model.config, text=dataclasses.replace(model.config.text, backend="vllm"))
    directory = tmp_path_factory.mktemp("ckpt") / "tiny-vllm"
    save_checkpoint(model, config, directory)
    return directory


@pytest.fixture(scope="session")
def tiny_engine(tiny_checkpoint):
    from omnireel.engine import LocalEngine
    return LocalEngine(tiny_checkpoint)


@pytest.fixture(scope="session")
def ray_session():
    """Ray, started once for the whole test session (no dashboard). 8 logical CPUs: the shared Serve
    app holds 2.2 of them while it runs, a family's app beside it (test_*_drivers, test_ltx2_serve)
    1.9 more, and a batch run (3 one-CPU pools) must fit beside both."""
    import ray
    if not ray.is_initialized():
        ray.init(num_cpus=8, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def served(ray_session, tiny_checkpoint, tmp_path_factory):
    """The Serve app on the tiny checkpoint (tests/serve_support.py), started once (~25 s) and shared
    by every serve test module; its voice registry is a folder of its own (`served.voices`)."""
    from serve_support import running_app
    with running_app(ray_session, tiny_checkpoint, tmp_path_factory.mktemp("serve")) as app:
        yield app
