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

from dataclasses import dataclass

from .config import GenerationRequest, Shot
from .model.config import LANGUAGES
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


def first_frame(k: int, frames_per_latent: int) -> int:
    """First video frame covered by latent frame k: latent 0 is frame 0 alone, each later latent
    covers `frames_per_latent` frames (the video VAE's time factor)."""
    return 0 if k == 0 else frames_per_latent * (k - 1) + 1


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
    frames_per_latent: int         # video frames per latent after the first (the VAE's time factor)
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
    family: str = "omni"                           # the model family whose stages run this plan (families/)

    @property
    def artifact_extension(self) -> str:
        return artifact_extension(self.output, self.mode)

    @property
    def frame_count(self) -> int:
        """Frames the latents decode to (1 + frames_per_latent * n; num_frames of them are kept)."""
        return 1 + self.frames_per_latent * (self.latent_frames - 1)

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
                          frames_per_latent=self.frames_per_latent,
                          shot_starts=tuple(s.latent_start for s in self.shots),
                          caption_lengths=caption_lengths, voices=voices, refs=refs, **streams)


def shot_latent_starts(shot_seconds: list[float], fps: int, latent_frames: int,
                       frames_per_latent: int) -> list[int]:
    """Place each cut on the latent frame whose first frame is nearest the requested cut time."""
    starts, elapsed = [0], 0.0
    for seconds in shot_seconds[:-1]:
        elapsed += seconds
        # first_frame(k) = f (k - 1) + 1 = elapsed * fps  <->  k = (elapsed * fps + f - 1) / f
        k = max(round((elapsed * fps + frames_per_latent - 1) / frames_per_latent), starts[-1] + 1)
        starts.append(k)
    if starts[-1] >= latent_frames:
        raise PlanError("shots", f"{len(shot_seconds)} shots need at least {len(shot_seconds)} latent frames "
                                 f"({frames_per_latent} video frames each); this clip has {latent_frames}")
    return starts


def storyboard_shots(request: GenerationRequest) -> list[Shot]:
    """The request's shots: its own, else its storyboard planner's (see storyboard.py). The rules
    planner runs here; an LLM storyboard must have been planned at admission (the Serve
    StoryboardPlanner, the batch planner pool, the CLI's own planner: storyboard.py), so a request
    still asking for one is refused, naming the field."""
    if not plans_shots(request):
        return list(request.shots)
    if request.storyboard == "llm":
        reason = llm_unavailable()
        raise PlanError("storyboard", reason.split(": ", 1)[1] if reason else
                        "'llm' storyboards are planned once, by the storyboard planner, when the "
                        "request is accepted; this request reached planning without its shots")
    try:
        shots = plan_shots_rules(request.prompt, request.seconds, fps=request.fps)
    except StoryboardError as e:
        raise PlanError("storyboard", str(e)) from None
    return shots if len(shots) > 1 else []     # one shot: the request's prompt is its only caption


def plan_request(request: GenerationRequest, config) -> ScenePlan:
    """The plan of `request` on a checkpoint with `config`, by its family's rules (families/):
    PlanError naming the field for what that family cannot honor."""
    from .families import get_family
    return get_family(config.family).plan(request, config)


def language_index(language: str) -> int:
    return LANGUAGES.index(language)
