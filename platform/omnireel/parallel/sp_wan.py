"""Ulysses sequence parallel for diffusers' `WanTransformer3DModel`, installed from outside.

The video tokens (S = T' h' w' after the (1, 2, 2) patch; 32k at 720p x 81 frames) are split over
the `sp` ranks; the text (512 UMT5 tokens, and Wan 2.1 I2V's 257 CLIP image tokens) stays whole on
every rank. Everything is diffusers' own: the split and gather points are the model's `_cp_plan`
(applied with diffusers' context-parallel hooks), the attention is its WanAttnProcessor dispatched
through diffusers' Ulysses. Per forward, with S_s = this rank's video tokens, H_t the heads per tp rank:

    rope's (cos, sin) (1, S, 1, hd)    --split-->  (1, S_s, 1, hd)           "rope" (its output)
    blocks.0 hidden_states (B, S, d)   --split-->  (B, S_s, d)               "blocks.0" (its input)
    timestep (B, S) (TI2V-5B only)     --split-->  (B, S_s): adaLN per token "" (a 1-D (B,) one stays)
    attn1 (video self-attention)       q, k, v (B, S_s, H_t, hd) --all-to-all--> (B, S, H_t / sp, hd),
                                       attention over all S tokens, --all-to-all--> (B, S_s, H_t, hd)
    attn2 (cross-attention to text)    queries are this rank's tokens, keys / values whole: nothing to
                                       exchange (the processor passes no parallel config with a context)
    proj_out (B, S_s, C p)             --all-gather--> (B, S, C p)           "proj_out" (its output)

Uneven S: torch.tensor_split shards (the first S % sp ranks hold one token more) and diffusers'
"Ulysses anything" all-to-alls, which exchange uneven shards as they are (no padded token, no mask).
The one gather is mesh.all_gather_rows, not the plan's: gloo's all_gather takes equal shards only,
so it pads the short ones for the collective and trims them after. Under TP too, q / k / v are this tp rank's heads (tp_wan.py: attn.heads is the local
count) and the all-to-alls run on the sp group. Both Wan 2.2 A14B experts are split the same way.
"""
from __future__ import annotations

import torch

from .mesh import all_gather_rows, split_lengths, ulysses_config, use_ulysses_processors

SEQUENCE_PARALLEL_ATTENTIONS = ("attn1",)   # whose keys are the split video tokens
GATHERED_OUTPUT = "proj_out"                # the _cp_plan entry whose output is gathered


def attention_heads(config) -> dict[str, int]:
    """The head counts the mesh must divide (mesh.check_mesh): the WanConfig's or the transformer config's."""
    return {"num_attention_heads": config.num_attention_heads}


def install_sequence_parallel_wan(module, sp_mesh):
    """Splits the video tokens of `module` (a WanTransformer3DModel, or the WanDenoiser's ModuleList of
    both experts) over the 1-D `sp_mesh` in place (diffusers' processors and context-parallel hooks)."""
    from diffusers.hooks.context_parallel import apply_context_parallel

    if sp_mesh.size() == 1:
        return module
    config = ulysses_config(sp_mesh)
    transformers = module if isinstance(module, torch.nn.ModuleList) else [module]
    for transformer in transformers:
        use_ulysses_processors(transformer.blocks, SEQUENCE_PARALLEL_ATTENTIONS, config)
        splits = {key: plan for key, plan in transformer._cp_plan.items() if key != GATHERED_OUTPUT}
        apply_context_parallel(transformer, config.context_parallel_config, splits)
        gather_video_tokens(transformer, sp_mesh)
    return module


def gather_video_tokens(transformer, sp_mesh) -> None:
    """proj_out's (B, S_s, C p) -> (B, S, C p) on every sp rank (S from the forward's hidden_states)."""
    group, size, lengths = sp_mesh.get_group(), sp_mesh.size(), []

    def count(module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]   # (B, C, T, H, W)
        p_t, p_h, p_w = module.config.patch_size
        _, _, frames, height, width = hidden.shape
        lengths[:] = split_lengths(frames // p_t * (height // p_h) * (width // p_w), size)

    def gather(module, args, out):
        return all_gather_rows(out.contiguous(), group, lengths, dim=1)

    transformer.register_forward_pre_hook(count, with_kwargs=True)
    transformer.get_submodule(GATHERED_OUTPUT).register_forward_hook(gather)
