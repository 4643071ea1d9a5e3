"""Tiny random Wan checkpoints, built offline from diffusers' and transformers' own classes: the
folders benchmarks/batching.py denoises, and the tests' (tests/conftest.py puts benchmarks/ on their path).

`build_tiny_wan(directory, variant)` writes a diffusers folder that `WanPipeline.from_pretrained`
(or `WanImageToVideoPipeline.from_pretrained`) loads, with the module configs of diffusers' own
tests (tests/pipelines/wan/): a Wan 2.1 VAE (space x8, time x4: frames = 1 + 4k), a WanTransformer3DModel
of 2 layers x 2 heads x 12, and UniPC in flow mode (shift 3) as Wan ships. A small UMT5 encoder and
a `tokenizers` WordLevel tokenizer (eos appended, as T5's) stand in for umt5-xxl and its tokenizer.
Every module is built under torch.manual_seed(0), as diffusers' tests do, so two builds are identical.

Variants:
    "t2v"      Wan 2.1 text-to-video (WanPipeline)
    "a14b"     Wan 2.2 A14B: a high-noise `transformer` and a low-noise `transformer_2` (seeded apart,
               so the switch shows), boundary_ratio 0.875 (diffusers' Wan 2.2 test)
    "ti2v"     Wan 2.2 TI2V-5B: the 48-channel residual VAE (space x16, patchified), expand_timesteps
    "i2v"      Wan 2.1 image-to-video (WanImageToVideoPipeline): 36 input channels, a CLIP vision
               encoder (hidden 4) for the image tokens
"""
from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("a robot dancing in the rain at night cat plays piano on stage bright city lights "
         "waves crash rocks sunrise red car drives fast through desert").split()
MAX_SEQUENCE_LENGTH = 512        # WanPipeline's default max_sequence_length (and the I2V processor's text length)
TEXT_DIM = 32
ROBOT = dict(prompt="a robot dancing in the rain", size="32x32", seconds=9 / 16, fps=16, seed=3, steps=2)
"""A request the tiny checkpoints serve: 9 frames (1 + 4 * 2, three latent frames), 2 steps."""


def tiny_tokenizer():
    """WordLevel tokenizer over WORDS, wrapped as a transformers fast tokenizer (eos appended, pad 0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate([*specials, *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=MAX_SEQUENCE_LENGTH)


def tiny_text_encoder(vocab_size: int):
    """UMT5EncoderModel: 2 layers of width TEXT_DIM (the transformer's text_dim)."""
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(vocab_size=vocab_size, d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=8, relative_attention_max_distance=32, pad_token_id=0,
                        eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(0)
    return UMT5EncoderModel(config).eval()


def tiny_transformer(in_channels: int = 16, out_channels: int = 16, image_dim: int | None = None, seed: int = 0):
    """diffusers' test WanTransformer3DModel: 2 layers, 2 heads x 12, patch (1, 2, 2)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=in_channels,
        out_channels=out_channels, text_dim=TEXT_DIM, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, image_dim=image_dim,
        added_kv_proj_dim=None if image_dim is None else 24)


def tiny_vae(ti2v: bool = False):
    """diffusers' test AutoencoderKLWan: Wan 2.1's (z 16, x8) or TI2V-5B's (z 48, residual, patch 2, x16),
    with non-trivial latent statistics, so (de)normalizing is tested."""
    from diffusers import AutoencoderKLWan

    statistics = torch.Generator().manual_seed(1)
    channels = 48 if ti2v else 16
    mean = (0.2 * torch.randn(channels, generator=statistics)).tolist()
    std = (0.5 + torch.rand(channels, generator=statistics)).tolist()
    torch.manual_seed(0)
    if ti2v:
        return AutoencoderKLWan(base_dim=3, z_dim=48, in_channels=12, out_channels=12, is_residual=True, patch_size=2,
                                latents_mean=mean, latents_std=std, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                scale_factor_spatial=16, scale_factor_temporal=4,
                                temperal_downsample=[False, True, True])
    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], latents_mean=mean, latents_std=std)


def tiny_scheduler():
    from diffusers import UniPCMultistepScheduler
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


def tiny_image_encoder():
    """CLIPVisionModel (hidden 24: the transformer's image_dim) and its processor at 32 px (diffusers' test)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=24, projection_dim=24, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, intermediate_size=16, patch_size=4)
    return CLIPVisionModel(config).eval(), CLIPImageProcessor(crop_size=32, size=32)


def tiny_components(variant: str = "t2v") -> dict:
    """The pipeline's components for `variant` (see the module docstring)."""
    tokenizer = tiny_tokenizer()
    parts = {"tokenizer": tokenizer, "text_encoder": tiny_text_encoder(len(tokenizer)), "scheduler": tiny_scheduler()}
    if variant == "t2v":
        return {**parts, "vae": tiny_vae(), "transformer": tiny_transformer()}
    if variant == "a14b":
        return {**parts, "vae": tiny_vae(), "transformer": tiny_transformer(seed=0),
                "transformer_2": tiny_transformer(seed=1), "boundary_ratio": 0.875}
    if variant == "ti2v":
        return {**parts, "vae": tiny_vae(ti2v=True), "transformer": tiny_transformer(48, 48), "expand_timesteps": True}
    if variant == "i2v":
        image_encoder, image_processor = tiny_image_encoder()
        return {**parts, "vae": tiny_vae(), "transformer": tiny_transformer(36, 16, image_dim=24),
                "image_encoder": image_encoder, "image_processor": image_processor}
    raise ValueError(f"unknown variant {variant!r}")


def build_tiny_wan(directory, variant: str = "t2v") -> Path:
    """Write the tiny Wan pipeline of `variant` to `directory` (diffusers layout) and return it."""
    from diffusers import WanImageToVideoPipeline, WanPipeline

    directory = Path(directory)
    cls = WanImageToVideoPipeline if variant == "i2v" else WanPipeline
    cls(**tiny_components(variant)).save_pretrained(directory)
    return directory
