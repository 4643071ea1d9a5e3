"""The Wan family (Wan 2.1 / 2.2, video only): a diffusers `WanPipeline` or `WanImageToVideoPipeline`
folder served through OmniReel's stages.

Every model is diffusers' or transformers' own class (WanTransformer3DModel, AutoencoderKLWan,
UMT5EncoderModel, CLIPVisionModel, the folder's scheduler), loaded from its subfolder; this module
splits the pipeline's `__call__` into OmniReel's stages, computed the way the pipeline computes them,
so the result is the pipeline's for the same seed (DESIGN.md §3b):

    encode_text   UMT5 last hidden states, zero-padded to 512 tokens (WanPipeline.encode_prompt)
    encode_voice  nothing (Wan has no speaker conditioning): empty VoiceEmbeddings
    encode_media  input_reference -> the I2V condition, as WanImageToVideoPipeline.prepare_latents makes it
                  (Wan 2.1 / 2.2 A14B I2V: mask + VAE latents of [image, zeros]; TI2V-5B: the clean first
                  latent) and, for Wan 2.1 I2V, the CLIP image tokens (WanImageToVideoPipeline.encode_image)
    denoise       WanDenoiser: the pipeline's noise, scheduler and CFG one sampler step at a time; Wan 2.2
                  A14B's high-noise `transformer` for t >= boundary_ratio * num_train_timesteps, then
                  `transformer_2` (both experts live on the backbone host, see WanDenoiser)
    decode_video  AutoencoderKLWan -> H.264 MP4;  decode_audio: an empty stream;  mux: the video alone

Frames: the causal VAE makes 1 + 4k frames. A request for round(seconds * fps) frames is generated at
the next 1 + 4k count up and the decoded frames are trimmed back. Latents in payloads are the pipeline's
(its output_type="latent"): video (C, T, h, w); the decoder applies the VAE's latents_mean / latents_std.

Payloads: `TextEmbeddings.captions` holds the prompt's (512, text_dim) embeddings, then (with CFG) the
negative prompt's ("", the pipeline's default). `MediaLatents.video` holds the I2V condition (C', T', h, w)
and, until MediaLatents has a field for image tokens, `MediaLatents.refs` holds Wan 2.1 I2V's CLIP image
tokens as (1, L_image, image_dim) (else it is empty).
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .base import FamilyLimits
from . import diffusers_folder
from .diffusers_folder import DiffusersFamily, encode_voice, meta_module, read_json
from .stacked_calls import run_stacked

NEGATIVE_PROMPT = ""                 # WanPipeline.encode_prompt's default negative prompt
MAX_SECONDS = 10.0                   # what one replica is sized for (161 frames at 16 fps, 1280x720)
PIPELINE_MULTIPLE = 16               # WanPipeline.check_inputs: height and width divisible by 16


def pipeline_default(name: str):
    """The default of WanPipeline.__call__'s argument `name`."""
    from diffusers import WanPipeline
    return diffusers_folder.pipeline_default(WanPipeline, name)


# ---- config ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WanConfig:
    """What planning, loading and warm-up need from a Wan folder (read from its configs; the VAE's
    compression from AutoencoderKLWan built on the meta device, so its defaults count)."""
    pipeline: str                      # model_index.json _class_name
    vae_spatial_compression: int       # 8 (Wan 2.1, 2.2 A14B); 16 (TI2V-5B)
    vae_temporal_compression: int      # 4: frames = 1 + 4k
    vae_latent_channels: int           # z_dim: 16; 48 (TI2V-5B)
    patch_size: tuple[int, int, int]   # the transformer's (t, h, w) patch
    in_channels: int                   # 16 (T2V), 36 (I2V: 4 mask + 16 condition + 16 noise), 48 (TI2V-5B)
    num_layers: int
    num_attention_heads: int
    attention_head_dim: int
    ffn_dim: int
    text_dim: int                      # UMT5's width (4096)
    image_dim: int | None              # CLIP image tokens' width (Wan 2.1 I2V: 1280), else None
    experts: int                       # 2: Wan 2.2 A14B (transformer, transformer_2)
    boundary_ratio: float | None
    expand_timesteps: bool             # TI2V-5B: a timestep per token
    num_train_timesteps: int
    max_sequence_length: int           # WanPipeline's default (512): prompts pad to it
    scheduler: str                     # scheduler_config.json, canonical JSON
    default_steps: int
    default_guidance: float
    default_fps: int = 16              # Wan's frame rate (diffusers' examples export at 16)
    family: str = "wan"

    @property
    def size_multiple(self) -> int:
        """check_inputs' 16 and the patchification's VAE x patch (WanPipeline.__call__ rounds down otherwise)."""
        _, p_h, p_w = self.patch_size
        return math.lcm(PIPELINE_MULTIPLE, self.vae_spatial_compression * p_h, self.vae_spatial_compression * p_w)

    @property
    def takes_image(self) -> bool:
        """Whether input_reference can be honored: an I2V folder, or TI2V-5B (expand_timesteps)."""
        return self.pipeline == "WanImageToVideoPipeline" or self.expand_timesteps

    @property
    def needs_image(self) -> bool:
        """An I2V folder's transformer takes the image condition on its input channels: it always needs one."""
        return self.pipeline == "WanImageToVideoPipeline"

    @property
    def boundary_timestep(self) -> float | None:
        """Where Wan 2.2 A14B switches experts, as WanPipeline computes it."""
        if self.experts < 2 or self.boundary_ratio is None:
            return None
        return self.boundary_ratio * self.num_train_timesteps

    @property
    def scheduler_config(self) -> dict:
        return json.loads(self.scheduler)


def read_wan_config(folder: Path) -> WanConfig:
    from diffusers import AutoencoderKLWan

    folder = Path(folder)
    index = read_json(folder / "model_index.json")
    transformer = read_json(folder / "transformer" / "config.json")
    scheduler = read_json(folder / "scheduler" / "scheduler_config.json")
    vae = meta_module(AutoencoderKLWan, read_json(folder / "vae" / "config.json"))
    has_second = (index.get("transformer_2") or [None])[0] is not None
    return WanConfig(
        pipeline=index["_class_name"],
        vae_spatial_compression=vae.config.scale_factor_spatial,
        vae_temporal_compression=vae.config.scale_factor_temporal, vae_latent_channels=vae.config.z_dim,
        patch_size=tuple(transformer["patch_size"]), in_channels=transformer["in_channels"],
        num_layers=transformer["num_layers"], num_attention_heads=transformer["num_attention_heads"],
        attention_head_dim=transformer["attention_head_dim"], ffn_dim=transformer["ffn_dim"],
        text_dim=transformer["text_dim"], image_dim=transformer.get("image_dim"),
        experts=2 if has_second else 1, boundary_ratio=index.get("boundary_ratio"),
        expand_timesteps=bool(index.get("expand_timesteps", False)),
        num_train_timesteps=scheduler.get("num_train_timesteps", 1000),
        max_sequence_length=pipeline_default("max_sequence_length"),
        scheduler=json.dumps(scheduler, sort_keys=True),
        default_steps=pipeline_default("num_inference_steps"), default_guidance=pipeline_default("guidance_scale"))


# ---- planning ----------------------------------------------------------------------------------

LIMITS = FamilyLimits(size_multiple=PIPELINE_MULTIPLE, frame_rule="1 + 4k (round(seconds * fps) rounded up, trimmed back)",
                      max_seconds=MAX_SECONDS, min_fps=8, max_fps=30, fields=frozenset({"input_reference"}),
                      modalities=("video",))


def check_geometry(request, config: WanConfig) -> None:
    """PlanError for a size, fps or length Wan cannot make, or an image the checkpoint cannot take."""
    from ..plan import PlanError

    multiple = config.size_multiple
    if request.width % multiple or request.height % multiple:
        raise PlanError("size", f"{request.size}: this Wan checkpoint needs width and height multiples of {multiple}")
    if not LIMITS.min_fps <= request.fps <= LIMITS.max_fps:
        raise PlanError("fps", f"{request.fps}: Wan serves {LIMITS.min_fps} to {LIMITS.max_fps} fps")
    if request.seconds > LIMITS.max_seconds:
        raise PlanError("seconds", f"{request.seconds:g}: Wan serves at most {LIMITS.max_seconds:g} seconds")
    if request.input_reference is None and config.needs_image:
        raise PlanError("input_reference", f"required: this checkpoint is a {config.pipeline} (image-to-video)")
    if request.input_reference is not None and not config.takes_image:
        raise PlanError("input_reference", f"not supported by this text-to-video Wan checkpoint ({config.pipeline}); "
                                           "serve an image-to-video (or TI2V) one")


def plan_wan(request, config: WanConfig):
    """GenerationRequest -> ScenePlan (family "wan"): one shot, 1 + 4k generated frames, no audio."""
    from ..plan import ScenePlan, ShotPlan

    check_geometry(request, config)
    num_frames = round(request.seconds * request.fps)                      # kept after decoding
    factor = config.vae_temporal_compression
    latent_frames = 1 + math.ceil((num_frames - 1) / factor)
    spatial = config.vae_spatial_compression
    return ScenePlan(
        output="video", captions=(request.prompt,), language=request.language, seed=request.seed,
        steps=request.steps or config.default_steps, shift=1.0,           # the scheduler's flow_shift applies
        guidance_video=config.default_guidance if request.guidance_video is None else request.guidance_video,
        guidance_audio=1.0, fps=request.fps, width=request.width, height=request.height, num_frames=num_frames,
        latent_frames=latent_frames, latent_height=request.height // spatial, latent_width=request.width // spatial,
        audio_samples=0, audio_frames=0,
        shots=(ShotPlan(index=0, caption=request.prompt, latent_start=0, latent_end=latent_frames,
                        frame_start=0, frame_end=num_frames),),
        input_reference=request.input_reference, family="wan", frames_per_latent=factor)


def uses_cfg(plan) -> bool:
    return plan.guidance_video > 1.0     # WanPipeline.do_classifier_free_guidance


# ---- loading -----------------------------------------------------------------------------------

def partial_pipeline(config: WanConfig, **modules):
    """A WanPipeline (or WanImageToVideoPipeline for image modules) holding only `modules` (the rest
    None), with the whole checkpoint's config, so its own helper methods run as in __call__."""
    from diffusers import WanImageToVideoPipeline, WanPipeline

    image = config.takes_image and ("image_encoder" in modules or "vae" in modules)
    cls = WanImageToVideoPipeline if image else WanPipeline
    names = ["tokenizer", "text_encoder", "vae", "scheduler", "transformer", "transformer_2"]
    if cls is WanImageToVideoPipeline:
        names += ["image_processor", "image_encoder"]
    pipeline = cls(**{name: modules.get(name) for name in names}, boundary_ratio=config.boundary_ratio,
                   expand_timesteps=config.expand_timesteps)
    pipeline.vae_scale_factor_spatial = config.vae_spatial_compression
    pipeline.vae_scale_factor_temporal = config.vae_temporal_compression
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


# ---- components --------------------------------------------------------------------------------

@dataclass
class WanTextEncoder:
    """UMT5 (+ tokenizer): prompt -> (512, text_dim) embeddings, zero past the prompt's tokens."""
    pipeline: object                   # WanPipeline with text_encoder, tokenizer
    config: WanConfig

    @torch.inference_mode()
    def encode(self, prompt: str, negative: bool) -> list[torch.Tensor]:
        """[prompt (L, D)], then the negative prompt's (L, D) if `negative`; float32 on the CPU."""
        pipe = self.pipeline
        embeds, negative_embeds = pipe.encode_prompt(
            prompt=prompt, negative_prompt=NEGATIVE_PROMPT if negative else None, do_classifier_free_guidance=negative,
            max_sequence_length=self.config.max_sequence_length, device=pipe._execution_device)   # (1, L, D) each
        rows = [embeds[0]] + ([negative_embeds[0]] if negative else [])
        return [row.float().cpu() for row in rows]


@dataclass
class WanImageEncoder:
    """The VAE's encoder (and Wan 2.1 I2V's CLIP vision encoder): input_reference -> the I2V condition."""
    pipeline: object                   # WanImageToVideoPipeline with vae (+ image_encoder, image_processor)
    config: WanConfig

    @torch.inference_mode()
    def condition(self, image, plan) -> torch.Tensor:
        """PIL image -> WanImageToVideoPipeline.prepare_latents' condition, float32 on the CPU:
        (4 + C, T, h, w) mask + normalized latents of [image, zeros], or (TI2V) (C, 1, h, w)."""
        pipe, config = self.pipeline, self.config
        device = pipe.vae.device
        pixels = pipe.video_processor.preprocess(image, height=plan.height, width=plan.width).to(device, torch.float32)
        shape = (1, config.vae_latent_channels, plan.latent_frames, plan.latent_height, plan.latent_width)
        outputs = pipe.prepare_latents(pixels, 1, config.vae_latent_channels, plan.height, plan.width,
                                       plan.frame_count, torch.float32, device, None,
                                       latents=torch.zeros(shape, device=device))   # the noise is the denoiser's
        return outputs[1][0].float().cpu()

    @torch.inference_mode()
    def image_tokens(self, image) -> torch.Tensor:
        """CLIP's penultimate hidden states (1, L_image, image_dim) (WanImageToVideoPipeline.encode_image)."""
        return self.pipeline.encode_image(image, self.pipeline.vae.device).float().cpu()


@dataclass
class WanVideoDecoder:
    vae: object                        # AutoencoderKLWan
    config: WanConfig


# ---- the stages --------------------------------------------------------------------------------

def encode_text(encoder: WanTextEncoder, plan):
    from ..stages import TextEmbeddings
    return TextEmbeddings(captions=encoder.encode(plan.captions[0], negative=uses_cfg(plan)))


def no_media(plan):
    """MediaLatents without conditioning (Wan takes no reference images: refs is empty)."""
    from ..stages import MediaLatents
    return MediaLatents(refs=torch.zeros(0, 0, plan.latent_height, plan.latent_width))


def encode_media(encoder: WanImageEncoder | None, plan):
    """input_reference -> MediaLatents: video = the I2V condition, refs = CLIP image tokens (Wan 2.1 I2V)."""
    import PIL.Image

    from .. import references

    if plan.input_reference is None:
        return no_media(plan)
    try:
        frame = references.load_frames(plan.input_reference, plan.width, plan.height, 1)[0]   # (H, W, 3) uint8
    except references.MediaReferenceError as e:
        raise references.MediaReferenceError(f"input_reference: {e}") from None
    image = PIL.Image.fromarray(frame)
    out = no_media(plan)
    out.video = encoder.condition(image, plan)
    if encoder.config.image_dim is not None:
        out.refs = encoder.image_tokens(image)
    return out


@torch.inference_mode()
def decode_frames(decoder: WanVideoDecoder, plan, latents) -> torch.Tensor:
    """Video latents (C, T, h, w) -> frames (3, plan.num_frames, H, W) in [-1, 1], as WanPipeline decodes."""
    vae = decoder.vae
    z = latents.video[None].to(vae.device, vae.dtype)                                  # (1, C, T, h, w)
    channels = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, channels, 1, 1, 1).to(z.device, z.dtype)
    inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, channels, 1, 1, 1).to(z.device, z.dtype)
    frames = vae.decode(z / inverse_std + mean, return_dict=False)[0]                  # (1, 3, F, H, W)
    return frames[0, :, :plan.num_frames].float().cpu()


def decode_video(decoder: WanVideoDecoder, plan, latents):
    from .. import media
    from ..stages import EncodedStream

    pixels = media.video_to_uint8(decode_frames(decoder, plan, latents))                # (T, H, W, 3)
    return EncodedStream(media.encode_video(pixels, plan.fps), "video/mp4")


def decode_audio(component, plan, latents, media_latents=None):
    """Wan makes no sound: an empty stream."""
    from ..stages import EncodedStream
    return EncodedStream(b"", "audio/mp4")


def mux(plan, video, audio):
    """The video MP4 alone (H.264, no audio stream): Wan is video-only."""
    return video


STAGES = {"encode_text": encode_text, "encode_voice": encode_voice, "encode_media": encode_media,
          "decode_video": decode_video, "decode_audio": decode_audio, "mux": mux}


# ---- the denoiser ------------------------------------------------------------------------------

@dataclass
class WanDenoiseState:
    """One job between steps (B = 2 [negative, prompt] with CFG, else 1)."""
    latents: torch.Tensor              # (1, C, T, h, w) float32
    text: torch.Tensor                 # (B, 512, text_dim), the transformer's dtype
    scheduler: object                  # a per-state copy: UniPC keeps its history between steps
    timesteps: torch.Tensor            # (steps,)
    guidance: float                    # the high-noise (or only) expert's CFG scale
    guidance_2: float                  # the low-noise expert's (WanPipeline: guidance_scale_2 = guidance_scale)
    condition: torch.Tensor | None = None         # I2V: (1, 4 + C, T, h, w); TI2V: (1, C, 1, h, w)
    first_frame_mask: torch.Tensor | None = None  # TI2V: (1, 1, T, h, w), 0 on the clean first latent
    image_tokens: torch.Tensor | None = None      # Wan 2.1 I2V: (B, L_image, image_dim)
    expand_timesteps: bool = False                # TI2V-5B: a timestep per token
    experts: list = None                          # which expert ran each step taken (0: high noise, 1: low)
    steps: int = 0
    done: int = 0
    tokens: int = 0                               # model tokens of one step, CFG rows included (max_batch_tokens)

    @property
    def cfg(self) -> bool:
        return self.text.shape[0] == 2


def expand_timesteps_mask(s: WanDenoiseState) -> torch.Tensor:
    """TI2V's per-latent mask (1, 1, T, h, w): that of the image, else all ones (WanPipeline's)."""
    if s.first_frame_mask is not None:
        return s.first_frame_mask
    return torch.ones_like(s.latents[:, :1])


def model_inputs(s: WanDenoiseState, t: torch.Tensor, dtype: torch.dtype) -> dict:
    """The transformer's arguments at timestep t, as the pipelines build them, for the batch of rows."""
    rows = s.text.shape[0]
    if s.first_frame_mask is not None:                     # TI2V image: the clean first latent, in place
        hidden = (1 - s.first_frame_mask) * s.condition + s.first_frame_mask * s.latents
    elif s.condition is not None:                          # I2V: the condition on the channels
        hidden = torch.cat([s.latents, s.condition], dim=1)
    else:
        hidden = s.latents
    if s.first_frame_mask is not None or s.expand_timesteps:
        timestep = (expand_timesteps_mask(s)[0][0][:, ::2, ::2] * t).flatten().unsqueeze(0).expand(rows, -1)
    else:
        timestep = t.expand(rows)
    return dict(hidden_states=hidden.to(dtype).expand(rows, -1, -1, -1, -1), timestep=timestep,
                encoder_hidden_states=s.text, encoder_hidden_states_image=s.image_tokens,
                attention_kwargs=None, return_dict=False)


class WanDenoiser:
    """The `backbone` component: WanTransformer3DModel (Wan 2.2 A14B: both experts) + the scheduler,
    stepping as WanPipeline and WanImageToVideoPipeline do.

    Both A14B experts live here, on the backbone host (under TP each rank holds its shard of both):
    every request runs the high-noise expert and then the low-noise one, so two replica groups would
    hand the latents across mid-loop and each group would sit idle for the other's steps; one host
    keeps the step loop and its batching whole, at the price of the second expert's weights (which
    TP divides)."""

    def __init__(self, transformers: list, scheduler, config: WanConfig):
        self.transformers = list(transformers)     # [high-noise (or only), low-noise]
        self.scheduler = scheduler
        self.config = config
        self.pipeline = partial_pipeline(config, transformer=self.transformers[0], scheduler=scheduler)

    @property
    def transformer(self):
        return self.transformers[0]

    @property
    def module(self):
        """The model modules (whole, or this rank's TP shards): what a host counts resident bytes of."""
        return self.transformers[0] if len(self.transformers) == 1 else torch.nn.ModuleList(self.transformers)

    @property
    def device(self) -> torch.device:
        return self.transformers[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformers[0].dtype

    @torch.inference_mode()
    def prepare(self, plan, text, voice, media) -> WanDenoiseState:
        """The pipeline's noise (one generator seeded with plan.seed), its scheduler's timesteps, the
        text batch [negative, prompt] and the I2V condition."""
        config, device = self.config, self.device
        generator = torch.Generator().manual_seed(plan.seed)
        latents = self.pipeline.prepare_latents(1, config.vae_latent_channels, plan.height, plan.width,
                                                plan.frame_count, torch.float32, device, generator)
        scheduler = copy.deepcopy(self.scheduler)
        scheduler.set_timesteps(plan.steps, device=device)
        scheduler.set_begin_index(0)
        rows = [text.captions[1], text.captions[0]] if uses_cfg(plan) else text.captions[:1]
        state = WanDenoiseState(latents=latents, text=torch.stack(rows).to(device, self.dtype), scheduler=scheduler,
                                timesteps=scheduler.timesteps, guidance=plan.guidance_video,
                                guidance_2=plan.guidance_video, expand_timesteps=config.expand_timesteps,
                                experts=[], steps=len(scheduler.timesteps),
                                tokens=len(rows) * latents[0, 0].numel() // math.prod(config.patch_size))
        if media is not None and media.video is not None:
            self.condition(state, media)
        return state

    def condition(self, s: WanDenoiseState, media) -> None:
        """The I2V condition (and TI2V's first-frame mask, CLIP image tokens) into the state."""
        s.condition = media.video[None].to(self.device, torch.float32)
        if self.config.expand_timesteps:
            mask = torch.ones_like(s.latents[:, :1])
            mask[:, :, 0] = 0
            s.first_frame_mask = mask
        if media.refs.ndim == 3 and media.refs.numel():
            s.image_tokens = media.refs.to(self.device, self.dtype).expand(s.text.shape[0], -1, -1)

    def expert(self, t) -> int:
        """0 (the high-noise `transformer`) while t >= boundary_ratio * num_train_timesteps, then 1."""
        boundary = self.config.boundary_timestep
        return 0 if boundary is None or t >= boundary else 1

    @torch.inference_mode()
    def step(self, states: list[WanDenoiseState], forward: Callable | None = None) -> None:
        """One sampler step of every state, each step's expert called through `forward` (base.Denoiser).
        The states whose calls agree in expert and token shape (latents, text length, image tokens)
        run as one call, their rows (cond and uncond included) stacked on the batch dimension with
        each state's own timestep per row (stacked_calls.run_stacked); then every state applies its
        CFG and its scheduler step to its own rows. One state: one call, as WanPipeline makes it."""
        experts = [self.expert(s.timesteps[s.done]) for s in states]
        calls = [(self.transformers[e], model_inputs(s, s.timesteps[s.done], self.dtype))
                 for s, e in zip(states, experts)]
        for s, expert, (noise, *_) in zip(states, experts, run_stacked(forward, calls)):   # noise (B, C, T, h, w)
            self.advance(s, expert, noise)

    def advance(self, s: WanDenoiseState, expert: int, noise: torch.Tensor) -> None:
        """The pipeline's loop body after the expert's call: CFG, the scheduler step."""
        t = s.timesteps[s.done]
        if s.cfg:
            scale = s.guidance if expert == 0 else s.guidance_2
            noise_uncond, noise = noise.chunk(2)
            noise = noise_uncond + scale * (noise - noise_uncond)
        s.latents = s.scheduler.step(noise, t, s.latents, return_dict=False)[0]
        s.experts.append(expert)
        s.done += 1

    def finish(self, s: WanDenoiseState):
        """GeneratedLatents: video (C, T, h, w) float32 on the CPU (TI2V: the clean first latent put back);
        audio (0, 0): Wan makes none."""
        from ..stages import GeneratedLatents

        latents = s.latents
        if s.first_frame_mask is not None:
            latents = (1 - s.first_frame_mask) * s.condition + s.first_frame_mask * latents
        return GeneratedLatents(video=latents[0].float().cpu(), audio=torch.zeros(0, 0))


# ---- the family --------------------------------------------------------------------------------

WARMUP_IMAGE_SIZE = 16


def warmup_request(config: WanConfig):
    """The smallest request this checkpoint serves: a square of the smallest side both the request (>= 32)
    and the checkpoint's size multiple allow, 1 + 4 frames, 2 steps (and a black image for an I2V folder)."""
    import base64

    import numpy as np

    from .. import media
    from ..config import MIN_SIDE, GenerationRequest

    multiple, fps = config.size_multiple, config.default_fps
    side = multiple * math.ceil(MIN_SIDE / multiple)
    image = None
    if config.needs_image:
        png = media.encode_png(np.zeros((WARMUP_IMAGE_SIZE, WARMUP_IMAGE_SIZE, 3), np.uint8))
        image = "data:image/png;base64," + base64.b64encode(png).decode()
    return GenerationRequest(prompt="warm-up", size=f"{side}x{side}", fps=fps,
                             seconds=(1 + config.vae_temporal_compression) / fps, steps=2, input_reference=image)


def warmup_values(config: WanConfig) -> dict:
    """A placeholder for every payload, shaped for warmup_request(config)."""
    from ..stages import GeneratedLatents, TextEmbeddings, VoiceEmbeddings

    plan = plan_wan(warmup_request(config), config)
    rows = 2 if uses_cfg(plan) else 1
    latent = (plan.latent_height, plan.latent_width)
    media = no_media(plan)
    if config.needs_image:
        media.video = torch.zeros(config.in_channels - config.vae_latent_channels, plan.latent_frames, *latent)
        if config.image_dim is not None:
            media.refs = torch.zeros(1, 1, config.image_dim)
    return {
        "plan": plan,
        "text": TextEmbeddings(captions=[torch.zeros(config.max_sequence_length, config.text_dim)] * rows),
        "voice": VoiceEmbeddings(speakers=torch.zeros(0, 0)),
        "media": media,
        "latents": GeneratedLatents(video=torch.zeros(config.vae_latent_channels, plan.latent_frames, *latent),
                                    audio=torch.zeros(0, 0)),
    }


class WanFamily(DiffusersFamily):
    name = "wan"
    limits = LIMITS
    stages = STAGES

    def read_config(self, checkpoint: Path) -> WanConfig:
        return read_wan_config(Path(checkpoint))

    def plan_folder(self, request, config: WanConfig):
        return plan_wan(request, config)

    def component_makers(self, config: WanConfig, part) -> dict:
        """A text-to-video folder makes no media encoder, and no folder an audio decoder."""
        def media_encoder():
            if not config.takes_image:
                return None
            image = {"image_encoder": part("image_encoder"), "image_processor": part("image_processor")} \
                if config.image_dim is not None else {}
            return WanImageEncoder(partial_pipeline(config, vae=part("vae"), **image), config)

        experts = ("transformer", "transformer_2")[:config.experts]
        return {
            "text_encoder": lambda: WanTextEncoder(partial_pipeline(
                config, text_encoder=part("text_encoder"), tokenizer=part("tokenizer")), config),
            "voices": lambda: None,
            "media_encoder": media_encoder,
            "backbone": lambda: WanDenoiser([part(name) for name in experts], part("scheduler"), config),
            "vae": lambda: WanVideoDecoder(part("vae"), config),
            "audio_decoder": lambda: None,
        }

    def load_backbone_shard(self, checkpoint: Path, mesh, device="cpu", dtype: torch.dtype | None = None) -> WanDenoiser:
        """This rank's TP shard of the transformer(s), read by slice (parallel/tp_wan.py), as the denoiser."""
        from ..parallel.tp_wan import load_wan_backbone_shard
        return load_wan_backbone_shard(Path(checkpoint), mesh, device, dtype)

    def check_tp(self, config: WanConfig, tp: int) -> None:
        from ..parallel.tp_wan import check_tp_degree_wan
        check_tp_degree_wan(config, tp)

    def warmup_values(self, config: WanConfig) -> dict:
        return warmup_values(config)


FAMILY = WanFamily()
