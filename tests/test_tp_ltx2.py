"""Tensor parallelism for the LTX-2 family (parallel/tp_ltx2.py): TP=2 (two gloo processes, weights read
by slice) equals TP=1 within 1e-5 over a whole denoising loop with the pipeline's default guidance
(CFG + STG + modality isolation + rescale), on the tiny checkpoint and on a variant with gated
attention, the perturbed (STG) processor, interleaved RoPE and prompt modulation whose transformer
is saved as shards with an index; each rank holds exactly its rows or columns of the split tensors;
bad degrees fail naming the heads; a BackboneGroup(tp=2) on Ray gives the same latents."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from tiny_ltx2 import build_tiny_ltx2
from tp_support import gloo_rank, shard_report, spawn_ranks

from omnireel.config import GenerationRequest
from omnireel.families.ltx2 import FAMILY
from omnireel.parallel.tp_ltx2 import check_tp_degree_ltx2
from omnireel.stages import MediaLatents, TextEmbeddings, VoiceEmbeddings, denoise

TP = 2
PARITY = 1e-5
TEXT_TOKENS = 64
# The split tensors (DESIGN.md §3), named independently of the plan: column-parallel q, k, v, gate
# logits, feed-forward up (weights and biases) and the across-heads QK norm weights on dim 0;
# row-parallel to_out.0 and feed-forward down weights on dim 1 (their biases are replicated).
ATTENTION = r"transformer_blocks\.\d+\.(attn1|audio_attn1|attn2|audio_attn2|audio_to_video_attn|video_to_audio_attn)"
COLUMN_SPLIT = re.compile(rf"{ATTENTION}\.(to_[qkv]|to_gate_logits)\.(weight|bias)$|{ATTENTION}\.norm_[qk]\.weight$"
                          r"|transformer_blocks\.\d+\.(ff|audio_ff)\.net\.0\.proj\.(weight|bias)$")
ROW_SPLIT = re.compile(rf"{ATTENTION}\.to_out\.0\.weight$|transformer_blocks\.\d+\.(ff|audio_ff)\.net\.2\.weight$")
VARIANT = dict(gated_attn=True, audio_gated_attn=True, perturbed_attn=True, rope_type="interleaved",
               cross_attn_mod=True, audio_cross_attn_mod=True)


def split_dim(name: str) -> int | None:
    """The dim `name` is split on under TP, or None for a replicated tensor."""
    return 0 if COLUMN_SPLIT.match(name) else 1 if ROW_SPLIT.match(name) else None


def build_variant(tiny, directory):
    """The tiny checkpoint with a transformer that has gated attention, the perturbed processor,
    interleaved RoPE and prompt modulation, saved as several safetensors shards with an index."""
    from diffusers import LTX2VideoTransformer3DModel

    shutil.copytree(tiny, directory, ignore=shutil.ignore_patterns("transformer"))
    config = json.loads((tiny / "transformer" / "config.json").read_text())
    torch.manual_seed(1)
    transformer = LTX2VideoTransformer3DModel.from_config({**config, **VARIANT})
    transformer.save_pretrained(directory / "transformer", max_shard_size="20KB")
    return directory


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ltx2-tp")
    tiny = build_tiny_ltx2(root / "tiny")
    return {"tiny": tiny, "gated-sharded": build_variant(tiny, root / "gated-sharded")}


def denoise_inputs(config, size: str = "64x64", frames: int = 9):
    """The denoise stage's inputs: a 64x64, 1 + 8 frame (by default), 2-step plan with the pipeline's guidance
    (CFG on: the text holds the prompt's and the negative prompt's rows, with different padding, so
    the text mask differs per row and per head)."""
    plan = FAMILY.plan(GenerationRequest(prompt="a robot dancing in the rain", size=size, seconds=frames / 24,
                                         fps=24, seed=3, steps=2), config)
    g = torch.Generator().manual_seed(5)
    captions = []
    for valid in (40, 17):                                           # prompt, negative prompt
        mask = torch.zeros(TEXT_TOKENS, dtype=torch.int64)
        mask[-valid:] = 1                                            # left padding, as Gemma's tokenizer pads
        captions += [torch.randn(TEXT_TOKENS, config.video_text_dim, generator=g),    # (L, Dv)
                     torch.randn(TEXT_TOKENS, config.audio_text_dim, generator=g), mask]
    media = MediaLatents(refs=torch.zeros(0, config.vae_latent_channels, plan.latent_height, plan.latent_width))
    return plan, TextEmbeddings(captions=captions), VoiceEmbeddings(speakers=torch.zeros(0, 0)), media


def full_tensors(checkpoint) -> dict[str, torch.Tensor]:
    """The whole transformer's tensors, loaded by diffusers itself."""
    from diffusers import LTX2VideoTransformer3DModel
    return LTX2VideoTransformer3DModel.from_pretrained(checkpoint / "transformer").state_dict()


def tp_rank(rank: int, checkpoints: dict, store: str, out: str) -> None:
    """One TP rank: join the gloo group, load each checkpoint's shard by slice, run the denoise stage."""
    from omnireel.parallel.tp import resident_parameter_bytes

    with gloo_rank(rank, TP, store) as mesh:
        results = {}
        for key, checkpoint in checkpoints.items():
            denoiser = FAMILY.load_backbone_shard(checkpoint, mesh)
            latents = denoise(denoiser, *denoise_inputs(FAMILY.read_config(checkpoint)))
            results[key] = {"video": latents.video, "audio": latents.audio,
                            "bytes": resident_parameter_bytes(denoiser.module),
                            "shards": shard_report(denoiser.module, full_tensors(checkpoint), rank, TP, split_dim),
                            "heads": {block.attn1.heads for block in denoiser.module.transformer_blocks}}
        torch.save(results, f"{out}/rank{rank}.pt")


@pytest.fixture(scope="module")
def tp2_run(checkpoints, tmp_path_factory):
    return spawn_ranks(tp_rank, (checkpoints,), TP, tmp_path_factory.mktemp("tp2"))


@pytest.fixture(scope="module")
def expected(checkpoints):
    """TP=1: the family's own backbone component (diffusers' from_pretrained), same inputs."""
    return {key: denoise(FAMILY.load_components(checkpoint, {"backbone"})["backbone"],
                         *denoise_inputs(FAMILY.read_config(checkpoint)))
            for key, checkpoint in checkpoints.items()}


def test_the_variant_transformer_is_sharded_with_an_index(checkpoints):
    folder = checkpoints["gated-sharded"] / "transformer"
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (folder / "diffusion_pytorch_model.safetensors").exists()
    config = json.loads((folder / "config.json").read_text())
    assert {key: config[key] for key in VARIANT} == VARIANT
    tiny = checkpoints["tiny"] / "transformer"
    assert (tiny / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.parametrize("key", ["tiny", "gated-sharded"])
def test_tp2_equals_tp1_over_a_guided_denoising_loop(checkpoints, tp2_run, expected, key):
    config = FAMILY.read_config(checkpoints[key])
    plan = denoise_inputs(config)[0]
    guidance = config.guidance.with_cfg(plan.guidance_video, plan.guidance_audio)
    assert guidance.cfg and guidance.stg and guidance.modality and guidance.guidance_rescale > 0
    reference = expected[key]
    for rank in tp2_run:   # every rank ran the whole loop; each ends with the same latents
        video, audio = rank[key]["video"], rank[key]["audio"]
        assert video.shape == reference.video.shape and audio.shape == reference.audio.shape
        video_diff = (video - reference.video).abs().max().item()
        audio_diff = (audio - reference.audio).abs().max().item()
        print(f"{key}: max |TP=2 - TP=1| video {video_diff:.2e}, audio {audio_diff:.2e}")
        assert video_diff <= PARITY and audio_diff <= PARITY
    assert reference.video.abs().max() > 0.1 and reference.audio.abs().max() > 0.1   # a real signal


@pytest.mark.parametrize("key", ["tiny", "gated-sharded"])
def test_each_rank_holds_exactly_its_rows_or_columns(checkpoints, tp2_run, key):
    for rank in tp2_run:
        shards = rank[key]["shards"]
        wrong = [name for name, (_, same) in shards.items() if not same]
        assert not wrong, wrong
        split = [name for name, (dim, _) in shards.items() if dim is not None]
        layers = FAMILY.read_config(checkpoints[key]).num_layers
        # per block: 6 attentions x (q, k, v weight + bias, norm_q, norm_k, out weight) + 2 FFs x 3
        per_block = 6 * 9 + 2 * 3 + (6 * 2 if key == "gated-sharded" else 0)   # + gate logits
        assert len(split) == layers * per_block
        assert rank[key]["heads"] == {1}     # 2 video heads / tp=2


@pytest.mark.parametrize("key", ["tiny", "gated-sharded"])
def test_each_rank_holds_half_the_split_tensors_plus_the_replicated_ones(checkpoints, tp2_run, key):
    full = full_tensors(checkpoints[key])
    split = sum(t.numel() * t.element_size() for n, t in full.items() if split_dim(n) is not None)
    replicated = sum(t.numel() * t.element_size() for n, t in full.items() if split_dim(n) is None)
    for rank in tp2_run:
        assert rank[key]["bytes"] == split // TP + replicated
    print(f"{key}: total {split + replicated} B, split {split} B, per rank at tp={TP}: {tp2_run[0][key]['bytes']} B")


@pytest.mark.parametrize("tp", [3, 4])
def test_a_degree_that_does_not_divide_the_heads_is_rejected(checkpoints, tp):
    config = FAMILY.read_config(checkpoints["tiny"])   # 2 video heads, 2 audio heads
    message = (rf"tp={tp} must divide the LTX-2 transformer's num_attention_heads=2 .*"
               rf"audio_num_attention_heads=2 .*degrees that fit: \[1, 2\]")
    with pytest.raises(ValueError, match=message):
        FAMILY.check_tp(config, tp)
    FAMILY.check_tp(config, 2)


def test_the_audio_heads_count_too():
    from types import SimpleNamespace
    ltx2 = SimpleNamespace(num_attention_heads=32, audio_num_attention_heads=32)   # LTX-2's transformer
    for tp in (1, 2, 4, 8, 16, 32):
        check_tp_degree_ltx2(ltx2, tp)
    uneven = SimpleNamespace(num_attention_heads=32, audio_num_attention_heads=12)
    with pytest.raises(ValueError, match=r"tp=8 .*audio_num_attention_heads=12 .*fit: \[1, 2, 4\]"):
        check_tp_degree_ltx2(uneven, 8)
    with pytest.raises(ValueError, match=r"whole number >= 1"):
        check_tp_degree_ltx2(ltx2, 0)


def test_a_backbone_group_of_two_ranks_equals_tp1(ray_session, checkpoints, expected, tp2_run):
    from omnireel.parallel.group import BackboneGroup

    checkpoint = checkpoints["tiny"]
    with pytest.raises(ValueError, match=r"tp=3 must divide"):      # before any actor starts
        BackboneGroup(checkpoint, 3)
    group = BackboneGroup(checkpoint, TP, threads=1, pg_timeout_s=30.0)
    try:
        latents = group.denoise(*denoise_inputs(FAMILY.read_config(checkpoint)))
        assert group.resident_parameter_bytes == [tp2_run[0]["tiny"]["bytes"]] * TP
    finally:
        group.shutdown()
    reference = expected["tiny"]
    assert latents.video.shape == reference.video.shape and latents.audio.shape == reference.audio.shape
    assert (latents.video - reference.video).abs().max().item() <= PARITY
    assert (latents.audio - reference.audio).abs().max().item() <= PARITY
