"""Component sizes of the real LTX-2 and Wan checkpoints: parameters and bf16 GiB per component,
from meta-device builds of diffusers' and transformers' own classes (no weights, no memory).

    python benchmarks/components.py

The LTX-2 modules are built from their class defaults (LTX-2's 19B config); Gemma 3 12B, Wan 2.1
T2V-14B and UMT5-XXL from their published configs, written out below. These are the figures the
README's serving sections and deployments/serve_config_{ltx2,wan}.yaml quote.
"""
from __future__ import annotations

import os
import sys

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GEMMA3_12B = dict(
    text_config=dict(vocab_size=262208, hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                     num_attention_heads=16, num_key_value_heads=8, head_dim=256),
    vision_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                       image_size=896, patch_size=14))
WAN21_14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
                 text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
                 qk_norm="rms_norm_across_heads", eps=1e-6)
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                feed_forward_proj="gated-gelu")


def builders() -> dict[str, dict[str, callable]]:
    """{family: {component: a function building it}}."""
    from diffusers import (AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video, AutoencoderKLWan,
                           LTX2VideoTransformer3DModel, WanTransformer3DModel)
    from diffusers.pipelines.ltx2 import LTX2TextConnectors, LTX2Vocoder
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, UMT5Config, UMT5EncoderModel

    return {
        "ltx2": {"text encoder (Gemma 3 12B)": lambda: Gemma3ForConditionalGeneration(Gemma3Config(**GEMMA3_12B)),
                 "text connectors": LTX2TextConnectors, "transformer": LTX2VideoTransformer3DModel,
                 "video VAE": AutoencoderKLLTX2Video, "audio VAE": AutoencoderKLLTX2Audio, "vocoder": LTX2Vocoder},
        "wan": {"text encoder (UMT5-XXL)": lambda: UMT5EncoderModel(UMT5Config(**UMT5_XXL)),
                "transformer (one expert, 2.1 T2V-14B)": lambda: WanTransformer3DModel(**WAN21_14B),
                "video VAE": AutoencoderKLWan},
    }


def main() -> int:
    from diffusers.utils import logging
    logging.set_verbosity_error()
    for family, parts in builders().items():
        print(f"{family}:")
        for name, build in parts.items():
            with torch.device("meta"):
                params = sum(p.numel() for p in build().parameters())
            print(f"  {name:<40} {params / 1e9:6.2f} B parameters  {2 * params / 2**30:6.1f} GiB bf16")
    return 0


if __name__ == "__main__":
    sys.exit(main())
