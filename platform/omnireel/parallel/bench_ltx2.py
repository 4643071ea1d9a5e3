"""The LTX-2 transformer's cost per denoising step (`omnireel bench backbone --family ltx2`).

FLOPs come from families.ltx2.step_flops: torch's FlopCounterMode over the very transformer calls
one LTX2Denoiser step makes (the CFG batch of two, the STG pass, the modality-isolated pass, as
LTX2Pipeline's defaults run them), on diffusers' own LTX2VideoTransformer3DModel built on the meta
device, so the real 19B config costs no memory. Where a CUDA device is present, the same config is
built there with random weights in bf16 and the same calls are timed (ms per step, MFU against the
device's dense bf16 peak); never in CI.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}   # dense, from the vendors' data sheets
TINY_CONFIG = dict(num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16, num_layers=2,
                   audio_num_attention_heads=2, audio_attention_head_dim=4, audio_cross_attention_dim=8,
                   caption_channels=16, in_channels=8, out_channels=8, audio_in_channels=8, audio_out_channels=8,
                   qk_norm="rms_norm_across_heads")


@dataclass(frozen=True)
class LTX2StepShape:
    width: int = 768
    height: int = 512
    frames: int = 121
    fps: float = 24.0
    text_tokens: int = 1024        # LTX2Pipeline's max_sequence_length

    def geometry(self) -> dict:
        return dict(width=self.width, height=self.height, frames=self.frames, fps=self.fps,
                    text_tokens=self.text_tokens)


def transformer_config(preset: str) -> dict | None:
    """The transformer config of `preset`: None for the real one (the class defaults), or the tiny one."""
    return dict(TINY_CONFIG) if preset == "tiny" else None


def time_step(preset: str, shape: LTX2StepShape, steps: int) -> float:
    """Median seconds of one step's transformer calls in bf16 on CUDA (random weights)."""
    from diffusers import LTX2VideoTransformer3DModel

    from ..families.ltx2 import run_branches, synthetic_step_state
    from .bench import build_on

    model = build_on("cuda", torch.bfloat16,                 # 19B parameters: bf16 from the start (35 GiB)
                     lambda: LTX2VideoTransformer3DModel(**(transformer_config(preset) or {})))
    state = synthetic_step_state(model, **shape.geometry())
    times = []
    for i in range(steps + 1):              # the first is a warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        run_branches(model, state)
        torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def flop_text(flops: float) -> str:
    return f"{flops / 1e12:,.2f} TFLOP" if flops >= 1e12 else f"{flops / 1e9:,.4f} GFLOP"


def run(preset: str, shape: LTX2StepShape, steps: int) -> list[str]:
    from diffusers.utils import logging

    from ..families.ltx2 import meta_transformer, step_flops

    logging.set_verbosity_error()
    model = meta_transformer(transformer_config(preset))
    counts = step_flops(model, **shape.geometry())
    params = sum(p.numel() for p in model.parameters())
    branches = ", ".join(f"{name} {flop_text(n)}" for name, n in counts.items() if name != "step")
    lines = [f"ltx2 transformer ({preset}: {params / 1e9:.2f} B parameters, {model.config.num_layers} layers) at "
             f"{shape.width}x{shape.height}, {shape.frames} frames, {shape.text_tokens} text tokens",
             f"  FLOPs per step  {flop_text(counts['step'])} ({branches}; meta-device count)"]
    if not torch.cuda.is_available():
        return lines + ["  per-step time   needs a CUDA device (none here): FLOPs only"]
    step_s = time_step(preset, shape, steps)
    name = torch.cuda.get_device_name(0)
    peak = next((tf for key, tf in PEAK_BF16_TFLOPS.items() if key in name), None)
    achieved = counts["step"] / step_s / 1e12
    lines += [f"  per-step time   {step_s * 1e3:.1f} ms (median of {steps}, bf16, {name})",
              f"  achieved        {achieved:.1f} TFLOP/s" + (f", MFU {achieved / peak:.1%} of {peak:g}" if peak else "")]
    return lines
