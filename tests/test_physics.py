"""Physics-aware motion: pymunk scenes -> trajectories; the warped noise stays unit Gaussian and
follows the simulated motion; collision frames become the audio cues; bad scenes name the field."""
from __future__ import annotations

import json
import math

import pytest
import torch
from pydantic import ValidationError

from omnireel.cli import main as cli_main
from omnireel.config import GenerationRequest, PhysicsScene, request_error_message
from omnireel.model.config import MODALITY_ID
from omnireel.model.layout import AUDIO_LATENT_RATE, build_layout
from omnireel.physics import body_cover, motion_conditioning, simulate, warp_noise
from omnireel.plan import plan_request
from omnireel.families.omni import denoise_layout_spec, initial_noise
from omnireel.stages import STAGE_GRAPH, run_stage

STAGES = {stage.name: stage for stage in STAGE_GRAPH}
SIZE, FPS = 256, 24
CELL = 8                                   # pixels per latent cell (the VAE's x8)


def latent_frames(frames: int, factor: int = 4) -> int:
    return 1 + math.ceil((frames - 1) / factor)


def test_warped_noise_stays_unit_gaussian_in_every_frame():
    scene = PhysicsScene(gravity=(0, 900), bodies=[
        {"position": [60, 60], "velocity": [300, -100], "radius": 30},
        {"shape": "box", "position": [180, 200], "size": [60, 40], "velocity": [-200, -400], "angular_velocity": 3},
        {"shape": "box", "position": [128, 250], "size": [256, 8], "static": True}],
        particles=[{"count": 200, "position": [128, 100], "spread": 50, "velocity": [0, 200]}])
    frames = 2 * FPS + 1
    sim = simulate(scene, SIZE, SIZE, FPS, frames)
    T, h = latent_frames(frames), SIZE // CELL
    motion = motion_conditioning(sim, T, h, h, audio_frames=50, frames_per_latent=4)
    noise = torch.randn(16, T, h, h, generator=torch.Generator().manual_seed(0))   # (C, T, h, w)
    warped = warp_noise(noise, motion.flow, motion.layer)
    assert (motion.flow != 0).any(dim=-1).float().mean() > 0.05, "the scene must move a good part of the frame"
    n = 16 * h * h                                                       # samples per latent frame
    for k in range(T):
        frame = warped[:, k]
        assert abs(float(frame.mean())) < 4 / math.sqrt(n), (k, float(frame.mean()))
        assert abs(float(frame.var()) - 1) < 4 * math.sqrt(2 / n), (k, float(frame.var()))
    # and the values are Gaussian, not just of unit variance: the fraction beyond 1 and 2 sigma
    tails = [float((warped.abs() > s).float().mean()) for s in (1, 2)]
    assert abs(tails[0] - 0.3173) < 0.01 and abs(tails[1] - 0.0455) < 0.005


def best_shift(before: torch.Tensor, after: torch.Tensor, cells: torch.Tensor, reach: int = 5):
    """The (dy, dx) that makes `after` at cells + shift most correlated with `before` at cells."""
    scores = {}
    h, w = before.shape[-2:]
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            ty, tx = cells[:, 0] + dy, cells[:, 1] + dx
            ok = (ty >= 0) & (ty < h) & (tx >= 0) & (tx < w)
            a, b = before[:, cells[ok, 0], cells[ok, 1]], after[:, ty[ok], tx[ok]]
            scores[(dy, dx)] = float((a * b).mean() / (a.std() * b.std()))
    return max(scores, key=scores.get), scores


@pytest.mark.parametrize("factor", [4, 2])    # the VAE's time factor: video frames per latent
def test_frame_to_frame_correlation_follows_the_simulated_displacement(factor):
    scene = PhysicsScene(gravity=(0, 300), walls=True, bodies=[
        {"position": [50, 80], "velocity": [170, 60], "radius": 28, "elasticity": 0.9}])
    frames = 2 * FPS + 1
    sim = simulate(scene, SIZE, SIZE, FPS, frames)
    T, h = latent_frames(frames, factor), SIZE // CELL
    motion = motion_conditioning(sim, T, h, h, audio_frames=50, frames_per_latent=factor)
    warped = warp_noise(torch.randn(8, T, h, h, generator=torch.Generator().manual_seed(1)), motion.flow, motion.layer)
    moved = 0
    for k in range(T - 1):
        f0, f1 = (0 if j == 0 else factor * (j - 1) + 1 for j in (k, k + 1))
        simulated = tuple(int(v) for v in (sim.body_position[f1, 0, ::-1] // CELL - sim.body_position[f0, 0, ::-1] // CELL))
        body = torch.from_numpy(body_cover(sim, 0, f0, CELL, h, h)).nonzero()            # (n, 2) cells
        shift, scores = best_shift(warped[:, k], warped[:, k + 1], body)
        assert shift == simulated, (k, shift, simulated)
        assert scores[shift] > 0.9                                   # the body's noise moved with it
        if simulated != (0, 0):
            moved += 1
            assert abs(scores[(0, 0)]) < 0.35                        # and is not where the body was
    assert moved >= T // 2
    # the background the ball never covers keeps its noise from the first frame to the last (cells
    # the ball only passes next to may take its noise, hence not exactly 1)
    far = torch.ones(h, h, dtype=torch.bool)
    for k in range(T - 1):
        far &= (motion.layer[k] == 0) & ~(motion.flow[k] != 0).any(-1)
    shift, scores = best_shift(warped[:, 0], warped[:, -1], far.nonzero())
    assert shift == (0, 0) and scores[shift] > 0.95


def test_collision_frames_are_the_audio_cue_times(tiny_engine):
    """A ball dropped on the floor: the frames the simulator reports are real bounces, and the audio
    tokens flagged as cues sit at exactly those instants on the shared time axis."""
    physics = {"gravity": [0, 1200], "bodies": [{"position": [32, 12], "radius": 6, "elasticity": 0.8}]}
    request = GenerationRequest(prompt="a ball bounces", seconds=2, size="64x64", fps=FPS, steps=1, physics=physics)
    plan = plan_request(request, tiny_engine.config)
    sim = simulate(request.physics, 64, 64, FPS, plan.num_frames)
    frames = sim.collision_frames
    assert len(frames) >= 3
    fall = math.sqrt(2 * (64 - 6 - 12) / 1200)        # seconds until the ball first touches the floor
    assert frames[0] == math.ceil(fall * FPS)
    vy = sim.body_velocity[:, 0, 1]
    for f in frames:          # free fall adds 1200 / 24 = 50 px/s per frame; a bounce takes speed away
        assert vy[f] - vy[f - 1] < 0, (f, vy[f - 1], vy[f])
        assert sim.body_position[f - 1, 0, 1] + 6 > 64 - 20

    values = {"plan": plan}
    for name in ("encode_text", "encode_voice", "encode_media"):
        values[STAGES[name].output] = run_stage(STAGES[name], tiny_engine.components, values)
    media = values["media"]
    assert tuple(media.collision_frames) == frames
    assert tuple(media.audio_cues) == tuple(sorted({round(f / FPS * AUDIO_LATENT_RATE) for f in frames}))
    layout = build_layout(denoise_layout_spec(plan, values["text"], values["voice"], media), tiny_engine.config.backbone)
    cue_times = layout.position[layout.cue, 0]
    assert (layout.modality[layout.cue] == MODALITY_ID["audio"]).all()
    assert torch.allclose(cue_times, torch.tensor([f / FPS for f in frames]), atol=0.5 / AUDIO_LATENT_RATE)
    # the trajectory tokens: one per body per latent frame, at that frame's time, where the ball is
    motion = layout.spans["motion"]
    assert motion.stop - motion.start == plan.latent_frames
    video_times = layout.position[layout.spans["video"], 0].unique()
    assert torch.equal(layout.position[motion, 0], video_times)


def test_physics_conditions_the_render_through_every_stage(tiny_engine):
    base = dict(prompt="marbles roll", seconds=1, size="64x64", fps=12, steps=2, seed=5)
    physics = {"bodies": [{"position": [10, 30], "velocity": [200, 0], "radius": 10}],
               "particles": [{"count": 30, "position": [40, 20], "spread": 10}]}
    still = tiny_engine.render(GenerationRequest(**base))
    moving = tiny_engine.render(GenerationRequest(**base, physics=physics))
    again = tiny_engine.render(GenerationRequest(**base, physics=physics))
    assert torch.equal(moving.latents.video, again.latents.video)             # deterministic simulation
    assert (moving.latents.video - still.latents.video).abs().max() > 1e-2
    plan = moving.plan
    media = run_stage(STAGES["encode_media"], tiny_engine.components, {"plan": plan})
    video_noise, _ = initial_noise(plan, 4, 4, media)
    plain_noise, _ = initial_noise(plan, 4, 4)
    assert torch.equal(video_noise[:, :, 0], plain_noise[:, :, 0])            # frame 0 is the seed's noise
    assert not torch.equal(video_noise[:, :, 1:], plain_noise[:, :, 1:])      # later frames follow the flow
    assert media.tracks.shape == (2, plan.latent_frames, tiny_engine.config.backbone.track_dim)


BAD_SCENES = [
    ({"bodies": [{"position": [10, 10], "radius": 0}]}, "physics.bodies.0.radius: must be > 0 and <= 1920 (got 0)"),
    ({"bodies": [{"position": [10, 300]}]}, "physics.bodies.0.position: must lie inside the frame [0, 256] x [0, 256]"),
    ({"bodies": [{"shape": "box", "position": [10, 10]}]}, "physics.bodies.0: size: required for a box"),
    ({"bodies": [{"shape": "blob", "position": [10, 10]}]}, "physics.bodies.0.shape: Input should be 'circle' or 'box'"),
    ({"bodies": [{"position": [10]}]}, "physics.bodies.0.position.1: required"),
    ({"bodies": [{"position": [1, 1], "mass": -2}]}, "physics.bodies.0.mass: must be > 0 and <= 1000 (got -2)"),
    ({"bodies": [{"position": [1, 1], "elasticity": 1.5}]}, "physics.bodies.0.elasticity: must be >= 0 and <= 1"),
    ({"bodies": [{"position": [1, 1], "velocity": [1e6, 0]}]}, "physics.bodies.0.velocity.0: must be >= -10000"),
    ({"bodies": [{"position": [1, 1], "colour": "red"}]}, "physics.bodies.0.colour: unknown field; allowed: shape,"),
    ({"bodies": [{"position": [1, 1]}] * 17}, "physics: bodies: at most 16 bodies (got 17)"),
    ({"particles": [{"count": 200, "position": [9, 9]}, {"count": 100, "position": [9, 9]}]},
     "physics: particles: at most 256 particles in all (got 300)"),
    ({"particles": [{"count": 0, "position": [9, 9]}]}, "physics.particles.0.count: must be >= 1 and <= 256"),
    ({"gravity": [0, "down"], "bodies": [{"position": [1, 1]}]}, "physics.gravity.1: Input should be a valid number"),
    ({"bodies": []}, "physics: needs at least one body or particle emitter"),
    ({"wind": 3, "bodies": [{"position": [1, 1]}]}, "physics.wind: unknown field; allowed: gravity, bodies, particles, walls"),
    ("a ball", "physics: Input should be a valid dictionary"),
]


@pytest.mark.parametrize("scene,expected", BAD_SCENES, ids=[e.split(":")[0] for _, e in BAD_SCENES])
def test_malformed_scene_is_rejected_naming_the_field(scene, expected):
    with pytest.raises(ValidationError) as caught:
        GenerationRequest(prompt="p", physics=scene)
    assert expected in request_error_message(caught.value)


def test_malformed_scene_from_the_cli_is_one_line(capsys, tmp_path):
    scene = tmp_path / "scene.json"
    scene.write_text(json.dumps({"bodies": [{"position": [10, 10], "radius": -3}]}))
    for value, expected in ((f"@{scene}", "physics.bodies.0.radius"), ("{bodies", "--physics: not valid JSON"),
                            ("@/no/such/scene.json", "--physics: cannot read")):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["render", "p", "--physics", value])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and expected in err, err
    with pytest.raises(SystemExit):
        cli_main(["render", "p", "--image", "--physics", json.dumps({"bodies": [{"position": [1, 1]}]})])
    assert "physics: not available with output 'image'" in capsys.readouterr().err
