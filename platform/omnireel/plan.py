"""Request -> ScenePlan: frames, latent shapes, shots on latent-frame boundaries, captions.

Frame arithmetic (DESIGN.md §3 "Codecs"): a request for round(seconds * fps) frames gets
1 + 4n latent frames (n rounded up) and decoded frames are trimmed back. Latent k covers frames
4k-3..4k (latent 0: frame 0), so a cut placed at latent k starts at frame 4k-3 and never splits a
latent. Audio is trimmed to the same duration. A video request without explicit shots gets them
from its storyboard planner (`storyboard`: the rule-based one runs here; an LLM storyboard was
planned into explicit shots when the request was accepted).

The Omni features ride along as plain data (so the plan stays small and JSON-able): bound voices as
(character, voice_id) pairs, references as the request's validated URIs, the physics scene as
canonical JSON. What they become — voice embeddings, clean latents, motion conditioning — is the
work of the encode stages. Which tokens are clean and which are generated (the per-token timestep
rule) follows from them: input_reference -> a clean first latent, input_video -> clean leading
latents, input_audio -> clean audio, mode "audio" -> one clean blank video latent and generated audio.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .config import GenerationRequest, Shot, canonical_json
from .model.config import LANGUAGES, ModelConfig
from .model.layout import LayoutSpec
from .storyboard import StoryboardError, llm_unavailable, plan_shots_rules, plans_shots


class PlanError(ValueError):
    """A request that validates field by field but cannot be planned; names the field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def artifact_extension(output: str, mode: str) -> str:
    """File extension of a request's artifact: png (an image), m4a (audio alone) or mp4."""
    return "png" if output == "image" else "m4a" if mode == "audio" else "mp4"


def first_frame(k: int) -> int:
    """First video frame covered by latent frame k."""
    return 0 if k == 0 else 4 * k - 3


@dataclass(frozen=True)
class ShotPlan:
    index: int
    caption: str
    latent_start: int   # [latent_start, latent_end) video latent frames
    latent_end: int
    frame_start: int    # [frame_start, frame_end) decoded frames
    frame_end: int
    camera: str | None = None   # the shot's camera direction (also appended to its caption)


@dataclass(frozen=True)
class ScenePlan:
    output: str                    # "video" | "image"
    captions: tuple[str, ...]      # global caption, then one per shot when there are several
    language: str
    seed: int
    steps: int
    shift: float
    guidance_video: float
    guidance_audio: float
    fps: int
    width: int
    height: int
    num_frames: int                # decoded frames kept (round(seconds * fps); 1 for an image)
    latent_frames: int             # 1 + n
    latent_height: int
    latent_width: int
    audio_samples: int             # waveform samples kept (0 for an image)
    audio_frames: int              # audio latents at 25 per second
    shots: tuple[ShotPlan, ...]
    # ---- the Omni features (defaults: plain text-to-video+audio) ----
    mode: str = "video"                            # "video" | "audio" (audio alone)
    voices: tuple[tuple[str, str], ...] = ()       # (character, voice_id), in binding order
    elements: tuple[str, ...] = ()                 # reference images -> clean ref tokens
    input_reference: str | None = None             # image -> the clean first latent frame
    input_video: str | None = None                 # video -> clean leading latent frames
    input_audio: str | None = None                 # audio -> clean audio tokens
    physics: str | None = None                     # the scene as canonical JSON

    @property
    def artifact_extension(self) -> str:
        return artifact_extension(self.output, self.mode)

    @property
    def seconds(self) -> float:
        return self.num_frames / self.fps

    @property
    def characters(self) -> tuple[str, ...]:
        return tuple(character for character, _ in self.voices)

    def layout_spec(self, caption_lengths: tuple[int, ...], voices: int = 0, refs: int = 0,
                    **streams) -> LayoutSpec:
        """The layout of this plan; `streams` are LayoutSpec's optional fields (clean frames, tracks, cues)."""
        return LayoutSpec(latent_frames=self.latent_frames, latent_height=self.latent_height,
                          latent_width=self.latent_width, fps=float(self.fps), audio_frames=self.audio_frames,
                          shot_starts=tuple(s.latent_start for s in self.shots),
                          caption_lengths=caption_lengths, voices=voices, refs=refs, **streams)


def shot_latent_starts(shot_seconds: list[float], fps: int, latent_frames: int) -> list[int]:
    """Place each cut on the latent frame whose first frame is nearest the requested cut time."""
    starts, elapsed = [0], 0.0
    for seconds in shot_seconds[:-1]:
        elapsed += seconds
        k = max(round((elapsed * fps + 3) / 4), starts[-1] + 1)
        starts.append(k)
    if starts[-1] >= latent_frames:
        raise PlanError("shots", f"{len(shot_seconds)} shots need at least {len(shot_seconds)} latent frames "
                                 f"(4 video frames each); this clip has {latent_frames}")
    return starts


def storyboard_shots(request: GenerationRequest) -> list[Shot]:
    """The request's shots: its own, else its storyboard planner's (see storyboard.py). The rules
    planner runs here; an LLM storyboard must have been planned at admission
    (storyboard.resolve_storyboard), so a request still asking for one is refused, naming the field."""
    if not plans_shots(request):
        return list(request.shots)
    if request.storyboard == "llm":
        reason = llm_unavailable()
        raise PlanError("storyboard", reason.split(": ", 1)[1] if reason else
                        "'llm' storyboards are planned once, when the request is accepted "
                        "(storyboard.resolve_storyboard), before the request is planned")
    try:
        shots = plan_shots_rules(request.prompt, request.seconds, fps=request.fps)
    except StoryboardError as e:
        raise PlanError("storyboard", str(e)) from None
    return shots if len(shots) > 1 else []     # one shot: the request's prompt is its only caption


def plan_request(request: GenerationRequest, config: ModelConfig) -> ScenePlan:
    vae, audio = config.vae, config.audio
    image = request.output == "image"
    audio_only = request.mode == "audio"
    num_frames = 1 if image else round(request.seconds * request.fps)
    latent_frames = 1 if audio_only else 1 + math.ceil((num_frames - 1) / vae.time_factor)
    if (request.input_reference or request.input_video) and latent_frames < 2:
        field = "input_reference" if request.input_reference else "input_video"
        raise PlanError(field, f"needs a clip of at least 2 frames, to generate some after the given ones "
                               f"(round(seconds * fps) = {num_frames})")
    audio_samples = 0 if image else round(num_frames / request.fps * audio.sample_rate)
    audio_frames = math.ceil(audio_samples / (audio.hop_length * audio.time_factor))

    shots = storyboard_shots(request)
    shot_seconds = [s.seconds for s in shots] or [request.seconds]
    starts = [0] if image else shot_latent_starts(shot_seconds, request.fps, latent_frames)
    ends = starts[1:] + [latent_frames]
    shot_captions = [s.prompt if not s.camera else f"{s.prompt} (camera: {s.camera})" for s in shots]
    if len(starts) == 1:   # one shot: a single global caption, no shot captions, no mask
        captions = (" ".join([request.prompt, *shot_captions]),)
        shot_captions = list(captions)
    else:
        captions = (request.prompt, *shot_captions)
    shot_plans = tuple(
        ShotPlan(index=i, caption=caption, latent_start=a, latent_end=b, frame_start=first_frame(a),
                 frame_end=num_frames if b == latent_frames else first_frame(b),
                 camera=shots[i].camera if len(shots) == len(starts) else None)
        for i, (caption, a, b) in enumerate(zip(shot_captions, starts, ends)))
    # mode "audio": the video stream is one clean blank latent of a single patch (it costs one token)
    latent_height, latent_width = ((config.backbone.patch[1], config.backbone.patch[2]) if audio_only else
                                   (request.height // vae.space_factor, request.width // vae.space_factor))

    sampler = config.sampler
    return ScenePlan(
        output=request.output, captions=captions, language=request.language, seed=request.seed,
        steps=request.steps or sampler.steps, shift=sampler.shift,
        guidance_video=sampler.cfg_video if request.guidance_video is None else request.guidance_video,
        guidance_audio=sampler.cfg_audio if request.guidance_audio is None else request.guidance_audio,
        fps=request.fps, width=request.width, height=request.height, num_frames=num_frames,
        latent_frames=latent_frames, latent_height=latent_height,
        latent_width=latent_width, audio_samples=audio_samples,
        audio_frames=audio_frames, shots=shot_plans,
        mode=request.mode, voices=tuple((v.character, v.voice_id) for v in request.voices),
        elements=tuple(request.elements), input_reference=request.input_reference,
        input_video=request.input_video, input_audio=request.input_audio,
        physics=None if request.physics is None else canonical_json(
            request.physics.model_dump(mode="json")).decode())


def language_index(language: str) -> int:
    return LANGUAGES.index(language)
