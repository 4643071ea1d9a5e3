"""Shared fixtures: one tiny checkpoint and one LocalEngine per test session, fixed thread count."""
from __future__ import annotations

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

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
def tiny_engine(tiny_checkpoint):
    from omnireel.engine import LocalEngine
    return LocalEngine(tiny_checkpoint)


@pytest.fixture(scope="session")
def ray_session():
    """Ray, started once for the whole test session (4 logical CPUs, no dashboard)."""
    import ray
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False)
    yield ray
    ray.shutdown()
