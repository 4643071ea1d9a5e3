"""Joint attention over the packed sequence, and the shot mask (DESIGN.md §3 "Shots").

Visibility rule: two tokens see each other unless they belong to different shots and at least one
of them is a shot caption. Global tokens (shot id -1) belong to no shot. One shot: no mask at all.

A packed batch (several jobs' rows in one varlen sequence, model/backbone.py forward_packed) adds one
rule: a token sees only the tokens of its own row. On the CPU that is one SDPA call per job over its
own rows, with its own shot mask (PackedMask); on a GPU one FlexAttention block mask over the whole
sequence (same row and the shot rule), so the blocks of other rows are skipped, never computed.
"""
from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class PackedMask:
    """The block-diagonal mask of a packed sequence, as per-job attention calls: job i holds `rows`
    rows of `length` tokens from token `start`, each row attending only to itself under `mask` (the
    job's own: None | (L, L) bool | BlockMask)."""
    segments: tuple[tuple[int, int, int, object], ...]    # (start, rows, length, mask)


def packed_row_ids(segments, device) -> torch.Tensor:
    """(N,) long: which row (over all jobs) each packed token belongs to."""
    ids, row = [], 0
    for _, rows, length, _ in segments:
        ids.append(torch.arange(row, row + rows, device=device).repeat_interleave(length))
        row += rows
    return torch.cat(ids)


def packed_attention_mask(jobs, device: torch.device | str):
    """jobs: per job (start, rows, TokenLayout, its own mask) in packing order -> the packed sequence's
    mask: a PackedMask on the CPU (per-job SDPA), a FlexAttention BlockMask elsewhere."""
    segments = tuple((start, rows, layout.length, mask) for start, rows, layout, mask in jobs)
    if torch.device(device).type == "cpu":
        return PackedMask(merge_unmasked(segments))
    return flex_packed_mask(segments, torch.cat([layout.shot.repeat(rows) for _, rows, layout, _ in jobs]),
                            torch.cat([layout.caption.repeat(rows) for _, rows, layout, _ in jobs]), device)


def merge_unmasked(segments) -> tuple:
    """Adjacent segments of one length and no shot mask as one (their rows in one SDPA call): the
    same rows, the same visibility, fewer calls when jobs of one shape are batched."""
    merged: list[tuple[int, int, int, object]] = []
    for start, rows, length, mask in segments:
        if merged and mask is None and merged[-1][3] is None and merged[-1][2] == length:
            first, first_rows, _, _ = merged.pop()
            merged.append((first, first_rows + rows, length, None))
        else:
            merged.append((start, rows, length, mask))
    return tuple(merged)


def flex_packed_mask(segments, shot: torch.Tensor, caption: torch.Tensor, device):
    """A BlockMask over N packed tokens: same row, and the shot rule within it. shot, caption (N,)."""
    from torch.nn.attention.flex_attention import create_block_mask

    row, shot, caption = packed_row_ids(segments, device), shot.to(device), caption.to(device)

    def mask_mod(b, h, q_idx, kv_idx):
        return (row[q_idx] == row[kv_idx]) & shot_visibility(shot[q_idx], caption[q_idx], shot[kv_idx], caption[kv_idx])

    n = row.shape[0]
    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=n, KV_LEN=n, device=device)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: PackedMask) -> torch.Tensor:
    """q, k, v (1, H, N, head_dim) -> (1, H, N, head_dim): each job's rows attend alone, as in
    joint_attention over that job's (rows, H, L, head_dim)."""
    out = []
    for start, rows, length, job_mask in mask.segments:
        def rows_of(t):   # (1, H, N, hd) -> (rows, H, L, hd)
            return t[0, :, start:start + rows * length].unflatten(1, (rows, length)).transpose(0, 1)
        y = joint_attention(rows_of(q), rows_of(k), rows_of(v), job_mask)          # (rows, H, L, hd)
        out.append(y.transpose(0, 1).flatten(1, 2))                                 # (H, rows*L, hd)
    return torch.cat(out, 1)[None]


def joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """q, k, v (B, H, L, head_dim); mask None | (L, L) bool | BlockMask | PackedMask (B = 1, L = N)
    -> (B, H, L, head_dim)."""
    if isinstance(mask, PackedMask):
        return packed_attention(q, k, v, mask)
    if mask is None or isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    from torch.nn.attention.flex_attention import flex_attention
    return flex_attention(q, k, v, block_mask=mask)
