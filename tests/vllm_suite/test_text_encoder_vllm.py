"""The vllm text backend (vLLM's pooling runner, token_embed) against the torch (transformers) one."""
from __future__ import annotations

import pytest
import torch

from omnireel.model.config import TextEncoderConfig
from omnireel.model.text import HFTextEncoder, VLLMTextEncoder, build_text_encoder

CAPTIONS = [
    "hello world",
    "A red paper boat drifting down a rainy street gutter, puddles rippling, soft rain sounds.",
    "Close-up: the chef flips 3 pancakes at 7:45 a.m.; the kitchen is LOUD!!",
    "Café naïve résumé — 東京の夜景, 雨",
    "",
    "word " * 120,                        # truncated at max_tokens (77)
]


@pytest.fixture(scope="module")
def hf_encoder() -> HFTextEncoder:
    return build_text_encoder(TextEncoderConfig(), backend="hf")


def test_backend_is_chosen_by_the_checkpoint_config(vllm_engine, vllm_encoder):
    assert vllm_engine.config.text.backend == "vllm"
    assert isinstance(vllm_encoder, VLLMTextEncoder)
    assert vllm_encoder.dim == 384 and vllm_encoder.max_tokens == 77


def test_per_token_embeddings_match_the_torch_encoder(hf_encoder, vllm_encoder):
    expected = hf_encoder.encode(CAPTIONS)
    found = vllm_encoder.encode(CAPTIONS)
    assert len(found) == len(CAPTIONS)
    worst_cosine, worst_abs = 1.0, 0.0
    for caption, want, got in zip(CAPTIONS, expected, found):
        ids = hf_encoder.tokenizer(caption, truncation=True, max_length=77)["input_ids"]
        assert got.shape == want.shape == (len(ids), 384), caption   # [CLS] ... [SEP], no padding
        assert got.dtype == torch.float32
        cosine = torch.nn.functional.cosine_similarity(got, want, dim=-1)   # one per token
        assert cosine.min().item() >= 0.999, (caption, cosine.min().item())
        # normalization off: the vectors themselves match, not just their directions
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        worst_cosine = min(worst_cosine, cosine.min().item())
        worst_abs = max(worst_abs, (got - want).abs().max().item())
    assert found[-1].shape[0] == 77
    print(f"\nvllm vs torch text encoder: min per-token cosine {worst_cosine:.7f}, max abs {worst_abs:.2e}")


def test_token_vectors_are_not_normalized(vllm_encoder):
    norms = vllm_encoder.encode(["a fox runs across the frozen lake"])[0].norm(dim=-1)
    assert (norms - 1.0).abs().min().item() > 0.5   # MiniLM's last hidden states have norms ~5-12


def test_batching_does_not_change_features(vllm_encoder):
    alone = vllm_encoder.encode([CAPTIONS[1]])[0]
    batched = vllm_encoder.encode(CAPTIONS)[1]
    torch.testing.assert_close(alone, batched, atol=1e-5, rtol=1e-5)
    assert vllm_encoder.encode([]) == []
