"""The Wan backbone step against diffusers' own forward (`omnireel bench backbone --family wan`).

The peer check: at the same width, depth and tokens, one WanDenoiser.step (the stage's state
handling, the model call, the scheduler step) against diffusers' WanTransformer3DModel forward
alone, called as WanPipeline calls it, on the same random-weight model and the same latents and text.
Both are timed interleaved on the CPU (guidance off: one model call per step), medians printed with
the overhead ratio step / forward - 1.
"""
from __future__ import annotations

import statistics
import time

import torch

PRESETS = {   # WanTransformer3DModel configs: "tiny" (diffusers' test); "cpu": Wan 2.1 14B's blocks (128-dim heads,
              # UMT5's 4096-wide text) at a quarter of its width (10 of 40 heads, ffn 13824 / 4) and 4 of 40 layers
    "tiny": dict(num_attention_heads=2, attention_head_dim=12, ffn_dim=32, num_layers=2, text_dim=32),
    "cpu": dict(num_attention_heads=10, attention_head_dim=128, ffn_dim=3456, num_layers=4, text_dim=4096),
}


def wan_config(model, steps: int):
    """A WanConfig for a 16-channel Wan 2.1 text-to-video model (VAE x8 / x4) around `model`."""
    import json

    from ..families.wan import WanConfig

    c = model.config
    return WanConfig(pipeline="WanPipeline", vae_spatial_compression=8, vae_temporal_compression=4,
                     vae_latent_channels=c.in_channels, patch_size=tuple(c.patch_size), in_channels=c.in_channels,
                     num_layers=c.num_layers, num_attention_heads=c.num_attention_heads,
                     attention_head_dim=c.attention_head_dim, ffn_dim=c.ffn_dim, text_dim=c.text_dim, image_dim=None,
                     experts=1, boundary_ratio=None, expand_timesteps=False, num_train_timesteps=1000,
                     max_sequence_length=512, scheduler=json.dumps({}), default_steps=steps, default_guidance=1.0)


def step_state(model, width: int, height: int, frames: int, steps: int, guidance: float = 1.0, seed: int = 0):
    """(WanDenoiser around `model`, its plan, a prepared state) for a `width`x`height`, `frames`-frame
    clip of `steps` sampler steps: the pipeline's noise and random text rows (seeded; with guidance > 1
    the CFG batch [negative, prompt], B = 2)."""
    from diffusers import UniPCMultistepScheduler

    from ..config import GenerationRequest
    from ..families.wan import WanDenoiser, plan_wan
    from ..stages import TextEmbeddings

    config = wan_config(model, steps)
    denoiser = WanDenoiser([model], UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                            flow_shift=3.0), config)
    plan = plan_wan(GenerationRequest(prompt="bench", size=f"{width}x{height}", fps=16, seconds=frames / 16,
                                      steps=steps, guidance_video=guidance), config)
    g = torch.Generator().manual_seed(seed)
    rows = 2 if guidance > 1.0 else 1
    text = TextEmbeddings(captions=[torch.randn(config.max_sequence_length, config.text_dim, generator=g)
                                    for _ in range(rows)])
    return denoiser, plan, denoiser.prepare(plan, text, None, None)


def run(preset: str, width: int, height: int, frames: int, steps: int) -> list[str]:
    from diffusers import WanTransformer3DModel
    from diffusers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    model = WanTransformer3DModel(**PRESETS[preset]).eval()
    denoiser, plan, state = step_state(model, width, height, frames, 2 * steps + 2)
    config = denoiser.config
    step_times, forward_times = [], []
    for i in range(steps + 1):                       # the first round is a warm-up
        t = state.timesteps[state.done]
        start = time.perf_counter()
        with torch.inference_mode():                 # diffusers' forward, as WanPipeline calls it
            model(hidden_states=state.latents.to(model.dtype), timestep=t.expand(1), encoder_hidden_states=state.text,
                  attention_kwargs=None, return_dict=False)
        middle = time.perf_counter()
        denoiser.step([state])                       # OmniReel's step: the same call + CFG-free update
        end = time.perf_counter()
        if i:
            forward_times.append(middle - start)
            step_times.append(end - middle)
    forward_s, step_s = statistics.median(forward_times), statistics.median(step_times)
    tokens = plan.latent_frames * (plan.latent_height // 2) * (plan.latent_width // 2)
    params = sum(p.numel() for p in model.parameters())
    return [f"wan transformer ({preset}: {params / 1e6:.1f} M parameters, {model.config.num_layers} layers, "
            f"{model.config.num_attention_heads} x {model.config.attention_head_dim} heads) at {width}x{height}, "
            f"{frames} frames: {tokens} video tokens, {config.max_sequence_length} text tokens, "
            f"{torch.get_num_threads()} CPU threads",
            f"  diffusers WanTransformer3DModel forward  {forward_s * 1e3:.1f} ms (median of {steps})",
            f"  OmniReel WanDenoiser.step             {step_s * 1e3:.1f} ms (median of {steps})",
            f"  overhead of the stage                 {step_s / forward_s - 1:+.1%}"]
