"""The model families OmniReel serves, and which one a checkpoint folder is.

A folder names its family: a diffusers folder by its model_index.json `_class_name`
(LTX2Pipeline -> "ltx2"), any other by config.json's "family" (absent means "omni").
Family modules import lazily, so the omni family never imports diffusers.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

from .base import Family, FamilyLimits

FAMILY_MODULES = {"omni": "omnireel.families.omni", "ltx2": "omnireel.families.ltx2", "wan": "omnireel.families.wan"}
DIFFUSERS_PIPELINES = {"LTX2Pipeline": "ltx2", "LTX2ImageToVideoPipeline": "ltx2", "WanPipeline": "wan",
                       "WanImageToVideoPipeline": "wan"}


def family_name(checkpoint: str | Path) -> str:
    """The family of a checkpoint folder (ValueError naming the file for an unknown one)."""
    folder = Path(checkpoint)
    index = folder / "model_index.json"
    if index.is_file():
        class_name = json.loads(index.read_text()).get("_class_name")
        if class_name not in DIFFUSERS_PIPELINES:
            raise ValueError(f"{index}: _class_name {class_name!r} is not a served family; "
                             f"served diffusers pipelines: {', '.join(sorted(DIFFUSERS_PIPELINES))}")
        return DIFFUSERS_PIPELINES[class_name]
    config = folder / "config.json"
    name = json.loads(config.read_text()).get("family", "omni") if config.is_file() else "omni"
    if name not in FAMILY_MODULES:
        raise ValueError(f"{config}: family {name!r} is unknown; known: {', '.join(sorted(FAMILY_MODULES))}")
    return name


def get_family(name: str) -> Family:
    """The Family object of `name` (its module's FAMILY)."""
    if name not in FAMILY_MODULES:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(sorted(FAMILY_MODULES))}")
    return importlib.import_module(FAMILY_MODULES[name]).FAMILY


def family_of(checkpoint: str | Path) -> Family:
    return get_family(family_name(checkpoint))


__all__ = ["Family", "FamilyLimits", "family_name", "family_of", "get_family"]
