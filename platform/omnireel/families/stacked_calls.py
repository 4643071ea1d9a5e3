"""Many model calls of one step run as fewer: calls that agree in everything but their rows are
stacked on the batch dimension, run once, and their outputs split back (the batched step of the
diffusers families, LTX-2 and Wan; DESIGN.md §3b).

    calls = [(transformer, kwargs_job_a), (transformer, kwargs_job_b), (transformer, kwargs_job_c)]
    outputs = run_stacked(forward, calls)     # one tuple of tensors per call, as module(**kwargs) gives it

Two calls stack when they go to the same module, their non-tensor arguments are equal (flags such as
LTX-2's isolate_modalities or its STG blocks, the latent geometry, return_dict) and every tensor
argument has the same shape past dim 0, the same dtype and device (the same token counts: latents,
text after padding, audio). The rule the families' calls obey is that every tensor argument holds
one entry per row on dim 0 (B rows: a job's CFG batch, or a single guidance pass), and that
diffusers' transformers compute each row from that row's inputs alone (no attention, norm or
reduction across the batch), so a stacked row is the row run alone, up to float rounding. Calls of
other shapes fall into other groups: a job never sees another job's tokens.

The stacked calls of one module go to `base.run_calls` together, so a CFG-parallel forward spreads
all their rows over its ranks in one go; a single call goes unchanged (the solo path is the solo path).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .base import run_calls


def signature(kwargs: dict) -> dict:
    """What two calls must share to stack: tensors' (shape past dim 0, dtype, device), other values as is."""
    return {name: ("tensor", tuple(value.shape[1:]), value.dtype, value.device)
            if isinstance(value, torch.Tensor) else ("value", value) for name, value in kwargs.items()}


def row_count(kwargs: dict) -> int:
    """B: the rows of a call (every tensor argument's dim 0; ValueError if they disagree)."""
    counts = {name: value.shape[0] for name, value in kwargs.items() if isinstance(value, torch.Tensor)}
    if not counts or 0 in {value.ndim for value in kwargs.values() if isinstance(value, torch.Tensor)}:
        raise ValueError("a stacked call needs tensor arguments with a batch dimension")
    if len(set(counts.values())) != 1:
        raise ValueError(f"the tensor arguments of one call disagree on their rows: {counts}")
    return next(iter(counts.values()))


@dataclass
class CallGroup:
    """Calls that run as one: their indices in the caller's list, in order."""
    module: object
    signature: dict
    members: list[int] = field(default_factory=list)


def group_calls(calls: list[tuple[object, dict]]) -> list[CallGroup]:
    """The calls grouped by (module, signature), groups in order of their first call."""
    groups: list[CallGroup] = []
    for index, (module, kwargs) in enumerate(calls):
        key = signature(kwargs)
        group = next((g for g in groups if g.module is module and g.signature == key), None)
        if group is None:
            group = CallGroup(module, key)
            groups.append(group)
        group.members.append(index)
    return groups


def stacked_kwargs(calls: list[tuple[object, dict]], members: list[int]) -> dict:
    """One call's arguments for the group: tensors concatenated on dim 0 in member order."""
    if len(members) == 1:
        return calls[members[0]][1]
    first = calls[members[0]][1]
    return {name: torch.cat([calls[i][1][name] for i in members]) if isinstance(value, torch.Tensor) else value
            for name, value in first.items()}


def run_stacked(forward: Callable | None, calls: list[tuple[object, dict]]) -> list[tuple]:
    """Each call's outputs (a tuple of (B_i, ...) tensors), through as few model calls as the groups:
    per module, its groups' stacked calls go to base.run_calls together (`forward` injected)."""
    groups = group_calls(calls)
    results: list[tuple | None] = [None] * len(calls)
    modules = list({id(g.module): g.module for g in groups}.values())
    for module in modules:
        mine = [g for g in groups if g.module is module]
        outputs = run_calls(forward, module, [stacked_kwargs(calls, g.members) for g in mine])
        for group, output in zip(mine, outputs):
            if len(group.members) == 1:
                results[group.members[0]] = tuple(output)
                continue
            rows = [row_count(calls[i][1]) for i in group.members]
            parts = [torch.split(tensor, rows) for tensor in output]          # per output: one slice per call
            for k, index in enumerate(group.members):
                results[index] = tuple(part[k] for part in parts)
    return results
