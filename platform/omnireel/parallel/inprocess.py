"""The backbone host for tp=1: the backbone in the caller's own process, behind BackboneGroup's API.

At tensor-parallel degree 1 there is nothing to coordinate, so a Serve replica or a Ray Data actor
runs the `denoise` stage itself (as vLLM's single-process executor does at tp=1) instead of
driving one rank actor: no object-store hop for the inputs, no broadcast of the job id and of the
stop flag each step, no progress polling. The caller takes the rank's resources (see
`host_resources`). `open_backbone` picks this or a BackboneGroup by the TP degree.

    host.denoise(plan, text, voice, media, progress=, should_stop=) -> GeneratedLatents
    host.rebuild()    host.shutdown()
"""
from __future__ import annotations

from pathlib import Path

import ray
import torch
from ray.util.placement_group import PlacementGroup

from ..plan import ScenePlan
from ..scheduler import DEFAULT_MAX_BATCH_TOKENS
from ..stages import GeneratedLatents, MediaLatents, TextEmbeddings, VoiceEmbeddings, denoise
from .group import BackboneGroup
from .mesh import MeshShape


class InProcessBackbone:
    """The whole backbone on this process's device; the `denoise` stage runs in the calling thread."""

    tp = 1
    broken = False        # no rank can die apart from this process

    def __init__(self, checkpoint_dir: str | Path, *, dtype: str | None = None):
        from ..stages import load_components

        self.checkpoint_dir = str(checkpoint_dir)
        self.device = torch.device("cuda", 0) if ray.is_initialized() and ray.get_gpu_ids() else torch.device("cpu")
        self.backbone = load_components(self.checkpoint_dir, ["backbone"], self.device, dtype=dtype)["backbone"]

    def denoise(self, plan: ScenePlan, text: TextEmbeddings, voice: VoiceEmbeddings, media: MediaLatents,
                progress=None, should_stop=None) -> GeneratedLatents:
        """The `denoise` stage (the engine over the family's Denoiser); a stop raises
        model.sampler.Cancelled at the start of a step."""
        return denoise(self.backbone, plan, text, voice, media, progress=progress, should_stop=should_stop)

    def rebuild(self) -> None:
        """Nothing to restart: no rank can die apart from this process."""

    def shutdown(self) -> None:
        self.backbone = None


def host_resources(ranks: int, use_gpu: bool, cpus_per_rank: float, host_cpus: float) -> dict:
    """What the host itself asks Ray for: with one rank it is the rank (its CPUs and its GPU); above,
    only its own CPUs, while the ranks take `BackboneGroup.bundles(...)` of its placement group."""
    if ranks == 1:
        return {"num_cpus": host_cpus + cpus_per_rank, "num_gpus": 1 if use_gpu else 0}
    return {"num_cpus": host_cpus, "num_gpus": 0}


def open_backbone(checkpoint_dir: str | Path, tp: int, placement_group: PlacementGroup | None = None, *,
                  use_gpu: bool | None = None, cpus_per_rank: float = 1, threads: int | None = None,
                  dtype: str | None = None, niceness: int | None = None, mesh: MeshShape | None = None,
                  max_batch_jobs: int = 1, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS):
    """The backbone host for `tp` (or a (cfg, sp, tp) `mesh`): in this process with one rank (run it
    on the caller's compute thread; the caller batches with a DenoiseScheduler of its own), else a
    BackboneGroup of rank actors whose engine threads are compute threads at `niceness`, and whose
    rank 0 batches concurrent denoise calls up to `max_batch_jobs` / `max_batch_tokens`."""
    mesh = mesh or MeshShape(tp=tp)
    if mesh.ranks == 1:
        return InProcessBackbone(checkpoint_dir, dtype=dtype)
    return BackboneGroup(checkpoint_dir, mesh.tp, placement_group, use_gpu=use_gpu, cpus_per_rank=cpus_per_rank,
                         threads=threads, dtype=dtype, niceness=niceness, mesh=mesh,
                         max_batch_jobs=max_batch_jobs, max_batch_tokens=max_batch_tokens)
