"""A backbone on a (cfg, sp, tp) mesh (`omnireel bench backbone [--family omni|ltx2|wan] --cfg-parallel C
--sp S --tp T`): per-step time, bytes each rank sends per step (from the plan) and parity with one rank.

One step is bench.py's: one CFG-guided velocity (cond + uncond, B = 2 rows) over a one-shot layout
of about `tokens` tokens. The C x S x T ranks are processes (gloo on the CPU, NCCL on GPUs) that load
a temporary checkpoint through the mesh denoiser (mesh_denoiser.py) and run the step through its
injected forward; --check-parity compares rank 0's velocities with one rank on the same weights.

Bytes per rank per step (ring collectives; e = bytes per element, d = model width, B_c = B / cfg
rows per cfg rank, L_s = L / sp tokens per sp rank), per block:

    tp   2 all-reduces (attention out, MLP down) of (B_c, L_s, d):      2 x 2 (tp - 1) / tp x B_c L_s d e
    sp   4 all-to-alls (q, k, v, attention out) of (B_c, L_s, d / tp):  4 x (sp - 1) / sp x B_c L_s (d / tp) e
    cfg  nothing inside a block

and once per step: sp all-gathers the blocks' output, (sp - 1) x B_c L_s d e; cfg all-gathers the
velocities (video and audio latents), (cfg - 1) x B_c x (latent elements) e.

LTX-2 and Wan (diffusers' transformers, seeded random weights built in every rank, the TP plan and
sequence parallel applied as the mesh denoiser applies them): one step is the family's model calls of
one denoising step (LTX-2: the CFG batch, the STG and the modality passes, 2 + 1 + 1 rows; Wan: the
CFG batch, 2 rows), through the cfg-parallel forward; B_c = ceil(rows / cfg) rows per cfg rank, all
counted as full passes through every block (the STG / modality passes skip some attention: an upper
bound). Per block, S_s = S / sp video tokens, d_v (d_a) the video (audio) attention width, L_a audio
tokens (whole on every sp rank), C_o the output channels per video token:

    Wan    tp  3 all-reduces (attn1 out, attn2 out, FF down) of (B_c, S_s, d):  3 x 2 (tp - 1) / tp x B_c S_s d e
           sp  4 all-to-alls in attn1 (q, k, v, out) of (B_c, S_s, d / tp):  4 x (sp - 1) / sp x B_c S_s (d / tp) e
    LTX-2  tp  4 video all-reduces (attn1, attn2, audio-to-video out, FF) of (B_c, S_s, d_v) and
               4 audio ones (audio_attn1, audio_attn2, video-to-audio out, audio FF) of (B_c, L_a, d_a)
           sp  attn1's 4 all-to-alls of (B_c, S_s, d_v / tp); video_to_audio_attn's k, v (B_c, S_s, d_a / tp)
               and its whole-audio q and out (B_c, L_a, d_a / tp): (sp - 1) / sp of each

(the QK norms' all-reduced sums of squares, one value per token, are left out) and once per step:
sp all-gathers the video output, (sp - 1) x B_c S_s C_o e; cfg all-gathers every output,
(cfg - 1) x B_c x (output elements per row) e.
"""
from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from ..model.config import BackboneConfig, preset
from .bench import (DTYPES, INPUT_SEED, _device_for, _rank_main, _write_backbone_checkpoint, build_on, free_port,
                    joined_group, seeded_backbone, synthetic_spec, time_calls, time_steps)
from .mesh import MeshShape

BATCH = 2   # cond + uncond


@dataclass(frozen=True)
class MeshTraffic:
    """Bytes one rank sends in one step, by mode (`per_block` for the blocks, `per_step` in all)."""
    tp_per_block: float
    sp_per_block: float
    sp_gather: float        # once per step
    cfg_gather: float       # once per step
    layers: int

    @property
    def per_step(self) -> float:
        return self.layers * (self.tp_per_block + self.sp_per_block) + self.sp_gather + self.cfg_gather


def mesh_traffic(cfg: BackboneConfig, tokens: int, latent_elements: int, shape: MeshShape,
                 element_size: int) -> MeshTraffic:
    """The module docstring's formulas for one step of `tokens` tokens (B = 2 rows) on `shape`."""
    rows = BATCH / shape.cfg                                      # B_c
    local_tokens = tokens / shape.sp                              # L_s
    activation = rows * local_tokens * cfg.dim * element_size     # (B_c, L_s, d)
    return MeshTraffic(
        tp_per_block=2 * 2 * (shape.tp - 1) / shape.tp * activation,
        sp_per_block=4 * (shape.sp - 1) / shape.sp * activation / shape.tp,
        sp_gather=(shape.sp - 1) * activation,
        cfg_gather=(shape.cfg - 1) * rows * latent_elements * element_size,
        layers=cfg.layers)


def latent_elements(cfg: BackboneConfig, tokens: int) -> int:
    """Elements of one row's velocities (video + audio) at the bench layout."""
    spec = synthetic_spec(tokens)
    return cfg.video_channels * spec.latent_frames * spec.latent_height * spec.latent_width + \
        cfg.audio_channels * spec.audio_frames


def load_on_mesh(shape: MeshShape, checkpoint: str, world: int, device, dtype: torch.dtype):
    """A rank's mesh denoiser (bench._rank_main's `load`) -> (its module, the call a step makes)."""
    from ..families.base import bind_forward
    from .mesh import BackboneMesh
    from .mesh_denoiser import load_mesh_denoiser

    denoiser = load_mesh_denoiser(checkpoint, BackboneMesh(shape, device.type), device, dtype)
    return denoiser.module, bind_forward(getattr(denoiser, "forward", None), denoiser.module)


def bench_mesh(preset_name: str, shape: MeshShape, steps: int = 5, tokens: int = 1024, dtype: str = "float32",
               check_parity: bool = False) -> list[str]:
    """Runs the step on `shape`'s ranks; the lines to print."""
    import torch.multiprocessing as mp

    from .mesh_denoiser import check_family_mesh

    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)} (got {dtype!r})")
    config = preset(preset_name)
    check_family_mesh("omni", config, shape)
    if torch.cuda.is_available() and torch.cuda.device_count() < shape.ranks:
        raise ValueError(f"{shape.describe()} needs {shape.ranks} GPUs; this machine has {torch.cuda.device_count()}")
    cfg = config.backbone
    backbone = seeded_backbone(cfg)
    with tempfile.TemporaryDirectory(prefix="omnireel-bench-mesh-") as tmp:
        _write_backbone_checkpoint(backbone, preset_name, Path(tmp))
        mp.spawn(_rank_main, args=(shape.ranks, free_port(), tmp, tokens, steps, dtype, rank_threads(shape), tmp,
                                   partial(load_on_mesh, shape)), nprocs=shape.ranks, join=True)
        rank0 = torch.load(Path(tmp) / "rank0.pt")
    length = rank0["length"]
    element = torch.empty(0, dtype=DTYPES[dtype]).element_size()
    traffic = mesh_traffic(cfg, length, latent_elements(cfg, tokens), shape, element)
    parity = None
    if check_parity:
        device = _device_for(0)
        reference = backbone.to(device, DTYPES[dtype])
        _, expected, _ = time_steps(reference, tokens, 1, device, DTYPES[dtype])
        parity = max_difference(rank0["out"], expected)
    return report(f"backbone {preset_name}", shape, dtype, f"L={length} tokens x batch {BATCH}, {steps} steps",
                  rank0["step_s"], traffic, parity)


def rank_threads(shape: MeshShape) -> int:
    """Torch threads per rank: the CPU's shared out among the ranks (each rank its own GPU: all)."""
    return torch.get_num_threads() if torch.cuda.is_available() else max(1, torch.get_num_threads() // shape.ranks)


def max_difference(got, expected) -> float:
    return max((a - b).abs().max().item() for a, b in zip(got, expected))


def report(model: str, shape: MeshShape, dtype: str, workload: str, step_s: float, traffic: MeshTraffic,
           parity: float | None) -> list[str]:
    """The lines the bench prints."""
    device = _device_for(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [f"{model} on a {shape.describe()} mesh ({shape.ranks} ranks, {name}, {dtype}): {workload}",
             f"  per-step time   {step_s * 1e3:.2f} ms (median, rank 0)",
             f"  bytes sent per step per rank   {traffic.per_step / 1e6:,.3f} MB "
             f"(per block: tp {traffic.tp_per_block / 1e3:,.1f} kB, sp {traffic.sp_per_block / 1e3:,.1f} kB; "
             f"per step: sp gather {traffic.sp_gather / 1e3:,.1f} kB, cfg gather {traffic.cfg_gather / 1e3:,.1f} kB)"]
    if parity is not None:
        lines.append(f"  parity vs 1 rank  max abs diff {parity:.3e}")
    return lines


# ---- LTX-2 and Wan -----------------------------------------------------------------------------

@dataclass(frozen=True)
class FamilyStep:
    """What the mesh bench needs from a diffusers family."""
    build: Callable[[str], torch.nn.Module]       # preset -> its transformer (random weights)
    parallelize: Callable                         # (transformer, tp mesh): the family's TP plan, in place
    calls: Callable                               # (transformer, width, height, frames) -> [kwargs of each call]
    traffic: Callable                             # (transformer config, calls, shape, element size) -> MeshTraffic


def rows_per_cfg_rank(calls: list[dict], shape: MeshShape) -> int:
    """B_c: the rows of one step's calls (each call's hidden_states rows) a cfg rank runs."""
    return math.ceil(sum(call["hidden_states"].shape[0] for call in calls) / shape.cfg)


def ltx2_build(preset_name: str):
    from diffusers import LTX2VideoTransformer3DModel

    from .bench_ltx2 import transformer_config
    return LTX2VideoTransformer3DModel(**(transformer_config(preset_name) or {}))


def ltx2_calls(model, width: int, height: int, frames: int) -> list[dict]:
    """One LTX2Denoiser step's branch calls, on a synthetic state with seeded random latents and text."""
    from ..families.ltx2 import branch_inputs, branches, synthetic_step_state

    state = synthetic_step_state(model, width=width, height=height, frames=frames)
    g = torch.Generator().manual_seed(INPUT_SEED)
    for tensor in (state.video, state.audio, state.text["video"], state.text["audio"]):
        tensor.copy_(torch.randn(tensor.shape, generator=g))
    return [branch_inputs(state, state.timesteps[0], branch, model.dtype) for branch in branches(state.guidance)]


def ltx2_traffic(config, calls: list[dict], shape: MeshShape, element_size: int) -> MeshTraffic:
    """The module docstring's LTX-2 formulas."""
    rows, (sp, tp, cfg) = rows_per_cfg_rank(calls, shape), (shape.sp, shape.tp, shape.cfg)
    tokens, audio_tokens = calls[0]["hidden_states"].shape[1], calls[0]["audio_hidden_states"].shape[1]
    d_v = config.num_attention_heads * config.attention_head_dim
    d_a = config.audio_num_attention_heads * config.audio_attention_head_dim
    video, audio = rows * tokens / sp * element_size, rows * audio_tokens * element_size   # per channel
    return MeshTraffic(
        tp_per_block=2 * (tp - 1) / tp * (4 * video * d_v + 4 * audio * d_a),
        sp_per_block=(sp - 1) / sp * (4 * video * d_v + 2 * video * d_a + 2 * audio * d_a) / tp,
        sp_gather=(sp - 1) * video * config.out_channels,
        cfg_gather=(cfg - 1) * rows * (tokens * config.out_channels + audio_tokens * config.audio_out_channels)
        * element_size,
        layers=config.num_layers)


def wan_build(preset_name: str):
    from diffusers import WanTransformer3DModel

    from .bench_wan import PRESETS
    return WanTransformer3DModel(**PRESETS[preset_name])


def wan_calls(model, width: int, height: int, frames: int) -> list[dict]:
    """One WanDenoiser step's call: the CFG batch [negative, prompt] at the pipeline's noise."""
    from ..families.wan import model_inputs
    from .bench_wan import step_state

    _, _, state = step_state(model, width, height, frames, steps=2, guidance=5.0, seed=INPUT_SEED)
    return [model_inputs(state, state.timesteps[0], model.dtype)]


def wan_traffic(config, calls: list[dict], shape: MeshShape, element_size: int) -> MeshTraffic:
    """The module docstring's Wan formulas."""
    rows, (sp, tp, cfg) = rows_per_cfg_rank(calls, shape), (shape.sp, shape.tp, shape.cfg)
    _, _, frames, height, width = calls[0]["hidden_states"].shape
    p_t, p_h, p_w = config.patch_size
    tokens = frames // p_t * (height // p_h) * (width // p_w)
    d = config.num_attention_heads * config.attention_head_dim
    activation = rows * tokens / sp * d * element_size                   # (B_c, S_s, d)
    per_token_out = config.out_channels * p_t * p_h * p_w
    return MeshTraffic(
        tp_per_block=3 * 2 * (tp - 1) / tp * activation,
        sp_per_block=4 * (sp - 1) / sp * activation / tp,
        sp_gather=(sp - 1) * rows * tokens / sp * per_token_out * element_size,
        cfg_gather=(cfg - 1) * rows * tokens * per_token_out * element_size,
        layers=config.num_layers)


def family_step(family: str) -> FamilyStep:
    from .tp_ltx2 import parallelize_ltx2_transformer
    from .tp_wan import parallelize_wan_transformer

    if family == "ltx2":
        return FamilyStep(ltx2_build, parallelize_ltx2_transformer, ltx2_calls, ltx2_traffic)
    return FamilyStep(wan_build, parallelize_wan_transformer, wan_calls, wan_traffic)


def seeded_transformer(family: str, preset_name: str, device, dtype: torch.dtype):
    return build_on(device, dtype, lambda: family_step(family).build(preset_name))


def step_outputs(model, forward, calls: list[dict]) -> tuple:
    """Every output tensor of one step's calls, through `forward` (None: the model itself)."""
    from ..families.base import run_calls
    return tuple(t for out in run_calls(forward, model, calls) for t in out)


def _family_rank_main(rank: int, family: str, preset_name: str, geometry: tuple, shape: MeshShape, steps: int,
                      dtype: str, threads: int, port: int, out_dir: str) -> None:
    """One rank: the seeded transformer, its TP shard, sequence parallel and the cfg forward (as
    load_mesh_denoiser applies them), then the step's calls timed."""
    import torch.distributed as dist

    from .mesh import BackboneMesh
    from .mesh_denoiser import apply_mesh

    with joined_group(rank, shape.ranks, port, threads) as device:
        mesh = BackboneMesh(shape, device.type)
        step = family_step(family)
        model = seeded_transformer(family, preset_name, device, DTYPES[dtype])
        if shape.tp > 1:
            step.parallelize(model, mesh.tp_mesh)
        forward = apply_mesh(model, mesh, family)
        calls = step.calls(model, *geometry)
        step_s, out = time_calls(lambda: step_outputs(model, forward, calls), steps, device, dist.barrier)
        if rank == 0:
            traffic = step.traffic(model.config, calls, shape, torch.empty(0, dtype=DTYPES[dtype]).element_size())
            rows = sum(call["hidden_states"].shape[0] for call in calls)
            torch.save({"step_s": step_s, "out": out, "traffic": traffic, "calls": len(calls), "rows": rows},
                       Path(out_dir) / "rank0.pt")


def bench_family_mesh(family: str, preset_name: str, shape: MeshShape, width: int, height: int, frames: int,
                      steps: int = 5, dtype: str = "float32", check_parity: bool = False) -> list[str]:
    """Runs the LTX-2 or Wan step on `shape`'s ranks; the lines to print."""
    import torch.multiprocessing as mp
    from diffusers.utils import logging

    from .mesh_denoiser import check_family_mesh

    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)} (got {dtype!r})")
    if not torch.cuda.is_available() and preset_name == "real":
        raise ValueError("--preset real: the real LTX-2 transformer on a mesh needs CUDA GPUs (use --preset tiny here)")
    logging.set_verbosity_error()
    with torch.device("meta"):
        config = family_step(family).build(preset_name).config
    check_family_mesh(family, config, shape)
    if torch.cuda.is_available() and torch.cuda.device_count() < shape.ranks:
        raise ValueError(f"{shape.describe()} needs {shape.ranks} GPUs; this machine has {torch.cuda.device_count()}")
    geometry = (width, height, frames)
    with tempfile.TemporaryDirectory(prefix="omnireel-bench-mesh-") as tmp:
        mp.spawn(_family_rank_main, args=(family, preset_name, geometry, shape, steps, dtype, rank_threads(shape),
                                          free_port(), tmp), nprocs=shape.ranks, join=True)
        rank0 = torch.load(Path(tmp) / "rank0.pt", weights_only=False)
    parity = None
    if check_parity:                                 # one rank: the same seeded weights and inputs, no mesh
        reference = seeded_transformer(family, preset_name, _device_for(0), DTYPES[dtype])
        with torch.inference_mode():
            expected = step_outputs(reference, None, family_step(family).calls(reference, *geometry))
        parity = max_difference(rank0["out"], [t.float().cpu() for t in expected])
    return report(f"{family} transformer {preset_name}", shape, dtype,
                  f"{width}x{height}, {frames} frames, {rank0['calls']} call(s) of {rank0['rows']} rows in all per "
                  f"step, {steps} steps", rank0["step_s"], rank0["traffic"], parity)

