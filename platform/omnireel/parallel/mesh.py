"""The backbone group's device mesh: (cfg, sp, tp) over its ranks, tp innermost.

    rank = (c * sp + s) * tp + t        c: CFG-parallel index (which rows of a CFG batch)
                                        s: sequence-parallel index (which tokens, Ulysses)
                                        t: tensor-parallel index (which heads / hidden units)

Each axis has its own process subgroup (torch's DeviceMesh makes them: gloo on the CPU, NCCL on a
GPU): the TP plan (tp.py, tp_ltx2.py) runs on the `tp` sub-mesh unchanged, Ulysses' all-to-alls on
the `sp` one, the CFG gather on the `cfg` one. Ranks that share (c, s) hold one model split by
heads; ranks that differ in s see different tokens of the same rows; ranks that differ in c run
different rows. Limits (check_mesh): cfg is 1 or 2 (the conditional and the unconditional half of
a CFG batch), the product is the number of ranks, tp divides every attention's heads and sp
divides the heads each tp rank keeps (Ulysses hands each sp rank whole heads).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MESH_AXES = ("cfg", "sp", "tp")
CFG_DEGREES = (1, 2)


@dataclass(frozen=True)
class MeshShape:
    """The degrees of the three axes; `ranks` = their product."""
    cfg: int = 1
    sp: int = 1
    tp: int = 1

    def __post_init__(self):
        for flag, value in (("--cfg-parallel", self.cfg), ("--sp", self.sp), ("--tp", self.tp)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{flag} must be a whole number >= 1 (got {value!r})")
        if self.cfg not in CFG_DEGREES:
            raise ValueError(f"--cfg-parallel must be one of {list(CFG_DEGREES)} (got {self.cfg}): a CFG batch "
                             f"has a conditional and an unconditional half")

    @property
    def ranks(self) -> int:
        return self.cfg * self.sp * self.tp

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """rank -> (c, s, t)."""
        if not 0 <= rank < self.ranks:
            raise ValueError(f"rank {rank} is outside a mesh of {self.ranks} ranks ({self.describe()})")
        return rank // (self.sp * self.tp), rank // self.tp % self.sp, rank % self.tp

    def rank(self, c: int, s: int, t: int) -> int:
        return (c * self.sp + s) * self.tp + t

    def describe(self) -> str:
        return f"cfg={self.cfg} x sp={self.sp} x tp={self.tp}"


def fitting_degrees(heads: dict[str, int], tp: int = 1) -> list[int]:
    """Degrees that divide every head count (after dividing it by tp)."""
    counts = [h // tp for h in heads.values()]
    return [n for n in range(1, min(counts) + 1) if all(h % n == 0 for h in counts)]


def check_mesh(shape: MeshShape, heads: dict[str, int], ranks: int | None = None) -> None:
    """ValueError naming the flag and the limit: the product against the group's `ranks`, tp against
    every attention's head count (`heads`: {"backbone.heads": 4} or LTX-2's video and audio heads),
    sp against the heads per tp rank."""
    if ranks is not None and shape.ranks != ranks:
        raise ValueError(f"--cfg-parallel x --sp x --tp ({shape.describe()} = {shape.ranks}) must equal the "
                         f"backbone group's ranks ({ranks})")
    named = ", ".join(f"{name}={count}" for name, count in heads.items())
    if any(count % shape.tp for count in heads.values()):
        raise ValueError(f"--tp={shape.tp} must divide {named}; tensor-parallel degrees that fit: "
                         f"{fitting_degrees(heads)}")
    if any(count // shape.tp % shape.sp for count in heads.values()):
        per_rank = ", ".join(f"{name}={count} / tp={shape.tp} = {count // shape.tp}" for name, count in heads.items())
        raise ValueError(f"--sp={shape.sp} must divide the heads per tensor-parallel rank ({per_rank}): Ulysses "
                         f"gives each sequence-parallel rank whole heads; sequence-parallel degrees that fit at "
                         f"tp={shape.tp}: {fitting_degrees(heads, shape.tp)}")


class BackboneMesh:
    """The (cfg, sp, tp) DeviceMesh over every rank of the default process group (call it on every
    rank: making the subgroups is collective). `tp_mesh` is what the TP plans take."""

    def __init__(self, shape: MeshShape, device_type: str = "cpu"):
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        world = dist.get_world_size()
        if shape.ranks != world:
            raise ValueError(f"--cfg-parallel x --sp x --tp ({shape.describe()} = {shape.ranks}) must equal the "
                             f"backbone group's ranks ({world})")
        self.shape = shape
        self.rank = dist.get_rank()
        self.device_mesh = init_device_mesh(device_type, (shape.cfg, shape.sp, shape.tp), mesh_dim_names=MESH_AXES)
        self.coordinates = shape.coordinates(self.rank)

    @property
    def tp_mesh(self):
        return self.device_mesh["tp"]

    @property
    def sp_mesh(self):
        return self.device_mesh["sp"]

    @property
    def cfg_mesh(self):
        return self.device_mesh["cfg"]

    def describe(self) -> str:
        c, s, t = self.coordinates
        return f"rank {self.rank} at (cfg {c}, sp {s}, tp {t}) of {self.shape.describe()}"


def split_lengths(total: int, parts: int) -> list[int]:
    """torch.tensor_split's shard lengths: the first `total % parts` shards hold one more."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def all_gather_rows(t: torch.Tensor, group, lengths: list[int], dim: int = 0) -> torch.Tensor:
    """Concatenates every rank's `t` along `dim` in rank order; rank r's `t` is lengths[r] long on
    `dim` (uneven shards are padded to the longest for the collective, then trimmed)."""
    import torch.distributed as dist

    if len(lengths) == 1:
        return t
    longest = max(lengths)
    padded = t
    if t.shape[dim] < longest:
        pad_shape = list(t.shape)
        pad_shape[dim] = longest - t.shape[dim]
        padded = torch.cat([t, t.new_zeros(pad_shape)], dim)
    parts = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, lengths)], dim)


def ulysses_config(sp_mesh):
    """diffusers' ParallelConfig for Ulysses over our 1-D sp mesh (no ring, uneven shards allowed):
    what a diffusers attention processor's `_parallel_config` takes, and (its context_parallel_config)
    what diffusers' context-parallel split / gather hooks take."""
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig

    context = ContextParallelConfig(ulysses_degree=sp_mesh.size(), ulysses_anything=True)
    context._ulysses_mesh = sp_mesh
    context._flattened_mesh = sp_mesh            # no ring: the split / gather hooks' mesh is the Ulysses one
    context._world_size = sp_mesh.size()
    return ParallelConfig(context_parallel_config=context)


def use_ulysses_processors(blocks, names: tuple[str, ...], config) -> None:
    """Gives the attentions `names` of every block in `blocks` a fresh diffusers processor of their own
    type whose attention is dispatched through diffusers' Ulysses (`config`: ulysses_config's)."""
    for block in blocks:
        for name in names:
            attention = getattr(block, name)
            processor = type(attention.processor)()
            processor._parallel_config = config
            attention.set_processor(processor)
