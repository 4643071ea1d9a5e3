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
Weights load per rank by slice from the transformer's safetensors (one file or an index of shards).
"""
from __future__ import annotations

import json
import os
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from .tp import local_tensor, run_as_2d_under_no_grad

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


class HeadShardedRMSNorm(nn.Module):
    """torch.nn.RMSNorm over the full inner dim D, for an input that holds this rank's D / N channels
    (its heads): the sum of squares is all-reduced over the mesh, the weight is a Shard(0) DTensor."""

    def __init__(self, norm: nn.RMSNorm, mesh: DeviceMesh):
        super().__init__()
        (self.full_dim,) = norm.normalized_shape
        self.eps = norm.eps
        self.group = mesh.get_group()
        self.weight = None
        if norm.weight is not None:                   # (D,) -> local (D / N,)
            self.weight = nn.Parameter(distribute_tensor(norm.weight.detach(), mesh, [Shard(0)]),
                                       requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, D / N) -> (B, L, D / N), normalized by the RMS of all D channels of each token."""
        squares = x.float().square().sum(dim=-1, keepdim=True)            # (B, L, 1) this rank's channels
        if squares.numel():                                               # every rank has the same shapes
            dist.all_reduce(squares, group=self.group)                    # (B, L, 1) all D channels
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        out = (x.float() * torch.rsqrt(squares / self.full_dim + eps)).to(x.dtype)
        return out if self.weight is None else out * local_tensor(self.weight)

    def extra_repr(self) -> str:
        return f"full_dim={self.full_dim}, eps={self.eps}"


def rope_slicer(rank: int, tp: int):
    """A forward hook for an LTX2AudioVideoRotaryPosEmbed: its (cos, sin) -> this rank's heads'.
    "split": (B, H, T, r) -> (B, H / N, T, r); "interleaved": (B, T, D) -> (B, T, D / N)."""
    def hook(rope, args, out):
        dim = 1 if rope.rope_type == "split" else -1
        return tuple(t.chunk(tp, dim=dim)[rank] for t in out)
    return hook


def split_parameter_names(transformer) -> dict[str, int]:
    """{name: the dim it is split on} for every parameter the plan shards (of a parallelized
    transformer: its Shard placements)."""
    return {name: p.placements[0].dim for name, p in transformer.named_parameters()
            if isinstance(p, DTensor) and p.placements[0].is_shard()}


# ---- sliced loading ------------------------------------------------------------------------------

class SafetensorsFolder:
    """A diffusers model folder's weights, read by name: one `diffusion_pytorch_model.safetensors`, or
    shards listed by `diffusion_pytorch_model.safetensors.index.json`. Opens a shard on first use."""

    def __init__(self, directory: str | os.PathLike):
        from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME

        self.directory = Path(directory)
        index = self.directory / SAFE_WEIGHTS_INDEX_NAME
        single = self.directory / SAFETENSORS_WEIGHTS_NAME
        if index.is_file():
            self.files = json.loads(index.read_text())["weight_map"]      # name -> shard file name
        elif single.is_file():
            from safetensors import safe_open
            with safe_open(single, framework="pt") as weights:
                self.files = {name: SAFETENSORS_WEIGHTS_NAME for name in weights.keys()}
        else:
            raise FileNotFoundError(f"{self.directory}: neither {SAFETENSORS_WEIGHTS_NAME} nor {SAFE_WEIGHTS_INDEX_NAME}")
        self._open: dict[str, object] = {}
        self._stack = ExitStack()

    def __enter__(self) -> "SafetensorsFolder":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self._open.clear()

    def get_slice(self, name: str):
        """safetensors' lazy slice of tensor `name`: `[...]` reads only the indexed bytes."""
        from safetensors import safe_open

        file = self.files[name]
        if file not in self._open:
            self._open[file] = self._stack.enter_context(safe_open(self.directory / file, framework="pt"))
        return self._open[file].get_slice(name)

    def meta_tensors(self) -> dict[str, torch.Tensor]:
        """{name: a meta tensor of its full shape}, for check_state_dict."""
        return {name: torch.empty(self.get_slice(name).get_shape(), device="meta") for name in self.files}


def fill_local_shards(module: nn.Module, weights: SafetensorsFolder, rank: int) -> None:
    """Copies each parameter's (and buffer's) local part from `weights`: a Shard(dim) DTensor gets
    rows or columns [rank * n, (rank + 1) * n) of its tensor, read by slice; the rest is read whole."""
    with torch.no_grad():
        for name, tensor in module.state_dict(keep_vars=True).items():
            if isinstance(tensor, DTensor) and tensor.placements[0].is_shard():
                local, dim = tensor.to_local(), tensor.placements[0].dim   # (out / N, in) or (out, in / N)
                index = [slice(None)] * local.dim()
                index[dim] = slice(rank * local.shape[dim], (rank + 1) * local.shape[dim])   # tp divides it
                local.copy_(weights.get_slice(name)[tuple(index)])        # only these bytes
            else:                                                         # replicated: the whole tensor
                local_tensor(tensor).copy_(weights.get_slice(name)[:])


def load_ltx2_backbone_shard(folder: str | os.PathLike, mesh: DeviceMesh, device="cpu",
                             dtype: torch.dtype | None = None):
    """This rank's tensor-parallel shard of an LTX-2 folder's transformer over the 1-D `mesh`, as the
    family's backbone component (an LTX2Denoiser with the folder's scheduler).

    Builds the transformer on the meta device, checks its shapes against the weights, applies the
    plan, allocates only the local shards (`to_empty`) and fills each from `get_slice` (the transformer
    has no buffers to recompute: its RoPE is computed in forward). `dtype` defaults as the family's
    load_components does (float32 on the CPU, bfloat16 on a GPU)."""
    from ..checkpoint import check_state_dict
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
    with SafetensorsFolder(folder / "transformer") as weights:
        check_state_dict(transformer.state_dict(), weights.meta_tensors(), source=folder / "transformer")
        parallelize_ltx2_transformer(transformer, mesh)
        transformer.to_empty(device=device)
        fill_local_shards(transformer, weights, mesh.get_local_rank())
    return LTX2Denoiser(transformer.eval(), load_subfolder(folder, "scheduler", device, None),
                        read_ltx2_config(folder))
