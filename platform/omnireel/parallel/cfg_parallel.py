"""CFG-parallel: the rows of one model call (the CFG batch: [cond, uncond] for omni, [negative,
prompt] for LTX-2) are run by different `cfg` ranks and gathered, through the Denoiser's injected
`forward(module, *args, **kwargs)` (families/base.py), so the sampler around it is unchanged.

    B rows, cfg ranks: rank c runs rows [c * ceil(B / cfg), ...) (the last rank's share padded by
    repeating its last row), each output (B_c, ...) is all-gathered over the cfg group -> (B, ...)

A call with one row (no CFG, or LTX-2's STG and modality passes) runs whole on every cfg rank.
Which arguments carry rows is the family's (BatchRows); everything else goes to every rank as is.
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
    """The injected forward of a cfg-parallel rank: this rank's share of the rows, then the gather."""

    def __init__(self, rows: BatchRows, group, rank: int, size: int):
        self.rows, self.group, self.rank, self.size = rows, group, rank, size

    def share(self, batch: int) -> tuple[torch.Tensor, list[int]]:
        """(this rank's row indices, every rank's count of real rows)."""
        per = math.ceil(batch / self.size)
        counts = [max(0, min(per, batch - r * per)) for r in range(self.size)]
        start = self.rank * per
        return torch.tensor([min(start + i, batch - 1) for i in range(per)]), counts

    def __call__(self, module, *args, **kwargs):
        batch = batch_rows(args, kwargs, self.rows)
        if self.size == 1 or batch == 1:
            return module(*args, **kwargs)
        index, counts = self.share(batch)
        args = tuple(take_rows(a, index) if i in self.rows.positions else a for i, a in enumerate(args))
        kwargs = {k: take_rows(v, index) if k in self.rows.names else v for k, v in kwargs.items()}
        out = module(*args, **kwargs)                              # tuple of (B_c, ...) tensors
        per = len(index)
        real = self.real_rows(counts, per)
        return type(out)(all_gather_rows(o.contiguous(), self.group, [per] * self.size)[real.to(o.device)]
                         for o in out)

    @staticmethod
    def real_rows(counts: list[int], per: int) -> torch.Tensor:
        """Indices of the real rows among the gathered (cfg * per) ones."""
        return torch.tensor([r * per + i for r, n in enumerate(counts) for i in range(n)])
