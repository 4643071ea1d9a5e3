"""LocalEngine: every stage of the graph in one process (CLI render, tests, the parity oracle)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .checkpoint import default_checkpoint, read_config, read_digest
from .config import GenerationRequest
from .families import family_of
from .plan import ScenePlan, plan_request
from .stages import (BACKBONE_STAGE, STAGE_GRAPH, EncodedStream, GeneratedLatents, ProgressFn, StageTimings, StopFn,
                     run_graph, run_stage)


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
        values = run_graph(STAGE_GRAPH, {"plan": self.plan(request)}, self.stage_call(progress, should_stop),
                           hooks=[timings])
        return RenderResult(values["plan"], values["latents"], values["artifact"], timings.seconds)

    def denoise_inputs(self, request: GenerationRequest) -> tuple:
        """The backbone stage's inputs for `request` by this engine's stages ((plan, text, voice,
        media) as STAGE_GRAPH names them): what a DenoiseScheduler, a backbone group or the denoise
        stage alone takes, for a benchmark or a parity check of the backbone host."""
        before = STAGE_GRAPH[STAGE_GRAPH.index(BACKBONE_STAGE) - 1]       # the graph is in order
        values = run_graph(STAGE_GRAPH, {"plan": self.plan(request)}, self.stage_call(), until=before.output)
        return tuple(values[name] for name in BACKBONE_STAGE.inputs)

    def stage_call(self, progress: ProgressFn | None = None, should_stop: StopFn | None = None):
        """run_graph's `call`: each stage on this engine's components, in this process."""
        def call(stage, inputs):
            return run_stage(stage, self.components, dict(zip(stage.inputs, inputs)), progress, should_stop)
        return call
