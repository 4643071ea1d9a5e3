"""The (cfg, sp, tp) device mesh (parallel/mesh.py, cfg_parallel.py, sp_omni.py, sp_ltx2.py, sp_wan.py): on
the CPU with gloo, omni, LTX-2 and Wan (2.2 A14B: both experts) under (cfg=2), (sp=2), (tp=2), (sp=2, tp=2)
and (cfg=2, sp=2) each equal the single-rank denoise stage within 1e-5 over a guided 2-step loop (one
spawn per mesh shape runs the three families; the token counts are odd, so the sequence shards are
uneven); bad shapes fail naming the flag."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_tp import denoise_inputs as omni_inputs
from test_tp_ltx2 import denoise_inputs as ltx2_inputs
from test_tp_wan import denoise_inputs as wan_tp_inputs
from tp_support import gloo_rank, spawn_ranks
from tiny_wan import ROBOT, build_tiny_wan

from omnireel.config import GenerationRequest

from omnireel.checkpoint import read_config
from omnireel.families import family_of
from omnireel.families.ltx2 import FAMILY as LTX2
from omnireel.families.wan import FAMILY as WAN
from omnireel.families.wan import no_media
from omnireel.parallel.mesh import MeshShape, check_mesh, split_lengths
from omnireel.parallel.mesh_denoiser import check_family_mesh
from omnireel.stages import denoise

PARITY = 1e-5
SHAPES = {"cfg2": MeshShape(cfg=2), "sp2": MeshShape(sp=2), "tp2": MeshShape(tp=2),
          "sp2-tp2": MeshShape(sp=2, tp=2), "cfg2-sp2": MeshShape(cfg=2, sp=2)}
LTX2_GEOMETRY = dict(size="96x96", frames=17)     # 3 x 3 x 3 = 27 video tokens: uneven over sp=2
HEADS4 = dict(num_attention_heads=4, attention_head_dim=4, audio_num_attention_heads=4, audio_attention_head_dim=2)
# (the inner dims stay 16 and 8; 4 heads / tp=2 / sp=2 = 1 head each)
WAN_HEADS4 = dict(num_attention_heads=4, attention_head_dim=6)   # the inner dim stays 24
WAN_SIZE = "48x48"                                # 3 latents x 3 x 3 patches = 27 video tokens: uneven over sp=2


@pytest.fixture(scope="module")
def ltx2_heads4(ltx2_checkpoint, tmp_path_factory):
    """The tiny LTX-2 with 4 video and 4 audio heads (the tiny one has 2: too few for sp=2 x tp=2)."""
    from diffusers import LTX2VideoTransformer3DModel

    directory = tmp_path_factory.mktemp("ltx2-mesh") / "heads4"
    shutil.copytree(ltx2_checkpoint, directory, ignore=shutil.ignore_patterns("transformer"))
    config = json.loads((ltx2_checkpoint / "transformer" / "config.json").read_text())
    torch.manual_seed(2)
    LTX2VideoTransformer3DModel.from_config({**config, **HEADS4}).save_pretrained(directory / "transformer")
    return directory


@pytest.fixture(scope="module")
def wan_heads4(tmp_path_factory):
    """The tiny Wan 2.2 A14B (two experts) with 4 heads in each expert (the tiny one has 2)."""
    from diffusers import WanTransformer3DModel

    directory = build_tiny_wan(tmp_path_factory.mktemp("wan-mesh") / "heads4", "a14b")
    for seed, name in enumerate(("transformer", "transformer_2")):
        config = json.loads((directory / name / "config.json").read_text())
        shutil.rmtree(directory / name)
        torch.manual_seed(seed)
        WanTransformer3DModel.from_config({**config, **WAN_HEADS4}).save_pretrained(directory / name)
    return directory


def inputs(checkpoint):
    """The denoise stage's inputs for `checkpoint`'s family: CFG on for all, an odd token count (the
    omni two-shot request of test_tp with its global caption one token shorter: 89 tokens)."""
    if family_of(checkpoint).name == "ltx2":
        return ltx2_inputs(LTX2.read_config(checkpoint), **LTX2_GEOMETRY)
    if family_of(checkpoint).name == "wan":
        config = WAN.read_config(checkpoint)
        plan = WAN.plan(GenerationRequest(**{**ROBOT, "size": WAN_SIZE}), config)
        _, text, voice, _ = wan_tp_inputs(config)                # random prompt and negative rows
        return plan, text, voice, no_media(plan)
    plan, text, voice, media = omni_inputs(read_config(checkpoint))
    text.captions[0] = text.captions[0][:-1]
    return plan, text, voice, media


def mesh_rank(rank: int, shape: MeshShape, checkpoints: dict, store: str, out: str) -> None:
    """One rank of the mesh: join the gloo group, build the (cfg, sp, tp) mesh, load, denoise."""
    from omnireel.parallel.mesh import BackboneMesh
    from omnireel.parallel.mesh_denoiser import load_mesh_denoiser

    with gloo_rank(rank, shape.ranks, store):
        mesh = BackboneMesh(shape)
        results = {}
        for key, checkpoint in checkpoints.items():
            denoiser, block_tokens = load_mesh_denoiser(checkpoint, mesh), []
            if key == "wan":                                     # the tokens each expert's first block attends from
                for transformer in denoiser.module:
                    transformer.blocks[0].attn1.register_forward_pre_hook(
                        lambda block, args: block_tokens.append(args[0].shape[1]))
            latents = denoise(denoiser, *inputs(checkpoint))
            results[key] = {"video": latents.video, "audio": latents.audio, "block_tokens": block_tokens}
        torch.save({"results": results, "where": mesh.describe()}, f"{out}/rank{rank}.pt")


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint, ltx2_heads4, wan_heads4):
    return {"omni": str(tiny_checkpoint), "ltx2": str(ltx2_heads4), "wan": str(wan_heads4)}


@pytest.fixture(scope="module")
def expected(checkpoints):
    """One rank: each family's own backbone component."""
    return {key: denoise(family_of(c).load_components(c, {"backbone"})["backbone"], *inputs(c))
            for key, c in checkpoints.items()}


@pytest.fixture(scope="module", params=list(SHAPES))
def mesh_run(request, checkpoints, tmp_path_factory):
    shape = SHAPES[request.param]
    return request.param, spawn_ranks(mesh_rank, (shape, checkpoints), shape.ranks, tmp_path_factory.mktemp(request.param))


def test_the_sequences_are_uneven(checkpoints):
    """Every family's token count is odd, so sp=2 shards it unevenly (what the parity covers)."""
    from omnireel.families.omni import denoise_layout_spec
    from omnireel.model.layout import build_layout

    plan, text, voice, media = inputs(checkpoints["omni"])
    config = read_config(checkpoints["omni"])
    tokens = build_layout(denoise_layout_spec(plan, text, voice, media), config.backbone).modality.shape[0]
    ltx2_plan = inputs(checkpoints["ltx2"])[0]
    video_tokens = ltx2_plan.latent_frames * ltx2_plan.latent_height * ltx2_plan.latent_width
    wan_plan = inputs(checkpoints["wan"])[0]
    wan_tokens = wan_plan.latent_frames * (wan_plan.latent_height // 2) * (wan_plan.latent_width // 2)
    assert tokens % 2 == 1 and video_tokens % 2 == 1 and wan_tokens % 2 == 1, (tokens, video_tokens, wan_tokens)
    assert split_lengths(video_tokens, 2) == [14, 13] and split_lengths(wan_tokens, 2) == [14, 13]


@pytest.mark.parametrize("family", ["omni", "ltx2", "wan"])
def test_every_mesh_shape_equals_one_rank(mesh_run, expected, family):
    name, ranks = mesh_run
    reference = expected[family]
    assert reference.video.abs().max() > 0.1                                          # a real signal
    assert family == "wan" or reference.audio.abs().max() > 0.1                       # (Wan makes no audio)
    for rank in ranks:   # every rank ran the whole loop; each ends with the same latents
        got = rank["results"][family]
        assert got["video"].shape == reference.video.shape and got["audio"].shape == reference.audio.shape
        video_diff = (got["video"] - reference.video).abs().max().item()
        audio_diff = (got["audio"] - reference.audio).abs().amax().item() if reference.audio.numel() else 0.0
        print(f"{family} {name} {rank['where']}: max |mesh - 1 rank| video {video_diff:.2e}, audio {audio_diff:.2e}")
        assert video_diff <= PARITY and audio_diff <= PARITY


def test_wan_blocks_see_their_sequence_shard(mesh_run):
    """Under sp=2 each Wan rank's blocks run on its 14 or 13 of the 27 video tokens, at both steps
    (one per expert); without sp they see all 27."""
    name, ranks = mesh_run
    for rank in ranks:
        sp = SHAPES[name].sp
        s = SHAPES[name].coordinates(int(rank["where"].split()[1]))[1]
        assert rank["results"]["wan"]["block_tokens"] == [split_lengths(27, sp)[s]] * 2, rank["where"]


def test_mesh_coordinates_put_tp_innermost():
    shape = MeshShape(cfg=2, sp=2, tp=2)
    assert [shape.coordinates(r) for r in range(8)] == [(c, s, t) for c in (0, 1) for s in (0, 1) for t in (0, 1)]
    assert all(shape.rank(*shape.coordinates(r)) == r for r in range(8))


def test_bad_mesh_shapes_name_the_flag_and_the_limit(checkpoints):
    with pytest.raises(ValueError, match=r"--cfg-parallel must be one of \[1, 2\] \(got 3\)"):
        MeshShape(cfg=3)
    with pytest.raises(ValueError, match=r"--sp must be a whole number >= 1 \(got 0\)"):
        MeshShape(sp=0)
    with pytest.raises(ValueError, match=r"cfg=2 x sp=2 x tp=1 = 4\) must equal the backbone group's ranks \(2\)"):
        check_mesh(MeshShape(cfg=2, sp=2), {"backbone.heads": 4}, ranks=2)
    omni = read_config(checkpoints["omni"])                    # 4 heads
    with pytest.raises(ValueError, match=r"--sp=4 must divide the heads per tensor-parallel rank "
                                         r"\(backbone.heads=4 / tp=2 = 2\).*fit at tp=2: \[1, 2\]"):
        check_family_mesh("omni", omni, MeshShape(sp=4, tp=2))
    ltx2 = LTX2.read_config(checkpoints["ltx2"])
    with pytest.raises(ValueError, match=r"--tp=3 must divide num_attention_heads=4, audio_num_attention_heads=4"):
        check_family_mesh("ltx2", ltx2, MeshShape(sp=2, tp=3))
    check_family_mesh("ltx2", ltx2, MeshShape(cfg=2, sp=2, tp=2), ranks=8)
    wan = WAN.read_config(checkpoints["wan"])                 # 4 heads, ffn 32
    with pytest.raises(ValueError, match=r"--sp=2 must divide the heads per tensor-parallel rank "
                                         r"\(num_attention_heads=4 / tp=4 = 1\).*fit at tp=4: \[1\]"):
        check_family_mesh("wan", wan, MeshShape(sp=2, tp=4))
    with pytest.raises(ValueError, match=r"--tp=3 must divide num_attention_heads=4"):
        check_family_mesh("wan", wan, MeshShape(cfg=2, tp=3))
    check_family_mesh("wan", wan, MeshShape(cfg=2, sp=2, tp=2), ranks=8)


def test_the_bench_counts_each_modes_bytes_from_the_plan():
    """bench_mesh.mesh_traffic, by hand for tiny (d = 64, 3 blocks), L = 100, float32, B = 2 rows."""
    from omnireel.model.config import preset
    from omnireel.parallel.bench_mesh import mesh_traffic

    cfg = preset("tiny").backbone
    traffic = mesh_traffic(cfg, 100, latent_elements=1000, shape=MeshShape(cfg=2, sp=2, tp=2), element_size=4)
    activation = 1 * 50 * 64 * 4                                 # (B_c = 1, L_s = 50, d) floats
    assert traffic.tp_per_block == 2 * 2 * (1 / 2) * activation  # two ring all-reduces
    assert traffic.sp_per_block == 4 * (1 / 2) * activation / 2  # four all-to-alls of d / tp channels
    assert traffic.sp_gather == activation and traffic.cfg_gather == 1 * 1000 * 4
    assert traffic.per_step == 3 * (traffic.tp_per_block + traffic.sp_per_block) + activation + 4000
    single = mesh_traffic(cfg, 100, 1000, MeshShape(), 4)
    assert single.per_step == 0


def test_the_wan_bench_counts_its_bytes_from_the_plan():
    """bench_mesh.wan_traffic, by hand for the tiny Wan (d = 2 x 12, patch (1, 2, 2), 16 output channels,
    2 blocks) at a 3 x 6 x 6 latent (27 tokens), the CFG batch of 2 rows, float32."""
    from omnireel.parallel.bench_mesh import family_step, wan_traffic

    with torch.device("meta"):
        config = family_step("wan").build("tiny").config
    calls = [{"hidden_states": torch.empty(2, 16, 3, 6, 6, device="meta")}]
    traffic = wan_traffic(config, calls, MeshShape(cfg=2, sp=2, tp=2), element_size=4)
    activation = 1 * 27 / 2 * 24 * 4                             # (B_c = 1, S_s = 13.5, d) floats
    assert traffic.tp_per_block == 3 * 2 * (1 / 2) * activation  # three ring all-reduces
    assert traffic.sp_per_block == 4 * (1 / 2) * activation / 2  # four all-to-alls of d / tp channels in attn1
    assert traffic.sp_gather == 1 * 27 / 2 * 64 * 4               # proj_out's 16 x 4 values per token
    assert traffic.cfg_gather == 1 * 27 * 64 * 4
    assert wan_traffic(config, calls, MeshShape(), 4).per_step == 0


def test_the_bench_refuses_a_bad_mesh_in_one_line(capsys):
    """What the checkpoint cannot take; a degree out of its field's limits (--cfg-parallel 4) is the
    flag's own error (tests/test_driver_args.py)."""
    import argparse

    from omnireel.cli import add_backbone_bench_arguments
    from omnireel.parallel.bench import run

    parser = argparse.ArgumentParser()
    add_backbone_bench_arguments(parser)
    assert run(parser.parse_args(["--preset", "tiny", "--sp", "3"])) == 2
    assert run(parser.parse_args(["--family", "wan", "--preset", "tiny", "--size", "48x48", "--frames", "9",
                                  "--sp", "2", "--tp", "2"])) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == ["omnireel: error: --sp=3 must divide the heads per tensor-parallel rank (backbone.heads=4 / "
                      "tp=1 = 4): Ulysses gives each sequence-parallel rank whole heads; sequence-parallel degrees "
                      "that fit at tp=1: [1, 2, 4]",
                      "omnireel: error: --sp=2 must divide the heads per tensor-parallel rank (num_attention_heads=2 / "
                      "tp=2 = 1): Ulysses gives each sequence-parallel rank whole heads; sequence-parallel degrees "
                      "that fit at tp=2: [1]"]


def test_a_backbone_group_on_a_cfg2_mesh_equals_one_rank(ray_session, checkpoints, expected):
    """BackboneGroup(mesh=(cfg=2)): two rank actors, the rows split between them, rank 0's latents."""
    from omnireel.parallel.group import BackboneGroup

    with pytest.raises(ValueError, match=r"--sp=3 must divide the heads per tensor-parallel rank"):
        BackboneGroup(checkpoints["omni"], 1, mesh=MeshShape(sp=3))           # before any actor starts
    group = BackboneGroup(checkpoints["omni"], 1, threads=1, pg_timeout_s=30.0, mesh=MeshShape(cfg=2))
    try:
        assert len(group.rank_actors) == 2
        latents = group.denoise(*inputs(checkpoints["omni"]))
    finally:
        group.shutdown()
    assert (latents.video - expected["omni"].video).abs().max().item() <= PARITY
    assert (latents.audio - expected["omni"].audio).abs().max().item() <= PARITY
