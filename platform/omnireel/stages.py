"""The pipeline stages as plain functions over typed payloads, and the stage graph declared once.

A stage never knows which driver runs it (DESIGN.md §2). Each stage takes its model component
(or None) and its named inputs, and returns one payload. Drivers (LocalEngine, the Serve app, the
Ray Data pipeline) only map `STAGE_GRAPH`; none re-codes the flow.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import media
from .model.audio import AudioCodec, Vocoder
from .model.backbone import ConditionTokens, OmniBackbone
from .model.config import ModelConfig
from .model.layout import build_layout
from .model.sampler import Guidance, sample
from .model.vae import VideoVAE
from .plan import ScenePlan, language_index

ProgressFn = Callable[[int, int], None]
StopFn = Callable[[], bool]


# ---- payloads -------------------------------------------------------------------------------

@dataclass
class TextEmbeddings:
    captions: list[torch.Tensor]          # per caption (L_i, text_dim), in ScenePlan.captions order

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(c.shape[0] for c in self.captions)


@dataclass
class VoiceEmbeddings:
    speakers: torch.Tensor                # (V, speaker_dim), one per bound character


@dataclass
class MediaLatents:
    refs: torch.Tensor                    # (R, C, h, w) reference-image latents (clean)


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
    return TextEmbeddings(captions=text_encoder.encode(list(plan.captions)))


def encode_voice(plan: ScenePlan) -> VoiceEmbeddings:
    """Speaker embeddings of the bound characters (none yet: voice binding is its own issue)."""
    return VoiceEmbeddings(speakers=torch.zeros(0, 0))


def encode_media(vae: VideoVAE, plan: ScenePlan) -> MediaLatents:
    """Reference images -> clean latents (none yet: elements are their own issue)."""
    return MediaLatents(refs=torch.zeros(0, vae.cfg.latent_channels, plan.latent_height, plan.latent_width))


def initial_noise(plan: ScenePlan, video_channels: int, audio_channels: int):
    """Seeded noise, drawn on the CPU in a fixed order so every driver and TP degree sees the same."""
    g = torch.Generator().manual_seed(plan.seed)
    video = torch.randn(1, video_channels, plan.latent_frames, plan.latent_height, plan.latent_width, generator=g)
    audio = torch.randn(1, audio_channels, plan.audio_frames, generator=g)
    return video, audio


@torch.inference_mode()
def denoise(backbone: OmniBackbone, plan: ScenePlan, text: TextEmbeddings, voice: VoiceEmbeddings,
            media_latents: MediaLatents, progress: ProgressFn | None = None,
            should_stop: StopFn | None = None) -> GeneratedLatents:
    device = next(backbone.parameters()).device
    dtype = next(backbone.parameters()).dtype
    cfg = backbone.cfg
    speakers = voice.speakers.reshape(voice.speakers.shape[0], cfg.speaker_dim)     # (V, speaker_dim)
    spec = plan.layout_spec(text.lengths, voices=speakers.shape[0], refs=media_latents.refs.shape[0])
    prep = backbone.prepare(build_layout(spec, cfg), device)
    cond = ConditionTokens(
        captions=torch.cat(text.captions)[None].to(device, dtype),
        language=torch.tensor([language_index(plan.language)], device=device),
        voices=speakers[None].to(device, dtype),
        refs=media_latents.refs[None].to(device, dtype))
    video, audio = (x.to(device, dtype) for x in initial_noise(plan, cfg.video_channels, cfg.audio_channels))
    video, audio = sample(backbone, video, audio, cond, prep, steps=plan.steps, shift=plan.shift,
                          guidance=Guidance(plan.guidance_video, plan.guidance_audio),
                          progress=progress, should_stop=should_stop)
    return GeneratedLatents(video=video[0].float().cpu(), audio=audio[0].float().cpu())


@torch.inference_mode()
def decode_video(vae: VideoVAE, plan: ScenePlan, latents: GeneratedLatents) -> EncodedStream:
    param = next(vae.parameters())
    frames = vae.decode(latents.video[None].to(param.device, param.dtype))[0, :, :plan.num_frames]  # (3, T, H, W)
    pixels = media.video_to_uint8(frames.float().cpu())                                               # (T, H, W, 3)
    if plan.output == "image":
        return EncodedStream(media.encode_png(pixels[0]), "image/png")
    return EncodedStream(media.encode_video(pixels, plan.fps), "video/mp4")


def decode_audio(audio_decoder: AudioDecoder, plan: ScenePlan, latents: GeneratedLatents) -> EncodedStream:
    if plan.output == "image":
        return EncodedStream(b"", "audio/none")
    param = next(audio_decoder.codec.parameters())
    wave = audio_decoder(latents.audio[None].to(param.device, param.dtype))[0, :plan.audio_samples]
    sample_rate = audio_decoder.codec.cfg.sample_rate
    return EncodedStream(media.encode_audio(wave.float().cpu().numpy().astype(np.float32), sample_rate), "audio/mp4")


def mux(plan: ScenePlan, video: EncodedStream, audio: EncodedStream) -> EncodedStream:
    if plan.output == "image":
        return video
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
    Stage("encode_voice", encode_voice, None, ("plan",), "voice", {"CPU": 1}),
    Stage("encode_media", encode_media, "vae", ("plan",), "media", {"CPU": 1}),
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


def build_components(model, config: ModelConfig, text_encoder, names=None) -> dict:
    """The components stages run on, from a loaded OmniModel (only `names` if given)."""
    makers = {
        "text_encoder": lambda: text_encoder,
        "backbone": lambda: model.backbone,
        "vae": lambda: model.vae,
        "audio_decoder": lambda: AudioDecoder(model.audio_codec, Vocoder(config.audio)),
    }
    return {name: make() for name, make in makers.items() if names is None or name in names}
