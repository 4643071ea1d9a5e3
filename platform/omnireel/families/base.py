"""What a model family gives the platform (DESIGN.md §3b): limits, config, plan, components, the
family's halves of the stages, and its denoiser (prepare / step / finish).

The drivers never look at a family directly: `checkpoint.read_config`, `plan.plan_request`,
`stages.load_components`, `stages.run_stage` and `stages.denoise` dispatch on the checkpoint's
family (the ScenePlan carries its family's name, so a stage call needs nothing else).

    family = family_of(checkpoint)                 # families/__init__.py
    config = family.read_config(checkpoint)        # config.family == family.name
    plan = family.plan(request, config)            # PlanError(field, limit) for what it cannot honor
    parts = family.load_components(checkpoint, {"text_encoder", ...}, device, dtype=..., voices=...)
    family.stage("encode_text")(parts["text_encoder"], plan) -> TextEmbeddings
    denoiser = parts["backbone"]                   # a Denoiser: the engine loop in stages.denoise
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Protocol

BASIC_FIELDS = frozenset({"prompt", "seconds", "size", "fps", "seed", "steps", "guidance_video", "guidance_audio"})
"""Request fields every family honors."""

OPTIONAL_REQUEST_FIELDS = ("language", "shots", "output", "storyboard", "mode", "voices", "elements",
                           "input_reference", "input_video", "input_audio", "physics")
"""Request fields a family may or may not honor (FamilyLimits.fields); a request that sets one its
family does not honor is refused naming the field, never ignored."""


@dataclass(frozen=True)
class FamilyLimits:
    """What requests a family can serve; every refusal names the field and this limit."""
    size_multiple: int                 # width and height are multiples of this
    frame_rule: str                    # how a clip's frame count is made (for messages), e.g. "1 + 8k"
    max_seconds: float
    min_fps: int
    max_fps: int
    fields: frozenset[str]             # the OPTIONAL_REQUEST_FIELDS it honors
    languages: tuple[str, ...] = ("en",)
    modalities: tuple[str, ...] = ("video", "audio")   # what its artifacts hold

    def describe(self) -> dict:
        """JSON-able, for GET /v1/models and error messages."""
        return {"size_multiple": self.size_multiple, "frame_rule": self.frame_rule,
                "max_seconds": self.max_seconds, "fps": [self.min_fps, self.max_fps],
                "fields": sorted(BASIC_FIELDS | self.fields), "languages": list(self.languages),
                "modalities": list(self.modalities)}


class DenoiseState(Protocol):
    """One job's sampler state between steps. A state may also give `tokens` (its step's model
    tokens, CFG rows included): what a batching scheduler's max_batch_tokens counts (scheduler.py)."""
    steps: int        # sampler steps in all
    done: int         # steps taken so far


class Denoiser(Protocol):
    """The backbone component of a family: the engine (stages.denoise) owns the loop.

    prepare builds a job's state (conditions, layout, the initial noise drawn exactly as the family's
    reference pipeline draws it); step advances every state in `states` by one sampler step through
    `forward(module, *args, **kwargs)`, the one injected model call: it runs the model module the
    family chose for the step (Wan 2.2's expert, say) on its inputs (default: module(*args, **kwargs)),
    so step batching, CFG-parallel and sequence parallel can swap it; finish returns the latents.
    """

    def prepare(self, plan, text, voice, media) -> DenoiseState: ...

    def step(self, states: list, forward: Callable | None = None) -> None: ...

    def finish(self, state) -> Any: ...


def bind_forward(forward: Callable | None, module) -> Callable:
    """The model call of one step: `module` itself, or the injected `forward` bound to it."""
    return module if forward is None else partial(forward, module)


def run_calls(forward: Callable | None, module, calls: list[dict]) -> list:
    """Several model calls of one step (keyword arguments each), whose outputs the step needs only
    together: an injected forward with a `calls` method (CFG-parallel) spreads their rows over its
    ranks in one go; otherwise they run one after the other."""
    if forward is not None and hasattr(forward, "calls"):
        return forward.calls(module, [((), kwargs) for kwargs in calls])
    call = bind_forward(forward, module)
    return [call(**kwargs) for kwargs in calls]


class Family:
    """One model family. Subclasses fill every attribute and method below."""

    name: str = ""
    limits: FamilyLimits
    component_names: tuple[str, ...] = ("text_encoder", "voices", "media_encoder", "backbone", "vae",
                                        "audio_decoder")

    def read_config(self, checkpoint: Path):
        """The checkpoint's config; its `family` attribute is this family's name."""
        raise NotImplementedError

    def digest(self, checkpoint: Path) -> str:
        """A stable hash of the checkpoint (config + weights): part of every artifact key."""
        raise NotImplementedError

    def plan(self, request, config):
        """GenerationRequest -> ScenePlan (with family=self.name); PlanError naming the field."""
        raise NotImplementedError

    def load_components(self, checkpoint: Path, names, device="cpu", *, dtype: str | None = None,
                        voices: str | None = None) -> dict:
        """The named components, loading only the weights they are made of."""
        raise NotImplementedError

    def stage(self, name: str) -> Callable:
        """The family's function for stage `name` (the denoise stage's is the shared engine)."""
        raise NotImplementedError

    def limits_for(self, config) -> FamilyLimits:
        """The limits of one checkpoint of this family (its size multiple can be the checkpoint's own)."""
        size_multiple = getattr(config, "size_multiple", self.limits.size_multiple)
        return replace(self.limits, size_multiple=max(size_multiple, self.limits.size_multiple))

    def model_id(self, config) -> str:
        """The model's id in the API (GET /v1/models) when the operator names none."""
        return f"omnireel-{self.name}"

    def warmup_values(self, config) -> dict:
        """A placeholder for every payload of the graph for the smallest request this family serves."""
        raise NotImplementedError

    def check_fields(self, request) -> None:
        """PlanError for the first optional field `request` sets that this family does not honor."""
        from ..plan import PlanError

        for name in OPTIONAL_REQUEST_FIELDS:
            if name in self.limits.fields or name not in request.model_fields_set:
                continue
            default = type(request).model_fields[name].get_default(call_default_factory=True)
            if getattr(request, name) != default:
                raise PlanError(name, f"not supported by the {self.name} family (it honors: "
                                      f"{', '.join(sorted(BASIC_FIELDS | self.limits.fields))})")
