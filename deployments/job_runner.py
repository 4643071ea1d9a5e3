"""The JobRunner deployment: one job per request, so its in-flight requests ARE the running jobs
(`max_ongoing_requests`, `max_queued_requests`, autoscaling and graceful shutdown see real load).
The JobStore (job_store.py) dispatches each job to it; it reports every transition back to the store.
"""
from __future__ import annotations

import asyncio
import logging
import time

from ray import serve
from ray.serve.handle import DeploymentResponse

from omnireel import storage
from omnireel.checkpoint import read_config, read_digest
from omnireel.config import parse_request
from omnireel.model.sampler import Cancelled
from omnireel.plan import plan_request
from omnireel.stages import STAGE_GRAPH, StageTimings, run_graph, run_stage

from .job_book import JobRecord
from .job_store import riding_out_restarts
from .request_parsing import reference_policy
from .stage_replica import DRIVER, NO_JOB, REPLICA_LOST, JobTicket

logger = logging.getLogger("ray.serve")


def one_line(exc: BaseException) -> str:
    """`Type: message` of the original error (a Ray task error's cause), first line only."""
    cause = getattr(exc, "cause", None) or exc
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"


async def root_cause(response: DeploymentResponse, calls: list[DeploymentResponse]):
    """The value of a chained call; if it failed, the error of the first call upstream of it that
    failed (a decoder fails when the Backbone it waits on died: the cause is the Backbone's death)."""
    try:
        return await response
    except Exception:
        for call in calls[:calls.index(response)]:      # graph order
            try:
                await call
            except Exception as upstream:
                raise upstream
        raise


@serve.deployment(graceful_shutdown_timeout_s=60)
class JobRunner:
    """Runs one job per request: the core's STAGE_GRAPH mapped onto the stage deployments' handles.

    Stages with a deployment are chained as DeploymentResponses (text and voice encoding start
    together, both decoders start on the same latents, and latents never pass through here); a
    stage without one (mux: no model) runs here on the decoders' encoded streams. The artifact is
    written under the shared layout, so a request rendered before (online or in batch) is reused.
    """

    def __init__(self, args, store, stages: dict):
        self.args, self.store, self.stages = args, store, stages     # stages: stage name -> handle
        self.config, self.digest = read_config(args.checkpoint), read_digest(args.checkpoint)
        self.policy = reference_policy(args)      # the allow-list the ingress accepted the request under
        unplaced = [s.name for s in STAGE_GRAPH if s.component is not None and s.name not in stages]
        if unplaced:
            raise ValueError(f"stages {unplaced} need a model but have no deployment")

    async def run(self, ticket: JobTicket) -> str:
        """The whole job; returns how it ended ("completed", "failed", "retried", "stopped", "stale")."""
        record = await self._tell_store("start", ticket)
        if record is None:
            return "stale"
        work = asyncio.create_task(self._render(ticket, record))
        deadline = time.monotonic() + self.args.job_timeout_s
        try:
            while not work.done():
                await asyncio.wait({work}, timeout=self.args.lease_s / 3)
                if work.done():
                    break
                stop = await self._tell_store("heartbeat", ticket)
                if stop or time.monotonic() > deadline:
                    work.cancel()
                    await asyncio.wait({work})
                    if not stop:
                        await self._tell_store("fail", ticket, "timeout",
                                               f"not done within job_timeout_s={self.args.job_timeout_s:g}")
                        return "failed"
                    return "stopped"
            artifact = work.result()
        except Cancelled:                    # the backbone stopped: the job was cancelled or superseded
            return "stopped"
        except REPLICA_LOST as exc:
            await self._tell_store("retry", ticket, "worker_lost", f"a stage replica was lost: {one_line(exc)}")
            return "retried"
        except Exception as exc:
            logger.warning("job %s failed", ticket.job_id, exc_info=exc)
            await self._tell_store("fail", ticket, "generation_failed", one_line(exc))
            return "failed"
        finally:
            work.cancel()
        await self._tell_store("complete", ticket, artifact)
        return "completed"

    async def latents(self, request: dict):
        """The GeneratedLatents of a request through the served stages (the parity check's view)."""
        plan = plan_request(parse_request(request, self.policy), self.config)
        return await self._chain(NO_JOB, plan, until="latents")

    async def ready(self) -> bool:
        return True

    async def _render(self, ticket: JobTicket, record: JobRecord) -> str:
        """Runs the graph for the job; writes artifact then sidecar; returns the artifact URI."""
        plan = plan_request(record.generation(self.policy), self.config)
        prefix, extension = self.args.storage_uri, plan.artifact_extension
        artifact_uri = storage.artifact_uri(prefix, record.key, extension)
        if await asyncio.to_thread(storage.artifact_done, prefix, record.key, extension):
            return artifact_uri                       # rendered before: never render twice
        artifact = await self._chain(ticket, plan)    # EncodedStream: the muxed MP4 (or PNG, M4A)
        sidecar = {"media_type": artifact.media_type, "request": record.request, "checkpoint": self.digest,
                   "steps": plan.steps, "frames": plan.num_frames, "job_id": record.id}
        await asyncio.to_thread(storage.write_artifact, prefix, record.key, extension, artifact.data, sidecar)
        return artifact_uri

    async def _chain(self, ticket: JobTicket, plan, until: str | None = None):
        """STAGE_GRAPH over the handles (the core's run_graph), up to the stage producing `until`
        (default: the last); returns that payload. A stage with a deployment is a DeploymentResponse
        chained into the next calls; one without (mux: no model) is a task here that awaits its
        inputs. Only what a local stage or the caller needs is fetched here."""
        until = until or STAGE_GRAPH[-1].output
        calls: list[DeploymentResponse] = []
        here: list[asyncio.Task] = []

        def call(stage, inputs):
            if stage.name in self.stages:
                calls.append(self.stages[stage.name].run.remote(stage.name, ticket, *inputs))
                return calls[-1]
            here.append(asyncio.ensure_future(self._run_here(stage, inputs, calls)))
            return here[-1]

        try:
            value = run_graph(STAGE_GRAPH, {"plan": plan}, call, until=until)[until]
            return await (root_cause(value, calls) if isinstance(value, DeploymentResponse) else value)
        except BaseException:
            for pending in [*calls, *here]:
                try:
                    pending.cancel()
                except Exception:          # cancelling a call that already failed raises its error
                    pass
            raise

    async def _run_here(self, stage, inputs: list, calls: list[DeploymentResponse]):
        """A stage without a deployment, in this replica, once its inputs have arrived."""
        values = {name: await root_cause(v, calls) if isinstance(v, DeploymentResponse) else v
                  for name, v in zip(stage.inputs, inputs)}
        with StageTimings(DRIVER).measure(stage):
            return await asyncio.to_thread(run_stage, stage, {}, values)

    async def _tell_store(self, method: str, *args, patience_s: float = 120.0):
        """Calls a JobStore transition, riding out a store restart (transitions are idempotent)."""
        async for attempt in riding_out_restarts(patience_s, wait_s=0.5):
            with attempt:
                return await getattr(self.store, method).remote(*args)
