"""A Serve job on a (cfg=2, sp=2) mesh: the omni tiny checkpoint as its own application beside the
shared one, its Backbone replica holding one placement-group bundle per mesh rank (4), and a job
posted with the official openai client comes out as LocalEngine's (one process, one rank): latents
within 1e-4, frames >= 40 dB PSNR (DESIGN.md §2)."""
from __future__ import annotations

import pytest

from omnireel import media
from omnireel.config import GenerationRequest

from serve_support import checkpoint_app, openai_render, psnr, served_latents

APP = "mesh"
MESH = dict(sp=2, cfg_parallel=2)      # 4 rank actors of 0.25 CPUs each (serve_support.ARGS' cpus_per_rank)
FIELDS = {"prompt": "a paper boat in the rain", "size": "32x32", "seconds": 0.5, "fps": 8, "steps": 3, "seed": 7}


@pytest.fixture(scope="module")
def mesh_app(served, tiny_checkpoint, tmp_path_factory):
    """build_app on the omni tiny checkpoint at cfg=2 x sp=2 x tp=1, one torch thread per rank (four
    ranks share this machine's two cores); deleted at the end of the module."""
    with checkpoint_app(served, tiny_checkpoint, APP, tmp_path_factory.mktemp("serve-mesh"), threads=1,
                        **MESH) as app:
        yield app


def test_the_backbone_replica_holds_one_bundle_per_mesh_rank(mesh_app):
    import ray

    groups = [g for g in ray.util.placement_group_table().values() if g["state"] == "CREATED"]
    assert any(len(g["bundles"]) == 4 for g in groups), [len(g["bundles"]) for g in groups]


def test_a_job_on_the_mesh_equals_local_engine(mesh_app, tiny_engine):
    mp4 = openai_render(mesh_app, FIELDS)
    request = GenerationRequest(**FIELDS)
    local = tiny_engine.render(request)
    served_frames, local_frames = media.decode_video(mp4), media.decode_video(local.artifact.data)
    assert served_frames.shape == local_frames.shape == (4, 32, 32, 3)
    assert psnr(served_frames, local_frames) >= 40.0
    latents = served_latents(request, app=APP)
    assert (latents.video - local.latents.video).abs().max().item() <= 1e-4
    assert (latents.audio - local.latents.audio).abs().max().item() <= 1e-4
    assert local.latents.video.abs().max() > 0.1
