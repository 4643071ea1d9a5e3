"""A family's Denoiser on a (cfg, sp, tp) mesh rank: the TP shard (tp.py, tp_ltx2.py, tp_wan.py) on the tp
sub-mesh, Ulysses installed on the model (sp_omni.py, sp_ltx2.py, sp_wan.py) on the sp one, and the
cfg-parallel forward (cfg_parallel.py) injected into every step. prepare / finish are the family's,
so the engine loop (stages.denoise), its sampler, progress and cancel are unchanged.

    denoiser = load_mesh_denoiser(checkpoint, mesh, device)    # on every rank of the mesh
    stages.denoise(denoiser, plan, text, voice, media)         # every rank ends with the same latents
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .cfg_parallel import LTX2_ROWS, OMNI_ROWS, WAN_ROWS, BatchRows, CfgParallelForward
from .mesh import BackboneMesh, MeshShape, check_mesh


@dataclass(frozen=True)
class MeshPlan:
    """What the mesh needs from one family."""
    rows: BatchRows                            # the arguments of a model call that hold CFG rows
    heads: Callable[[object], dict[str, int]]  # config -> head counts the mesh must divide
    install_sp: Callable                       # (model module, sp mesh) -> the module, sequence-parallel


def mesh_plan(family: str) -> MeshPlan:
    """The family's mesh plan; ValueError for a family that has none."""
    if family == "omni":
        from . import sp_omni
        return MeshPlan(OMNI_ROWS, sp_omni.attention_heads, sp_omni.install_sequence_parallel)
    if family == "ltx2":
        from . import sp_ltx2
        return MeshPlan(LTX2_ROWS, sp_ltx2.attention_heads, sp_ltx2.install_sequence_parallel_ltx2)
    if family == "wan":
        from . import sp_wan
        return MeshPlan(WAN_ROWS, sp_wan.attention_heads, sp_wan.install_sequence_parallel_wan)
    raise ValueError(f"--sp and --cfg-parallel are implemented for the omni, ltx2 and wan families, not {family!r} "
                     f"(it takes --tp alone)")


def check_family_mesh(family: str, config, shape: MeshShape, ranks: int | None = None) -> None:
    """The mesh's limits for this checkpoint (before any rank starts). tp alone: the family's own check."""
    from ..families import get_family

    check_mesh(shape, {} if shape.cfg == 1 and shape.sp == 1 else mesh_plan(family).heads(config), ranks)
    get_family(family).check_tp(config, shape.tp)


def apply_mesh(module, mesh: BackboneMesh, family: str) -> CfgParallelForward | None:
    """Installs the family's sequence parallel on `module` (its TP shard, or the whole model at tp=1)
    over mesh.sp_mesh in place; -> the injected forward of a step (cfg-parallel over mesh.cfg_mesh),
    or None at cfg=1."""
    plan = mesh_plan(family)
    plan.install_sp(module, mesh.sp_mesh)
    if mesh.shape.cfg == 1:
        return None
    return CfgParallelForward(plan.rows, mesh.cfg_mesh.get_group(), mesh.coordinates[0], mesh.shape.cfg)


class MeshDenoiser:
    """A Denoiser whose step runs through the mesh (base.Denoiser's contract)."""

    def __init__(self, denoiser, forward: CfgParallelForward | None):
        self.denoiser, self.forward = denoiser, forward

    @property
    def module(self):
        return self.denoiser.module

    def prepare(self, plan, text, voice, media):
        return self.denoiser.prepare(plan, text, voice, media)

    def step(self, states: list, forward: Callable | None = None) -> None:
        if forward is not None and self.forward is not None:
            raise ValueError("a cfg-parallel denoiser takes no other injected forward")
        self.denoiser.step(states, forward or self.forward)

    def finish(self, state):
        return self.denoiser.finish(state)


def load_mesh_denoiser(checkpoint: str | Path, mesh: BackboneMesh, device="cpu", dtype: torch.dtype | None = None):
    """This rank's denoiser: the family's TP shard over mesh.tp_mesh (the whole model at tp=1),
    sequence-parallel over mesh.sp_mesh, cfg-parallel over mesh.cfg_mesh."""
    from ..families import family_of

    family = family_of(checkpoint)
    check_family_mesh(family.name, family.read_config(Path(checkpoint)), mesh.shape, mesh.shape.ranks)
    if mesh.shape.tp > 1:
        denoiser = family.load_backbone_shard(Path(checkpoint), mesh.tp_mesh, device, dtype)
    else:
        name = None if dtype is None else str(dtype).removeprefix("torch.")
        denoiser = family.load_components(Path(checkpoint), {"backbone"}, device, dtype=name)["backbone"]
    if mesh.shape.cfg == 1 and mesh.shape.sp == 1:
        return denoiser                                  # TP alone: the family's denoiser as it was
    return MeshDenoiser(denoiser, apply_mesh(denoiser.module, mesh, family.name))
