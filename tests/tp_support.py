"""The TP tests' harness: TP ranks as processes in one gloo group on the CPU, and a check that each
rank holds exactly its part of every parameter."""
from __future__ import annotations

import datetime
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
import torch.multiprocessing as mp


@contextmanager
def gloo_rank(rank: int, world: int, store: str):
    """One rank's process group (one torch thread: the ranks share the test cores) -> its 1-D CPU mesh.
    On a clean exit the rank waits for the others, so none tears the group down while it is in use."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        yield init_device_mesh("cpu", (world,))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn_ranks(rank_main: Callable, args: tuple, world: int, out: Path) -> list:
    """Runs rank_main(rank, *args, store, out) in `world` processes; each saves out/rank<r>.pt -> their contents."""
    mp.spawn(rank_main, args=(*args, str(out / "store"), str(out)), nprocs=world, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


def shard_report(module, full: dict[str, torch.Tensor], rank: int, world: int,
                 split_dim: Callable[[str], int | None], prefix: str = "") -> dict:
    """{prefix + name: (split dim or None, whether this rank holds exactly its chunk of the full tensor,
    or the whole tensor when it is replicated)} for each parameter of a parallelized `module`."""
    from torch.distributed.tensor import DTensor

    report = {}
    for name, p in module.named_parameters():
        dim = split_dim(name)
        local = p.to_local() if isinstance(p, DTensor) else p
        expected = full[name] if dim is None else full[name].chunk(world, dim)[rank]
        report[prefix + name] = (dim, local.shape == expected.shape and torch.equal(local, expected))
    return report


def split_parameter_names(backbone) -> set[str]:
    """Parameter names the backbone's TP plan shards (column-parallel weights and biases, row-parallel weights)."""
    from torch.distributed.tensor.parallel import ColwiseParallel

    from omnireel.parallel.tp import backbone_tp_plan

    names = set()
    for path, style in backbone_tp_plan(backbone).items():
        names.add(f"{path}.weight")
        if isinstance(style, ColwiseParallel) and backbone.get_submodule(path).bias is not None:
            names.add(f"{path}.bias")
    return names


def parameter_bytes_split(backbone) -> tuple[int, int]:
    """(split bytes, replicated bytes) of an unsharded backbone (meta is fine): per rank under TP=N
    the resident bytes are split / N + replicated."""
    split_names = split_parameter_names(backbone)
    split = replicated = 0
    for name, p in backbone.named_parameters():
        size = p.numel() * p.element_size()
        if name in split_names:
            split += size
        else:
            replicated += size
    return split, replicated
