"""Tensor parallelism: TP=2 (two gloo processes, sharded loading) equals TP=1 over a whole denoising
loop with CFG; each rank holds half of the split weights plus the replicated ones; bad degrees fail."""
from __future__ import annotations

import re

import pytest
import torch

from tp_support import gloo_rank, spawn_ranks

from omnireel.checkpoint import load_checkpoint, read_config
from omnireel.config import GenerationRequest, Shot
from omnireel.model.backbone import OmniBackbone
from omnireel.model.config import preset
from omnireel.parallel.tp import check_tp_degree
from omnireel.plan import plan_request
from omnireel.families.omni import OmniDenoiser
from omnireel.stages import MediaLatents, TextEmbeddings, VoiceEmbeddings, denoise

TP = 2
# The sharded parts (DESIGN.md §3): column-parallel q, k, v, MLP up (weights and biases) and
# row-parallel o, MLP down (weights; their biases are added once, after the all-reduce, so replicated).
SPLIT = re.compile(r"blocks\.\d+\.(attn\.[qkv]|mlp\.up)(\.groups\.\w+)?\.(weight|bias)$"
                   r"|blocks\.\d+\.(attn\.o|mlp\.down)(\.groups\.\w+)?\.weight$")


def denoise_inputs(config, image: bool = False):
    """A two-shot request (shot mask), one voice and one reference image, so every stream and every
    per-modality weight group takes part; CFG on (the tiny preset's guidance scales are 5 and 4).
    An image has no audio tokens: the audio weight group sees an empty span."""
    if image:
        request = GenerationRequest(prompt="a red fox in the snow", size="64x48", seed=11, output="image")
    else:
        request = GenerationRequest(prompt="a red fox in the snow", size="64x48", fps=8, seed=11,
                                    shots=[Shot(prompt="the fox runs", seconds=0.5),
                                           Shot(prompt="the fox stops and looks up", seconds=0.5)])
    plan = plan_request(request, config)
    assert plan.guidance_video != 1.0 and (plan.audio_frames == 0 if image else len(plan.shots) == 2)
    g = torch.Generator().manual_seed(5)
    text = TextEmbeddings([torch.randn(n, config.backbone.text_dim, generator=g)
                           for n in (6, 4, 5)[:len(plan.captions)]])
    voice = VoiceEmbeddings(torch.randn(1, config.backbone.speaker_dim, generator=g))
    media = MediaLatents(torch.randn(1, config.vae.latent_channels, plan.latent_height, plan.latent_width,
                                     generator=g))
    return plan, text, voice, media


def tp_rank(rank: int, checkpoint: str, store: str, out: str) -> None:
    """One TP rank: join the gloo group, load this rank's shard, run the same denoise stage."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor

    from omnireel.checkpoint import load_backbone_shard
    from omnireel.parallel.tp import resident_parameter_bytes

    with gloo_rank(rank, TP, store) as mesh:
        backbone = load_backbone_shard(checkpoint, mesh)
        shards = {}
        with safe_open(f"{checkpoint}/model.safetensors", framework="pt") as full:
            for name, p in backbone.named_parameters():
                if isinstance(p, DTensor) and p.placements[0].is_shard():
                    dim = p.placements[0].dim
                    expected = full.get_tensor(f"backbone.{name}").chunk(TP, dim)[rank]
                    shards[name] = torch.equal(p.to_local(), expected)
        latents = denoise(OmniDenoiser(backbone), *denoise_inputs(read_config(checkpoint)))
        image = denoise(OmniDenoiser(backbone), *denoise_inputs(read_config(checkpoint), image=True))
        torch.save({"video": latents.video, "audio": latents.audio, "image": image.video,
                    "bytes": resident_parameter_bytes(backbone), "shards": shards}, f"{out}/rank{rank}.pt")


@pytest.fixture(scope="module")
def tp2_run(tiny_checkpoint, tmp_path_factory):
    return spawn_ranks(tp_rank, (str(tiny_checkpoint),), TP, tmp_path_factory.mktemp("tp2"))


def test_tp2_equals_tp1_over_a_guided_denoising_loop(tiny_checkpoint, tp2_run):
    backbone = OmniDenoiser(load_checkpoint(tiny_checkpoint).backbone)
    expected = denoise(backbone, *denoise_inputs(read_config(tiny_checkpoint)))
    video, audio = tp2_run[0]["video"], tp2_run[0]["audio"]
    assert video.shape == expected.video.shape and audio.shape == expected.audio.shape
    assert (video - expected.video).abs().max().item() <= 1e-5
    assert (audio - expected.audio).abs().max().item() <= 1e-5
    assert expected.video.abs().max() > 0.1   # a real signal, not zeros on both sides


def test_tp2_equals_tp1_for_an_image_which_has_no_audio_tokens(tiny_checkpoint, tp2_run):
    backbone = OmniDenoiser(load_checkpoint(tiny_checkpoint).backbone)
    expected = denoise(backbone, *denoise_inputs(read_config(tiny_checkpoint), image=True))
    assert expected.audio.numel() == 0
    assert (tp2_run[0]["image"] - expected.video).abs().max().item() <= 1e-5


def test_each_rank_loads_its_own_rows_or_columns(tp2_run):
    for rank in tp2_run:
        assert rank["shards"] and all(rank["shards"].values()), rank["shards"]
    assert len(tp2_run[0]["shards"]) > 20   # every q, k, v, o, up, down of every block and group


def test_each_rank_holds_half_the_split_weights_plus_the_replicated_ones(tp2_run):
    with torch.device("meta"):
        backbone = OmniBackbone(preset("tiny").backbone)
    split = sum(p.numel() * p.element_size() for n, p in backbone.named_parameters() if SPLIT.match(n))
    total = sum(p.numel() * p.element_size() for p in backbone.parameters())
    replicated = total - split
    for rank in tp2_run:
        assert rank["bytes"] == split // TP + replicated
    print(f"tiny backbone: total {total} B, split {split} B, replicated {replicated} B, "
          f"per rank at tp={TP}: {tp2_run[0]['bytes']} B")


@pytest.mark.parametrize("tp", [3, 8])
def test_a_degree_that_does_not_divide_the_heads_is_rejected(tp):
    cfg = preset("tiny").backbone   # 4 heads
    with pytest.raises(ValueError, match=rf"tp={tp} must divide backbone.heads=4"):
        check_tp_degree(cfg, tp)


def test_a_degree_that_does_not_divide_the_mlp_is_rejected():
    from dataclasses import replace
    cfg = replace(preset("tiny").backbone, heads=8, mlp_hidden=132)   # 132 % 8 != 0
    with pytest.raises(ValueError, match=r"tp=8 .*heads=8 .*mlp_hidden=132"):
        check_tp_degree(cfg, 8)
    check_tp_degree(cfg, 4)
