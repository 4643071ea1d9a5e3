"""StoryboardPlanner: the LLM storyboard planner as a Serve deployment of its own.

Each replica holds ONE LLMShotPlanner (one vLLM engine: an engine core and, on CPU, a worker process
under the replica, stopped with it). The ingress asks it through a DeploymentHandle, once per
create that asks for `storyboard: "llm"` without shots, before the job exists; the job then carries
the planned shots like any request with explicit shots, so no stage replica ever plans again.
Concurrent requests are planned together (serve.batch: one engine call, vLLM batches them).

    plan(task: storyboard.StoryboardTask (prompt, seconds, fps, seed)) -> {"shots": [shot dicts]}
                                                                          | {"error": one line naming storyboard}

build_app starts it only where a planner model is configured (AppArgs.storyboard_model, else
$OMNIREEL_STORYBOARD_MODEL) and vLLM is installed (storyboard.llm_unavailable); without it the
ingress refuses such a request itself with the same one-line reason.
"""
from __future__ import annotations

import asyncio

from ray import serve

from omnireel.storyboard import LLMShotPlanner, StoryboardError, StoryboardTask, planned_shots

PLAN_BATCH = 16               # requests one engine call plans together
PLAN_BATCH_WAIT_S = 0.01      # how long a batch waits for more requests once the first arrived


def answer(outcome) -> dict:
    """One outcome of LLMShotPlanner.plan_many as the deployment's answer (plain values)."""
    try:
        return {"shots": [shot.model_dump(exclude_none=True) for shot in planned_shots(outcome)]}
    except StoryboardError as e:
        return {"error": str(e)}


@serve.deployment
class StoryboardPlanner:
    """One vLLM engine per replica; plans the shots of requests with an LLM storyboard."""

    def __init__(self, args):
        self.planner = LLMShotPlanner(args.storyboard_model)
        self.requests, self.batches = 0, 0

    @serve.batch(max_batch_size=PLAN_BATCH, batch_wait_timeout_s=PLAN_BATCH_WAIT_S)
    async def plan(self, tasks: list[StoryboardTask]) -> list[dict]:
        tasks = [StoryboardTask(*task) for task in tasks]
        # one batch at a time (serve.batch's default), so the engine is never called from two threads
        outcomes = await asyncio.to_thread(self.planner.plan_many, tasks)
        self.requests, self.batches = self.requests + len(tasks), self.batches + 1
        return [answer(outcome) for outcome in outcomes]

    async def stats(self) -> dict:
        """What this replica has planned: {"requests": n, "batches": engine calls}."""
        return {"requests": self.requests, "batches": self.batches}

    def __del__(self):
        planner = getattr(self, "planner", None)
        if planner is not None:
            planner.close()
