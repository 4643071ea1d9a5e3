"""A tiny random LTX-2 checkpoint, built offline from diffusers' and transformers' own classes: the
folder benchmarks/batching.py denoises, and the tests' (tests/conftest.py puts benchmarks/ on their path).

`build_tiny_ltx2(directory)` writes a diffusers folder that `LTX2Pipeline.from_pretrained` loads
(model_index.json `_class_name` "LTX2Pipeline"). The geometry is LTX-2's, scaled down: the video VAE
compresses space x32 and time x8 (frames = 1 + 8k), the audio VAE maps 16 kHz mel frames (hop 160)
to 25 latents per second with the mel axis /4, the vocoder makes stereo at 24 kHz (240 samples per
mel frame), and the scheduler has LTX-2's dynamic-shift config. Weights are seeded, so two builds
are identical. A Gemma 3 text encoder (with its small vision tower, as the real checkpoint has) and
a `tokenizers` WordLevel tokenizer stand in for Gemma 3 12B and its tokenizer.
"""
from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("a robot dancing in the rain at night cat plays piano on stage bright city lights "
         "waves crash rocks sunrise red car drives fast through desert").split()
MAX_SEQUENCE_LENGTH = 1024       # LTX2Pipeline's default max_sequence_length
ROBOT = dict(prompt="a robot dancing in the rain", size="64x64", seconds=0.375, fps=24, seed=3, steps=2)
"""A request the tiny checkpoint serves: 9 frames (1 + 8, two latent frames), 2 steps; its tokenizer knows the words."""


def tiny_tokenizer():
    """WordLevel tokenizer over WORDS, wrapped as a transformers fast tokenizer (bos prepended)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {token: i for i, token in enumerate([*specials, *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=MAX_SEQUENCE_LENGTH)


def tiny_text_encoder(vocab_size: int):
    """Gemma3ForConditionalGeneration: 2 text layers of width 16, a 1-layer SigLIP tower."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    config = Gemma3Config(
        text_config=dict(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, sliding_window=8,
                         max_position_embeddings=MAX_SEQUENCE_LENGTH * 2, pad_token_id=0, bos_token_id=2,
                         eos_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4, boi_token_index=vocab_size, eoi_token_index=vocab_size + 1,
        image_token_index=vocab_size + 2)
    torch.manual_seed(0)
    return Gemma3ForConditionalGeneration(config).eval()


def tiny_components() -> dict:
    """Every LTX2Pipeline component, seeded (each module under torch.manual_seed(0), as diffusers' tests do)."""
    from diffusers import (AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video, FlowMatchEulerDiscreteScheduler,
                           LTX2VideoTransformer3DModel)
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

    tokenizer = tiny_tokenizer()
    text_encoder = tiny_text_encoder(len(tokenizer))
    text_width, text_layers = 16, 2
    torch.manual_seed(0)
    transformer = LTX2VideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, audio_in_channels=8, audio_out_channels=8, audio_num_attention_heads=2,
        audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=2, qk_norm="rms_norm_across_heads",
        caption_channels=text_width, rope_double_precision=False, rope_type="split")
    torch.manual_seed(0)
    connectors = LTX2TextConnectors(
        caption_channels=text_width, text_proj_in_factor=text_layers + 1,
        video_connector_num_attention_heads=2, video_connector_attention_head_dim=8, video_connector_num_layers=1,
        video_connector_num_learnable_registers=None, audio_connector_num_attention_heads=2,
        audio_connector_attention_head_dim=8, audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=None, connector_rope_base_seq_len=32, rope_theta=10000.0,
        rope_double_precision=False, causal_temporal_positioning=False, rope_type="split")
    torch.manual_seed(0)
    vae = AutoencoderKLLTX2Video(     # space x32 (patch 4 x 2^3), time x8 (2^3), like LTX-2's
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8),
        decoder_block_out_channels=(8, 16, 32), layers_per_block=(1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True), decoder_spatio_temporal_scaling=(True, True, True),
        decoder_inject_noise=(False, False, False, False), downsample_type=("spatiotemporal",) * 3,
        upsample_type=("spatiotemporal",) * 3, upsample_residual=(True, True, True), upsample_factor=(2, 2, 2),
        timestep_conditioning=False, patch_size=4, patch_size_t=1, encoder_causal=True, decoder_causal=False)
    torch.manual_seed(0)
    audio_vae = AutoencoderKLLTX2Audio(   # mel (2 ch, 16 bins) /4 in time and mel -> (2, T, 4); 2 x 4 = base 8
        base_channels=8, output_channels=2, ch_mult=(1, 2, 4), num_res_blocks=1, attn_resolutions=None,
        in_channels=2, resolution=32, latent_channels=2, norm_type="pixel", causality_axis="height", dropout=0.0,
        mid_block_add_attention=False, sample_rate=16000, mel_hop_length=160, is_causal=True, mel_bins=16)
    torch.manual_seed(0)
    vocoder = LTX2Vocoder(            # 100 mel frames/s x 8*6*5 = 24000 samples/s, stereo
        in_channels=2 * 16, hidden_channels=32, out_channels=2, upsample_kernel_sizes=[16, 12, 15],
        upsample_factors=[8, 6, 5], resnet_kernel_sizes=[3], resnet_dilations=[[1, 3, 5]],
        leaky_relu_negative_slope=0.1, output_sampling_rate=24000)
    statistics = torch.Generator().manual_seed(1)   # non-trivial latent statistics, so (de)normalizing is tested
    for module, channels in ((vae, 8), (audio_vae, 8)):
        module.latents_mean.copy_(0.2 * torch.randn(channels, generator=statistics))
        module.latents_std.copy_(0.5 + torch.rand(channels, generator=statistics))
    scheduler = FlowMatchEulerDiscreteScheduler(   # LTX-2's scheduler_config
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
        base_image_seq_len=1024, max_image_seq_len=4096, shift_terminal=0.1, time_shift_type="exponential")
    return {"transformer": transformer, "vae": vae, "audio_vae": audio_vae, "scheduler": scheduler,
            "text_encoder": text_encoder, "tokenizer": tokenizer, "connectors": connectors, "vocoder": vocoder,
            "processor": None, "prompt_enhancer": None, "duration_head": None}


def build_tiny_ltx2(directory) -> Path:
    """Write the tiny LTX-2 pipeline to `directory` (diffusers layout) and return it."""
    from diffusers import LTX2Pipeline

    directory = Path(directory)
    LTX2Pipeline(**tiny_components()).save_pretrained(directory)
    return directory
