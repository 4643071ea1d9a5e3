"""tests/vllm_suite runs only where vLLM is installed: the .venv-vllm that scripts/setup-vllm.sh builds.

    bash scripts/setup-vllm.sh && .venv-vllm/bin/python -m pytest -q tests/vllm_suite

Anywhere else (the main environment) every test here is reported as skipped, with this reason.
Test modules here import vllm only inside tests and fixtures, so they collect without it.
"""
from __future__ import annotations

import pytest

from omnireel.model.text import vllm_installed

SKIP_REASON = ("vLLM is not installed in this environment; run tests/vllm_suite in .venv-vllm "
               "(bash scripts/setup-vllm.sh && .venv-vllm/bin/python -m pytest tests/vllm_suite)")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if not vllm_installed():
        pytest.skip(SKIP_REASON)


@pytest.fixture(scope="session", autouse=True)
def ray_before_vllm(ray_session):
    """Ray starts before this process imports vLLM, so Ray's processes get this shell's environment,
    as a node's `ray start` gives them, and not the one vLLM's import leaves in this process
    (LD_PRELOAD, LD_LIBRARY_PATH, VLLM_WORKER_MULTIPROC_METHOD and more)."""
    yield ray_session


@pytest.fixture(scope="session")
def vllm_engine(vllm_checkpoint):
    """LocalEngine on the tiny checkpoint with `text.backend = "vllm"`.

    One vLLM engine for the encoder and render tests: each start costs tens of seconds on 2 cores.
    Its teardown checks that close() leaves none of the engine's processes behind.
    """
    import os

    import psutil

    from omnireel.engine import LocalEngine
    from vllm_support import engine_processes

    before = {p.pid for p in engine_processes()}
    engine = LocalEngine(vllm_checkpoint)
    started = [p for p in engine_processes() if p.pid not in before]
    cores = [p for p in started if p.ppid() == os.getpid()]              # this process's own engine core
    workers = [p for p in started if cores and p.ppid() == cores[0].pid]  # and the core's model worker
    assert len(cores) == 1 and len(workers) == 1, started
    started = cores + workers
    yield engine
    engine.components["text_encoder"].close()
    gone, alive = psutil.wait_procs(started, timeout=10)   # close() waits for them; 10 s is slack
    assert not alive, f"close() left vLLM processes running: {alive}"
    engine.components["text_encoder"].close()               # a second close (a replica's teardown) is a no-op


@pytest.fixture(scope="session")
def vllm_encoder(vllm_engine):
    """The vLLM text encoder that the checkpoint's config chose."""
    return vllm_engine.components["text_encoder"]


@pytest.fixture(scope="session")
def planner_model(tmp_path_factory):
    """A real model folder for the LLM storyboard planner: the tiny decoder with random weights
    (vllm_support.write_tiny_decoder) and a 2048-token context, so that a prompt of ~2000 tokens
    leaves no room for the planner's 1024-token storyboard and is refused."""
    from vllm_support import write_tiny_decoder
    return write_tiny_decoder(tmp_path_factory.mktemp("planner") / "tiny-decoder", weights=True,
                              max_position_embeddings=2048)
