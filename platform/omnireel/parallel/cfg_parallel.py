"""CFG-parallel: the rows of one model call (the CFG batch: [cond, uncond] for omni, [negative,
prompt] for LTX-2 and Wan) are run by different `cfg` ranks and gathered, through the Denoiser's injected
`forward(module, *args, **kwargs)` (families/base.py), so the sampler around it is unchanged.

    B rows, cfg ranks: rank c runs rows [c * ceil(B / cfg), ...) (the last rank's share padded by
    repeating its last row), each output (B_c, ...) is all-gathered over the cfg group -> (B, ...)

A step whose calls the family hands over together (base.run_calls: LTX-2's CFG batch [negative,
prompt], STG pass and modality pass, 2 + 1 + 1 rows) has all their rows spread as one list: at cfg=2
rank 0 runs the CFG batch, rank 1 the STG and the modality passes. A lone one-row call (no CFG) runs
whole on every cfg rank. Which arguments carry rows is the family's (BatchRows); everything else goes
to every rank as is.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .mesh import all_gather_rows


@dataclass(frozen=True)
class BatchRows:
    """The arguments of a model call that hold one entry per row: positions and keyword names.
    A dataclass argument (omni's ConditionTokens) has its tensor fields taken row by row."""
    positions: tuple[int, ...] = ()
    names: tuple[str, ...] = ()


OMNI_ROWS = BatchRows(positions=(0, 1, 2, 3), names=("drop_captions",))   # video, audio, sigmas, cond
LTX2_ROWS = BatchRows(names=("hidden_states", "audio_hidden_states", "encoder_hidden_states",
                             "audio_encoder_hidden_states", "timestep", "audio_timestep", "sigma", "audio_sigma",
                             "encoder_attention_mask", "audio_encoder_attention_mask", "video_coords",
                             "audio_coords"))
WAN_ROWS = BatchRows(names=("hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_image"))


def take_rows(value, index: torch.Tensor):
    """`value`'s rows at `index` (a tensor, a dataclass of tensors, or None)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.index_select(0, index.to(value.device))
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value, **{f.name: take_rows(getattr(value, f.name), index)
                                             for f in dataclasses.fields(value)})
    raise TypeError(f"cannot take rows of a {type(value).__name__}")


def batch_rows(args: tuple, kwargs: dict, rows: BatchRows) -> int:
    """B: the row count of the first row argument present."""
    for value in [args[i] for i in rows.positions if i < len(args)] + [kwargs.get(n) for n in rows.names]:
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    raise ValueError(f"no row argument among positions {rows.positions} / names {rows.names}")


class CfgParallelForward:
    """The injected forward of a cfg-parallel rank: this rank's share of the rows, then the gather.

    `calls(module, [(args, kwargs), ...])` spreads the rows of several calls of one step (LTX-2's CFG
    batch, STG and modality passes: 2 + 1 + 1 rows) over the ranks as one list, each rank running
    its rows of each call it touches; a plain call is a list of one."""

    def __init__(self, rows: BatchRows, group, rank: int, size: int):
        self.rows, self.group, self.rank, self.size = rows, group, rank, size

    def __call__(self, module, *args, **kwargs):
        return self.calls(module, [(args, kwargs)])[0]

    def calls(self, module, calls: list[tuple[tuple, dict]]) -> list:
        """Each call's outputs (tuples of (B_i, ...) tensors), as module(*args, **kwargs) would give them."""
        counts = [batch_rows(args, kwargs, self.rows) for args, kwargs in calls]
        units = [(c, row) for c, n in enumerate(counts) for row in range(n)]   # one (call, row) per row
        per = math.ceil(len(units) / self.size)
        if self.size == 1 or per == len(units):                                # one rank could hold them all
            return [module(*args, **kwargs) for args, kwargs in calls]
        mine = [units[min(self.rank * per + i, len(units) - 1)] for i in range(per)]   # the last padded
        outputs = []                                                           # one tuple per run of one call
        for c in dict.fromkeys(call for call, _ in mine):
            index = torch.tensor([row for call, row in mine if call == c])
            args, kwargs = calls[c]
            args = tuple(take_rows(a, index) if i in self.rows.positions else a for i, a in enumerate(args))
            kwargs = {k: take_rows(v, index) if k in self.rows.names else v for k, v in kwargs.items()}
            outputs.append(module(*args, **kwargs))
        gathered = [all_gather_rows(torch.cat(parts).contiguous(), self.group, [per] * self.size)[:len(units)]
                    for parts in zip(*outputs)]                                # (units, ...) per output
        results, start = [], 0
        for n, (args, kwargs) in zip(counts, calls):
            results.append(tuple(g[start:start + n] for g in gathered))
            start += n
        return results
