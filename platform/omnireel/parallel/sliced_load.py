"""Loading a tensor-parallel shard by slice: each rank reads only the rows or columns it keeps of every
split tensor (safetensors' get_slice) and the replicated tensors whole. `fill_local_shards` serves the
omni checkpoint (checkpoint.load_backbone_shard) and the diffusers folders (SafetensorsFolder: one file
or an index of shards; `load_sharded`) alike.
"""
from __future__ import annotations

import json
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from .tp import local_tensor


class SafetensorsFolder:
    """A diffusers model folder's weights, read by name: one `diffusion_pytorch_model.safetensors`, or
    shards listed by `diffusion_pytorch_model.safetensors.index.json`. Opens a shard on first use."""

    def __init__(self, directory: str | os.PathLike):
        from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME

        self.directory = Path(directory)
        index = self.directory / SAFE_WEIGHTS_INDEX_NAME
        single = self.directory / SAFETENSORS_WEIGHTS_NAME
        if index.is_file():
            self.files = json.loads(index.read_text())["weight_map"]      # name -> shard file name
        elif single.is_file():
            from safetensors import safe_open
            with safe_open(single, framework="pt") as weights:
                self.files = {name: SAFETENSORS_WEIGHTS_NAME for name in weights.keys()}
        else:
            raise FileNotFoundError(f"{self.directory}: neither {SAFETENSORS_WEIGHTS_NAME} nor {SAFE_WEIGHTS_INDEX_NAME}")
        self._open: dict[str, object] = {}
        self._stack = ExitStack()

    def __enter__(self) -> "SafetensorsFolder":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self._open.clear()

    def get_slice(self, name: str):
        """safetensors' lazy slice of tensor `name`: `[...]` reads only the indexed bytes."""
        from safetensors import safe_open

        file = self.files[name]
        if file not in self._open:
            self._open[file] = self._stack.enter_context(safe_open(self.directory / file, framework="pt"))
        return self._open[file].get_slice(name)

    def meta_tensors(self) -> dict[str, torch.Tensor]:
        """{name: a meta tensor of its full shape}, for check_state_dict."""
        return {name: torch.empty(self.get_slice(name).get_shape(), device="meta") for name in self.files}


def fill_local_shards(module: nn.Module, get_slice: Callable[[str], object], rank: int) -> None:
    """Copies each parameter's (and buffer's) local part of a parallelized `module` from the weights:
    `get_slice(name)` is safetensors' lazy slice of the tensor `name` holds. A Shard(dim) DTensor gets
    rows or columns [rank * n, (rank + 1) * n) of its tensor, and only those bytes are read; the rest
    is read whole."""
    with torch.no_grad():
        for name, tensor in module.state_dict(keep_vars=True).items():
            if isinstance(tensor, DTensor) and tensor.placements[0].is_shard():
                local, dim = tensor.to_local(), tensor.placements[0].dim   # (out / N, in) or (out, in / N)
                index = [slice(None)] * local.dim()
                index[dim] = slice(rank * local.shape[dim], (rank + 1) * local.shape[dim])   # tp divides it
                local.copy_(get_slice(name)[tuple(index)])                # only these bytes
            else:                                                         # replicated: the whole tensor
                local_tensor(tensor).copy_(get_slice(name)[:])


def load_sharded(meta_module: nn.Module, folder: str | os.PathLike, parallelize: Callable, mesh: DeviceMesh,
                 device) -> nn.Module:
    """A diffusers model folder's weights into this rank's shards of `meta_module` (built on the meta
    device): shapes checked against the files, `parallelize(module, mesh)` applied, only the local
    shards allocated (`to_empty`) and filled by slice. Non-persistent buffers are the caller's to
    recompute."""
    from ..checkpoint import check_state_dict

    with SafetensorsFolder(folder) as weights:
        check_state_dict(meta_module.state_dict(), weights.meta_tensors(), source=folder)
        parallelize(meta_module, mesh)
        meta_module.to_empty(device=device)
        fill_local_shards(meta_module, weights.get_slice, mesh.get_local_rank())
    return meta_module
