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


@pytest.fixture(scope="session")
def vllm_engine(tiny_checkpoint, tmp_path_factory):
    """LocalEngine on the tiny checkpoint with `text.backend = "vllm"` written into its config.json.

    One vLLM engine for the encoder and render tests: each start costs tens of seconds on 2 cores.
    """
    import dataclasses

    from omnireel.checkpoint import load_checkpoint, save_checkpoint
    from omnireel.engine import LocalEngine

    model = load_checkpoint(tiny_checkpoint)
    config = dataclasses.replace(model.config, text=dataclasses.replace(model.config.text, backend="vllm"))
    directory = tmp_path_factory.mktemp("ckpt") / "tiny-vllm"
    save_checkpoint(model, config, directory)
    engine = LocalEngine(directory)
    yield engine
    engine.components["text_encoder"].close()


@pytest.fixture(scope="session")
def vllm_encoder(vllm_engine):
    """The vLLM text encoder that the checkpoint's config chose."""
    return vllm_engine.components["text_encoder"]
