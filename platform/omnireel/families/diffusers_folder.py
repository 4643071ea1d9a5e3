"""What the families served from diffusers folders share (ltx2, wan): the folder's files, its digest,
loading one component from its subfolder only, and the Family methods that follow from those.

A diffusers folder is what `Pipeline.save_pretrained` writes: model_index.json (the pipeline's class
and each component's library and class) and one subfolder per component.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
from pathlib import Path
from typing import Callable

import torch

from .base import Family

HASHED_EDGE_BYTES = 1 << 20          # a weights file is digested by name, size, first and last MiB


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def meta_module(cls, config: dict):
    """A diffusers model built from `config` on the meta device (no memory, no weights read)."""
    with torch.device("meta"):
        return cls.from_config(config)


def checkpoint_digest(folder: Path) -> str:
    """sha256 over model_index.json and every subfolder's files: small files (configs, tokenizer)
    by content, weights by name, size and their first and last MiB (cheap on a 40 GB folder)."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        size = path.stat().st_size
        digest.update(f"{relative}\0{size}\0".encode())
        with path.open("rb") as f:
            if size <= 2 * HASHED_EDGE_BYTES:
                digest.update(f.read())
            else:
                digest.update(f.read(HASHED_EDGE_BYTES))
                f.seek(size - HASHED_EDGE_BYTES)
                digest.update(f.read())
    return digest.hexdigest()


LIBRARIES = {"diffusers": "diffusers", "transformers": "transformers", "ltx2": "diffusers.pipelines.ltx2"}


def load_subfolder(folder: Path, name: str, device, dtype: torch.dtype | None):
    """The checkpoint's `name` component, by the class model_index.json names, from its subfolder only."""
    library, class_name = read_json(folder / "model_index.json")[name]
    cls = getattr(importlib.import_module(LIBRARIES.get(library, library)), class_name)
    path = folder / name
    if library == "transformers" and not hasattr(cls, "to"):     # a tokenizer
        return cls.from_pretrained(path)
    if class_name.endswith("Scheduler"):
        return cls.from_pretrained(path)
    if library == "transformers":
        return cls.from_pretrained(path, dtype=dtype).to(device).eval()
    return cls.from_pretrained(path, torch_dtype=dtype).to(device).eval()


def torch_dtype(dtype: str | None, device) -> torch.dtype:
    """--dtype: float32 by default on the CPU, bfloat16 on a GPU."""
    if dtype is None:
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    return getattr(torch, dtype)


def pipeline_default(pipeline_class, name: str):
    """The default of `pipeline_class.__call__`'s argument `name` (a diffusers pipeline)."""
    return inspect.signature(pipeline_class.__call__).parameters[name].default


def encode_voice(component, plan):
    """No diffusers family binds voices: empty VoiceEmbeddings."""
    from ..stages import VoiceEmbeddings
    return VoiceEmbeddings(speakers=torch.zeros(0, 0))


class DiffusersFamily(Family):
    """A family whose checkpoints are diffusers folders (which pipeline classes: the registry's
    DIFFUSERS_PIPELINES, families/__init__.py). Subclasses give
    read_config, plan_folder (the family's planning after the shared field check), component_makers,
    `stages` and warmup_values."""

    stages: dict[str, Callable] = {}

    def digest(self, checkpoint: Path) -> str:
        return checkpoint_digest(Path(checkpoint))

    def plan(self, request, config):
        self.check_fields(request)
        return self.plan_folder(request, config)

    def plan_folder(self, request, config):
        raise NotImplementedError

    def load_components(self, checkpoint: Path, names, device="cpu", *, dtype: str | None = None,
                        voices: str | None = None) -> dict:
        """Each named component from only its subfolders, each subfolder loaded once (`voices` is
        unused: no diffusers family binds voices)."""
        folder, config = Path(checkpoint), self.read_config(checkpoint)
        as_dtype = torch_dtype(dtype, device)
        loaded: dict = {}

        def part(name: str):
            if name not in loaded:
                loaded[name] = load_subfolder(folder, name, device, as_dtype)
            return loaded[name]

        makers = self.component_makers(config, part)
        return {name: makers[name]() for name in self.component_names if name in names}

    def component_makers(self, config, part: Callable[[str], object]) -> dict[str, Callable[[], object]]:
        """{component name: a function making it}, loading subfolders through `part(name)`."""
        raise NotImplementedError

    def stage(self, name: str) -> Callable:
        return self.stages[name]
