"""The stage graph, declared once; the payloads between stages; the one executor that walks the graph;
and the denoise engine (DESIGN.md §2, §3b).

A stage never knows which driver runs it. Each stage takes its model component (or None) and its
named inputs, and returns one payload. Which function runs a stage is the model family's (families/):
the ScenePlan names its family, so `run_stage` needs nothing else. The denoise stage is the same for
every family: the engine loop below over the family's Denoiser (prepare / step / finish).

Drivers (LocalEngine, the Serve app, the Ray Data pipeline) only map `STAGE_GRAPH` through
`run_graph`, each with its own `call`; none re-codes the flow or names a stage: a stage's `deployment`
and `pool` say where the Serve app and the batch pipeline place it.

Payloads hold tensors, lists of tensors, bytes and plain JSON-able values only (pipelines/rows.py
turns them into Arrow rows).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import media
from .plan import ScenePlan

ProgressFn = Callable[[int, int], None]
StopFn = Callable[[], bool]


# ---- payloads -------------------------------------------------------------------------------

@dataclass
class TextEmbeddings:
    captions: list[torch.Tensor]          # per caption (L_i, text_dim), in ScenePlan.captions order
    characters: list[torch.Tensor] = field(default_factory=list)  # per bound character's name (L_i, text_dim)

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(c.shape[0] for c in self.captions)


@dataclass
class VoiceEmbeddings:
    speakers: torch.Tensor                # (V, speaker_dim), one per bound character


@dataclass
class MediaLatents:
    """The clean conditioning besides text and voices (None / empty where the request has none)."""
    refs: torch.Tensor                    # (R, C, h, w) reference-image latents (elements)
    video: torch.Tensor | None = None     # (C, K, h, w) clean leading video latents (K < T)
    audio: torch.Tensor | None = None     # (Ca, Ta) clean audio latents (audio-driven video)
    soundtrack: bytes | None = None       # the same input audio as the output's audio stream (M4A,
                                          # trimmed or padded to the clip): decode_audio hands it on
    # motion conditioning of a simulated scene (physics.MotionConditioning, flattened for rows.py)
    flow: torch.Tensor | None = None      # (T-1, h, w, 2) int16: per-cell displacement, latent k -> k+1
    layer: torch.Tensor | None = None     # (T-1, h, w) uint8: occlusion order of the moving cells
    tracks: torch.Tensor | None = None    # (N, T, track_dim) trajectory features
    track_cells: torch.Tensor | None = None  # (N, T, 2) (y, x) of each track, in latent cells
    collision_frames: list[int] = field(default_factory=list)  # video frames of the simulated hits
    audio_cues: list[int] = field(default_factory=list)        # audio latents at those times


@dataclass
class GeneratedLatents:
    video: torch.Tensor                   # (C, T, h, w)
    audio: torch.Tensor                   # (Ca, Ta)


@dataclass
class EncodedStream:
    data: bytes                           # an encoded stream (MP4 video, M4A audio) or a PNG
    media_type: str


# ---- the family-independent stage -------------------------------------------------------

def mux(plan: ScenePlan, video: EncodedStream, audio: EncodedStream) -> EncodedStream:
    if plan.output == "image":
        return video
    if plan.mode == "audio":
        return audio
    return EncodedStream(media.mux(video.data, audio.data), "video/mp4")


# ---- the graph -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stage:
    name: str
    component: str | None         # which component the stage runs on (None: no model)
    inputs: tuple[str, ...]       # payload names, in the stage function's argument order after the component
    output: str
    output_type: type
    deployment: str               # the Serve deployment that runs it ("" : the JobRunner itself)
    pool: str                     # the batch pipeline's actor pool that runs it
    resources: dict = field(default_factory=dict)   # what one replica / actor of the stage asks for
    on_backbone: bool = False     # the denoise engine on a backbone host (takes progress= and should_stop=)


STAGE_GRAPH: tuple[Stage, ...] = (
    Stage("encode_text", "text_encoder", ("plan",), "text", TextEmbeddings, "TextEncoder", "encode", {"CPU": 1}),
    Stage("encode_voice", "voices", ("plan",), "voice", VoiceEmbeddings, "VoiceEncoder", "encode", {"CPU": 1}),
    Stage("encode_media", "media_encoder", ("plan",), "media", MediaLatents, "MediaEncoder", "encode", {"CPU": 1}),
    Stage("denoise", "backbone", ("plan", "text", "voice", "media"), "latents", GeneratedLatents, "Backbone",
          "denoise", {"GPU": 1}, on_backbone=True),
    Stage("decode_video", "vae", ("plan", "latents"), "video", EncodedStream, "VideoDecoder", "decode", {"GPU": 1}),
    Stage("decode_audio", "audio_decoder", ("plan", "latents", "media"), "audio", EncodedStream, "AudioDecoder", "decode",
          {"CPU": 1}),
    Stage("mux", None, ("plan", "video", "audio"), "artifact", EncodedStream, "", "decode", {"CPU": 1}),
)
BACKBONE_STAGE = next(stage for stage in STAGE_GRAPH if stage.on_backbone)


def stage_function(stage: Stage, plan: ScenePlan) -> Callable:
    """The function that runs `stage` for `plan`'s family (the engine for the backbone stage)."""
    if stage.on_backbone:
        return denoise
    from .families import get_family
    return get_family(plan.family).stage(stage.name)


def run_stage(stage: Stage, components: dict, values: dict, progress: ProgressFn | None = None,
              should_stop: StopFn | None = None):
    """Call one stage with its component and inputs taken from `values`."""
    args = [values[name] for name in stage.inputs]
    if stage.component is not None:
        args.insert(0, components[stage.component])
    kwargs = {"progress": progress, "should_stop": should_stop} if stage.on_backbone else {}
    return stage_function(stage, values["plan"])(*args, **kwargs)


class StageTimings:
    """Seconds per stage into `seconds`, and the omnireel_stage_seconds metric labelled with `driver`
    (None: no metric, as in the LocalEngine). A run_graph hook (before / after), or around any one
    call as `with timings.measure(stage):` (a replica's awaited stage call)."""

    def __init__(self, driver: str | None = None):
        self.driver, self.seconds, self._start = driver, {}, 0.0

    def before(self, stage: Stage) -> None:
        self._start = time.perf_counter()

    def after(self, stage: Stage) -> None:
        from . import metrics
        self.seconds[stage.name] = time.perf_counter() - self._start
        if self.driver is not None:
            metrics.record("omnireel_stage_seconds", self.seconds[stage.name], stage=stage.name, driver=self.driver)

    @contextmanager
    def measure(self, stage: Stage):
        self.before(stage)
        yield
        self.after(stage)


def run_graph(graph: tuple[Stage, ...], values: dict, call: Callable[[Stage, list], object], *,
              until: str | None = None, hooks=()) -> dict:
    """The one executor: each stage of `graph` in order whose output is not in `values` yet gets
    `values[stage.output] = call(stage, [its inputs])`, up to the stage producing `until`. `hooks`
    have before(stage) / after(stage). A driver's `call` may return a future (Serve chains
    DeploymentResponses): the walk never waits on values, only the driver's call does."""
    for stage in graph:
        if stage.output not in values:
            for hook in hooks:
                hook.before(stage)
            values[stage.output] = call(stage, [values[name] for name in stage.inputs])
            for hook in hooks:
                hook.after(stage)
        if stage.output == until:
            break
    return values


# ---- the denoise engine ------------------------------------------------------------------------

@torch.inference_mode()
def denoise(denoiser, plan: ScenePlan, text: TextEmbeddings, voice: VoiceEmbeddings, media_latents: MediaLatents,
            progress: ProgressFn | None = None, should_stop: StopFn | None = None) -> GeneratedLatents:
    """The denoise stage of every family: one job through a scheduler of its own (scheduler.py: prepare,
    one `step` per sampler step, finish). Checks should_stop() at the start of every step
    (model.sampler.Cancelled), reports progress after it. A backbone host that batches jobs keeps
    one DenoiseScheduler and submits every job to it instead."""
    from .scheduler import DenoiseScheduler

    scheduler = DenoiseScheduler(denoiser, max_batch_jobs=1)
    task = scheduler.submit(plan, text, voice, media_latents, progress=progress, should_stop=should_stop)
    scheduler.run_until_idle()
    return task.future.result()


# ---- components --------------------------------------------------------------------------------

def load_components(checkpoint, names, device="cpu", voices: str | None = None, dtype: str | None = None) -> dict:
    """The named components from a checkpoint folder of any family, loading only the weights they
    are made of (a replica or pool actor that runs some stages loads just those)."""
    from pathlib import Path

    from .families import family_of

    return family_of(checkpoint).load_components(Path(checkpoint), set(names), device, dtype=dtype, voices=voices)


def close_components(components: dict) -> None:
    """Releases what components hold outside this process (a vLLM text encoder's engine)."""
    for component in components.values():
        close = getattr(component, "close", None)
        if close is not None:
            close()
