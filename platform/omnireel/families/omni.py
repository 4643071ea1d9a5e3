"""The omni family: OmniReel's own spacetime DiT (DESIGN.md §3) and its codecs, in one checkpoint folder
(config.json + model.safetensors, see checkpoint.py), and the family's halves of the stages.

Components: text_encoder (model/text.py), voices (the voice registry), media_encoder (video VAE +
audio codec encoders), backbone (an OmniDenoiser over the OmniBackbone), vae (the video decoder),
audio_decoder (audio codec + vocoder). The any-to-any choice is the per-token timestep rule:
encode_media returns the clean parts (reference latents, leading video latents, audio latents) and
the denoiser marks exactly those tokens clean; everything else is generated. An input_audio is
decoded once, in encode_media, which also hands decode_audio the soundtrack (MediaLatents.soundtrack).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import media
from ..canonical import canonical_json
from ..config import GenerationRequest
from ..model.audio import AudioCodec, MelSpectrogram, Vocoder
from ..model.backbone import ConditionTokens, OmniBackbone, PreparedLayout
from ..model.config import LANGUAGES, ModelConfig
from ..model.layout import build_layout
from ..model.sampler import (Guidance, euler_step, euler_update, guidance_rows, guide, noisy_masks,
                             shifted_sigmas)
from ..model.text import mean_pool
from ..model.vae import VideoVAE, to_pixels
from ..plan import PlanError, ScenePlan, ShotPlan, first_frame, language_index, shot_latent_starts, storyboard_shots
from ..stages import EncodedStream, GeneratedLatents, MediaLatents, TextEmbeddings, VoiceEmbeddings, mux
from .base import OPTIONAL_REQUEST_FIELDS, Family, FamilyLimits, bind_forward

# ---- components ------------------------------------------------------------------------------

@dataclass
class OmniMediaEncoder:
    """Reference media -> clean latents: the video VAE's encoder and the audio codec's."""
    vae: VideoVAE
    codec: AudioCodec | None

    @torch.inference_mode()
    def encode_frames(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 (T, H, W, 3), T = 1 + time_factor * k -> (C, 1 + k, H/8, W/8) latents."""
        param = next(self.vae.parameters())
        pixels = to_pixels(torch.from_numpy(frames))[None].to(param.device, param.dtype)   # (1, 3, T, H, W)
        return self.vae.encode(pixels)[0].float().cpu()

    @torch.inference_mode()
    def encode_wave(self, wave: np.ndarray, audio_frames: int) -> torch.Tensor:
        """float32 (S,) at the codec's rate -> (Ca, audio_frames) latents (silence pads a short wave)."""
        param = next(self.codec.parameters())
        mel = MelSpectrogram(self.codec.cfg).to(param.device).clip(torch.from_numpy(wave).to(param.device),
                                                                  audio_frames)      # (M, mel_frames)
        return self.codec.encode(mel[None].to(param.dtype))[0].float().cpu()


@dataclass
class OmniAudioDecoder:
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


def encode_media(encoder: OmniMediaEncoder, plan: ScenePlan) -> MediaLatents:
    """Elements -> clean ref latents; input_reference -> the clean first latent; input_video -> clean
    leading latents (as many whole latents as it covers, leaving at least one to generate);
    input_audio -> clean audio latents; mode "audio" -> one blank clean video latent; physics ->
    the simulated scene's motion conditioning (physics.py)."""
    from .. import physics, references

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
        sample_rate = encoder.codec.cfg.sample_rate
        try:
            wave = references.load_audio(plan.input_audio, sample_rate)          # (S,) float32: its one decode
        except references.MediaReferenceError as e:
            raise references.MediaReferenceError(f"input_audio: {e}") from None
        out.audio = encoder.encode_wave(wave, plan.audio_frames)
        kept = np.pad(wave[:plan.audio_samples], (0, max(0, plan.audio_samples - wave.shape[0])))
        out.soundtrack = media.encode_audio(kept.astype(np.float32), sample_rate)   # the output's, as given
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
        from ..physics import warp_noise
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
def decode_video(vae: VideoVAE, plan: ScenePlan, latents: GeneratedLatents) -> EncodedStream:
    if plan.mode == "audio":
        return EncodedStream(b"", "video/none")
    param = next(vae.parameters())
    frames = vae.decode(latents.video[None].to(param.device, param.dtype))[0, :, :plan.num_frames]  # (3, T, H, W)
    pixels = media.video_to_uint8(frames.float().cpu())                                               # (T, H, W, 3)
    if plan.output == "image":
        return EncodedStream(media.encode_png(pixels[0]), "image/png")
    return EncodedStream(media.encode_video(pixels, plan.fps), "video/mp4")


def decode_audio(audio_decoder: OmniAudioDecoder, plan: ScenePlan, latents: GeneratedLatents,
                 media_latents: MediaLatents) -> EncodedStream:
    """The generated audio; audio-driven, the given soundtrack as encode_media prepared it (the
    input audio is decoded once per job, there)."""
    if plan.output == "image":
        return EncodedStream(b"", "audio/none")
    if media_latents.soundtrack is not None:
        return EncodedStream(media_latents.soundtrack, "audio/mp4")
    param = next(audio_decoder.codec.parameters())
    wave = audio_decoder(latents.audio[None].to(param.device, param.dtype))[0, :plan.audio_samples]
    return EncodedStream(media.encode_audio(wave.float().cpu().numpy().astype(np.float32),
                                            audio_decoder.codec.cfg.sample_rate), "audio/mp4")




# ---- the denoiser (prepare / step / finish; the loop is the engine's, stages.denoise) ----------------

@dataclass
class OmniDenoiseState:
    """One job between steps: the latents being integrated and what every step reuses."""
    video: torch.Tensor                  # (1, C, T, h, w) noise, with the clean leading latents in place
    audio: torch.Tensor                  # (1, Ca, Ta)
    cond: ConditionTokens
    prep: PreparedLayout
    sigmas: torch.Tensor                 # (steps + 1,) float64, 1 -> 0
    guidance: Guidance
    video_noisy: torch.Tensor            # (1, 1, T, 1, 1): 0 where the video latent is clean
    audio_noisy: float                   # 0 when the audio is given clean
    steps: int
    done: int = 0

    @property
    def tokens(self) -> int:
        """Tokens of one step's model call: the layout's, once per CFG branch (what max_batch_tokens counts)."""
        return self.prep.layout.length * (2 if self.guidance.needs_uncond else 1)


class OmniDenoiser:
    """The `backbone` component of the omni family: an OmniBackbone (whole, or this rank's TP shard)."""

    def __init__(self, backbone: OmniBackbone):
        self.backbone = backbone
        self.cfg = backbone.cfg

    @property
    def module(self) -> OmniBackbone:
        """The model module (whole, or this rank's TP shard): what a host counts resident bytes of."""
        return self.backbone

    @torch.inference_mode()
    def prepare(self, plan: ScenePlan, text: TextEmbeddings, voice: VoiceEmbeddings,
                media_latents: MediaLatents) -> OmniDenoiseState:
        backbone, cfg = self.backbone, self.cfg
        device = next(backbone.parameters()).device
        dtype = next(backbone.parameters()).dtype
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
        video_noisy, audio_noisy = noisy_masks(video, prep.layout.spec)
        return OmniDenoiseState(video=video, audio=audio, cond=cond, prep=prep,
                                sigmas=shifted_sigmas(plan.steps, plan.shift),
                                guidance=Guidance(plan.guidance_video, plan.guidance_audio),
                                video_noisy=video_noisy, audio_noisy=audio_noisy, steps=plan.steps)

    @torch.inference_mode()
    def step(self, states: list[OmniDenoiseState], forward: Callable | None = None) -> None:
        """One Euler step (with CFG) of every state, the backbone called through `forward` (base.Denoiser).
        One state: OmniBackbone.forward on its rows (the LocalEngine path). Several: one
        forward_packed over all their rows (CFG branches included) packed into one varlen sequence,
        each state at its own sigma, guidance and layout; the states move only after the forward
        returns, so a failing forward leaves every state as it was."""
        if len(states) == 1:
            s = states[0]
            i = s.done
            s.video, s.audio = euler_step(bind_forward(forward, self.backbone), s.video, s.audio, float(s.sigmas[i]),
                                          float(s.sigmas[i + 1]), s.cond, s.prep, s.guidance, s.video_noisy,
                                          s.audio_noisy)
            s.done = i + 1
            return
        rows = [guidance_rows(s.video, s.audio, float(s.sigmas[s.done]), s.cond, s.prep, s.guidance) for s in states]
        velocities = bind_forward(forward, self.backbone.forward_packed)(rows)
        for s, (v_video, v_audio) in zip(states, velocities):
            i = s.done
            s.video, s.audio = euler_update(s.video, s.audio, *guide(v_video, v_audio, s.guidance), float(s.sigmas[i]),
                                            float(s.sigmas[i + 1]), s.video_noisy, s.audio_noisy)
            s.done = i + 1

    def finish(self, state: OmniDenoiseState) -> GeneratedLatents:
        return GeneratedLatents(video=state.video[0].float().cpu(), audio=state.audio[0].float().cpu())


# ---- planning ---------------------------------------------------------------------------------------

def plan_omni(request: GenerationRequest, config: ModelConfig) -> ScenePlan:
    """The omni frame rule (1 + n latents for 1 + time_factor * n frames), cut rule (shots on latent
    frames) and latent shapes."""
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
    starts = [0] if image else shot_latent_starts(shot_seconds, request.fps, latent_frames, vae.time_factor)
    ends = starts[1:] + [latent_frames]
    shot_captions = [s.prompt if not s.camera else f"{s.prompt} (camera: {s.camera})" for s in shots]
    if len(starts) == 1:   # one shot: a single global caption, no shot captions, no mask
        captions = (" ".join([request.prompt, *shot_captions]),)
        shot_captions = list(captions)
    else:
        captions = (request.prompt, *shot_captions)
    shot_plans = tuple(
        ShotPlan(index=i, caption=caption, latent_start=a, latent_end=b, frame_start=first_frame(a, vae.time_factor),
                 frame_end=num_frames if b == latent_frames else first_frame(b, vae.time_factor),
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
            request.physics.model_dump(mode="json")).decode(),
        frames_per_latent=vae.time_factor)


# ---- components -------------------------------------------------------------------------------

# which OmniModel parts (model/omni.py PARTS) each component is made of
COMPONENT_PARTS = {"text_encoder": (), "voices": (), "backbone": ("backbone",), "vae": ("vae",),
                   "media_encoder": ("vae", "audio_codec"), "audio_decoder": ("audio_codec",)}


def build_components(parts, config: ModelConfig, text_encoder, names=None, voices: str | None = None) -> dict:
    """The components stages run on, from loaded model parts (`parts[name]`: an OmniModel's children
    by name, or checkpoint.load_parts' dict); only `names` if given. `voices` is the voice
    registry's URI (default voices.default_voice_prefix())."""
    from ..voices import VoiceRegistry

    makers = {
        "text_encoder": lambda: text_encoder,
        "voices": lambda: VoiceRegistry(voices),
        "backbone": lambda: OmniDenoiser(parts["backbone"]),
        "vae": lambda: parts["vae"],
        "media_encoder": lambda: OmniMediaEncoder(parts["vae"], parts["audio_codec"]),
        "audio_decoder": lambda: OmniAudioDecoder(parts["audio_codec"], Vocoder(config.audio)),
    }
    return {name: make() for name, make in makers.items() if names is None or name in names}


def warmup_values(config: ModelConfig) -> dict:
    """A placeholder for every payload of the graph, shaped for the smallest request (one frame,
    32x32, one step), so each replica can run its stages once before it reports ready."""
    plan = plan_omni(GenerationRequest(prompt="warm-up", size="32x32", fps=8, seconds=0.125, steps=1), config)
    backbone, latent_channels = config.backbone, config.vae.latent_channels
    return {
        "plan": plan,
        "text": TextEmbeddings([torch.zeros(4, backbone.text_dim) for _ in plan.captions]),
        "voice": VoiceEmbeddings(torch.zeros(0, backbone.speaker_dim)),
        "media": MediaLatents(torch.zeros(0, latent_channels, plan.latent_height, plan.latent_width)),
        "latents": GeneratedLatents(
            video=torch.zeros(backbone.video_channels, plan.latent_frames, plan.latent_height, plan.latent_width),
            audio=torch.zeros(backbone.audio_channels, plan.audio_frames)),
    }


# ---- the family ---------------------------------------------------------------------------------

class OmniFamily(Family):
    name = "omni"
    limits = FamilyLimits(size_multiple=16,
                          frame_rule="1 + f*k, f the VAE's time factor (round(seconds * fps) rounded up, trimmed back)",
                          max_seconds=20.0, min_fps=1, max_fps=60, fields=frozenset(OPTIONAL_REQUEST_FIELDS),
                          languages=LANGUAGES)

    def read_config(self, checkpoint: Path) -> ModelConfig:
        from ..checkpoint import read_omni_config
        return read_omni_config(checkpoint)

    def digest(self, checkpoint: Path) -> str:
        from ..checkpoint import read_omni_digest
        return read_omni_digest(checkpoint)

    def plan(self, request: GenerationRequest, config: ModelConfig) -> ScenePlan:
        self.check_fields(request)
        return plan_omni(request, config)

    def load_components(self, checkpoint: Path, names, device="cpu", *, dtype: str | None = None,
                        voices: str | None = None) -> dict:
        """Only the model parts the named components are made of (a replica that runs some stages
        loads just those); `dtype` casts the model parts (default: as stored)."""
        from ..checkpoint import load_parts
        from ..model.text import build_text_encoder

        config = self.read_config(checkpoint)
        parts = load_parts(checkpoint, sorted({part for name in names for part in COMPONENT_PARTS[name]}), device)
        if dtype is not None:
            parts = {name: part.to(getattr(torch, dtype)) for name, part in parts.items()}
        text_encoder = build_text_encoder(config.text) if "text_encoder" in names else None
        return build_components(parts, config, text_encoder, names, voices)

    def load_backbone_shard(self, checkpoint: Path, mesh, device="cpu", dtype: torch.dtype | None = None) -> OmniDenoiser:
        """This rank's TP shard of the backbone (checkpoint.load_backbone_shard), as the denoiser."""
        from ..checkpoint import load_backbone_shard
        return OmniDenoiser(load_backbone_shard(checkpoint, mesh, device, dtype))

    def check_tp(self, config: ModelConfig, tp: int) -> None:
        from ..parallel.tp import check_tp_degree
        check_tp_degree(config.backbone, tp)

    def stage(self, name: str) -> Callable:
        return STAGES[name]

    def model_id(self, config: ModelConfig) -> str:
        return f"omnireel-{config.name}"      # the preset: omnireel-small, omnireel-tiny

    def warmup_values(self, config: ModelConfig) -> dict:
        return warmup_values(config)


STAGES = {"encode_text": encode_text, "encode_voice": encode_voice, "encode_media": encode_media,
          "decode_video": decode_video, "decode_audio": decode_audio, "mux": mux}
FAMILY = OmniFamily()
