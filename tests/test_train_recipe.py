"""`omnireel train` on the tiny recipe: the losses go down, a resumed run repeats the same curve, and
what it exports is a checkpoint the normal loader and LocalEngine take."""
import json
import math

import pytest

from omnireel.training.recipe import recipe
from omnireel.training.scenes import make_scene
from omnireel.training.trainer import Trainer

TINY = recipe("tiny")
STEPS_BEFORE_BACKBONE = TINY.vae.steps + TINY.codec.steps


def log_losses(folder):
    """{(stage, step): loss} and [(step, eval_loss)] from a run folder's log.jsonl."""
    losses, evals = {}, []
    for line in (folder / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            losses[(record["stage"], record["step"])] = record["loss"]
        if "eval_loss" in record:
            evals.append((record["step"], record["eval_loss"]))
    return losses, evals


@pytest.fixture(scope="module")
def text_encoder():
    from omnireel.model.text import build_text_encoder
    return build_text_encoder(TINY.model.text)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, text_encoder):
    folder = tmp_path_factory.mktemp("train") / "full"
    trainer = Trainer(TINY, folder, quiet=True, text_encoder=text_encoder)
    result = trainer.run()
    return folder, trainer, result


def test_scenes_are_deterministic_and_labelled():
    a, b = make_scene(123), make_scene(123)
    assert a.caption == b.caption and a.collision_frames == b.collision_frames
    assert (a.tracks == b.tracks).all()
    assert make_scene(124).caption != a.caption or (make_scene(124).tracks != a.tracks).any()
    scene = make_scene(5, language="en", objects=1)
    assert scene.objects[0].colour in scene.caption and scene.background in scene.caption


def test_training_lowers_the_loss(full_run):
    folder, trainer, result = full_run
    assert result["stage"] == "done"
    losses, evals = log_losses(folder)
    backbone = [losses[("backbone", s)] for s in range(1, TINY.backbone.steps + 1)]
    first, last = sum(backbone[:5]) / 5, sum(backbone[-5:]) / 5
    print(f"\nbackbone loss, first 5 steps {first:.4f} -> last 5 {last:.4f}; held-out {evals}")
    assert last < 0.8 * first
    assert [s for s, _ in evals] == list(range(TINY.eval_every, TINY.backbone.steps + 1, TINY.eval_every))
    assert evals[-1][1] < evals[0][1]
    vae = [losses[("vae", s)] for s in range(1, TINY.vae.steps + 1)]
    assert all(math.isfinite(v) for v in vae)          # finite, logged for every step


def test_the_video_loss_weighs_the_bodies_cells_up(full_run):
    _, trainer, _ = full_run
    example = trainer.data[0]
    weight = trainer.object_weights(example)                  # (T, h, w)
    assert weight.shape == example.video.shape[1:]
    assert abs(weight.mean().item() - 1.0) < 1e-5
    covered = (example.layer > 0)[0]                          # latent frame 0's cells under a body
    assert covered.any() and not covered.all()
    assert weight[0][covered].min() == pytest.approx((1 + TINY.object_weight) * weight[0][~covered].max())


def test_resume_repeats_the_same_loss_curve(full_run, tmp_path, text_encoder):
    from omnireel.cli import main

    full_folder, _, _ = full_run
    folder = tmp_path / "resumed"
    stop = STEPS_BEFORE_BACKBONE + 12         # stops inside the backbone stage
    main(["train", "--recipe", "tiny", "--out", str(folder), "--stop-after", str(stop), "-q"])
    resumed = Trainer(TINY, folder, quiet=True, text_encoder=text_encoder)
    assert (resumed.stage, resumed.step) == ("backbone", 12)
    result = resumed.run()
    assert result["stage"] == "done" and len(result["losses"]) == TINY.backbone.steps - 12
    expected, expected_evals = log_losses(full_folder)
    got, got_evals = log_losses(folder)
    assert got == expected                    # every stage, every step, bit for bit
    assert got_evals == expected_evals
    assert result["losses"] == [expected[("backbone", s)] for s in range(13, TINY.backbone.steps + 1)]


def test_exported_checkpoint_renders(full_run):
    from omnireel.checkpoint import load_checkpoint, read_config
    from omnireel.config import GenerationRequest
    from omnireel.engine import LocalEngine

    _, trainer, _ = full_run
    checkpoint = trainer.latest_checkpoint()
    assert checkpoint.name == "final"
    assert read_config(checkpoint) == TINY.model
    load_checkpoint(checkpoint)                # strict load through the normal loader
    scene = make_scene(20_000_000, TINY.width, TINY.height, TINY.fps, TINY.seconds, language="en")
    engine = LocalEngine(checkpoint)
    result = engine.render(GenerationRequest(prompt=scene.caption, seconds=TINY.seconds, size=TINY.size,
                                             fps=TINY.fps, physics=scene.physics))
    assert result.artifact.media_type == "video/mp4" and len(result.artifact.data) > 0
