"""The pipeline stages as plain functions over typed payloads, and the stage graph declared once.

A stage never knows which driver runs it (DESIGN.md §2). Each stage takes its model component
(or None) and its named inputs, and returns one payload. Drivers (LocalEngine, the Serve app, the
Ray Data pipeline) only map `STAGE_GRAPH`; none re-codes the flow.

Payloads hold tensors, lists of tensors, bytes and plain JSON-able values only (pipelines/rows.py
turns them into Arrow rows). The any-to-any choice is the per-token timestep rule: encode_media
returns the clean parts (reference latents, leading video latents, audio latents) and denoise marks
exactly those tokens clean; everything else is generated.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import media
from .model.audio import LOG_FLOOR, AudioCodec, MelSpectrogram, Vocoder
from .model.backbone import ConditionTokens, OmniBackbone
from .model.config import ModelConfig
from .model.layout import build_layout
from .model.sampler import Guidance, sample
from .model.text import mean_pool
from .model.vae import VideoVAE
from .plan import ScenePlan, language_index

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


# ---- components ------------------------------------------------------------------------------

@dataclass
class MediaEncoder:
    """Reference media -> clean latents: the video VAE's encoder and the audio codec's."""
    vae: VideoVAE
    codec: AudioCodec | None

    @torch.inference_mode()
    def encode_frames(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 (T, H, W, 3), T = 1 + 4k -> (C, 1 + k, H/8, W/8) latents."""
        param = next(self.vae.parameters())
        pixels = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].to(param.device, param.dtype)  # (1, 3, T, H, W)
        return self.vae.encode(pixels / 127.5 - 1)[0].float().cpu()

    @torch.inference_mode()
    def encode_wave(self, wave: np.ndarray, audio_frames: int) -> torch.Tensor:
        """float32 (S,) at the codec's rate -> (Ca, audio_frames) latents (silence pads a short wave)."""
        cfg = self.codec.cfg
        param = next(self.codec.parameters())
        mel_frames = audio_frames * cfg.time_factor
        wave = np.pad(wave[: mel_frames * cfg.hop_length], (0, max(0, mel_frames * cfg.hop_length - wave.shape[0])))
        mel = MelSpectrogram(cfg).to(param.device)(torch.from_numpy(wave)[None].to(param.device))  # (1, M, mel_frames)
        mel = torch.nn.functional.pad(mel, (0, mel_frames - mel.shape[-1]), value=float(np.log(LOG_FLOOR)))
        return self.codec.encode(mel.to(param.dtype))[0].float().cpu()


@dataclass
class AudioDecoder:
    """Audio latents -> waveform: the codec's decoder then the vocoder."""
    codec: AudioCodec
    vocoder: Vocoder

    @torch.inference_mode()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, Ca, Ta) -> (B, samples)."""
        return self.vocoder(self.codec.decode(latents))


# ---- stages ----------------------------------------------------------------------------------

def encode_text(text_encoder, plan: ScenePlan) -> TextEmbeddings:
    """Captions, and the names of the characters bound to voices, in one batch."""
    encoded = text_encoder.encode([*plan.captions, *plan.characters])
    return TextEmbeddings(captions=encoded[:len(plan.captions)], characters=encoded[len(plan.captions):])


def encode_voice(registry, plan: ScenePlan) -> VoiceEmbeddings:
    """Speaker embeddings of the bound characters, read from the voice registry (voices.VoiceRegistry).
    An id that is not (or no longer) there raises voices.VoiceNotFound naming the field."""
    return VoiceEmbeddings(speakers=registry.embeddings([voice_id for _, voice_id in plan.voices]))


def encode_media(encoder: MediaEncoder, plan: ScenePlan) -> MediaLatents:
    """Elements -> clean ref latents; input_reference -> the clean first latent; input_video -> clean
    leading latents (as many whole latents as it covers, leaving at least one to generate);
    input_audio -> clean audio latents; mode "audio" -> one blank clean video latent; physics ->
    the simulated scene's motion conditioning (physics.py)."""
    from . import physics, references

    channels = encoder.vae.cfg.latent_channels
    factor = encoder.vae.cfg.time_factor

    def frames_of(field: str, reference: str, max_frames: int, fps=None) -> np.ndarray:
        try:
            return references.load_frames(reference, plan.width, plan.height, max_frames, fps)
        except references.MediaReferenceError as e:
            raise references.MediaReferenceError(f"{field}: {e}") from None

    refs = [encoder.encode_frames(frames_of(f"elements.{i}", uri, 1))[:, 0] for i, uri in enumerate(plan.elements)]
    out = MediaLatents(refs=torch.stack(refs) if refs else torch.zeros(0, channels, plan.latent_height, plan.latent_width))
    if plan.input_reference is not None:
        out.video = encoder.encode_frames(frames_of("input_reference", plan.input_reference, 1))
    elif plan.input_video is not None:
        frames = frames_of("input_video", plan.input_video, plan.num_frames, fps=plan.fps)
        latents = min(1 + (frames.shape[0] - 1) // factor, plan.latent_frames - 1)
        out.video = encoder.encode_frames(frames[: 1 + factor * (latents - 1)])
    elif plan.mode == "audio":
        out.video = torch.zeros(channels, 1, plan.latent_height, plan.latent_width)
    if plan.input_audio is not None:
        if encoder.codec is None:
            raise ValueError("input_audio: this media encoder has no audio codec")
        try:
            wave = references.load_audio(plan.input_audio, encoder.codec.cfg.sample_rate)
        except references.MediaReferenceError as e:
            raise references.MediaReferenceError(f"input_audio: {e}") from None
        out.audio = encoder.encode_wave(wave, plan.audio_frames)
    if plan.physics is not None:
        motion = physics.plan_motion(plan)
        out.flow, out.layer, out.tracks, out.track_cells = motion.flow, motion.layer, motion.tracks, motion.track_cells
        out.collision_frames, out.audio_cues = list(motion.collision_frames), list(motion.audio_cues)
    return out


def initial_noise(plan: ScenePlan, video_channels: int, audio_channels: int, media_latents: MediaLatents | None = None):
    """Seeded noise, drawn on the CPU in a fixed order so every driver and TP degree sees the same.
    With a simulated scene, the video noise is carried along its flow (physics.warp_noise)."""
    g = torch.Generator().manual_seed(plan.seed)
    video = torch.randn(1, video_channels, plan.latent_frames, plan.latent_height, plan.latent_width, generator=g)
    audio = torch.randn(1, audio_channels, plan.audio_frames, generator=g)
    if media_latents is not None and media_latents.flow is not None:
        from .physics import warp_noise
        video = warp_noise(video[0], media_latents.flow, media_latents.layer)[None]
    return video, audio


def denoise_layout_spec(plan: ScenePlan, text: TextEmbeddings, voice: VoiceEmbeddings, media_latents: MediaLatents):
    """The token layout of one denoise call: which streams exist and which tokens are clean."""
    m = media_latents
    return plan.layout_spec(
        text.lengths, voices=voice.speakers.shape[0], refs=m.refs.shape[0],
        video_clean_frames=0 if m.video is None else m.video.shape[1], audio_clean=m.audio is not None,
        tracks=0 if m.tracks is None else m.tracks.shape[0], audio_cues=tuple(m.audio_cues),
        track_cells=() if m.track_cells is None else tuple(m.track_cells.flatten().tolist()))


@torch.inference_mode()
def denoise(backbone: OmniBackbone, plan: ScenePlan, text: TextEmbeddings, voice: VoiceEmbeddings,
            media_latents: MediaLatents, progress: ProgressFn | None = None,
            should_stop: StopFn | None = None) -> GeneratedLatents:
    device = next(backbone.parameters()).device
    dtype = next(backbone.parameters()).dtype
    cfg = backbone.cfg
    speakers = voice.speakers.reshape(voice.speakers.shape[0], cfg.speaker_dim)     # (V, speaker_dim)
    m = media_latents
    tracks = m.tracks if m.tracks is not None else torch.zeros(0, plan.latent_frames, cfg.track_dim)  # (N, T, f)
    prep = backbone.prepare(build_layout(denoise_layout_spec(plan, text, voice, m), cfg), device)
    names = None
    if text.characters:   # each bound character's name, pooled: (V, text_dim)
        names = torch.stack([mean_pool(c) for c in text.characters])[None].to(device, dtype)
    cond = ConditionTokens(
        captions=torch.cat(text.captions)[None].to(device, dtype),
        language=torch.tensor([language_index(plan.language)], device=device),
        voices=speakers[None].to(device, dtype),
        refs=m.refs[None].to(device, dtype),
        voice_names=names,
        tracks=tracks.flatten(0, 1)[None].to(device, dtype))
    video, audio = (x.to(device, dtype) for x in initial_noise(plan, cfg.video_channels, cfg.audio_channels, m))
    if m.video is not None:                       # clean leading latents: they never move
        video[:, :, :m.video.shape[1]] = m.video.to(device, dtype)
    if m.audio is not None:
        audio[:] = m.audio.to(device, dtype)
    video, audio = sample(backbone, video, audio, cond, prep, steps=plan.steps, shift=plan.shift,
                          guidance=Guidance(plan.guidance_video, plan.guidance_audio),
                          progress=progress, should_stop=should_stop)
    return GeneratedLatents(video=video[0].float().cpu(), audio=audio[0].float().cpu())


@torch.inference_mode()
def decode_video(vae: VideoVAE, plan: ScenePlan, latents: GeneratedLatents) -> EncodedStream:
    if plan.mode == "audio":
        return EncodedStream(b"", "video/none")
    param = next(vae.parameters())
    frames = vae.decode(latents.video[None].to(param.device, param.dtype))[0, :, :plan.num_frames]  # (3, T, H, W)
    pixels = media.video_to_uint8(frames.float().cpu())                                               # (T, H, W, 3)
    if plan.output == "image":
        return EncodedStream(media.encode_png(pixels[0]), "image/png")
    return EncodedStream(media.encode_video(pixels, plan.fps), "video/mp4")


def decode_audio(audio_decoder: AudioDecoder, plan: ScenePlan, latents: GeneratedLatents) -> EncodedStream:
    if plan.output == "image":
        return EncodedStream(b"", "audio/none")
    sample_rate = audio_decoder.codec.cfg.sample_rate
    if plan.input_audio is not None:              # audio-driven: the given soundtrack, as given
        from .references import load_audio
        wave = load_audio(plan.input_audio, sample_rate)[:plan.audio_samples]
        wave = np.pad(wave, (0, plan.audio_samples - wave.shape[0]))
    else:
        param = next(audio_decoder.codec.parameters())
        wave = audio_decoder(latents.audio[None].to(param.device, param.dtype))[0, :plan.audio_samples]
        wave = wave.float().cpu().numpy()
    return EncodedStream(media.encode_audio(wave.astype(np.float32), sample_rate), "audio/mp4")


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
    fn: Callable
    component: str | None         # which component the stage runs on (None: no model)
    inputs: tuple[str, ...]       # payload names, in fn's argument order after the component
    output: str
    resources: dict = field(default_factory=dict)   # what one replica / actor of the stage asks for
    takes_hooks: bool = False     # accepts progress= and should_stop=


STAGE_GRAPH: tuple[Stage, ...] = (
    Stage("encode_text", encode_text, "text_encoder", ("plan",), "text", {"CPU": 1}),
    Stage("encode_voice", encode_voice, "voices", ("plan",), "voice", {"CPU": 1}),
    Stage("encode_media", encode_media, "media_encoder", ("plan",), "media", {"CPU": 1}),
    Stage("denoise", denoise, "backbone", ("plan", "text", "voice", "media"), "latents", {"GPU": 1},
          takes_hooks=True),
    Stage("decode_video", decode_video, "vae", ("plan", "latents"), "video", {"GPU": 1}),
    Stage("decode_audio", decode_audio, "audio_decoder", ("plan", "latents"), "audio", {"CPU": 1}),
    Stage("mux", mux, None, ("plan", "video", "audio"), "artifact", {"CPU": 1}),
)


def run_stage(stage: Stage, components: dict, values: dict, progress: ProgressFn | None = None,
              should_stop: StopFn | None = None):
    """Call one stage with its component and inputs taken from `values`."""
    args = [values[name] for name in stage.inputs]
    if stage.component is not None:
        args.insert(0, components[stage.component])
    kwargs = {"progress": progress, "should_stop": should_stop} if stage.takes_hooks else {}
    return stage.fn(*args, **kwargs)


# which OmniModel parts (model/omni.py PARTS) each component is made of
COMPONENT_PARTS = {"text_encoder": (), "voices": (), "backbone": ("backbone",), "vae": ("vae",),
                   "media_encoder": ("vae", "audio_codec"), "audio_decoder": ("audio_codec",)}


def build_components(parts, config: ModelConfig, text_encoder, names=None, voices: str | None = None) -> dict:
    """The components stages run on, from loaded model parts (`parts[name]`: an OmniModel's children
    by name, or checkpoint.load_parts' dict); only `names` if given. `voices` is the voice
    registry's URI (default voices.default_voice_prefix())."""
    from .voices import VoiceRegistry

    makers = {
        "text_encoder": lambda: text_encoder,
        "voices": lambda: VoiceRegistry(voices),
        "backbone": lambda: parts["backbone"],
        "vae": lambda: parts["vae"],
        "media_encoder": lambda: MediaEncoder(parts["vae"], parts["audio_codec"]),
        "audio_decoder": lambda: AudioDecoder(parts["audio_codec"], Vocoder(config.audio)),
    }
    return {name: make() for name, make in makers.items() if names is None or name in names}


def load_components(checkpoint, names, device="cpu", voices: str | None = None) -> dict:
    """The named components from a checkpoint folder, loading only the model parts they are made of
    (a replica or pool actor that runs some stages loads just those); `voices` as in build_components."""
    from .checkpoint import load_parts, read_config
    from .model.text import build_text_encoder

    config = read_config(checkpoint)
    parts = load_parts(checkpoint, sorted({part for name in names for part in COMPONENT_PARTS[name]}), device)
    text_encoder = build_text_encoder(config.text) if "text_encoder" in names else None
    return build_components(parts, config, text_encoder, names, voices)


def close_components(components: dict) -> None:
    """Releases what components hold outside this process (a vLLM text encoder's engine)."""
    for component in components.values():
        close = getattr(component, "close", None)
        if close is not None:
            close()
