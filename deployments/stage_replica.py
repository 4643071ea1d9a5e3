"""StageReplica: a Serve replica that runs some stages of `STAGE_GRAPH` on components loaded from
the checkpoint. The encoder and decoder deployments are StageReplicas that name their stages.

Contract (the same for every stage deployment, the Backbone included):
    run(stage_name, ticket, *inputs) -> the stage's output payload
where `inputs` are the stage's declared `inputs` in order (DeploymentResponses of upstream stages
resolve to payloads before the call lands) and `ticket` is the job's JobTicket, used by stages that
report progress. A replica is ready (constructed) only after it ran each of its stages once.
Every stage call, the warm-up included, runs on the replica's ComputeThread (compute.py).
"""
from __future__ import annotations

from typing import NamedTuple

import ray
from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError

from omnireel.checkpoint import read_config
from omnireel.compute import ComputeThread
from omnireel.families import get_family
from omnireel.parallel.group import RankFailure
from omnireel.stages import STAGE_GRAPH, StageTimings, close_components, load_components, run_stage

STAGES = {stage.name: stage for stage in STAGE_GRAPH}
DRIVER = "serve"   # the `driver` label of every metric recorded by the Serve app
# Failures that mean "a replica went away", not "this request is bad": the caller retries.
REPLICA_LOST = (RayActorError, DeploymentUnavailableError, RankFailure)


class JobTicket(NamedTuple):
    """Which job (and which attempt of it) a call works for; attempt fences stale work."""
    job_id: str
    attempt: int


NO_JOB = JobTicket("", 0)   # warm-up and parity calls: nothing to report to


def warmup_values(config) -> dict:
    """A placeholder for every payload of the graph for the smallest request the checkpoint's family
    serves, so each replica can run its stages once before it reports ready."""
    return get_family(config.family).warmup_values(config)


def deployment_stages(deployment: str) -> tuple:
    """The stages of STAGE_GRAPH that the deployment named `deployment` runs."""
    return tuple(stage for stage in STAGE_GRAPH if stage.deployment == deployment)


async def timed_call(compute: ComputeThread, stage, fn, *args, **kwargs):
    """`fn(*args)` on the compute thread, its seconds recorded as the stage's (driver "serve")."""
    with StageTimings(DRIVER).measure(stage):
        return await compute.call(fn, *args, **kwargs)


def compute_thread(args, stage_names) -> ComputeThread:
    """The compute thread of a replica running `stage_names`: their torch threads, the compute nice value."""
    return ComputeThread(args.threads_for(stage_names), args.compute_niceness)


class StageReplica:
    """Loads only the components its stages need, warms them up, then runs stage calls. A subclass
    is the deployment named by its stages' `deployment` in STAGE_GRAPH (its class name)."""

    def __init__(self, args):
        self.stages = deployment_stages(type(self).__name__)
        self.compute = compute_thread(args, [stage.name for stage in self.stages])
        self.config = read_config(args.checkpoint)
        needed = {stage.component for stage in self.stages if stage.component}
        device = "cuda" if ray.get_gpu_ids() else "cpu"          # a GPU stage got one (use_gpu)
        self.components = self.compute.run(load_components, args.checkpoint, needed, device, voices=args.voices_uri,
                                           dtype=args.dtype)
        values = warmup_values(self.config)
        for stage in self.stages:
            self.compute.run(run_stage, stage, self.components, values)

    async def run(self, stage_name: str, ticket: JobTicket, *inputs):
        stage = STAGES[stage_name]
        if stage not in self.stages:
            raise ValueError(f"{type(self).__name__} does not run stage {stage_name!r}")
        return await timed_call(self.compute, stage, run_stage, stage, self.components, dict(zip(stage.inputs, inputs)))

    async def ready(self) -> bool:
        return True

    def __del__(self):
        close_components(getattr(self, "components", {}))
        if hasattr(self, "compute"):
            self.compute.shutdown()
