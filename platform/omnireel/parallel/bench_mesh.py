"""The omni backbone on a (cfg, sp, tp) mesh (`omnireel bench backbone --cfg-parallel C --sp S --tp T`):
per-step time, bytes each rank sends per step (from the plan, `mesh_traffic`) and parity with one rank.

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
"""
from __future__ import annotations

import socket
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from ..model.config import BackboneConfig, preset
from .bench import (DTYPES, _device_for, _rank_main, _write_backbone_checkpoint, seeded_backbone, synthetic_spec,
                    time_steps)
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
        with socket.socket() as s:   # a free port for the rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        threads = torch.get_num_threads() if torch.cuda.is_available() else max(1, torch.get_num_threads() // shape.ranks)
        mp.spawn(_rank_main, args=(shape.ranks, port, tmp, tokens, steps, dtype, threads, tmp,
                                   partial(load_on_mesh, shape)), nprocs=shape.ranks, join=True)
        rank0 = torch.load(Path(tmp) / "rank0.pt")
    length = rank0["length"]
    element = torch.empty(0, dtype=DTYPES[dtype]).element_size()
    traffic = mesh_traffic(cfg, length, latent_elements(cfg, tokens), shape, element)
    device = _device_for(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [f"backbone {preset_name} on a {shape.describe()} mesh ({shape.ranks} ranks, {name}, {dtype}): "
             f"L={length} tokens x batch {BATCH}, {steps} steps",
             f"  per-step time   {rank0['step_s'] * 1e3:.2f} ms (median, rank 0)",
             f"  bytes sent per step per rank   {traffic.per_step / 1e6:,.3f} MB "
             f"(per block: tp {traffic.tp_per_block / 1e3:,.1f} kB, sp {traffic.sp_per_block / 1e3:,.1f} kB; "
             f"per step: sp gather {traffic.sp_gather / 1e3:,.1f} kB, cfg gather {traffic.cfg_gather / 1e3:,.1f} kB)"]
    if check_parity:
        reference = backbone.to(device, DTYPES[dtype])
        _, expected, _ = time_steps(reference, tokens, 1, device, DTYPES[dtype])
        parity = max((a - b).abs().max().item() for a, b in zip(rank0["out"], expected))
        lines.append(f"  parity vs 1 rank  max abs diff {parity:.3e}")
    return lines

