"""The Ray Data denoise actor batches across calls: five rows of different sizes, seeds, step counts,
guidance and shot counts reach the actor two to a call (max_batch_jobs 2), and the actor runs two
calls at once, so a row of one call joins the running batch of another's (its host's
DenoiseScheduler, which holds at most two of them): rows of two calls share a denoising step, and
each row's saved latents equal LocalEngine's (within 1e-4); a sixth row, bound to a voice the
registry lacks, fails alone (errors file: encode_voice) while it rides through a denoise call."""
from __future__ import annotations

import json
from batch_support import OPTIONS, read_parquet, saved_latents, write_manifest
from batching_support import JOBS, PARITY, max_difference

from omnireel.checkpoint import read_digest
from omnireel.config import GenerationRequest, request_key

from omnireel import storage
from omnireel.pipelines.render import run_batch

UNKNOWN_VOICE = "0123456789abcdef"
SLOW = GenerationRequest(prompt="a slow pan", size="128x128", seconds=1.0, fps=8, seed=30, steps=100)
"""First in the render order (id job0, and the smallest key: `first_in_key_order` picks its seed), so
it is in the first denoise call, and still denoising when the next calls' rows come: they join its
batch. Its 100 steps take about a second alone here, several times what the next call's rows need to
reach the actor (at 24 steps of 32x32, 0.2 s, a CI run once saw them come after it ended)."""


def first_in_key_order(request: GenerationRequest, others, digest: str) -> GenerationRequest:
    """`request` with the first seed from its own whose key sorts before every one of `others`' (the
    keys hash the checkpoint's digest, so a fixed seed stops sorting first when the config format grows)."""
    least = min(request_key(other, digest) for other in others)
    for seed in range(request.seed, request.seed + 1000):
        candidate = request.model_copy(update={"seed": seed})
        if request_key(candidate, digest) < least:
            return candidate
    raise AssertionError("no seed within 1000 sorts first")


def manifest_row(i: int, request) -> dict:
    fields = request.model_dump(mode="json", exclude_defaults=True)
    if "shots" in fields:
        fields["shots"] = json.dumps(fields["shots"])
    return {"id": f"job{i}", **fields}


def test_rows_of_two_calls_share_denoising_steps_each_equal_to_local_engine_and_a_bad_row_fails_alone(
        ray_session, tiny_checkpoint, tiny_engine, tmp_path):
    bad = dict(id="voiceless", prompt="Alice says hello", seed=9, seconds=0.5, size="32x32", fps=8, steps=2,
               voices=json.dumps([{"character": "Alice", "voice_id": UNKNOWN_VOICE}]))
    requests = (first_in_key_order(SLOW, JOBS, read_digest(tiny_checkpoint)), *JOBS)
    manifest = write_manifest(str(tmp_path / "manifest.parquet"),
                              [*(manifest_row(i, r) for i, r in enumerate(requests)), bad])
    out = str(tmp_path / "out")
    options = OPTIONS.model_copy(update=dict(save_latents=True, max_batch_jobs=2, voices_uri=str(tmp_path / "voices")))
    summary = run_batch(manifest, out, tiny_checkpoint, options)

    assert (summary.rendered, summary.failed, summary.invalid) == (len(requests), 1, 0)
    assert 0 < summary.denoise_busy <= 1
    assert summary.denoise_rows_in_flight > 1      # the rows' denoising overlapped on the one actor
    assert summary.denoise_rows_joined >= 2        # a row of one call shared a step with a row of another
                                                   # (both counted): calls run one at a time never do
    results = {r["id"]: r for r in read_parquet(storage.join(out, "results.parquet"))}
    assert sorted(results) == [f"job{i}" for i in range(len(requests))]
    for i, request in enumerate(requests):
        assert results[f"job{i}"]["steps"] == request.steps
        expected = tiny_engine.render(request).latents
        assert max_difference(saved_latents(out, results[f"job{i}"]["key"]), expected) <= PARITY, request
    (error,) = read_parquet(storage.join(out, "errors.parquet"))
    assert (error["id"], error["stage"]) == ("voiceless", "encode_voice") and UNKNOWN_VOICE in error["message"]
