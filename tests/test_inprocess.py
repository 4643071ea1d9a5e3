"""The tp=1 backbone host and partial loading: InProcessBackbone returns LocalEngine's latents
exactly and stops at the step should_stop asks for; submits from two threads share steps on its
compute thread, each with its own progress and cancel; `open_backbone` picks it at tp=1 only;
`load_parts` loads one part of the checkpoint strictly and equal to the whole model's; a
JobCancelled survives pickling (it crosses Ray from a Backbone replica to the JobRunner)."""
from __future__ import annotations

import pickle
import threading

import pytest
import torch

from omnireel.checkpoint import WEIGHTS_FILE, load_checkpoint, load_parts
from omnireel.compute import ComputeThread
from omnireel.families.omni import COMPONENT_PARTS
from omnireel.model.sampler import Cancelled
from omnireel.parallel.group import JobCancelled
from omnireel.parallel.inprocess import InProcessBackbone, host_resources, open_backbone
from omnireel.stages import load_components

from batching_support import PARITY, max_difference
from test_group import denoise_job, request


def test_the_in_process_host_returns_local_engines_latents_exactly(tiny_checkpoint, tiny_engine):
    host = open_backbone(tiny_checkpoint, 1)
    assert isinstance(host, InProcessBackbone)
    job = denoise_job(tiny_engine, request())
    latents = host.denoise(job.plan, job.text, job.voice, job.media)
    expected = tiny_engine.render(request()).latents
    assert torch.equal(latents.video, expected.video) and torch.equal(latents.audio, expected.audio)


def test_the_in_process_host_reports_each_step_and_stops_when_asked(tiny_checkpoint, tiny_engine):
    host = InProcessBackbone(tiny_checkpoint)
    job = denoise_job(tiny_engine, request(steps=10))
    seen = []
    with pytest.raises(Cancelled):
        host.denoise(job.plan, job.text, job.voice, job.media, progress=lambda i, n: seen.append((i, n)),
                     should_stop=lambda: len(seen) >= 3)
    assert seen == [(1, 10), (2, 10), (3, 10)]


def test_submits_share_steps_on_the_hosts_compute_thread_each_with_its_own_progress_and_cancel(
        tiny_checkpoint, tiny_engine):
    compute = ComputeThread(threads=torch.get_num_threads())     # the same thread count as LocalEngine's
    host = InProcessBackbone(tiny_checkpoint, compute=compute, max_batch_jobs=4)
    stepped_on = set()
    expected = tiny_engine.render(request()).latents             # before: the long job steps on meanwhile
    long_call = host.submit(denoise_job(tiny_engine, request(steps=100)),
                            progress=lambda i, n: stepped_on.add(threading.get_native_id()))
    short_call = host.submit(denoise_job(tiny_engine, request()))
    short = short_call.result()
    assert 0 < long_call.progress()[0] < 100                      # still running when the short one is done
    assert max_difference(short, expected) <= PARITY               # batched beside it
    long_call.cancel()
    with pytest.raises(Cancelled):
        long_call.result()
    assert stepped_on == {compute.native_id}                       # the step loop ran on the compute thread
    assert max(jobs for jobs, _ in host.batching()["recent_steps"]) == 2   # the two shared steps
    assert host.progress(long_call.job_id) is None                 # forgotten once over
    compute.shutdown()


def test_host_resources_make_the_host_the_rank_at_tp_1_only():
    assert host_resources(1, True, cpus_per_rank=2, host_cpus=0.5) == {"num_cpus": 2.5, "num_gpus": 1}
    assert host_resources(2, True, cpus_per_rank=2, host_cpus=0.5) == {"num_cpus": 0.5, "num_gpus": 0}


def test_load_parts_loads_only_the_named_part_equal_to_the_whole_model(tiny_checkpoint, tiny_engine):
    parts = load_parts(tiny_checkpoint, ["vae"])
    assert list(parts) == ["vae"]
    whole = load_checkpoint(tiny_checkpoint).vae.state_dict()
    assert all(torch.equal(tensor, whole[name]) for name, tensor in parts["vae"].state_dict().items())
    with pytest.raises(ValueError, match="unknown model part 'vocoder'"):
        load_parts(tiny_checkpoint, ["vocoder"])


@pytest.mark.parametrize("names", [{"vae"}, {"audio_decoder", "media_encoder"}, {"backbone"}])
def test_a_replica_reads_no_byte_of_another_components_parts(tiny_checkpoint, tmp_path, names):
    """The weights file keeps only the parts `names` are made of: loading must not touch the rest,
    and a component that does need a dropped part is refused naming its keys."""
    from safetensors.torch import load_file, save_file
    keep = {part for name in names for part in COMPONENT_PARTS[name]}
    only = tmp_path / "only"
    only.mkdir()
    for path in tiny_checkpoint.iterdir():
        (only / path.name).write_bytes(path.read_bytes())
    tensors = load_file(tiny_checkpoint / WEIGHTS_FILE)
    save_file({k: v for k, v in tensors.items() if k.split(".", 1)[0] in keep}, only / WEIGHTS_FILE)
    components = load_components(only, names)
    assert set(components) == names
    whole = load_checkpoint(tiny_checkpoint)
    for part in keep:
        loaded = load_parts(only, [part])[part].state_dict()
        assert all(torch.equal(t, getattr(whole, part).state_dict()[k]) for k, t in loaded.items())
    other = next(name for name, parts in COMPONENT_PARTS.items() if parts and not set(parts) <= keep)
    with pytest.raises(ValueError, match="missing keys"):
        load_components(only, {other})


def test_a_part_with_a_missing_key_is_refused_by_name(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in tiny_checkpoint.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    tensors = load_file(tiny_checkpoint / WEIGHTS_FILE)
    dropped = next(name for name in tensors if name.startswith("audio_codec."))
    del tensors[dropped]
    save_file(tensors, broken / WEIGHTS_FILE)
    with pytest.raises(ValueError, match=f"missing keys: {dropped[len('audio_codec.'):]}"):
        load_parts(broken, ["audio_codec"])
    assert load_parts(broken, ["vae"])      # the other parts do not need that key


def test_job_cancelled_survives_pickling():
    error = pickle.loads(pickle.dumps(JobCancelled("job1", [3, 3], 10)))
    assert isinstance(error, JobCancelled) and isinstance(error, Cancelled)
    assert (error.job_id, error.steps, error.total, error.steps_by_rank) == ("job1", 3, 10, [3, 3])
    assert "stopped after 3 of 10 steps" in str(error)
