"""Ulysses sequence parallel for diffusers' `LTX2VideoTransformer3DModel`, installed from outside.

The video tokens (S of them, 30k-75k at 720p) are split over the `sp` ranks; the audio tokens and
the text (a few hundred each) stay whole on every rank, as vLLM-Omni and SGLang split LTX-2. Per
block, with S_s = this rank's video tokens and H_t the heads per tp rank:

    attn1 (video self)            diffusers' own processor with diffusers' Ulysses (a ParallelConfig on
                                  the sp mesh): q, k, v (B, S_s, H_t, hd) --all-to-all--> (B, S, H_t/sp, hd),
                                  attention, --all-to-all--> (B, S_s, H_t, hd)
    video_to_audio_attn           the same processor setting: its queries (audio) are whole on every
                                  rank, so the all-to-all stacks sp copies of them against all S video
                                  keys, and each rank gets its copy's answer back (exact, no gather)
    attn2, audio_to_video_attn    queries are this rank's video tokens, keys/values whole (text, audio):
                                  nothing to exchange
    audio_attn1, audio_attn2      whole audio on every rank: nothing to exchange

The transformer's inputs are split by a forward pre-hook (hidden_states, video_coords and a per-token
timestep: everything with one entry per video token, so RoPE and adaLN follow) and its video output
is all-gathered by a forward hook. Uneven S: torch.tensor_split shards and diffusers' "Ulysses
anything" all-to-alls, which exchange uneven shards as they are (no padded token, no mask).
"""
from __future__ import annotations

from .mesh import all_gather_rows, split_lengths, ulysses_config, use_ulysses_processors

SEQUENCE_PARALLEL_ATTENTIONS = ("attn1", "video_to_audio_attn")   # whose keys are the split video tokens
VIDEO_TOKEN_DIMS = {"hidden_states": 1, "video_coords": 2, "timestep": 1, "video_keyframes_mask": 1}


def attention_heads(config) -> dict[str, int]:
    """The head counts the mesh must divide (mesh.check_mesh): the LTX2Config's or the transformer config's."""
    return {"num_attention_heads": config.num_attention_heads,
            "audio_num_attention_heads": config.audio_num_attention_heads}


def install_sequence_parallel_ltx2(transformer, sp_mesh):
    """Splits `transformer`'s video tokens over the 1-D `sp_mesh` in place (processors and hooks)."""
    size = sp_mesh.size()
    if size == 1:
        return transformer
    rank, group, config = sp_mesh.get_local_rank(), sp_mesh.get_group(), ulysses_config(sp_mesh)
    use_ulysses_processors(transformer.transformer_blocks, SEQUENCE_PARALLEL_ATTENTIONS, config)
    lengths = []

    def shard(module, args, kwargs):
        if args:
            raise TypeError("sequence-parallel LTX-2 takes its inputs by keyword (as the LTX-2 denoiser passes them)")
        if kwargs.get("video_self_attention_mask") is not None:
            raise ValueError("video_self_attention_mask is not supported under sequence parallel")
        if kwargs.get("video_coords") is None:
            raise ValueError("sequence-parallel LTX-2 needs video_coords (RoPE of this rank's tokens only)")
        tokens = kwargs["hidden_states"].shape[1]                                   # S
        lengths[:] = split_lengths(tokens, size)
        start = sum(lengths[:rank])
        for name, dim in VIDEO_TOKEN_DIMS.items():
            value = kwargs.get(name)
            if value is not None and value.ndim > dim and value.shape[dim] == tokens:
                kwargs[name] = value.narrow(dim, start, lengths[rank])              # (B, S_s, ...)
        return args, kwargs

    def gather(module, args, kwargs, out):
        if not isinstance(out, tuple):
            raise TypeError("sequence-parallel LTX-2 returns tuples (call it with return_dict=False)")
        video, audio = out                                                          # (B, S_s, C), (B, L, Ca)
        return all_gather_rows(video.contiguous(), group, lengths, dim=1), audio   # (B, S, C)

    transformer.register_forward_pre_hook(shard, with_kwargs=True)
    transformer.register_forward_hook(gather, with_kwargs=True)
    return transformer
