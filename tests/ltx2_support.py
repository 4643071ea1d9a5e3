"""LTX2Pipeline's side of a parity check on the tiny LTX-2 folder (benchmarks/tiny_ltx2.py): its
arguments for a plan, its latents for a request, and OmniReel's latents in its (denormalized) form."""
from __future__ import annotations

import torch


def pipeline_arguments(plan, guidance, frames: int) -> dict:
    """LTX2Pipeline.__call__'s arguments for `plan` (one prompt) at `guidance` (families.ltx2.LTX2Guidance),
    generating `frames` frames."""
    g = guidance.with_cfg(plan.guidance_video, plan.guidance_audio)
    return dict(prompt=plan.captions[0], height=plan.height, width=plan.width, num_frames=frames, frame_rate=float(plan.fps),
                num_inference_steps=plan.steps, guidance_scale=g.guidance_scale,
                audio_guidance_scale=g.audio_guidance_scale, stg_scale=g.stg_scale, audio_stg_scale=g.audio_stg_scale,
                modality_scale=g.modality_scale, audio_modality_scale=g.audio_modality_scale,
                guidance_rescale=g.guidance_rescale, audio_guidance_rescale=g.audio_guidance_rescale,
                spatio_temporal_guidance_blocks=list(g.stg_blocks), use_cross_timestep=g.use_cross_timestep,
                return_dict=False)


def denormalized(pipe, latents):
    """GeneratedLatents (normalized, unpacked) -> what the pipeline returns for output_type="latent"."""
    video = pipe._denormalize_latents(latents.video[None], pipe.vae.latents_mean, pipe.vae.latents_std,
                                      pipe.vae.config.scaling_factor)                  # (1, C, T, h, w)
    frames, mel_bins = latents.audio.shape[1:]
    packed = pipe._denormalize_audio_latents(pipe._pack_audio_latents(latents.audio[None]),
                                             pipe.audio_vae.latents_mean, pipe.audio_vae.latents_std)
    return video, pipe._unpack_audio_latents(packed, frames, num_mel_bins=mel_bins)   # (1, C, L, M)


def reference_latents(folder, request):
    """LTX2Pipeline (from `folder`) run on `request` (a GenerationRequest) at the checkpoint's default
    guidance, as the app serves it: (pipe, video latents, audio latents) for output_type="latent"."""
    from diffusers import LTX2Pipeline

    from omnireel.families.ltx2 import FAMILY

    config = FAMILY.read_config(folder)
    plan = FAMILY.plan(request, config)
    pipe = LTX2Pipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    video, audio = pipe(**pipeline_arguments(plan, config.guidance, plan.frame_count),
                        generator=torch.Generator().manual_seed(request.seed), output_type="latent")
    return pipe, video, audio
