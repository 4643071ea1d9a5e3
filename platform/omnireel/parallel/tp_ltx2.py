"""Tensor parallelism for diffusers' `LTX2VideoTransformer3DModel`, applied from outside (DESIGN.md §3).

diffusers' modules stay as they are; this module swaps attributes and adds hooks on them, the way
parallel/tp.py splits the omni backbone. Per block, over a 1-D device mesh of N ranks, each of the six
attentions (attn1 video self, audio_attn1 audio self, attn2 / audio_attn2 text cross, audio_to_video_attn
and video_to_audio_attn) and both feed-forwards:

    to_q, to_k, to_v, to_gate_logits   ColwiseParallel  (out/N, in): this rank's heads (K/V of a cross
                                                         attention come from replicated inputs)
    to_out.0                           RowwiseParallel  (out, in/N): one all-reduce
    ff.net.0.proj / ff.net.2           ColwiseParallel / RowwiseParallel (hidden units split)
    norm_q, norm_k                     HeadShardedRMSNorm: LTX-2's QK norm is RMSNorm over the whole
                                       inner dim ("rms_norm_across_heads"), so each rank all-reduces its
                                       sum of squares and holds its slice of the weight
    attn.heads                         the local head count (the processor reshapes with it, and repeats
                                       the text mask per head with it)
    rope, audio_rope, cross_attn_rope, cross_attn_audio_rope
                                       a forward hook hands each rank its heads' (cos, sin): "split" RoPE is
                                       (B, H, T, r) per head, "interleaved" is (B, T, D) over the flat dim

Every attention is split (its heads are the video or the audio head count), so tp must divide both
(check_tp_degree_ltx2). Everything else (embeddings, adaLN tables, caption projections, output heads,
row-parallel biases) is replicated. Each planned Linear also runs `run_as_2d_under_no_grad` (tp.py).
Weights load per rank by slice from the transformer's safetensors (one file or an index of shards:
sliced_load.py).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from .sliced_load import load_sharded
from .tp import HeadShardedRMSNorm, run_as_2d_under_no_grad

ATTENTIONS = ("attn1", "audio_attn1", "attn2", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn")
ATTENTION_COLUMN_PARALLEL = ("to_q", "to_k", "to_v", "to_gate_logits")   # to_gate_logits: gated attention only
ATTENTION_ROW_PARALLEL = ("to_out.0",)
FEED_FORWARDS = ("ff", "audio_ff")
FEED_FORWARD_COLUMN_PARALLEL = ("net.0.proj",)
FEED_FORWARD_ROW_PARALLEL = ("net.2",)
QK_NORMS = ("norm_q", "norm_k")
ROPES = ("rope", "audio_rope", "cross_attn_rope", "cross_attn_audio_rope")


def check_tp_degree_ltx2(config, tp: int) -> None:
    """ValueError unless `tp` splits the video and the audio heads evenly. `config`: the family's
    LTX2Config or the transformer's config (anything with num_attention_heads, audio_num_attention_heads).
    The feed-forward hidden units (4 x heads x head_dim) and the per-head RoPE follow the heads."""
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp must be a whole number >= 1 (got {tp!r})")
    video, audio = config.num_attention_heads, config.audio_num_attention_heads
    if video % tp or audio % tp:
        fits = [n for n in range(1, min(video, audio) + 1) if video % n == 0 and audio % n == 0]
        raise ValueError(
            f"tp={tp} must divide the LTX-2 transformer's num_attention_heads={video} (video self- and "
            f"text cross-attention) and audio_num_attention_heads={audio} (audio self-, audio text, "
            f"audio-to-video and video-to-audio cross-attention); tensor-parallel degrees that fit: {fits}")


# ---- the plan ------------------------------------------------------------------------------------

def attention_paths(transformer) -> list[str]:
    """"transformer_blocks.<i>.<attention>" for every attention of every block."""
    return [f"transformer_blocks.{i}.{name}" for i in range(len(transformer.transformer_blocks))
            for name in ATTENTIONS]


def ltx2_tp_plan(transformer) -> dict[str, ParallelStyle]:
    """{"transformer_blocks.0.attn1.to_q": ColwiseParallel(), ..., "transformer_blocks.0.ff.net.2":
    RowwiseParallel(), ...}: the Linears the plan splits (to_gate_logits only where it exists)."""
    plan: dict[str, ParallelStyle] = {}
    groups = [(attention_paths(transformer), ATTENTION_COLUMN_PARALLEL, ATTENTION_ROW_PARALLEL)]
    groups.append(([f"transformer_blocks.{i}.{ff}" for i in range(len(transformer.transformer_blocks))
                    for ff in FEED_FORWARDS], FEED_FORWARD_COLUMN_PARALLEL, FEED_FORWARD_ROW_PARALLEL))
    for parents, columns, rows in groups:
        for parent in parents:
            module = transformer.get_submodule(parent)
            for names, style in ((columns, ColwiseParallel), (rows, RowwiseParallel)):
                for name in names:
                    if _submodule_or_none(module, name) is not None:
                        plan[f"{parent}.{name}"] = style()   # use_local_output=True by default
    return plan


def _submodule_or_none(module: nn.Module, path: str):
    """The submodule at `path`, or None (without gated attention, to_gate_logits is None)."""
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def parallelize_ltx2_transformer(transformer, mesh: DeviceMesh):
    """Shards `transformer` (diffusers' LTX2VideoTransformer3DModel) in place over the 1-D `mesh`
    (meta, CPU or CUDA parameters): the Linear plan, the across-heads QK norms, the local head
    counts and the per-rank RoPE slices."""
    tp = mesh.size()
    check_tp_degree_ltx2(transformer.config, tp)
    plan = ltx2_tp_plan(transformer)
    parallelize_module(transformer, mesh, plan)
    for path in plan:
        run_as_2d_under_no_grad(transformer.get_submodule(path))
    for path in attention_paths(transformer):
        attention = transformer.get_submodule(path)
        attention.heads //= tp                        # the processor's unflatten(2, (heads, -1)) and mask repeat
        for name in QK_NORMS:
            setattr(attention, name, HeadShardedRMSNorm(getattr(attention, name), mesh))
    for name in ROPES:
        getattr(transformer, name).register_forward_hook(rope_slicer(mesh.get_local_rank(), tp))
    return transformer


def rope_slicer(rank: int, tp: int):
    """A forward hook for an LTX2AudioVideoRotaryPosEmbed: its (cos, sin) -> this rank's heads'.
    "split": (B, H, T, r) -> (B, H / N, T, r); "interleaved": (B, T, D) -> (B, T, D / N)."""
    def hook(rope, args, out):
        dim = 1 if rope.rope_type == "split" else -1
        return tuple(t.chunk(tp, dim=dim)[rank] for t in out)
    return hook


def load_ltx2_backbone_shard(folder: str | os.PathLike, mesh: DeviceMesh, device="cpu",
                             dtype: torch.dtype | None = None):
    """This rank's tensor-parallel shard of an LTX-2 folder's transformer over the 1-D `mesh`, as the
    family's backbone component (an LTX2Denoiser with the folder's scheduler).

    Builds the transformer on the meta device, checks its shapes against the weights, applies the
    plan, allocates only the local shards (`to_empty`) and fills each from `get_slice` (the transformer
    has no buffers to recompute: its RoPE is computed in forward). `dtype` defaults as the family's
    load_components does (float32 on the CPU, bfloat16 on a GPU)."""
    from ..families.diffusers_folder import load_subfolder, read_json, torch_dtype
    from ..families.ltx2 import LTX2Denoiser, meta_transformer, read_ltx2_config

    folder = Path(folder)
    transformer = meta_transformer(read_json(folder / "transformer" / "config.json"))
    dtype = dtype or torch_dtype(None, device)
    if transformer.dtype != dtype:
        transformer.to(dtype)                                           # still meta: costs nothing
    if next(transformer.buffers(), None) is not None:
        raise ValueError(f"{folder / 'transformer'}: this LTX-2 transformer has buffers; the sliced loader "
                         f"would have to recompute them")
    load_sharded(transformer, folder / "transformer", parallelize_ltx2_transformer, mesh, device)
    return LTX2Denoiser(transformer.eval(), load_subfolder(folder, "scheduler", device, None),
                        read_ltx2_config(folder))
