"""LocalEngine: every stage of the graph in one process (CLI render, tests, the parity oracle)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import default_checkpoint, load_checkpoint, read_digest
from .config import GenerationRequest
from .model.text import build_text_encoder
from .plan import ScenePlan, plan_request
from .stages import STAGE_GRAPH, EncodedStream, GeneratedLatents, ProgressFn, StopFn, build_components, run_stage


@dataclass
class RenderResult:
    plan: ScenePlan
    latents: GeneratedLatents
    artifact: EncodedStream           # the MP4 (or PNG for an image)
    timings: dict[str, float]         # seconds per stage


class LocalEngine:
    def __init__(self, checkpoint: str | Path | None = None, device: str = "cpu", voices: str | None = None):
        """`voices`: the voice registry's URI (default $OMNIREEL_VOICES, else $OMNIREEL_HOME/voices)."""
        self.checkpoint = Path(checkpoint) if checkpoint else default_checkpoint()
        self.model = load_checkpoint(self.checkpoint, device=device)
        self.config = self.model.config
        self.digest = read_digest(self.checkpoint)
        self.components = build_components(dict(self.model.named_children()), self.config,
                                           build_text_encoder(self.config.text), voices=voices)

    def plan(self, request: GenerationRequest) -> ScenePlan:
        return plan_request(request, self.config)

    def render(self, request: GenerationRequest, progress: ProgressFn | None = None,
               should_stop: StopFn | None = None) -> RenderResult:
        values: dict = {"plan": self.plan(request)}
        timings = {}
        for stage in STAGE_GRAPH:
            start = time.perf_counter()
            values[stage.output] = run_stage(stage, self.components, values, progress, should_stop)
            timings[stage.name] = time.perf_counter() - start
        return RenderResult(values["plan"], values["latents"], values["artifact"], timings)
