"""Tensor parallelism for the Wan family (parallel/tp_wan.py): TP=2 (two gloo processes, weights read by
slice) equals TP=1 within 1e-5 over a whole 2-step CFG loop, on Wan 2.2 A14B (both experts split, the
second saved as shards with an index) and on Wan 2.1 I2V (the image tokens' added K / V); each rank
holds exactly its rows or columns of the split tensors; bad degrees fail naming the heads."""
from __future__ import annotations

import re

import pytest
import torch
from tp_support import gloo_rank, shard_report, spawn_ranks
from tiny_wan import ROBOT, build_tiny_wan

from omnireel.config import GenerationRequest
from omnireel.families.wan import FAMILY
from omnireel.parallel.tp_wan import check_tp_degree_wan
from omnireel.stages import MediaLatents, TextEmbeddings, VoiceEmbeddings, denoise

TP = 2
PARITY = 1e-5
# The split tensors, named independently of the plan: column-parallel q, k, v, added k / v, FF up
# (weights and biases) and the across-heads QK norm weights on dim 0; row-parallel to_out.0 and FF down
# weights on dim 1 (their biases are replicated).
COLUMN_SPLIT = re.compile(r"blocks\.\d+\.attn[12]\.(to_[qkv]|add_[kv]_proj)\.(weight|bias)$"
                          r"|blocks\.\d+\.attn[12]\.norm_(q|k|added_k)\.weight$|blocks\.\d+\.ffn\.net\.0\.proj\.(weight|bias)$")
ROW_SPLIT = re.compile(r"blocks\.\d+\.attn[12]\.to_out\.0\.weight$|blocks\.\d+\.ffn\.net\.2\.weight$")


def split_dim(name: str) -> int | None:
    return 0 if COLUMN_SPLIT.match(name) else 1 if ROW_SPLIT.match(name) else None


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A14B (its low-noise expert re-saved as 20 KB shards with an index) and Wan 2.1 I2V."""
    from diffusers import WanTransformer3DModel

    root = tmp_path_factory.mktemp("wan-tp")
    a14b = build_tiny_wan(root / "a14b", "a14b")
    expert = WanTransformer3DModel.from_pretrained(a14b / "transformer_2")
    for file in (a14b / "transformer_2").glob("*.safetensors"):
        file.unlink()
    expert.save_pretrained(a14b / "transformer_2", max_shard_size="20KB")
    return {"a14b": a14b, "i2v": build_tiny_wan(root / "i2v", "i2v")}


def denoise_inputs(config):
    """A 32x32, 9-frame, 2-step CFG plan; random text rows (prompt, negative) and, for I2V, a random
    condition and random image tokens."""
    plan = FAMILY.plan(GenerationRequest(**ROBOT, input_reference=None), config) if not config.needs_image else \
        FAMILY.plan(GenerationRequest(**ROBOT, input_reference=FAMILY.warmup_values(config)["plan"].input_reference),
                    config)
    g = torch.Generator().manual_seed(5)
    text = TextEmbeddings(captions=[torch.randn(config.max_sequence_length, config.text_dim, generator=g)
                                    for _ in range(2)])
    media = MediaLatents(refs=torch.zeros(0, 0, plan.latent_height, plan.latent_width))
    if config.needs_image:
        media.video = torch.randn(config.in_channels - config.vae_latent_channels, plan.latent_frames,
                                  plan.latent_height, plan.latent_width, generator=g)
        media.refs = torch.randn(1, 65, config.image_dim, generator=g)        # (1, L_image, image_dim)
    return plan, text, VoiceEmbeddings(speakers=torch.zeros(0, 0)), media


def tp_rank(rank: int, checkpoints: dict, store: str, out: str) -> None:
    with gloo_rank(rank, TP, store) as mesh:
        results = {}
        for key, checkpoint in checkpoints.items():
            denoiser = FAMILY.load_backbone_shard(checkpoint, mesh)
            latents = denoise(denoiser, *denoise_inputs(FAMILY.read_config(checkpoint)))
            full = [t.state_dict() for t in FAMILY.load_components(checkpoint, {"backbone"})["backbone"].transformers]
            shards = {}
            for index, (module, tensors) in enumerate(zip(denoiser.transformers, full)):
                shards.update(shard_report(module, tensors, rank, TP, split_dim, prefix=f"{index}:"))
            results[key] = {"video": latents.video, "shards": shards,
                            "heads": {b.attn1.heads for t in denoiser.transformers for b in t.blocks}}
        torch.save(results, f"{out}/rank{rank}.pt")


@pytest.fixture(scope="module")
def tp2_run(checkpoints, tmp_path_factory):
    return spawn_ranks(tp_rank, (checkpoints,), TP, tmp_path_factory.mktemp("tp2"))


@pytest.mark.parametrize("key", ["a14b", "i2v"])
def test_tp2_equals_tp1_over_a_cfg_denoising_loop(checkpoints, tp2_run, key):
    config = FAMILY.read_config(checkpoints[key])
    denoiser = FAMILY.load_components(checkpoints[key], {"backbone"})["backbone"]
    reference = denoise(denoiser, *denoise_inputs(config))
    assert reference.video.abs().max() > 0.1
    for rank in tp2_run:
        diff = (rank[key]["video"] - reference.video).abs().max().item()
        print(f"{key}: max |TP=2 - TP=1| {diff:.2e}")
        assert rank[key]["video"].shape == reference.video.shape and diff <= PARITY
        assert rank[key]["heads"] == {config.num_attention_heads // TP}


@pytest.mark.parametrize("key", ["a14b", "i2v"])
def test_each_rank_holds_exactly_its_rows_or_columns(tp2_run, key):
    for rank in tp2_run:
        shards = rank[key]["shards"]
        assert not [name for name, (_, same) in shards.items() if not same]
        assert sum(dim is not None for dim, _ in shards.values()) > 0


def test_bad_degrees_name_the_heads(checkpoints):
    config = FAMILY.read_config(checkpoints["a14b"])
    with pytest.raises(ValueError, match=r"num_attention_heads=2 .*fit: \[1, 2\]"):
        check_tp_degree_wan(config, 4)
    FAMILY.check_tp(config, 2)
