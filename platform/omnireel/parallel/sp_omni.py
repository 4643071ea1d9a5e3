"""Ulysses sequence parallel for the omni backbone, installed from outside the model (DESIGN.md §3b).

The joint sequence (every stream, L tokens) is split over the `sp` ranks between the embedding and
the output heads; the blocks run on this rank's L_s tokens (its rows of the adaLN gather, RoPE and
weight-group spans), and each attention turns sequence shards into head shards and back:

    x (B, L, d) --shard--> (B, L_s, d)                          before block 0 (torch.tensor_split)
    q, k, v (B, L_s, H_t, hd) --all-to-all--> (B, L, H_t / sp, hd)   H_t: heads per tp rank
    attention over all L tokens with the whole shot mask (None | (L, L) | BlockMask)
    out (B, L, H_t / sp, hd) --all-to-all--> (B, L_s, H_t, hd) -> o
    x (B, L_s, d) --all-gather--> (B, L, d)                     before the output heads (norm_out)

Uneven lengths: the shards are torch.tensor_split's (the first L % sp ranks hold one token more) and
the all-to-alls are diffusers' "Ulysses anything" ones, which exchange uneven shards as they are; so
no token is padded and the mask needs no padding row (flash attention stays on for one shot).
Embeddings and output heads run on the whole sequence on every sp rank (cheap next to the blocks).
Under TP too, q/k/v are this tp rank's heads (tp.py) and the all-to-alls run on the sp group.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ..model.attention import joint_attention
from ..model.backbone import Attention, OmniBackbone, PreparedLayout, apply_linear
from ..model.rope import apply_rope
from .mesh import all_gather_rows, split_lengths


def attention_heads(config) -> dict[str, int]:
    """The head counts the mesh must divide (mesh.check_mesh), from the omni ModelConfig."""
    return {"backbone.heads": config.backbone.heads}


def shard_spans(spans, start: int, stop: int) -> tuple:
    """Weight groups' tokens -> their parts in [start, stop), relative to start. A single layout's
    groups are spans (contiguous, in order, covering [0, L)); a packed batch's (PackedLayout.groups)
    are index tensors, each kept to its indices in range."""
    if not isinstance(spans[0], slice):
        return tuple(index[(index >= start) & (index < stop)] - start for index in spans)
    return tuple(slice(min(max(s.start, start), stop) - start, min(max(s.stop, start), stop) - start) for s in spans)


class SequenceShard:
    """This rank's token range of the sequence a forward is running, and what the blocks need for it
    (computed once per PreparedLayout, so once per job, or once per packed step, not per block)."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size
        self._prep = None

    def update(self, prep, group_spans) -> None:
        """prep: the forward's PreparedLayout, or PackedLayout (several jobs' rows as one sequence)."""
        if prep is self._prep:
            return
        self._prep = None                     # until every field below is this prep's
        tokens = prep.timestep.shape[0]
        self.lengths = split_lengths(tokens, self.size)
        self.start = sum(self.lengths[:self.rank])
        self.stop = self.start + self.lengths[self.rank]
        rows = slice(self.start, self.stop)
        cos, sin = prep.rope
        self.local_prep = replace(prep, rope=(cos[rows], sin[rows]), timestep=prep.timestep[rows])  # mask: whole
        self.local_spans = shard_spans(group_spans, self.start, self.stop)
        self._prep = prep


def install_sequence_parallel(backbone: OmniBackbone, sp_mesh) -> OmniBackbone:
    """Splits `backbone`'s blocks over the 1-D `sp_mesh` in place (hooks and attention forwards)."""
    size = sp_mesh.size()
    if size == 1:
        return backbone
    group = sp_mesh.get_group()
    shard = SequenceShard(sp_mesh.get_local_rank(), size)

    def enter_block(first: bool):
        def hook(block, args):
            x, time_mod, prep, group_spans = args                       # x (B, L, d) or (B, L_s, d)
            shard.update(prep, group_spans)
            if first:
                x = x[:, shard.start:shard.stop]                        # (B, L_s, d)
            return x, time_mod, shard.local_prep, shard.local_spans
        return hook

    for i, block in enumerate(backbone.blocks):
        block.register_forward_pre_hook(enter_block(i == 0))
        ulysses_attention(block.attn, group)

    def gather(norm, args):
        (x,) = args                                                     # (B, L_s, d)
        return (all_gather_rows(x, group, shard.lengths, dim=1),)       # (B, L, d)

    backbone.norm_out.register_forward_pre_hook(gather)
    return backbone


def ulysses_attention(attn: Attention, group) -> None:
    """Replaces `attn.forward` with the sequence-parallel one (same weights, same per-head math)."""
    from diffusers.models.attention_dispatch import (all_to_all_single_any_o_async,
                                                     all_to_all_single_any_qkv_async, ulysses_anything_metadata)

    def forward(x: torch.Tensor, prep: PreparedLayout, group_spans) -> torch.Tensor:
        B, L, _ = x.shape                                               # L = L_s, this rank's tokens
        q = attn.q_norm(apply_linear(attn.q, x, group_spans).view(B, L, -1, attn.head_dim))  # (B, L_s, H_t, hd)
        k = attn.k_norm(apply_linear(attn.k, x, group_spans).view(B, L, -1, attn.head_dim))
        v = apply_linear(attn.v, x, group_spans).view(B, L, -1, attn.head_dim)
        cos, sin = prep.rope                                            # this rank's tokens' (L_s, hd / 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        meta = ulysses_anything_metadata(q)
        q, k, v = (all_to_all_single_any_qkv_async(t, group, **meta)() for t in (q, k, v))  # (B, L, H_t/sp, hd)
        out = joint_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), prep.mask)  # (B, H', L, hd)
        out = all_to_all_single_any_o_async(out.transpose(1, 2).contiguous(), group, **meta)()   # (B, L_s, H_t, hd)
        return apply_linear(attn.o, out.reshape(B, L, -1), group_spans)

    attn.forward = forward

