"""Checkpoints on disk. `read_config` / `read_digest` take a folder of any family (families/); the rest
is the omni family's format: one directory per checkpoint, written atomically.

    config.json        {"format": 1, "model": ModelConfig.to_dict()}
    model.safetensors  the OmniModel state_dict
    digest.txt         sha256 hex over canonical config JSON bytes + the safetensors bytes

A checkpoint directory appears by one rename of a finished temporary directory, so a reader never
sees a half-written checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .canonical import canonical_json
from .model.config import ModelConfig, preset
from .model.omni import PARTS, OmniModel, build_model, build_part

CHECKPOINT_FORMAT = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
DIGEST_FILE = "digest.txt"
DEFAULT_PRESET = "small"
DEFAULT_SEED = 0


def save_checkpoint(model: nn.Module, config: ModelConfig, directory: str | os.PathLike) -> str:
    """Writes `model` and `config` as a new checkpoint `directory`; returns its digest.

    Refuses to replace an existing path (FileExistsError): checkpoints are immutable.
    """
    directory = Path(directory)
    if directory.exists():
        raise FileExistsError(f"checkpoint directory {directory} already exists")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    staging.chmod(0o755)  # mkdtemp's 0o700 would hide a shared cache from other users
    try:
        config_document = {"format": CHECKPOINT_FORMAT, "model": config.to_dict()}
        (staging / CONFIG_FILE).write_text(json.dumps(config_document, indent=2, sort_keys=True) + "\n")
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
        save_file(tensors, staging / WEIGHTS_FILE)
        digest = _digest(config_document, staging / WEIGHTS_FILE)
        (staging / DIGEST_FILE).write_text(digest + "\n")
        _sync(staging)
        try:
            os.rename(staging, directory)
        except OSError as exc:
            if not directory.exists():
                raise
            # another writer renamed first (ENOTEMPTY / EEXIST)
            raise FileExistsError(f"checkpoint directory {directory} already exists") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful rename
    return digest


def read_config(directory: str | os.PathLike):
    """The config of a checkpoint folder of any family (families/); its `family` names the family."""
    from .families import family_of
    return family_of(directory).read_config(Path(directory))


def read_digest(directory: str | os.PathLike) -> str:
    """The digest of a checkpoint folder of any family: part of every artifact key."""
    from .families import family_of
    return family_of(directory).digest(Path(directory))


def read_omni_config(directory: str | os.PathLike) -> ModelConfig:
    document = json.loads((Path(directory) / CONFIG_FILE).read_text())
    if document.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{Path(directory) / CONFIG_FILE}: format {document.get('format')!r} "
                         f"is not supported (expected {CHECKPOINT_FORMAT})")
    return ModelConfig.from_dict(document["model"])


def read_omni_digest(directory: str | os.PathLike) -> str:
    return (Path(directory) / DIGEST_FILE).read_text().strip()


def load_checkpoint(directory: str | os.PathLike, device: str | torch.device = "cpu") -> OmniModel:
    """Builds the OmniModel of `directory`'s config on `device` and loads its weights strictly."""
    directory = Path(directory)
    with torch.device(device):
        model = build_model(read_omni_config(directory))
    tensors = load_file(directory / WEIGHTS_FILE, device=str(device))
    check_state_dict(model.state_dict(), tensors, source=directory)
    model.load_state_dict(tensors, strict=True)
    return model.eval()


def load_parts(directory: str | os.PathLike, names, device: str | torch.device = "cpu") -> dict[str, nn.Module]:
    """Only the named parts of `directory`'s OmniModel (see model/omni.py PARTS), each loaded strictly
    from its own keys of the weights file: a decoder replica never reads the backbone's bytes."""
    from safetensors import safe_open

    directory = Path(directory)
    config = read_omni_config(directory)
    parts = {}
    with safe_open(directory / WEIGHTS_FILE, framework="pt", device=str(device)) as weights:
        keys = list(weights.keys())
        for name in names:
            if name not in PARTS:
                raise ValueError(f"unknown model part {name!r}; parts: {list(PARTS)}")
            with torch.device(device):
                part = build_part(name, config)
            prefix = name + "."
            tensors = {key[len(prefix):]: weights.get_tensor(key) for key in keys if key.startswith(prefix)}
            check_state_dict(part.state_dict(), tensors, source=directory)
            part.load_state_dict(tensors, strict=True)
            parts[name] = part.eval()
    return parts


def check_state_dict(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source) -> None:
    """ValueError naming every missing key, unexpected key and shape mismatch of `found`."""
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    mismatched = [f"{name} (expected {tuple(expected[name].shape)}, found {tuple(found[name].shape)})"
                  for name in sorted(expected.keys() & found.keys())
                  if expected[name].shape != found[name].shape]
    problems = [f"{label}: {_listing(names)}" for label, names in
                (("missing keys", missing), ("unexpected keys", unexpected),
                 ("shape mismatches", mismatched)) if names]
    if problems:
        raise ValueError(f"checkpoint {source} does not match its model: " + "; ".join(problems))


def init_checkpoint(preset_name: str, directory: str | os.PathLike, seed: int = 0) -> str:
    """Writes a freshly initialized `preset_name` model seeded with `seed`; returns its digest."""
    config = preset(preset_name)
    with torch.random.fork_rng(devices=[]):  # leaves the caller's RNG state alone
        torch.manual_seed(seed)
        model = build_model(config)
    return save_checkpoint(model, config, directory)


DEMO_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "demo"


def default_checkpoint() -> Path:
    """The embedded default checkpoint: the trained demo model shipped in the package
    (omnireel/checkpoints/demo, README "The demo model"); where a build left it out, the random
    `small` one (small_checkpoint)."""
    if (DEMO_CHECKPOINT / WEIGHTS_FILE).is_file():
        return DEMO_CHECKPOINT
    return small_checkpoint()


def small_checkpoint() -> Path:
    """The `small` preset random-initialized with seed 0, created on first use.

    Lives under $OMNIREEL_HOME/checkpoints (OMNIREEL_HOME defaults to ~/.cache/omnireel). When two
    processes create it at once, one rename wins and both use the winner's checkpoint.
    """
    home = Path(os.environ.get("OMNIREEL_HOME", "~/.cache/omnireel")).expanduser()
    # The folder name carries a hash of the preset's architecture, so a cached default made by an
    # older version with other shapes is never loaded against the new code.
    architecture = hashlib.sha256(canonical_json(preset(DEFAULT_PRESET).to_dict())).hexdigest()[:10]
    directory = home / "checkpoints" / f"{DEFAULT_PRESET}-seed{DEFAULT_SEED}-{architecture}"
    if not directory.is_dir():
        try:
            init_checkpoint(DEFAULT_PRESET, directory, seed=DEFAULT_SEED)
        except FileExistsError:  # another process finished it first
            if not directory.is_dir():
                raise
    return directory


def load_backbone_shard(directory: str | os.PathLike, mesh, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None):
    """This rank's tensor-parallel shard of `directory`'s backbone over the 1-D device `mesh`.

    Builds the backbone on the meta device, applies the TP plan (parallel/tp.py), allocates only the
    local shards (`to_empty`) and fills each from `safe_open(...).get_slice(name)[rows or columns]`,
    so a rank never reads a whole tensor it does not keep; replicated tensors are read whole. Then
    recomputes the non-persistent buffers (RoPE). Shapes are checked against the full checkpoint.
    """
    from safetensors import safe_open

    from .model.backbone import OmniBackbone
    from .parallel.sliced_load import fill_local_shards
    from .parallel.tp import parallelize_backbone

    directory = Path(directory)
    with torch.device("meta"):
        backbone = OmniBackbone(read_omni_config(directory).backbone)
    if dtype is not None:
        backbone.to(dtype)                                  # still meta: costs nothing
    prefix = "backbone."                                    # the file holds the whole OmniModel
    with safe_open(directory / WEIGHTS_FILE, framework="pt", device="cpu") as weights:
        found = {name[len(prefix):]: torch.empty(weights.get_slice(name).get_shape(), device="meta")
                 for name in weights.keys() if name.startswith(prefix)}
        check_state_dict(backbone.state_dict(), found, source=directory)   # full shapes
        parallelize_backbone(backbone, mesh)
        backbone.to_empty(device=device)
        fill_local_shards(backbone, lambda name: weights.get_slice(prefix + name), mesh.get_local_rank())
    backbone.rope.init_buffers()
    return backbone.eval()


def _digest(config_document: dict, weights: Path) -> str:
    digest = hashlib.sha256(canonical_json(config_document))
    with open(weights, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sync(directory: Path) -> None:
    """Flushes every file in `directory` to disk, so the rename publishes complete data."""
    for path in directory.iterdir():
        with open(path, "rb") as stream:
            os.fsync(stream.fileno())


def _listing(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... and {len(names) - limit} more" if len(names) > limit else "")
