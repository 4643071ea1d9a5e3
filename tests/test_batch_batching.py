"""The Ray Data denoise actor batches: four rows of different sizes, seeds, step counts, guidance and
shot counts reach one denoise call and are denoised together through the actor's DenoiseScheduler,
each row's saved latents equal to LocalEngine's (within 1e-4); a fifth row, bound to a voice the
registry lacks, fails alone (errors file: encode_voice) while it rides through the same batch."""
from __future__ import annotations

import json
from batch_support import OPTIONS, read_parquet, saved_latents, write_manifest
from batching_support import JOBS, PARITY, max_difference

from omnireel import storage
from omnireel.pipelines.render import run_batch

UNKNOWN_VOICE = "0123456789abcdef"


def manifest_row(i: int, request) -> dict:
    fields = request.model_dump(mode="json", exclude_defaults=True)
    if "shots" in fields:
        fields["shots"] = json.dumps(fields["shots"])
    return {"id": f"job{i}", **fields}


def test_rows_of_one_block_denoise_together_each_equal_to_local_engine_and_a_bad_row_fails_alone(
        ray_session, tiny_checkpoint, tiny_engine, tmp_path):
    bad = dict(id="voiceless", prompt="Alice says hello", seed=9, seconds=0.5, size="32x32", fps=8, steps=2,
               voices=json.dumps([{"character": "Alice", "voice_id": UNKNOWN_VOICE}]))
    manifest = write_manifest(str(tmp_path / "manifest.parquet"),
                              [*(manifest_row(i, r) for i, r in enumerate(JOBS)), bad])
    out = str(tmp_path / "out")
    options = OPTIONS.model_copy(update=dict(save_latents=True, max_batch_jobs=8, voices_uri=str(tmp_path / "voices")))
    summary = run_batch(manifest, out, tiny_checkpoint, options)

    assert (summary.rendered, summary.failed, summary.invalid) == (4, 1, 0)
    assert 0 < summary.denoise_busy <= 1
    assert summary.denoise_rows_in_flight > 1      # the rows' denoising overlapped on the one actor
    results = {r["id"]: r for r in read_parquet(storage.join(out, "results.parquet"))}
    assert sorted(results) == [f"job{i}" for i in range(len(JOBS))]
    for i, request in enumerate(JOBS):
        assert results[f"job{i}"]["steps"] == request.steps
        expected = tiny_engine.render(request).latents
        assert max_difference(saved_latents(out, results[f"job{i}"]["key"]), expected) <= PARITY, request
    (error,) = read_parquet(storage.join(out, "errors.parquet"))
    assert (error["id"], error["stage"]) == ("voiceless", "encode_voice") and UNKNOWN_VOICE in error["message"]
