"""Tensor parallelism for diffusers' `WanTransformer3DModel`, applied from outside (DESIGN.md §3).

diffusers' modules stay as they are; as in parallel/tp_ltx2.py (the across-heads norm is tp.py's
HeadShardedRMSNorm, the sliced loading sliced_load.py's), per block over a 1-D mesh of N ranks:

    attn1 / attn2 to_q, to_k, to_v        ColwiseParallel  (out/N, in): this rank's heads
    attn2 add_k_proj, add_v_proj          ColwiseParallel  (Wan 2.1 I2V: the CLIP image tokens' K / V)
    attn1 / attn2 to_out.0                RowwiseParallel  (out, in/N): one all-reduce each
    ffn.net.0.proj / ffn.net.2            ColwiseParallel / RowwiseParallel (hidden units split)
    norm_q, norm_k, norm_added_k          HeadShardedRMSNorm: Wan's QK norm is RMSNorm over the whole
                                          inner dim, so each rank all-reduces its sum of squares
    attn.heads                            the local head count (WanAttnProcessor unflattens with it)

Wan's RoPE is (1, S, 1, head_dim), the same for every head, so it needs no slicing; its (cos, sin)
tables are non-persistent buffers, rebuilt on each rank after `to_empty`. Everything else (patch
embedding, condition embedder, adaLN tables, output head, row-parallel biases) is replicated. So
three all-reduces per block. Both Wan 2.2 A14B experts are split the same way on the same ranks.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from .tp import run_as_2d_under_no_grad
from .sliced_load import load_sharded
from .tp import HeadShardedRMSNorm

ATTENTIONS = ("attn1", "attn2")
ATTENTION_COLUMN_PARALLEL = ("to_q", "to_k", "to_v", "add_k_proj", "add_v_proj")   # add_*: I2V only
ATTENTION_ROW_PARALLEL = ("to_out.0",)
FEED_FORWARD_COLUMN_PARALLEL = ("ffn.net.0.proj",)
FEED_FORWARD_ROW_PARALLEL = ("ffn.net.2",)
QK_NORMS = ("norm_q", "norm_k", "norm_added_k")


def check_tp_degree_wan(config, tp: int) -> None:
    """ValueError unless `tp` splits the heads and the feed-forward hidden units evenly. `config`: the
    family's WanConfig or the transformer's config (num_attention_heads, ffn_dim)."""
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp must be a whole number >= 1 (got {tp!r})")
    heads, ffn = config.num_attention_heads, config.ffn_dim
    if heads % tp or ffn % tp:
        fits = [n for n in range(1, heads + 1) if heads % n == 0 and ffn % n == 0]
        raise ValueError(f"tp={tp} must divide the Wan transformer's num_attention_heads={heads} (self- and "
                         f"cross-attention) and ffn_dim={ffn}; tensor-parallel degrees that fit: {fits}")


def wan_tp_plan(transformer) -> dict[str, ParallelStyle]:
    """{"blocks.0.attn1.to_q": ColwiseParallel(), ..., "blocks.0.ffn.net.2": RowwiseParallel()}:
    the Linears the plan splits (add_k_proj / add_v_proj only where they exist)."""
    plan: dict[str, ParallelStyle] = {}
    for i, block in enumerate(transformer.blocks):
        for name in ATTENTIONS:
            attention = getattr(block, name)
            for linear in ATTENTION_COLUMN_PARALLEL:
                if getattr(attention, linear, None) is not None:
                    plan[f"blocks.{i}.{name}.{linear}"] = ColwiseParallel()
            for linear in ATTENTION_ROW_PARALLEL:
                plan[f"blocks.{i}.{name}.{linear}"] = RowwiseParallel()
        plan.update({f"blocks.{i}.{path}": ColwiseParallel() for path in FEED_FORWARD_COLUMN_PARALLEL})
        plan.update({f"blocks.{i}.{path}": RowwiseParallel() for path in FEED_FORWARD_ROW_PARALLEL})
    return plan


def parallelize_wan_transformer(transformer, mesh: DeviceMesh):
    """Shards `transformer` (diffusers' WanTransformer3DModel) in place over the 1-D `mesh` (meta, CPU
    or CUDA parameters): the Linear plan, the across-heads QK norms and the local head counts."""
    tp = mesh.size()
    check_tp_degree_wan(transformer.config, tp)
    plan = wan_tp_plan(transformer)
    parallelize_module(transformer, mesh, plan)
    for path in plan:
        run_as_2d_under_no_grad(transformer.get_submodule(path))
    for block in transformer.blocks:
        for name in ATTENTIONS:
            attention = getattr(block, name)
            attention.heads //= tp
            for norm in QK_NORMS:
                if getattr(attention, norm, None) is not None:
                    setattr(attention, norm, HeadShardedRMSNorm(getattr(attention, norm), mesh))
    return transformer


def meta_wan_transformer(transformer_config: dict, dtype: torch.dtype):
    """WanTransformer3DModel on the meta device in `dtype`, with its _keep_in_fp32_modules' parameters
    kept in float32 (as from_pretrained(torch_dtype=...) keeps them)."""
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        transformer = WanTransformer3DModel.from_config(transformer_config)
    if transformer.dtype == dtype:
        return transformer
    transformer.to(dtype)                                    # still meta: costs nothing
    keep = WanTransformer3DModel._keep_in_fp32_modules
    for name, parameter in transformer.named_parameters():
        if any(part in keep for part in name.split(".")):
            parameter.data = parameter.data.float()
    return transformer


def rebuild_rope(transformer, device) -> None:
    """The RoPE tables (non-persistent buffers that `to_empty` left unset), computed on `device`."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    config = transformer.config
    with torch.device(device):
        transformer.rope = WanRotaryPosEmbed(config.attention_head_dim, config.patch_size, config.rope_max_seq_len)


def load_wan_transformer_shard(folder: Path, mesh: DeviceMesh, device, dtype: torch.dtype):
    """This rank's shard of the WanTransformer3DModel in `folder`, read by slice (one safetensors file
    or an index of shards)."""
    from ..families.diffusers_folder import read_json

    transformer = meta_wan_transformer(read_json(folder / "config.json"), dtype)
    load_sharded(transformer, folder, parallelize_wan_transformer, mesh, device)
    rebuild_rope(transformer, device)
    return transformer.eval()


def load_wan_backbone_shard(folder: str | os.PathLike, mesh: DeviceMesh, device="cpu",
                            dtype: torch.dtype | None = None):
    """This rank's tensor-parallel shard of a Wan folder's transformer (Wan 2.2 A14B: of both experts)
    over the 1-D `mesh`, as the family's backbone component (a WanDenoiser with the folder's
    scheduler). `dtype` defaults as load_components does (float32 on the CPU, bfloat16 on a GPU)."""
    from ..families.diffusers_folder import load_subfolder, torch_dtype
    from ..families.wan import WanDenoiser, read_wan_config

    folder = Path(folder)
    config = read_wan_config(folder)
    dtype = dtype or torch_dtype(None, device)
    experts = ("transformer", "transformer_2")[:config.experts]
    transformers = [load_wan_transformer_shard(folder / name, mesh, device, dtype) for name in experts]
    return WanDenoiser(transformers, load_subfolder(folder, "scheduler", device, None), config)
