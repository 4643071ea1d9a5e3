"""The family interface: which family a folder is, the omni family unchanged by the refactor (latents
saved from the code before it), and the one graph executor every driver uses."""
import json

import pytest
import torch
from safetensors.torch import load_file

import omni_reference
from omnireel.families import family_name, family_of, get_family
from omnireel.model.sampler import Cancelled
from omnireel.stages import BACKBONE_STAGE, STAGE_GRAPH, denoise, run_graph


def test_the_omni_family_reproduces_the_latents_saved_before_the_refactor(tiny_engine, tmp_path):
    assert torch.get_num_threads() == 2            # the reference was written with 2 threads (conftest)
    expected = load_file(omni_reference.DATA)
    got = omni_reference.all_latents(tiny_engine, tmp_path)
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].shape == tensor.shape, name
        # bit-exact on the CPU that saved them; another CPU's float kernels (AVX-512 or not) move a
        # few ulps (1.2e-6 seen on an AMD EPYC): a refactor that changed the maths moves far more
        assert (got[name] - tensor).abs().max().item() <= 1e-5, name
    assert expected["shots_voice.video"].abs().max() > 0.1     # a real signal


def test_a_folder_names_its_family(tiny_checkpoint, tmp_path):
    assert family_name(tiny_checkpoint) == "omni" and family_of(tiny_checkpoint).name == "omni"
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "LTX2Pipeline"}))
    assert family_name(tmp_path) == "ltx2"
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="model_index.json: _class_name 'StableDiffusionPipeline' is not a served"):
        family_name(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"family": "nope"}))
    with pytest.raises(ValueError, match="family 'nope' is unknown"):
        family_name(other)
    with pytest.raises(ValueError, match="unknown model family 'nope'"):
        get_family("nope")


def test_the_graph_places_every_model_stage_and_one_stage_runs_on_the_backbone():
    assert [s for s in STAGE_GRAPH if s.on_backbone] == [BACKBONE_STAGE]
    assert all(s.deployment for s in STAGE_GRAPH if s.component)      # every model stage has a replica
    assert [s.pool for s in STAGE_GRAPH] == sorted((s.pool for s in STAGE_GRAPH), key=["encode", "denoise",
                                                                                        "decode"].index)


def test_run_graph_calls_each_stage_once_in_order_and_stops_at_until():
    called = []

    def call(stage, inputs):
        called.append((stage.name, len(inputs)))
        return stage.name

    values = run_graph(STAGE_GRAPH, {"plan": "p", "voice": "given"}, call, until="latents")
    assert [name for name, _ in called] == ["encode_text", "encode_media", "denoise"]   # voice was given
    assert called[-1] == ("denoise", 4) and values["latents"] == "denoise" and "video" not in values


class CountingDenoiser:
    """A Denoiser whose latents count the steps taken: the engine's contract, without a model."""

    class State:
        def __init__(self, steps):
            self.steps, self.done = steps, 0

    def prepare(self, plan, text, voice, media):
        return self.State(plan)

    def step(self, states, forward=None):
        for state in states:
            state.done += 1

    def finish(self, state):
        return state.done


def test_the_denoise_engine_steps_reports_progress_and_stops():
    seen = []
    assert denoise(CountingDenoiser(), 3, None, None, None, progress=lambda i, n: seen.append((i, n))) == 3
    assert seen == [(1, 3), (2, 3), (3, 3)]
    with pytest.raises(Cancelled, match="stopped at step 2 of 3"):
        denoise(CountingDenoiser(), 3, None, None, None, should_stop=lambda: len(seen) == 5,
                progress=lambda i, n: seen.append(i))
