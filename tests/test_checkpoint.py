"""Checkpoints: round trip, deterministic digests, strict loading, atomic writes, the embedded default."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from omnireel.checkpoint import (DEMO_CHECKPOINT, default_checkpoint, init_checkpoint, load_checkpoint, read_config,
                                 read_digest, save_checkpoint, small_checkpoint)
from omnireel.canonical import canonical_json
from omnireel.model.config import ModelConfig, preset
from omnireel.model.omni import build_model


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("checkpoints") / "tiny-seed0"
    digest = init_checkpoint("tiny", directory, seed=0)
    return directory, digest


def test_round_trip_gives_equal_tensors(tmp_path):
    config = preset("tiny")
    torch.manual_seed(3)
    model = build_model(config)
    digest = save_checkpoint(model, config, tmp_path / "ckpt")

    loaded = load_checkpoint(tmp_path / "ckpt")
    assert not loaded.training
    assert read_config(tmp_path / "ckpt") == config
    assert read_digest(tmp_path / "ckpt") == digest
    expected, found = model.state_dict(), loaded.state_dict()
    assert expected.keys() == found.keys()
    for name in expected:
        assert torch.equal(expected[name], found[name]), name


def test_digest_covers_config_and_weights(tiny_checkpoint):
    directory, digest = tiny_checkpoint
    document = json.loads((directory / "config.json").read_text())
    assert document["format"] == 1 and ModelConfig.from_dict(document["model"]) == preset("tiny")
    recomputed = hashlib.sha256(canonical_json(document) + (directory / "model.safetensors").read_bytes())
    assert recomputed.hexdigest() == digest == read_digest(directory)


def test_same_seed_same_digest_other_seed_other_digest(tiny_checkpoint, tmp_path):
    _, digest = tiny_checkpoint
    assert init_checkpoint("tiny", tmp_path / "again", seed=0) == digest
    assert init_checkpoint("tiny", tmp_path / "other", seed=1) != digest


def test_init_leaves_the_callers_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    init_checkpoint("tiny", tmp_path / "ckpt", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_mismatched_weights_are_named(tiny_checkpoint, tmp_path):
    source, _ = tiny_checkpoint
    directory = tmp_path / "tampered"
    directory.mkdir()
    (directory / "config.json").write_bytes((source / "config.json").read_bytes())
    tensors = load_file(source / "model.safetensors")
    dropped, reshaped = sorted(tensors)[0], sorted(tensors)[-1]
    expected_shape = tuple(tensors[reshaped].shape)
    del tensors[dropped]
    tensors[reshaped] = torch.zeros(expected_shape[0] + 1, *expected_shape[1:])
    tensors["backbone.not_a_weight"] = torch.zeros(2)
    save_file(tensors, directory / "model.safetensors")

    with pytest.raises(ValueError) as caught:
        load_checkpoint(directory)
    message = str(caught.value)
    assert f"missing keys: {dropped}" in message
    assert "unexpected keys: backbone.not_a_weight" in message
    found_shape = (expected_shape[0] + 1, *expected_shape[1:])
    assert f"shape mismatches: {reshaped} (expected {expected_shape}, found {found_shape})" in message


class TiedWeights(nn.Module):
    """Two names for one tensor: safetensors refuses to save it, so the save fails midway."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(2, 2)
        self.second = nn.Linear(2, 2)
        self.second.weight = self.first.weight


def test_failed_save_leaves_nothing_behind(tmp_path):
    with pytest.raises(RuntimeError):
        save_checkpoint(TiedWeights(), preset("tiny"), tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_existing_checkpoint_is_never_replaced(tiny_checkpoint):
    directory, digest = tiny_checkpoint
    with pytest.raises(FileExistsError):
        init_checkpoint("tiny", directory, seed=1)
    assert read_digest(directory) == digest


def test_unknown_format_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"format": 99, "model": {}}))
    with pytest.raises(ValueError, match="format 99.*expected 1"):
        read_config(tmp_path)


def test_default_checkpoint_is_the_shipped_demo_model():
    assert default_checkpoint() == DEMO_CHECKPOINT and read_config(DEMO_CHECKPOINT).name == "demo"


def test_small_checkpoint_is_created_once_even_by_racing_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("OMNIREEL_HOME", str(tmp_path))
    command = [sys.executable, "-c",
               "from omnireel.checkpoint import small_checkpoint; print(small_checkpoint())"]
    racers = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
              for _ in range(2)]
    paths = {racer.communicate()[0].strip() for racer in racers}
    assert all(racer.returncode == 0 for racer in racers)

    assert len(paths) == 1
    directory = Path(paths.pop())
    assert directory.parent == tmp_path / "checkpoints" and directory.name.startswith("small-seed0-")
    assert [path.name for path in (tmp_path / "checkpoints").iterdir()] == [directory.name]
    assert small_checkpoint() == directory
    assert read_digest(directory) == init_checkpoint("small", tmp_path / "fresh", seed=0)
