"""The LTX-2 family: a diffusers `LTX2Pipeline` folder served through OmniReel's stages.

Every model is diffusers' or transformers' own class, loaded from its subfolder of the checkpoint;
what this module adds is the split of `LTX2Pipeline.__call__` into OmniReel's stages, computed the
way the pipeline computes it, so the result is the pipeline's for the same seed (DESIGN.md §3b):

    encode_text   Gemma 3 hidden states (LTX2Pipeline.encode_prompt) -> LTX2TextConnectors
    encode_voice  nothing (LTX-2 has no speaker conditioning): empty VoiceEmbeddings
    encode_media  input_reference -> the clean first latent frame, as LTX2ImageToVideoPipeline makes it
    denoise       LTX2Denoiser: the pipeline's noise, sigmas and guidance (CFG, STG, modality
                  isolation, guidance rescale) one sampler step at a time
    decode_video  video VAE -> H.264 MP4; decode_audio: audio VAE -> vocoder -> stereo AAC

Frames: LTX-2's causal video VAE makes 1 + 8k frames (its temporal compression is 8). A request
for round(seconds * fps) frames is generated at the next 1 + 8k count up (what LTX2Pipeline users
pass as num_frames) and the decoded frames are trimmed back; the audio latents follow the generated
count, as the pipeline computes them, and the waveform is trimmed to round(seconds * fps) / fps.

Latents in payloads are in the transformer's (normalized) space, unpacked: video (C, T, h, w), audio
(C, L, M) with M latent mel bins; the decoders denormalize them with their VAE's statistics.

Text payload (until TextEmbeddings has fields of its own for them): `captions` holds, per prompt,
its video-stream embeddings (L, Dv), audio-stream embeddings (L, Da) and connector attention mask
(L,) int64, in that order: first the prompt's, then (when CFG is on) the negative prompt's ("", the
pipeline's default). See TEXT_PARTS and text_parts().
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .base import FamilyLimits
from . import diffusers_folder
from .diffusers_folder import DiffusersFamily, encode_voice, meta_module, read_json
from .stacked_calls import run_stacked

NEGATIVE_PROMPT = ""                 # LTX2Pipeline.encode_prompt's default negative prompt
STG_BLOCK = 28                       # LTX2Pipeline's default spatio_temporal_guidance_blocks=[28]
TEXT_PARTS = ("video", "audio", "mask")
MAX_SECONDS = 10.0                   # what one replica is sized for (~241 frames at 24 fps, 768x512)


# ---- config ----------------------------------------------------------------------------------------

def pipeline_default(name: str):
    """The default of LTX2Pipeline.__call__'s argument `name`."""
    from diffusers import LTX2Pipeline
    return diffusers_folder.pipeline_default(LTX2Pipeline, name)


@dataclass(frozen=True)
class LTX2Guidance:
    """The guidance terms of LTX2Pipeline.__call__ (video, then audio), with its rules for when each runs."""
    guidance_scale: float              # CFG
    audio_guidance_scale: float
    stg_scale: float                   # spatio-temporal guidance (self-attention skipped at stg_blocks)
    audio_stg_scale: float
    modality_scale: float              # modality isolation guidance (a2v / v2a cross-attention off)
    audio_modality_scale: float
    guidance_rescale: float
    audio_guidance_rescale: float
    stg_blocks: tuple[int, ...]
    use_cross_timestep: bool

    @property
    def cfg(self) -> bool:
        return self.guidance_scale > 1.0 or self.audio_guidance_scale > 1.0

    @property
    def stg(self) -> bool:
        return self.stg_scale > 0.0 or self.audio_stg_scale > 0.0

    @property
    def modality(self) -> bool:
        return self.modality_scale > 1.0 or self.audio_modality_scale > 1.0

    @classmethod
    def pipeline_defaults(cls, num_layers: int) -> "LTX2Guidance":
        """LTX2Pipeline.__call__'s defaults. STG sits at block 28; a transformer with fewer blocks
        (where the pipeline's default would silently skip STG) gets its last block instead."""
        names = ("guidance_scale", "audio_guidance_scale", "stg_scale", "audio_stg_scale", "modality_scale",
                 "audio_modality_scale", "guidance_rescale", "audio_guidance_rescale", "use_cross_timestep")
        values = {name: pipeline_default(name) for name in names}
        block = STG_BLOCK if num_layers > STG_BLOCK else num_layers - 1
        return cls(stg_blocks=(block,), **values)

    def with_cfg(self, video: float, audio: float) -> "LTX2Guidance":
        from dataclasses import replace
        return replace(self, guidance_scale=video, audio_guidance_scale=audio)


@dataclass(frozen=True)
class LTX2Config:
    """What planning, loading and warm-up need from an LTX-2 folder (read from its configs; the
    compression ratios as diffusers computes them, from modules built on the meta device)."""
    pipeline: str                      # model_index.json _class_name
    # video VAE
    vae_spatial_compression: int       # 32 for LTX-2
    vae_temporal_compression: int      # 8: frames = 1 + 8k
    vae_latent_channels: int
    vae_timestep_conditioning: bool
    # transformer
    patch_size: int
    patch_size_t: int
    in_channels: int                   # packed video token width (C * patch_t * patch^2)
    audio_in_channels: int             # packed audio token width (C_audio * latent mel bins)
    num_layers: int
    num_attention_heads: int
    attention_head_dim: int
    audio_num_attention_heads: int
    audio_attention_head_dim: int
    caption_channels: int
    # text: Gemma 3 + connectors
    text_model_type: str               # the text encoder's model_type (picks the image CRF)
    video_text_dim: int                # connector output widths
    audio_text_dim: int
    max_sequence_length: int           # LTX2Pipeline's default (1024): prompts pad to it
    # audio
    audio_sample_rate: int             # the audio VAE's mel rate (16 kHz, hop 160: 100 mel frames/s)
    audio_hop_length: int
    audio_temporal_compression: int    # mel frames per latent (4)
    audio_mel_compression: int
    audio_mel_bins: int
    audio_latent_channels: int
    vocoder_sample_rate: int           # the waveform's rate (24 kHz for LTX-2)
    vocoder_channels: int              # 2: stereo
    # sampler
    scheduler: str                     # scheduler_config.json, canonical JSON
    default_steps: int
    default_fps: float
    guidance: LTX2Guidance
    family: str = "ltx2"

    @property
    def size_multiple(self) -> int:
        return LIMITS.size_multiple   # LTX2Pipeline.check_inputs: height and width divisible by 32

    @property
    def audio_latents_per_second(self) -> float:
        """As LTX2Pipeline computes it (25 for LTX-2)."""
        return self.audio_sample_rate / self.audio_hop_length / float(self.audio_temporal_compression)

    @property
    def latent_mel_bins(self) -> int:
        return self.audio_mel_bins // self.audio_mel_compression

    @property
    def scheduler_config(self) -> dict:
        return json.loads(self.scheduler)


def read_ltx2_config(folder: Path) -> LTX2Config:
    from diffusers import AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video

    folder = Path(folder)
    index = read_json(folder / "model_index.json")
    vae_config = read_json(folder / "vae" / "config.json")
    audio_config = read_json(folder / "audio_vae" / "config.json")
    transformer = read_json(folder / "transformer" / "config.json")
    connectors = read_json(folder / "connectors" / "config.json")
    vocoder = read_json(folder / "vocoder" / "config.json")
    text = read_json(folder / "text_encoder" / "config.json")
    scheduler = read_json(folder / "scheduler" / "scheduler_config.json")
    vae = meta_module(AutoencoderKLLTX2Video, vae_config)
    audio_vae = meta_module(AutoencoderKLLTX2Audio, audio_config)
    per_modality = connectors.get("per_modality_projections", False)
    caption_channels = connectors.get("caption_channels", transformer.get("caption_channels"))
    return LTX2Config(
        pipeline=index["_class_name"],
        vae_spatial_compression=vae.spatial_compression_ratio,
        vae_temporal_compression=vae.temporal_compression_ratio,
        vae_latent_channels=vae.config.latent_channels,
        vae_timestep_conditioning=bool(vae.config.timestep_conditioning),
        patch_size=transformer["patch_size"], patch_size_t=transformer["patch_size_t"],
        in_channels=transformer["in_channels"], audio_in_channels=transformer["audio_in_channels"],
        num_layers=transformer["num_layers"], num_attention_heads=transformer["num_attention_heads"],
        attention_head_dim=transformer["attention_head_dim"],
        audio_num_attention_heads=transformer["audio_num_attention_heads"],
        audio_attention_head_dim=transformer["audio_attention_head_dim"],
        caption_channels=transformer["caption_channels"],
        text_model_type=text.get("model_type", ""),
        video_text_dim=connectors["video_hidden_dim"] if per_modality else caption_channels,
        audio_text_dim=connectors["audio_hidden_dim"] if per_modality else caption_channels,
        max_sequence_length=pipeline_default("max_sequence_length"),
        audio_sample_rate=audio_vae.config.sample_rate, audio_hop_length=audio_vae.config.mel_hop_length,
        audio_temporal_compression=audio_vae.temporal_compression_ratio,
        audio_mel_compression=audio_vae.mel_compression_ratio, audio_mel_bins=audio_vae.config.mel_bins,
        audio_latent_channels=audio_vae.config.latent_channels,
        vocoder_sample_rate=vocoder["output_sampling_rate"], vocoder_channels=vocoder["out_channels"],
        scheduler=json.dumps(scheduler, sort_keys=True),
        default_steps=pipeline_default("num_inference_steps"), default_fps=pipeline_default("frame_rate"),
        guidance=LTX2Guidance.pipeline_defaults(transformer["num_layers"]))


# ---- planning ----------------------------------------------------------------------------------

LIMITS = FamilyLimits(size_multiple=32, frame_rule="1 + 8k (round(seconds * fps) rounded up, trimmed back)",
                      max_seconds=MAX_SECONDS, min_fps=8, max_fps=60, fields=frozenset({"input_reference"}))


def check_geometry(request, config: LTX2Config) -> None:
    """PlanError for a size, fps or length LTX-2 cannot make."""
    from ..plan import PlanError

    multiple = config.size_multiple
    if request.width % multiple or request.height % multiple:
        raise PlanError("size", f"{request.size}: LTX-2 needs width and height multiples of {multiple}")
    if not LIMITS.min_fps <= request.fps <= LIMITS.max_fps:
        raise PlanError("fps", f"{request.fps}: LTX-2 serves {LIMITS.min_fps} to {LIMITS.max_fps} fps")
    if request.seconds > LIMITS.max_seconds:
        raise PlanError("seconds", f"{request.seconds:g}: LTX-2 serves at most {LIMITS.max_seconds:g} seconds")
    if request.steps == 1 and config.scheduler_config.get("shift_terminal"):
        raise PlanError("steps", "1: LTX-2's scheduler stretches its sigmas to shift_terminal, which needs "
                                 "at least 2 steps (one step gives NaN sigmas)")


def plan_ltx2(request, config: LTX2Config):
    """GenerationRequest -> ScenePlan (family "ltx2"): one shot, 1 + 8k generated frames."""
    from ..plan import PlanError, ScenePlan, ShotPlan

    check_geometry(request, config)
    num_frames = round(request.seconds * request.fps)                      # kept after decoding
    factor = config.vae_temporal_compression
    latent_frames = 1 + math.ceil((num_frames - 1) / factor)
    generated_frames = 1 + factor * (latent_frames - 1)                    # LTX2Pipeline's num_frames
    if request.input_reference is not None and latent_frames < 2:
        raise PlanError("input_reference", f"needs at least {1 + factor} frames (round(seconds * fps) = "
                                           f"{num_frames}) to generate some after the given one")
    guidance = config.guidance
    return ScenePlan(
        output="video", captions=(request.prompt,), language=request.language, seed=request.seed,
        steps=request.steps or config.default_steps, shift=1.0,   # the sigma shift (mu) follows the token count
        guidance_video=guidance.guidance_scale if request.guidance_video is None else request.guidance_video,
        guidance_audio=guidance.audio_guidance_scale if request.guidance_audio is None else request.guidance_audio,
        fps=request.fps, width=request.width, height=request.height, num_frames=num_frames,
        latent_frames=latent_frames, latent_height=request.height // config.vae_spatial_compression,
        latent_width=request.width // config.vae_spatial_compression,
        audio_samples=round(num_frames / request.fps * config.vocoder_sample_rate),
        audio_frames=round(generated_frames / request.fps * config.audio_latents_per_second),
        shots=(ShotPlan(index=0, caption=request.prompt, latent_start=0, latent_end=latent_frames,
                        frame_start=0, frame_end=num_frames),),
        input_reference=request.input_reference, family="ltx2", frames_per_latent=factor)


# ---- loading -----------------------------------------------------------------------------------

def partial_pipeline(config: LTX2Config, **modules):
    """An LTX2Pipeline holding only `modules` (the rest None), with the geometry of the whole
    checkpoint, so its own helper methods (encode_prompt, prepare_latents, ...) run as in __call__."""
    from diffusers import LTX2Pipeline

    names = ("scheduler", "vae", "audio_vae", "text_encoder", "tokenizer", "connectors", "transformer", "vocoder")
    pipeline = LTX2Pipeline(**{name: modules.get(name) for name in names})
    pipeline.vae_spatial_compression_ratio = config.vae_spatial_compression
    pipeline.vae_temporal_compression_ratio = config.vae_temporal_compression
    pipeline.audio_vae_mel_compression_ratio = config.audio_mel_compression
    pipeline.audio_vae_temporal_compression_ratio = config.audio_temporal_compression
    pipeline.audio_sampling_rate = config.audio_sample_rate
    pipeline.audio_hop_length = config.audio_hop_length
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


# ---- components --------------------------------------------------------------------------------

@dataclass
class LTX2TextEncoder:
    """Gemma 3 (+ tokenizer) and the text connectors: prompt -> video / audio text embeddings."""
    pipeline: object                   # LTX2Pipeline with text_encoder, tokenizer, connectors
    config: LTX2Config

    @torch.inference_mode()
    def encode(self, prompt: str, negative: bool) -> list[torch.Tensor]:
        """[video (L, Dv), audio (L, Da), mask (L,)] of the prompt, then the negative prompt's if `negative`."""
        pipe = self.pipeline
        embeds, mask, negative_embeds, negative_mask = pipe.encode_prompt(
            prompt=prompt, negative_prompt=NEGATIVE_PROMPT, do_classifier_free_guidance=negative,
            max_sequence_length=self.config.max_sequence_length, device=pipe._execution_device)
        if negative:                                  # the pipeline's batch order: [negative, prompt]
            embeds, mask = torch.cat([negative_embeds, embeds]), torch.cat([negative_mask, mask])
        padding_side = getattr(pipe.tokenizer, "padding_side", "left")
        video, audio, mask = pipe.connectors(embeds, mask, padding_side=padding_side)  # (B, L, D), (B, L)
        rows = [[video[b], audio[b], mask[b]] for b in range(video.shape[0])]
        rows = rows[::-1]                             # prompt first, then the negative prompt
        return [t.float().cpu() if t.is_floating_point() else t.cpu() for row in rows for t in row]


@dataclass
class LTX2ImageEncoder:
    """The video VAE's encoder: input_reference -> the clean first latent (image-to-video)."""
    vae: object                        # AutoencoderKLLTX2Video
    config: LTX2Config

    @torch.inference_mode()
    def encode_image(self, image, width: int, height: int) -> torch.Tensor:
        """PIL image -> (C, 1, h, w) normalized latents, as LTX2ImageToVideoPipeline makes them
        (H.264 CRF re-compression, resize, VAE posterior mode, latents_mean / latents_std)."""
        from diffusers.pipelines.ltx2.pipeline_ltx2_image2video import LTX2ImageToVideoPipeline, retrieve_latents
        from diffusers.pipelines.ltx2.utils import apply_image_conditioning_crf
        from diffusers.video_processor import VideoProcessor
        import PIL.Image

        crf = image_crf(self.config)
        if crf != 0:
            image = PIL.Image.fromarray(apply_image_conditioning_crf(np.array(image.convert("RGB")), crf))
        processor = VideoProcessor(vae_scale_factor=self.config.vae_spatial_compression)
        pixels = processor.preprocess(image, height=height, width=width).to(self.vae.device, self.vae.dtype)
        latents = retrieve_latents(self.vae.encode(pixels[0][None, :, None]), None, "argmax")  # (1, C, 1, h, w)
        latents = LTX2ImageToVideoPipeline._normalize_latents(latents.float(), self.vae.latents_mean,
                                                              self.vae.latents_std)
        return latents[0].cpu()


def image_crf(config: LTX2Config) -> int:
    """The image-conditioning CRF LTX2ImageToVideoPipeline uses by default for this text encoder."""
    from types import SimpleNamespace

    from diffusers.pipelines.ltx2.utils import resolve_default_image_crf
    return resolve_default_image_crf(SimpleNamespace(config=SimpleNamespace(model_type=config.text_model_type)))


@dataclass
class LTX2VideoDecoder:
    """The video VAE's decoder (diffusers' tiled decode for frames over 512 px)."""
    vae: object                        # AutoencoderKLLTX2Video
    config: LTX2Config


@dataclass
class LTX2AudioDecoder:
    """The audio VAE's decoder and the vocoder: latents -> mel -> stereo waveform."""
    audio_vae: object                  # AutoencoderKLLTX2Audio
    vocoder: object                    # LTX2Vocoder
    config: LTX2Config


# ---- the stages --------------------------------------------------------------------------------

def text_parts(text, cfg: bool) -> dict:
    """TextEmbeddings (this module's list order) -> {"video", "audio", "mask"}: (B, L, D), (B, L, D), (B, L),
    batched as the pipeline batches them: B = 2 [negative, prompt] with CFG, else 1 [prompt]."""
    rows = [text.captions[i:i + len(TEXT_PARTS)] for i in range(0, len(text.captions), len(TEXT_PARTS))]
    if cfg and len(rows) < 2:
        raise ValueError("text: CFG is on but the text embeddings hold no negative prompt")
    rows = [rows[1], rows[0]] if cfg else rows[:1]
    return {name: torch.stack([row[k] for row in rows]) for k, name in enumerate(TEXT_PARTS)}


def encode_text(encoder: LTX2TextEncoder, plan):
    from ..stages import TextEmbeddings
    cfg = plan.guidance_video > 1.0 or plan.guidance_audio > 1.0
    return TextEmbeddings(captions=encoder.encode(plan.captions[0], negative=cfg))


def encode_media(encoder: LTX2ImageEncoder, plan):
    """input_reference -> MediaLatents.video (C, 1, h, w): the clean first latent frame."""
    import PIL.Image

    from .. import references
    from ..stages import MediaLatents

    out = MediaLatents(refs=torch.zeros(0, encoder.config.vae_latent_channels, plan.latent_height, plan.latent_width))
    if plan.input_reference is None:
        return out
    try:
        frame = references.load_frames(plan.input_reference, plan.width, plan.height, 1)[0]   # (H, W, 3) uint8
    except references.MediaReferenceError as e:
        raise references.MediaReferenceError(f"input_reference: {e}") from None
    out.video = encoder.encode_image(PIL.Image.fromarray(frame), plan.width, plan.height)
    return out


@torch.inference_mode()
def decode_frames(decoder: LTX2VideoDecoder, plan, latents) -> torch.Tensor:
    """Normalized video latents (C, T, h, w) -> frames (3, plan.num_frames, H, W) in [-1, 1]."""
    from diffusers import LTX2Pipeline

    vae = decoder.vae
    z = latents.video[None].to(vae.device, torch.float32)                              # (1, C, T, h, w)
    # the pipeline's decode_timestep (0.0) and decode_noise_scale (= decode_timestep): no noise is mixed in
    timestep = torch.tensor([0.0], device=vae.device) if decoder.config.vae_timestep_conditioning else None
    z = LTX2Pipeline._denormalize_latents(z, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
    frames = vae.decode(z.to(vae.dtype), timestep, return_dict=False)[0]               # (1, 3, F, H, W)
    return frames[0, :, :plan.num_frames].float().cpu()


def decode_video(decoder: LTX2VideoDecoder, plan, latents):
    from .. import media
    from ..stages import EncodedStream

    pixels = media.video_to_uint8(decode_frames(decoder, plan, latents))                # (T, H, W, 3)
    return EncodedStream(media.encode_video(pixels, plan.fps), "video/mp4")


@torch.inference_mode()
def decode_waveform(decoder: LTX2AudioDecoder, plan, latents) -> torch.Tensor:
    """Normalized audio latents (C, L, M) -> waveform (channels, plan.audio_samples) at the vocoder's
    rate (zero-padded at the end if the causal codec made fewer samples than the clip's length)."""
    from diffusers import LTX2Pipeline

    audio_vae, vocoder = decoder.audio_vae, decoder.vocoder
    z = latents.audio[None].to(audio_vae.device, torch.float32)                         # (1, C, L, M)
    frames, mel_bins = z.shape[2], z.shape[3]
    packed = LTX2Pipeline._pack_audio_latents(z)                                        # (1, L, C*M)
    packed = LTX2Pipeline._denormalize_audio_latents(packed, audio_vae.latents_mean, audio_vae.latents_std)
    z = LTX2Pipeline._unpack_audio_latents(packed, frames, num_mel_bins=mel_bins)
    mel = audio_vae.decode(z.to(audio_vae.dtype), return_dict=False)[0]                 # (1, 2, mel frames, bins)
    wave = vocoder(mel.to(vocoder.dtype))[0].float().cpu()                              # (channels, S)
    wave = wave[:, :plan.audio_samples]
    return torch.nn.functional.pad(wave, (0, plan.audio_samples - wave.shape[1]))


def decode_audio(decoder: LTX2AudioDecoder, plan, latents, media_latents=None):
    from .. import media
    from ..stages import EncodedStream

    wave = decode_waveform(decoder, plan, latents).numpy()                              # (channels, S)
    return EncodedStream(media.encode_audio(wave, decoder.config.vocoder_sample_rate), "audio/mp4")


def mux(plan, video, audio):
    from ..stages import mux as omnireel_mux
    return omnireel_mux(plan, video, audio)


STAGES = {"encode_text": encode_text, "encode_voice": encode_voice, "encode_media": encode_media,
          "decode_video": decode_video, "decode_audio": decode_audio, "mux": mux}


# ---- the denoiser ------------------------------------------------------------------------------

@dataclass
class LTX2DenoiseState:
    """One job between steps: packed latents, schedulers and what every step reuses (B = 2 with CFG)."""
    video: torch.Tensor                # (1, S_video, C * p_t * p * p) float32, packed
    audio: torch.Tensor                # (1, L, C_audio * M) float32, packed
    text: dict                         # video (B, Lt, Dv), audio (B, Lt, Da), mask (B, Lt)
    video_coords: torch.Tensor         # (B, 3, S_video, 2)
    audio_coords: torch.Tensor         # (B, 1, L, 2)
    video_scheduler: object            # per-state copies: diffusers schedulers count their steps
    audio_scheduler: object
    timesteps: torch.Tensor            # (steps,)
    guidance: LTX2Guidance
    latent_frames: int
    latent_height: int
    latent_width: int
    audio_frames: int
    fps: float
    clean_first_frame: torch.Tensor | None = None  # (1, S_video) 1 on the clean first latent (image-to-video)
    steps: int = 0
    done: int = 0

    @property
    def tokens(self) -> int:
        """Model tokens of one step (what a batching scheduler's max_batch_tokens counts): video +
        audio, once per row of its branches (2 + 1 + 1 with the pipeline's CFG, STG and modality)."""
        rows = sum(2 if b == "cond_uncond" and self.guidance.cfg else 1 for b in branches(self.guidance))
        return rows * (self.video.shape[1] + self.audio.shape[1])


def branch_inputs(s: LTX2DenoiseState, t: torch.Tensor, branch: str, dtype: torch.dtype) -> dict:
    """The transformer's arguments for one guidance branch: "cond_uncond" (the CFG batch, or the
    prompt alone), "stg" (self-attention skipped at the STG blocks), "modality" (a2v / v2a off)."""
    batched = branch == "cond_uncond" and s.guidance.cfg
    rows = slice(None) if batched or not s.guidance.cfg else slice(1, 2)   # the prompt's row of [neg, prompt]
    coords = slice(None) if batched or not s.guidance.cfg else slice(0, 1)
    repeat = 2 if batched else 1
    timestep = t.expand(repeat)                                                      # (B,)
    video_timestep = timestep
    if s.clean_first_frame is not None:                                              # (B, S_video)
        video_timestep = timestep.unsqueeze(-1) * (1 - s.clean_first_frame.repeat(repeat, 1))
    return dict(
        hidden_states=s.video.repeat(repeat, 1, 1).to(dtype),
        audio_hidden_states=s.audio.repeat(repeat, 1, 1).to(dtype),
        encoder_hidden_states=s.text["video"][rows], audio_encoder_hidden_states=s.text["audio"][rows],
        timestep=video_timestep, audio_timestep=timestep if s.clean_first_frame is not None else None,
        sigma=timestep, encoder_attention_mask=s.text["mask"][rows],
        audio_encoder_attention_mask=s.text["mask"][rows], num_frames=s.latent_frames,
        height=s.latent_height, width=s.latent_width, fps=s.fps, audio_num_frames=s.audio_frames,
        video_coords=s.video_coords[coords], audio_coords=s.audio_coords[coords],
        isolate_modalities=branch == "modality",
        spatio_temporal_guidance_blocks=list(s.guidance.stg_blocks) if branch == "stg" else None,
        perturbation_mask=None, use_cross_timestep=s.guidance.use_cross_timestep, attention_kwargs=None,
        return_dict=False)


BRANCHES = ("cond_uncond", "stg", "modality")


def branches(guidance: LTX2Guidance) -> tuple[str, ...]:
    """The transformer calls of one step, in the pipeline's order."""
    return tuple(b for b, on in zip(BRANCHES, (True, guidance.stg, guidance.modality)) if on)


class LTX2Denoiser:
    """The `backbone` component: LTX2VideoTransformer3DModel + the scheduler, stepping as LTX2Pipeline
    (text-to-video) and LTX2ImageToVideoPipeline (with a clean first latent) do."""

    def __init__(self, transformer, scheduler, config: LTX2Config, guidance: LTX2Guidance | None = None):
        self.transformer = transformer
        self.scheduler = scheduler
        self.config = config
        self.guidance = guidance or config.guidance    # CFG scales come from each plan
        self.pipeline = partial_pipeline(config, transformer=transformer, scheduler=scheduler)

    @property
    def module(self):
        """The model module (whole, or this rank's TP shard): what a host counts resident bytes of."""
        return self.transformer

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @torch.inference_mode()
    def prepare(self, plan, text, voice, media) -> LTX2DenoiseState:
        """The pipeline's noise (video, then audio, from one generator seeded with plan.seed), its
        sigma schedule with the token-count shift, and its RoPE coordinates."""
        guidance = self.guidance.with_cfg(plan.guidance_video, plan.guidance_audio)
        pipe, config, device = self.pipeline, self.config, self.device
        generator = torch.Generator().manual_seed(plan.seed)
        frames = plan.frame_count                                       # the pipeline's num_frames
        video = pipe.prepare_latents(1, config.in_channels, plan.height, plan.width, frames, 0.0, torch.float32,
                                     device, generator)                                  # (1, S_video, C)
        clean = None
        if media is not None and media.video is not None:   # image-to-video: the first latent stays clean
            video, clean = self.condition_first_frame(video, media.video, plan)
        audio = pipe.prepare_audio_latents(1, config.audio_latent_channels, plan.audio_frames, config.audio_mel_bins,
                                           0.0, torch.float32, device, generator)      # (1, L, C_audio * M)
        video_scheduler, audio_scheduler, timesteps = self.schedulers(plan.steps, video.shape[1], device)
        batch = 2 if guidance.cfg else 1
        video_coords = self.transformer.rope.prepare_video_coords(
            1, plan.latent_frames, plan.latent_height, plan.latent_width, device, fps=float(plan.fps))
        audio_coords = self.transformer.audio_rope.prepare_audio_coords(1, plan.audio_frames, device)
        parts = {name: t.to(device) for name, t in text_parts(text, guidance.cfg).items()}
        parts["video"], parts["audio"] = parts["video"].to(self.dtype), parts["audio"].to(self.dtype)
        return LTX2DenoiseState(
            video=video, audio=audio, text=parts,
            video_coords=video_coords.repeat((batch,) + (1,) * (video_coords.ndim - 1)),
            audio_coords=audio_coords.repeat((batch,) + (1,) * (audio_coords.ndim - 1)),
            video_scheduler=video_scheduler, audio_scheduler=audio_scheduler, timesteps=timesteps, guidance=guidance,
            latent_frames=plan.latent_frames, latent_height=plan.latent_height, latent_width=plan.latent_width,
            audio_frames=plan.audio_frames, fps=float(plan.fps), clean_first_frame=clean, steps=len(timesteps))

    def condition_first_frame(self, noise: torch.Tensor, first: torch.Tensor, plan):
        """LTX2ImageToVideoPipeline.prepare_latents' mix: the clean first latent, noise elsewhere.
        noise (1, S, C) packed, first (C, 1, h, w) normalized -> (latents (1, S, C), mask (1, S))."""
        pipe, p, pt = self.pipeline, self.config.patch_size, self.config.patch_size_t
        unpacked = pipe._unpack_latents(noise, plan.latent_frames, plan.latent_height, plan.latent_width, p, pt)
        init = first[None].to(noise.device, noise.dtype).repeat(1, 1, plan.latent_frames, 1, 1)
        mask = torch.zeros((1, 1, plan.latent_frames, plan.latent_height, plan.latent_width), device=noise.device)
        mask[:, :, 0] = 1.0
        latents = init * mask + unpacked * (1 - mask)
        return pipe._pack_latents(latents, p, pt), pipe._pack_latents(mask, p, pt).squeeze(-1)

    def schedulers(self, steps: int, video_tokens: int, device):
        """Two copies of the scheduler set as LTX2Pipeline sets them: sigmas linspace(1, 1/steps), mu
        from the video token count (calculate_shift), begin index 0. -> (video, audio, timesteps)."""
        from diffusers.pipelines.ltx2.pipeline_ltx2 import calculate_shift, retrieve_timesteps

        config = self.scheduler.config
        sigmas = np.linspace(1.0, 1 / steps, steps)
        mu = calculate_shift(video_tokens, config.get("base_image_seq_len", 1024),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.95),
                             config.get("max_shift", 2.05))
        video_scheduler, audio_scheduler = copy.deepcopy(self.scheduler), copy.deepcopy(self.scheduler)
        retrieve_timesteps(audio_scheduler, steps, device, None, sigmas=sigmas, mu=mu)
        timesteps, _ = retrieve_timesteps(video_scheduler, steps, device, None, sigmas=sigmas, mu=mu)
        video_scheduler.set_begin_index(0)
        audio_scheduler.set_begin_index(0)
        return video_scheduler, audio_scheduler, timesteps

    @torch.inference_mode()
    def step(self, states: list[LTX2DenoiseState], forward: Callable | None = None) -> None:
        """One sampler step of every state, the transformer called through `forward` (base.Denoiser).
        Each state's branches (CFG batch, STG, modality) are its calls; the calls of all states that
        agree in branch and token shape (video, audio, text length) run as one, their rows stacked on
        the batch dimension (stacked_calls.run_stacked), each state with its own timestep per row;
        then every state guides and steps on its own rows. One state: its branches' calls as before."""
        calls = [[self.model_inputs(s, s.timesteps[s.done], b) for b in branches(s.guidance)] for s in states]
        predictions = iter(run_stacked(forward, [(self.transformer, kwargs) for per in calls for kwargs in per]))
        for s, per in zip(states, calls):
            self.advance(s, [next(predictions) for _ in per])

    def model_inputs(self, s: LTX2DenoiseState, t: torch.Tensor, branch: str) -> dict:
        return branch_inputs(s, t, branch, self.dtype)

    def to_x0(self, s: LTX2DenoiseState, prediction) -> tuple[torch.Tensor, torch.Tensor]:
        """One branch's velocities -> x0 predictions (video, audio), float32: (B, S, C) each, B = 2
        [negative, prompt] for the CFG batch (x0 = latents - velocity * sigma is elementwise)."""
        i, pipe = s.done, self.pipeline
        video, audio = (v.float() for v in prediction)
        rows = video.shape[0]
        return (pipe.convert_velocity_to_x0(s.video.repeat(rows, 1, 1), video, i, s.video_scheduler),
                pipe.convert_velocity_to_x0(s.audio.repeat(rows, 1, 1), audio, i, s.audio_scheduler))

    def advance(self, s: LTX2DenoiseState, predictions: list[tuple]) -> None:
        """LTX2Pipeline's loop body from the branches' predictions (video, audio) in branches() order:
        x0-space guidance deltas, rescale, back to velocity, Euler step."""
        from diffusers.pipelines.ltx2.pipeline_ltx2 import rescale_noise_cfg

        g, i, pipe = s.guidance, s.done, self.pipeline
        t = s.timesteps[i]
        names = branches(g)
        x0 = {name: self.to_x0(s, p) for name, p in zip(names, predictions)}
        video_x0, audio_x0 = x0["cond_uncond"]
        video_cfg = audio_cfg = video_stg = audio_stg = video_iso = audio_iso = 0   # the pipeline's deltas
        if g.cfg:
            video_uncond, video_x0 = video_x0.chunk(2)
            audio_uncond, audio_x0 = audio_x0.chunk(2)
            video_cfg = (g.guidance_scale - 1) * (video_x0 - video_uncond)
            audio_cfg = (g.audio_guidance_scale - 1) * (audio_x0 - audio_uncond)
        if g.stg:
            video_perturbed, audio_perturbed = x0["stg"]
            video_stg = g.stg_scale * (video_x0 - video_perturbed)
            audio_stg = g.audio_stg_scale * (audio_x0 - audio_perturbed)
        if g.modality:
            video_isolated, audio_isolated = x0["modality"]
            video_iso = (g.modality_scale - 1) * (video_x0 - video_isolated)
            audio_iso = (g.audio_modality_scale - 1) * (audio_x0 - audio_isolated)
        video_guided = video_x0 + video_cfg + video_stg + video_iso      # summed in the pipeline's order
        audio_guided = audio_x0 + audio_cfg + audio_stg + audio_iso
        if g.guidance_rescale > 0:
            video_guided = rescale_noise_cfg(video_guided, video_x0, guidance_rescale=g.guidance_rescale)
        if g.audio_guidance_rescale > 0:
            audio_guided = rescale_noise_cfg(audio_guided, audio_x0, guidance_rescale=g.audio_guidance_rescale)
        s.video = self.video_update(s, video_guided, t)
        audio_velocity = pipe.convert_x0_to_velocity(s.audio, audio_guided, i, s.audio_scheduler)
        s.audio = s.audio_scheduler.step(audio_velocity, t, s.audio, return_dict=False)[0]
        s.done = i + 1

    def video_update(self, s: LTX2DenoiseState, video_x0: torch.Tensor, t) -> torch.Tensor:
        """The Euler step of the video latents; with a clean first latent, only the later ones move
        (LTX2ImageToVideoPipeline steps the unpacked latents [:, :, 1:])."""
        pipe, i = self.pipeline, s.done
        if s.clean_first_frame is None:
            velocity = pipe.convert_x0_to_velocity(s.video, video_x0, i, s.video_scheduler)
            return s.video_scheduler.step(velocity, t, s.video, return_dict=False)[0]
        p, pt = self.config.patch_size, self.config.patch_size_t
        shape = (s.latent_frames, s.latent_height, s.latent_width, p, pt)
        x0, latents = pipe._unpack_latents(video_x0, *shape), pipe._unpack_latents(s.video, *shape)
        velocity = pipe.convert_x0_to_velocity(latents, x0, i, s.video_scheduler)
        moved = s.video_scheduler.step(velocity[:, :, 1:], t, latents[:, :, 1:], return_dict=False)[0]
        return pipe._pack_latents(torch.cat([latents[:, :, :1], moved], dim=2), p, pt)

    def finish(self, s: LTX2DenoiseState):
        """GeneratedLatents: video (C, T, h, w), audio (C_audio, L, M), normalized, float32 on the CPU."""
        from ..stages import GeneratedLatents

        pipe, config = self.pipeline, self.config
        video = pipe._unpack_latents(s.video, s.latent_frames, s.latent_height, s.latent_width,
                                     config.patch_size, config.patch_size_t)             # (1, C, T, h, w)
        audio = pipe._unpack_audio_latents(s.audio, s.audio_frames, num_mel_bins=config.latent_mel_bins)
        return GeneratedLatents(video=video[0].float().cpu(), audio=audio[0].float().cpu())


# ---- FLOPs (for benchmarks/backbone.py) ------------------------------------------------------------

def meta_transformer(transformer_config: dict | None = None):
    """LTX2VideoTransformer3DModel on the meta device: `transformer_config` (a transformer/config.json),
    else the class defaults, which are LTX-2's (48 layers, 32 x 128 video heads, 32 x 64 audio heads, 19B)."""
    from diffusers import LTX2VideoTransformer3DModel
    with torch.device("meta"):
        if transformer_config is None:
            return LTX2VideoTransformer3DModel()
        return LTX2VideoTransformer3DModel.from_config(transformer_config)


def synthetic_step_state(transformer, *, width: int = 768, height: int = 512, frames: int = 121, fps: float = 24.0,
                         guidance: LTX2Guidance | None = None, text_tokens: int = 1024, spatial_compression: int = 32,
                         temporal_compression: int = 8, audio_latents_per_second: float = 25.0) -> LTX2DenoiseState:
    """A denoise state of zeros at this geometry on the transformer's device (meta included): what one
    step's branch inputs are shaped like, without a text encoder or a scheduler. Text: LTX-2.0
    connectors (caption_channels wide, text_tokens long)."""
    config = transformer.config
    guidance = guidance or LTX2Guidance.pipeline_defaults(config.num_layers)
    latent_frames = (frames - 1) // temporal_compression + 1
    latent_h, latent_w = height // spatial_compression, width // spatial_compression
    audio_frames = round(frames / fps * audio_latents_per_second)
    rows, device = 2 if guidance.cfg else 1, transformer.device
    text = {"video": torch.zeros(rows, text_tokens, config.caption_channels, device=device, dtype=transformer.dtype),
            "audio": torch.zeros(rows, text_tokens, config.caption_channels, device=device, dtype=transformer.dtype),
            "mask": torch.ones(rows, text_tokens, dtype=torch.int64, device=device)}
    video_coords = transformer.rope.prepare_video_coords(rows, latent_frames, latent_h, latent_w, device, fps=fps)
    audio_coords = transformer.audio_rope.prepare_audio_coords(rows, audio_frames, device)
    return LTX2DenoiseState(
        video=torch.zeros(1, latent_frames * latent_h * latent_w, config.in_channels, device=device),
        audio=torch.zeros(1, audio_frames, config.audio_in_channels, device=device), text=text,
        video_coords=video_coords, audio_coords=audio_coords, video_scheduler=None, audio_scheduler=None,
        timesteps=torch.ones(1, device=device), guidance=guidance, latent_frames=latent_frames,
        latent_height=latent_h, latent_width=latent_w, audio_frames=audio_frames, fps=fps, steps=1)


def run_branches(transformer, state: LTX2DenoiseState, on_branch=None) -> None:
    """The transformer calls of one step of `state` (its guidance's branches), under inference mode;
    `on_branch(name)` is a context manager around each (a FLOP counter, a timer)."""
    from contextlib import nullcontext

    for branch in branches(state.guidance):
        with torch.inference_mode(), (on_branch(branch) if on_branch else nullcontext()):
            transformer(**branch_inputs(state, state.timesteps[0], branch, transformer.dtype))


def step_flops(transformer, **geometry) -> dict[str, int]:
    """FLOPs (torch.utils.flop_counter: matmuls and attention) of one LTX2Denoiser step at the
    geometry of synthetic_step_state(**geometry), counted per branch, so on meta tensors the real
    19B model costs no memory. -> {"cond_uncond": ..., "stg": ..., "modality": ..., "step": their sum}
    (only the branches the guidance runs; default: the pipeline's, CFG + STG + modality)."""
    from contextlib import contextmanager

    from torch.utils.flop_counter import FlopCounterMode

    counts = {}

    @contextmanager
    def count(branch):
        with FlopCounterMode(display=False) as counter:
            yield
        counts[branch] = counter.get_total_flops()

    run_branches(transformer, synthetic_step_state(transformer, **geometry), count)
    counts["step"] = sum(counts.values())
    return counts


# ---- the family --------------------------------------------------------------------------------

def warmup_values(config: LTX2Config) -> dict:
    """A placeholder for every payload, shaped for the smallest request (64x64, 1 + 8 frames, 2 steps)."""
    from ..config import GenerationRequest
    from ..stages import GeneratedLatents, MediaLatents, TextEmbeddings, VoiceEmbeddings

    fps = 24
    request = GenerationRequest(prompt="warm-up", size="64x64", fps=fps,
                                seconds=(1 + config.vae_temporal_compression) / fps, steps=2)
    plan = plan_ltx2(request, config)
    length = config.max_sequence_length
    rows = 2 if plan.guidance_video > 1 or plan.guidance_audio > 1 else 1
    text = [torch.zeros(length, config.video_text_dim), torch.zeros(length, config.audio_text_dim),
            torch.ones(length, dtype=torch.int64)] * rows
    latent = (plan.latent_height, plan.latent_width)
    return {
        "plan": plan,
        "text": TextEmbeddings(captions=text),
        "voice": VoiceEmbeddings(speakers=torch.zeros(0, 0)),
        "media": MediaLatents(refs=torch.zeros(0, config.vae_latent_channels, *latent)),
        "latents": GeneratedLatents(
            video=torch.zeros(config.vae_latent_channels, plan.latent_frames, *latent),
            audio=torch.zeros(config.audio_latent_channels, plan.audio_frames, config.latent_mel_bins)),
    }


class LTX2Family(DiffusersFamily):
    name = "ltx2"
    limits = LIMITS
    stages = STAGES

    def read_config(self, checkpoint: Path) -> LTX2Config:
        return read_ltx2_config(Path(checkpoint))

    def plan_folder(self, request, config: LTX2Config):
        return plan_ltx2(request, config)

    def component_makers(self, config: LTX2Config, part) -> dict:
        def video_decoder():
            vae = part("vae")
            vae.enable_tiling()     # diffusers' tiles: only frames over 512 px are split
            return LTX2VideoDecoder(vae, config)

        return {
            "text_encoder": lambda: LTX2TextEncoder(partial_pipeline(
                config, text_encoder=part("text_encoder"), tokenizer=part("tokenizer"),
                connectors=part("connectors")), config),
            "voices": lambda: None,
            "media_encoder": lambda: LTX2ImageEncoder(part("vae"), config),
            "backbone": lambda: LTX2Denoiser(part("transformer"), part("scheduler"), config),
            "vae": video_decoder,
            "audio_decoder": lambda: LTX2AudioDecoder(part("audio_vae"), part("vocoder"), config),
        }

    def load_backbone_shard(self, checkpoint: Path, mesh, device="cpu", dtype: torch.dtype | None = None) -> LTX2Denoiser:
        """This rank's TP shard of the transformer, read by slice (parallel/tp_ltx2.py), as the denoiser."""
        from ..parallel.tp_ltx2 import load_ltx2_backbone_shard
        return load_ltx2_backbone_shard(Path(checkpoint), mesh, device, dtype)

    def check_tp(self, config: LTX2Config, tp: int) -> None:
        from ..parallel.tp_ltx2 import check_tp_degree_ltx2
        check_tp_degree_ltx2(config, tp)

    def warmup_values(self, config: LTX2Config) -> dict:
        return warmup_values(config)


FAMILY = LTX2Family()
