"""LocalEngine: every stage of the graph in one process (CLI render, tests, the parity oracle)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .checkpoint import default_checkpoint, read_config, read_digest
from .config import GenerationRequest
from .families import family_of
from .plan import ScenePlan, plan_request
from .stages import (STAGE_GRAPH, EncodedStream, GeneratedLatents, ProgressFn, StageTimings, StopFn, run_graph,
                     run_stage)


@dataclass
class RenderResult:
    plan: ScenePlan
    latents: GeneratedLatents
    artifact: EncodedStream           # the MP4 (or PNG for an image)
    timings: dict[str, float]         # seconds per stage


class LocalEngine:
    def __init__(self, checkpoint: str | Path | None = None, device: str = "cpu", voices: str | None = None,
                 dtype: str | None = None):
        """`voices`: the voice registry's URI (default $OMNIREEL_VOICES, else $OMNIREEL_HOME/voices);
        `dtype`: the model's float type (default: as stored; "bfloat16" on a GPU)."""
        self.checkpoint = Path(checkpoint) if checkpoint else default_checkpoint()
        self.family = family_of(self.checkpoint)
        self.config = read_config(self.checkpoint)
        self.digest = read_digest(self.checkpoint)
        names = {stage.component for stage in STAGE_GRAPH if stage.component}
        self.components = self.family.load_components(self.checkpoint, names, device, dtype=dtype, voices=voices)

    def plan(self, request: GenerationRequest) -> ScenePlan:
        return plan_request(request, self.config)

    def render(self, request: GenerationRequest, progress: ProgressFn | None = None,
               should_stop: StopFn | None = None) -> RenderResult:
        timings = StageTimings()

        def call(stage, inputs):
            return run_stage(stage, self.components, dict(zip(stage.inputs, inputs)), progress, should_stop)

        values = run_graph(STAGE_GRAPH, {"plan": self.plan(request)}, call, hooks=[timings])
        return RenderResult(values["plan"], values["latents"], values["artifact"], timings.seconds)
