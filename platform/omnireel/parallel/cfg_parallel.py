"""CFG-parallel: the rows of one model call (the CFG batch: [cond, uncond] for omni, [negative,
prompt] for LTX-2 and Wan) are run by different `cfg` ranks and gathered, through the Denoiser's injected
`forward(module, *args, **kwargs)` (families/base.py), so the sampler around it is unchanged.

    B rows, cfg ranks: rank c runs rows [c * ceil(B / cfg), ...) (the last rank's share padded by
    repeating its last row), each output (B_c, ...) is all-gathered over the cfg group -> (B, ...)

A step whose calls the family hands over together (base.run_calls: LTX-2's CFG batch [negative,
prompt], STG pass and modality pass, 2 + 1 + 1 rows) has all their rows spread as one list: at cfg=2
rank 0 runs the CFG batch, rank 1 the STG and the modality passes. Calls of different row shapes (a
batched step's stacked calls of jobs of two sizes, stacked_calls.py) are spread shape by shape, so a
gather only ever joins rows of one shape. A lone one-row call (no CFG) runs whole on every cfg rank.
Which arguments carry rows is the family's (BatchRows); everything else goes to every rank as is.

A packed call (omni's batched step: forward_packed(jobs), one row dataclass per job, jobs of any
shapes; BatchRows.packed names the fields that hold rows) spreads each job's rows the same way, all
jobs in one forward per rank: rank c runs rows [c * ceil(B_j / cfg), ...) of every job j of B_j > 1
rows (the last share padded as above) and the whole of every one-row job; the spread jobs' outputs,
the same shapes on every rank, are gathered in one all-gather of their flattened concatenation.
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
    packed: tuple[str, ...] = ()           # the row fields of a packed call's per-job dataclass


OMNI_ROWS = BatchRows(positions=(0, 1, 2, 3), names=("drop_captions",),   # video, audio, sigmas, cond
                      packed=("video", "audio", "sigmas", "cond", "drop_captions"))   # model.backbone.BackboneRows
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


def row_values(args: tuple, kwargs: dict, rows: BatchRows) -> list:
    """The row arguments of one call, in BatchRows order (None where absent)."""
    return [args[i] if i < len(args) else None for i in rows.positions] + [kwargs.get(n) for n in rows.names]


def batch_rows(args: tuple, kwargs: dict, rows: BatchRows) -> int:
    """B: the row count of the first row argument present."""
    for value in row_values(args, kwargs, rows):
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    raise ValueError(f"no row argument among positions {rows.positions} / names {rows.names}")


def row_shape(value):
    """What a row of `value` looks like: a tensor's shape past dim 0, a dataclass's fields' (None: none)."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape[1:])
    if dataclasses.is_dataclass(value):
        return tuple(row_shape(getattr(value, f.name)) for f in dataclasses.fields(value))
    return None


def shape_classes(calls: list[tuple[tuple, dict]], rows: BatchRows) -> list[list[int]]:
    """The calls' indices grouped by the row shapes of their row arguments, groups in order of their
    first call (the same on every rank: every rank holds the same calls)."""
    classes: dict[tuple, list[int]] = {}
    for index, (args, kwargs) in enumerate(calls):
        key = tuple(row_shape(v) for v in row_values(args, kwargs, rows))
        classes.setdefault(key, []).append(index)
    return list(classes.values())


class CfgParallelForward:
    """The injected forward of a cfg-parallel rank: this rank's share of the rows, then the gather.

    `calls(module, [(args, kwargs), ...])` spreads the rows of several calls of one step (LTX-2's CFG
    batch, STG and modality passes: 2 + 1 + 1 rows) over the ranks as one list, each rank running
    its rows of each call it touches; a plain call is a list of one."""

    def __init__(self, rows: BatchRows, group, rank: int, size: int):
        self.rows, self.group, self.rank, self.size = rows, group, rank, size

    def __call__(self, module, *args, **kwargs):
        if args and isinstance(args[0], list):          # a packed call: module(jobs)
            return self.packed(module, args[0])
        return self.calls(module, [(args, kwargs)])[0]

    def calls(self, module, calls: list[tuple[tuple, dict]]) -> list:
        """Each call's outputs (tuples of (B_i, ...) tensors), as module(*args, **kwargs) would give them."""
        results = [None] * len(calls)
        for members in shape_classes(calls, self.rows):
            for index, output in zip(members, self.spread(module, [calls[i] for i in members])):
                results[index] = output
        return results

    def spread(self, module, calls: list[tuple[tuple, dict]]) -> list:
        """calls() for calls whose rows have one shape: their rows spread over the ranks as one list."""
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

    def packed(self, module, jobs: list) -> list:
        """module(jobs) (a packed call: one row dataclass per job -> per job a tuple of (B_j, ...)
        outputs), each job's rows spread over the ranks (module docstring)."""
        mine, spread = [], []                      # this rank's jobs; per job, its share (or None: whole)
        for job in jobs:
            count = next(getattr(job, f).shape[0] for f in self.rows.packed
                         if isinstance(getattr(job, f), torch.Tensor))
            per = math.ceil(count / self.size)
            if per == count:                       # one rank holds it all: every rank runs it whole
                mine.append(job)
                spread.append(None)
                continue
            index = torch.tensor([min(self.rank * per + i, count - 1) for i in range(per)])   # the last padded
            mine.append(dataclasses.replace(job, **{f: take_rows(getattr(job, f), index) for f in self.rows.packed}))
            spread.append((count, per))
        outputs = [tuple(out) for out in module(mine)]
        local = [t for out, share in zip(outputs, spread) if share is not None for t in out]   # equal on every rank
        if not local:
            return outputs
        flat = torch.cat([t.reshape(-1) for t in local])
        gathered = all_gather_rows(flat, self.group, [flat.numel()] * self.size).view(self.size, -1)   # (ranks, n)
        sizes = [t.numel() for t in local]
        parts = iter(zip(torch.split(gathered, sizes, dim=1), local))   # per local tensor: (ranks, its numel)
        results = []
        for out, share in zip(outputs, spread):
            if share is None:
                results.append(out)
                continue
            count, per = share
            results.append(tuple(part.reshape(self.size * per, *t.shape[1:])[:count]
                                 for part, t in (next(parts) for _ in out)))
        return results
