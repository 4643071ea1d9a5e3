"""The LTX-2 transformer's cost per denoising step (`omnireel bench backbone --family ltx2`).

FLOPs are counted by torch's FlopCounterMode over one forward of diffusers' own
LTX2VideoTransformer3DModel built on the meta device (no weights, no memory), so they follow the
real module exactly: every matmul, attention and cross-attention, video and audio streams together.
One step runs `rows` forwards: LTX2Pipeline's defaults run 4 (conditional, unconditional,
spatio-temporal-guidance perturbed, modality isolated). Where a CUDA device is present, the same
config is built there with random weights and the step is timed in bf16 (ms per step and MFU
against the device's dense bf16 peak); never in CI.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}   # dense, from the vendors' data sheets
TINY_CONFIG = dict(num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16, num_layers=2,
                   audio_num_attention_heads=2, audio_attention_head_dim=4, audio_cross_attention_dim=8,
                   caption_channels=16, in_channels=4, out_channels=4, audio_in_channels=4, audio_out_channels=4)


@dataclass(frozen=True)
class LTX2StepShape:
    width: int = 768
    height: int = 512
    frames: int = 121
    fps: float = 24.0
    text_tokens: int = 1024        # LTX2Pipeline's max_sequence_length
    rows: int = 4                  # forwards per step (batch rows): cond, uncond, STG, modality isolation


def transformer_inputs(model, shape: LTX2StepShape, device, dtype) -> dict:
    """One forward's keyword arguments for `shape` (random values: the cost is all that matters)."""
    cfg, rows = model.config, shape.rows
    t_scale, s_scale = cfg.vae_scale_factors[0], cfg.vae_scale_factors[1]
    latent_frames, latent_h, latent_w = (shape.frames - 1) // t_scale + 1, shape.height // s_scale, shape.width // s_scale
    video_tokens = latent_frames * latent_h * latent_w
    audio_tokens = round(shape.frames / shape.fps * cfg.audio_sampling_rate / cfg.audio_hop_length
                         / cfg.audio_scale_factor)
    with torch.device(device):
        return dict(
            hidden_states=torch.randn(rows, video_tokens, cfg.in_channels, dtype=dtype),               # (B, N_v, C)
            audio_hidden_states=torch.randn(rows, audio_tokens, cfg.audio_in_channels, dtype=dtype),   # (B, N_a, C_a)
            encoder_hidden_states=torch.randn(rows, shape.text_tokens, cfg.caption_channels, dtype=dtype),
            audio_encoder_hidden_states=torch.randn(rows, shape.text_tokens, cfg.caption_channels, dtype=dtype),
            timestep=torch.full((rows, video_tokens), 500.0), audio_timestep=torch.full((rows, audio_tokens), 500.0),
            encoder_attention_mask=torch.ones(rows, shape.text_tokens),
            audio_encoder_attention_mask=torch.ones(rows, shape.text_tokens),
            num_frames=latent_frames, height=latent_h, width=latent_w, fps=shape.fps, audio_num_frames=audio_tokens,
            return_dict=False)


def build_transformer(preset: str, device, dtype):
    """diffusers' LTX2VideoTransformer3DModel: the real (default) config or a tiny one."""
    from diffusers import LTX2VideoTransformer3DModel
    from diffusers.utils import logging

    logging.set_verbosity_error()          # its note on fp32-kept modules (there are none) is noise here
    with torch.device(device):
        model = LTX2VideoTransformer3DModel(**(TINY_CONFIG if preset == "tiny" else {}))
    return model.to(dtype).eval()


def flops_per_step(preset: str, shape: LTX2StepShape) -> tuple[float, int, int]:
    """(FLOPs of one step, video tokens, audio tokens), from a meta-device build."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_transformer(preset, "meta", torch.bfloat16)
    inputs = transformer_inputs(model, shape, "meta", torch.bfloat16)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**inputs)
    return float(counter.get_total_flops()), inputs["hidden_states"].shape[1], inputs["audio_hidden_states"].shape[1]


def time_step(preset: str, shape: LTX2StepShape, steps: int) -> float:
    """Median seconds of one step (its `rows` forwards as one batch) in bf16 on CUDA."""
    torch.manual_seed(0)
    model = build_transformer(preset, "cuda", torch.bfloat16)
    inputs = transformer_inputs(model, shape, "cuda", torch.bfloat16)
    times = []
    with torch.no_grad():
        for i in range(steps + 1):              # the first is a warm-up
            torch.cuda.synchronize()
            start = time.perf_counter()
            model(**inputs)
            torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def flop_text(flops: float) -> str:
    return f"{flops / 1e12:,.2f} TFLOP" if flops >= 1e12 else f"{flops / 1e9:,.4f} GFLOP"


def run(preset: str, shape: LTX2StepShape, steps: int) -> list[str]:
    flops, video_tokens, audio_tokens = flops_per_step(preset, shape)
    params = sum(p.numel() for p in build_transformer(preset, "meta", torch.bfloat16).parameters())
    lines = [f"ltx2 transformer ({preset}: {params / 1e9:.2f} B parameters) at {shape.width}x{shape.height}, "
             f"{shape.frames} frames: {video_tokens} video + {audio_tokens} audio tokens, "
             f"{shape.text_tokens} text tokens, {shape.rows} rows per step",
             f"  FLOPs per step  {flop_text(flops)} ({flop_text(flops / shape.rows)} per row; meta-device count)"]
    if not torch.cuda.is_available():
        return lines + ["  per-step time   needs a CUDA device (none here): FLOPs only"]
    step_s = time_step(preset, shape, steps)
    name = torch.cuda.get_device_name(0)
    peak = next((tf for key, tf in PEAK_BF16_TFLOPS.items() if key in name), None)
    achieved = flops / step_s / 1e12
    lines += [f"  per-step time   {step_s * 1e3:.1f} ms (median of {steps}, bf16, {name})",
              f"  achieved        {achieved:.1f} TFLOP/s" + (f", MFU {achieved / peak:.1%} of {peak:g}" if peak else "")]
    return lines
