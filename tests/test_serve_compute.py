"""Every stage replica of the served app runs its model work on its compute thread (compute.py): at
the app's compute_niceness (0, the Serve config's) while the rest of the replica keeps Ray's nice
value, with the torch threads of its stage (stage_threads: decode_audio runs on one). At tp=2 the
Backbone replica's compute thread drives the group; its ranks' engine threads are checked in test_group.py."""
from __future__ import annotations

import os

import pytest
import ray
import torch

from omnireel.compute import compute_threads
from omnireel.deployments.app import load_serve_config
from omnireel.stages import STAGE_GRAPH

from serve_support import ARGS, create, serve_actor, wait_done

CONFIG_ARGS = load_serve_config()["applications"][0]["args"]
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="nice 0, below Ray's 15, needs CAP_SYS_NICE (root here)")


def replica_threads(deployment: str) -> tuple[int, dict[int, int], int]:
    """(the replica process's own nice value, its compute threads: tid -> nice value, torch threads)."""
    actor = ray.get_actor(serve_actor(deployment), namespace="serve")
    return ray.get(actor.__ray_call__.remote(
        lambda self: (os.getpriority(os.PRIO_PROCESS, os.getpid()), compute_threads(), torch.get_num_threads())),
        timeout=60)


def test_stage_replicas_compute_on_their_own_threads_at_the_compute_nice_value(served):
    with served.http() as http:                      # every stage has run on a real request
        video = create(http, size="64x64", seconds="1", steps=2)
        assert wait_done(http, video["id"])["status"] == "completed"
    niceness, stage_threads = CONFIG_ARGS["compute_niceness"], CONFIG_ARGS["stage_threads"]
    assert niceness == 0 and stage_threads == {"decode_audio": 1}
    for stage in STAGE_GRAPH:
        if not stage.deployment:
            continue
        process_nice, compute, torch_threads = replica_threads(stage.deployment)
        assert compute and set(compute.values()) == {niceness}, (stage.deployment, compute)
        assert process_nice != niceness, stage.deployment          # Ray's and Serve's threads stay as Ray set them
        assert torch_threads == stage_threads.get(stage.name, ARGS["threads"]), stage.deployment
