"""The real MiniLM text encoder: shapes, special tokens, truncation, semantics, backend choice."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from omnireel.model.config import TextEncoderConfig
from omnireel.model.text import HFTextEncoder, build_text_encoder, mean_pool, resolve_text_model

PARAPHRASES = [
    ("A dog runs across the grassy park.", "A puppy is sprinting through the green park."),
    ("The chef is cooking pasta in the kitchen.", "A cook prepares spaghetti on the stove."),
    ("Waves crash against the rocky shore at sunset.", "At dusk the sea breaks on the rocks of the coast."),
    ("A man plays the guitar on stage.", "A guitarist performs a song at a concert."),
    ("Snow falls quietly over the mountain village.", "A small town in the mountains is covered by falling snow."),
]


@pytest.fixture(scope="module")
def encoder() -> HFTextEncoder:
    return build_text_encoder(TextEncoderConfig())


def test_default_model_resolves_to_packaged_folder():
    folder = resolve_text_model("all-MiniLM-L6-v2")
    assert (folder / "config.json").is_file()


def test_unknown_model_is_rejected():
    with pytest.raises(ValueError, match="no-such-model.*all-MiniLM-L6-v2"):
        resolve_text_model("no-such-model")


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match=r"text\.backend.*'tensorrt'.*'hf'"):
        build_text_encoder(TextEncoderConfig(backend="tensorrt"))


def test_tokens_include_special_tokens_and_no_padding(encoder):
    texts = ["hello world", "a much longer caption about a red bicycle"]
    features = encoder.encode(texts)
    for text, tokens in zip(texts, features):
        ids = encoder.tokenizer(text)["input_ids"]
        assert ids[0] == encoder.tokenizer.cls_token_id and ids[-1] == encoder.tokenizer.sep_token_id
        assert tokens.shape == (len(ids), encoder.dim)
        assert tokens.dtype == torch.float32
        assert not tokens.requires_grad
    assert features[0].shape == (4, 384)  # [CLS] hello world [SEP]


def test_batching_does_not_change_features(encoder):
    alone = encoder.encode(["hello world"])[0]
    batched = encoder.encode(["hello world", "a much longer caption about a red bicycle"])[0]
    torch.testing.assert_close(alone, batched, atol=1e-5, rtol=1e-5)


def test_truncates_at_max_tokens():
    short = build_text_encoder(dataclasses.replace(TextEncoderConfig(), max_tokens=8))
    tokens = short.encode(["word " * 50])[0]
    assert tokens.shape == (8, short.dim)


def test_encoder_is_frozen(encoder):
    assert not encoder.model.training
    assert not any(parameter.requires_grad for parameter in encoder.model.parameters())


def test_paraphrases_are_closer_than_unrelated_sentences(encoder):
    texts = [text for pair in PARAPHRASES for text in pair]
    pooled = torch.stack([mean_pool(tokens) for tokens in encoder.encode(texts)])
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    cosine = pooled @ pooled.T
    pair_of = [i // 2 for i in range(len(texts))]
    paraphrase = min(cosine[2 * p, 2 * p + 1].item() for p in range(len(PARAPHRASES)))
    unrelated = max(cosine[i, j].item() for i in range(len(texts)) for j in range(len(texts))
                    if pair_of[i] != pair_of[j])
    assert paraphrase > unrelated, (paraphrase, unrelated)


def test_mean_pool_averages_tokens():
    tokens = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    torch.testing.assert_close(mean_pool(tokens), torch.tensor([2.0, 4.0]))
