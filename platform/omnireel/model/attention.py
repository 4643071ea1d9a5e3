"""Joint attention over the packed sequence, and the shot mask (DESIGN.md §3 "Shots").

Visibility rule: two tokens see each other unless they belong to different shots and at least one
of them is a shot caption. Global tokens (shot id -1) belong to no shot. One shot: no mask at all.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Dense boolean masks are for small CPU sequences only; larger ones (and all CUDA runs) use
# FlexAttention's block-sparse mask.
DENSE_MASK_MAX_TOKENS = 16384


def shot_visibility(shot_q: torch.Tensor, cap_q: torch.Tensor,
                    shot_k: torch.Tensor, cap_k: torch.Tensor) -> torch.Tensor:
    """True where a query token may attend a key token. Broadcasts over any shapes."""
    different_shots = (shot_q >= 0) & (shot_k >= 0) & (shot_q != shot_k)
    return ~(different_shots & (cap_q | cap_k))


def dense_shot_mask(shot: torch.Tensor, caption: torch.Tensor) -> torch.Tensor:
    """shot (L,) int, caption (L,) bool -> (L, L) bool, True = may attend."""
    return shot_visibility(shot[:, None], caption[:, None], shot[None, :], caption[None, :])


def flex_shot_mask(shot: torch.Tensor, caption: torch.Tensor):
    """A FlexAttention BlockMask for the same rule (built on shot's device)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return shot_visibility(shot[q_idx], caption[q_idx], shot[kv_idx], caption[kv_idx])

    n = shot.shape[0]
    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=n, KV_LEN=n, device=shot.device)


def build_attention_mask(shot: torch.Tensor, caption: torch.Tensor, device: torch.device | str):
    """None for one shot (plain flash attention), a dense mask on small CPU runs, else a BlockMask."""
    if len({int(s) for s in shot.unique() if s >= 0}) <= 1:
        return None
    shot, caption = shot.to(device), caption.to(device)
    if torch.device(device).type == "cpu" and shot.numel() <= DENSE_MASK_MAX_TOKENS:
        return dense_shot_mask(shot, caption)
    return flex_shot_mask(shot, caption)


def joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """q, k, v (B, H, L, head_dim); mask None | (L, L) bool | BlockMask -> (B, H, L, head_dim)."""
    if mask is None or isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    from torch.nn.attention.flex_attention import flex_attention
    return flex_attention(q, k, v, block_mask=mask)
