"""Tensor parallelism for the spacetime backbone: a plan of module paths -> column/row-parallel styles.

The model file stays plain PyTorch (DESIGN.md §3); this module splits it from outside, the way
torchtitan's `parallelize.py` does. Per block, over a 1-D device mesh of N ranks:

    attn.q, attn.k, attn.v, mlp.up   ColwiseParallel   weight (out/N, in) rows: heads / hidden units split
    attn.o, mlp.down                 RowwiseParallel   weight (out, in/N) cols; one all-reduce each

Per-modality blocks hold a ModalityLinear (a ModuleDict `groups` of nn.Linear); the plan names each
group's Linear, so those blocks all-reduce once per group. Every style keeps `use_local_output=True`,
so the model only ever sees plain local tensors: q (B, L, d/N) reshapes with -1 heads into
(B, L, H/N, head_dim), and the per-head QK RMSNorm needs nothing from other ranks. Everything outside
the plan (embeddings, adaLN, heads, row-parallel biases) is replicated. Each planned Linear also gets
`run_as_2d_under_no_grad` (DTensor's fast path under the stage's inference_mode; see there).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from ..model.backbone import ModalityLinear, OmniBackbone
from ..model.config import BackboneConfig

COLUMN_PARALLEL = ("attn.q", "attn.k", "attn.v", "mlp.up")
ROW_PARALLEL = ("attn.o", "mlp.down")


def check_tp_degree(cfg: BackboneConfig, tp: int) -> None:
    """ValueError unless `tp` splits the heads and the MLP hidden units evenly."""
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp must be a whole number >= 1 (got {tp!r})")
    if cfg.heads % tp or cfg.mlp_hidden % tp:
        fits = [n for n in range(1, cfg.heads + 1) if cfg.heads % n == 0 and cfg.mlp_hidden % n == 0]
        raise ValueError(f"tp={tp} must divide backbone.heads={cfg.heads} and backbone.mlp_hidden="
                         f"{cfg.mlp_hidden}; tensor-parallel degrees that fit: {fits}")


def _linear_paths(block: nn.Module, path: str) -> list[str]:
    """The nn.Linear path(s) behind one planned position: itself, or each weight group's Linear."""
    module = block.get_submodule(path)
    if isinstance(module, ModalityLinear):
        return [f"{path}.groups.{group}" for group in module.groups]
    return [path]


def backbone_tp_plan(backbone: OmniBackbone) -> dict[str, ParallelStyle]:
    """{"blocks.<i>.attn.q": ColwiseParallel(), ..., "blocks.0.attn.o.groups.video": RowwiseParallel(), ...}."""
    plan: dict[str, ParallelStyle] = {}
    for i, block in enumerate(backbone.blocks):
        for paths, style in ((COLUMN_PARALLEL, ColwiseParallel), (ROW_PARALLEL, RowwiseParallel)):
            for path in paths:
                for linear in _linear_paths(block, path):
                    plan[f"blocks.{i}.{linear}"] = style()   # use_local_output=True by default
    return plan


def parallelize_backbone(backbone: OmniBackbone, mesh: DeviceMesh) -> OmniBackbone:
    """Shards `backbone` in place over the 1-D `mesh` (works on meta, CPU or CUDA parameters)."""
    check_tp_degree(backbone.cfg, mesh.size())
    plan = backbone_tp_plan(backbone)
    parallelize_module(backbone, mesh, plan)
    for path in plan:
        run_as_2d_under_no_grad(backbone.get_submodule(path))
    return backbone


def run_as_2d_under_no_grad(linear: nn.Linear) -> None:
    """Feeds a parallel Linear (B * L, d_in) rows and runs its matmul under no_grad.

    DTensor needs both for the `denoise` stage, which runs under torch.inference_mode: there F.linear
    reaches DTensor undecomposed, and on a 3-D input DTensor re-derives the sharding in Python on
    every call (several ms), on a 2-D input with a replicated bias (row-parallel) it picks a strategy
    that all-gathers the weight instead of all-reducing the output, and a 3-D input with no tokens
    (an image has no audio span) fails in its view rule. 2-D under no_grad takes the cached path:
    one all-reduce per row-parallel linear, none per column-parallel one. The values are the same.
    The fold runs before the style's input hook and the unfold after its output hook.
    """
    def fold(module, args, kwargs):
        x = args[0]                                                   # (B, L, d_in) plain local tensor
        return (x.reshape(-1, x.shape[-1]),), {"token_shape": x.shape[:-1]}   # (B * L, d_in)

    forward = linear.forward

    def forward_under_no_grad(x: torch.Tensor, token_shape: torch.Size) -> torch.Tensor:
        with torch.inference_mode(False), torch.no_grad():
            return forward(x)

    def unfold(module, args, kwargs, out):
        return out.reshape(*kwargs["token_shape"], out.shape[-1])     # (B, L, d_out / N or d_out)

    linear.register_forward_pre_hook(fold, prepend=True, with_kwargs=True)
    linear.forward = forward_under_no_grad
    linear.register_forward_hook(unfold, with_kwargs=True)


def local_tensor(t):
    """The part of `t` this rank holds (a DTensor's local shard, or a plain tensor itself)."""
    return t.to_local() if isinstance(t, DTensor) else t


def resident_parameter_bytes(module: nn.Module) -> int:
    """Bytes of the parameters this rank actually holds."""
    return sum(local_tensor(p).numel() * p.element_size() for p in module.parameters())


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
