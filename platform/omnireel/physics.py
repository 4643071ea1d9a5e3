"""Physics-aware motion: simulate the request's scene, and turn it into motion conditioning.

1. `simulate`: pymunk rigid bodies (circles, boxes) and particles (small circles that collide with
   everything: fluid-like motion) in output pixels (x right, y down), recorded once per video frame.
   Body-body and body-wall contacts that begin with an impact speed of at least MIN_IMPACT_SPEED
   are the collisions; the frame they first show in is their collision frame.
2. `motion_conditioning`: at latent resolution (a latent frame = the VAE's time factor in video
   frames, 4 or 2; a latent cell = 8 x 8 pixels), per latent step an integer displacement of every
   cell and an occlusion layer; one trajectory track per body and per particle emitter
   (TRACK_FEATURES numbers per latent frame); the collision frames as audio cue positions (audio
   latents at 25 per second, the shared time axis).
3. `warp_noise`: the initial video noise carried along that flow by a discrete noise transport
   that keeps it exactly unit Gaussian (cf. Go-with-the-Flow, Burgert et al. 2025; "How I Warped
   Your Noise", Chang et al. 2024): every noise sample of latent frame k moves to the cell its
   object moves to; a cell that receives n >= 1 samples (from the topmost layer arriving there) gets
   their sum / sqrt(n); a cell that receives none gets fresh noise. Each sample is used at most once,
   so every frame stays i.i.d. N(0, 1), and noise follows the simulated motion from frame to frame.

Shape names: F video frames, B bodies, P particles, E emitters, N = B + E tracks, T latent frames,
h, w latent rows and columns, C latent channels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .config import PhysicsScene
from .plan import ScenePlan, first_frame

SIMULATION_RATE = 480          # physics steps per second (at least; a whole number per frame)
MIN_IMPACT_SPEED = 40.0        # px/s along the contact normal: slower touches are resting, not hits
WALL_THICKNESS = 16.0          # px, outside the frame
WALL_ELASTICITY, WALL_FRICTION = 0.6, 0.5
PARTICLE_DENSITY = 0.02        # mass per px^2 of particle area
BODY, PARTICLE, WALL = 1, 2, 3  # pymunk collision types
AUDIO_LATENT_RATE = 25.0       # audio latents per second (DESIGN.md §3)
TRACK_FEATURES = 8             # x/W, y/H, vx/W, vy/H (per second), sin a, cos a, size/W, is-particles
GOLDEN_ANGLE = math.pi * (3 - math.sqrt(5))


@dataclass
class Simulation:
    """Per-frame state of one simulated scene (frame 0 = the initial state)."""
    fps: int
    width: int
    height: int
    body_position: np.ndarray       # (F, B, 2) px
    body_velocity: np.ndarray       # (F, B, 2) px/s
    body_angle: np.ndarray          # (F, B) radians
    body_shape: tuple[str, ...]     # (B,) "circle" | "box"
    body_extent: np.ndarray         # (B, 2): (radius, radius) or (width, height), px
    particle_position: np.ndarray   # (F, P, 2) px
    particle_velocity: np.ndarray   # (F, P, 2) px/s
    particle_emitter: np.ndarray    # (P,) emitter index
    collision_frames: tuple[int, ...]  # sorted, unique frames in which a rigid hit happened

    @property
    def frames(self) -> int:
        return self.body_position.shape[0]

    @property
    def emitters(self) -> int:
        return int(self.particle_emitter.max()) + 1 if self.particle_emitter.size else 0


def emitter_offsets(count: int, spread: float) -> np.ndarray:
    """(count, 2) points filling a disc of radius `spread` evenly (Vogel's sunflower): no RNG."""
    i = np.arange(count) + 0.5
    r = spread * np.sqrt(i / count)
    return np.stack([r * np.cos(i * GOLDEN_ANGLE), r * np.sin(i * GOLDEN_ANGLE)], 1)


def simulate(scene: PhysicsScene, width: int, height: int, fps: int, frames: int) -> Simulation:
    """Run `scene` for `frames` video frames at `fps` and record every frame."""
    import pymunk

    space = pymunk.Space()
    space.gravity = tuple(scene.gravity)
    if scene.walls:
        t = WALL_THICKNESS
        corners = [(-t, -t), (width + t, -t), (width + t, height + t), (-t, height + t)]
        for a, b in zip(corners, corners[1:] + corners[:1]):
            wall = pymunk.Segment(space.static_body, a, b, t)
            wall.elasticity, wall.friction, wall.collision_type = WALL_ELASTICITY, WALL_FRICTION, WALL
            space.add(wall)

    bodies = []
    for spec in scene.bodies:
        if spec.static:
            body = pymunk.Body(body_type=pymunk.Body.STATIC)
        elif spec.shape == "circle":
            body = pymunk.Body(spec.mass, pymunk.moment_for_circle(spec.mass, 0, spec.radius))
        else:
            body = pymunk.Body(spec.mass, pymunk.moment_for_box(spec.mass, tuple(spec.size)))
        body.position, body.angle = tuple(spec.position), spec.angle
        if not spec.static:
            body.velocity, body.angular_velocity = tuple(spec.velocity), spec.angular_velocity
        shape = pymunk.Circle(body, spec.radius) if spec.shape == "circle" else pymunk.Poly.create_box(body, tuple(spec.size))
        shape.elasticity, shape.friction, shape.collision_type = spec.elasticity, spec.friction, BODY
        space.add(body, shape)
        bodies.append(body)

    particles, emitter_of = [], []
    for e, spec in enumerate(scene.particles):
        mass = PARTICLE_DENSITY * math.pi * spec.radius ** 2
        for offset in emitter_offsets(spec.count, spec.spread):
            body = pymunk.Body(mass, pymunk.moment_for_circle(mass, 0, spec.radius))
            body.position = (spec.position[0] + offset[0], spec.position[1] + offset[1])
            body.velocity = tuple(spec.velocity)
            shape = pymunk.Circle(body, spec.radius)
            shape.elasticity, shape.friction, shape.collision_type = spec.elasticity, spec.friction, PARTICLE
            space.add(body, shape)
            particles.append(body)
            emitter_of.append(e)

    state = {"frame": 0, "hits": set()}

    def begin(arbiter, space, data):
        a, b = arbiter.shapes
        kinds = {a.collision_type, b.collision_type}
        if BODY not in kinds or PARTICLE in kinds:
            return                                  # only body-body and body-wall hits are cues
        point = arbiter.contact_point_set.points[0].point_a if arbiter.contact_point_set.points else a.body.position
        relative = b.body.velocity_at_world_point(point) - a.body.velocity_at_world_point(point)
        if abs(relative.dot(arbiter.normal)) >= MIN_IMPACT_SPEED:
            data["hits"].add(data["frame"])

    space.on_collision(begin=begin, data=state)

    substeps = max(1, math.ceil(SIMULATION_RATE / fps))
    dt = 1.0 / (fps * substeps)
    n_b, n_p = len(bodies), len(particles)
    record = {k: np.zeros(s) for k, s in (("bp", (frames, n_b, 2)), ("bv", (frames, n_b, 2)),
                                           ("ba", (frames, n_b)), ("pp", (frames, n_p, 2)),
                                           ("pv", (frames, n_p, 2)))}
    for frame in range(frames):
        if frame > 0:
            state["frame"] = frame                  # a hit while stepping to frame f shows in frame f
            for _ in range(substeps):
                space.step(dt)
        for i, body in enumerate(bodies):
            record["bp"][frame, i], record["bv"][frame, i] = tuple(body.position), tuple(body.velocity)
            record["ba"][frame, i] = body.angle
        for i, body in enumerate(particles):
            record["pp"][frame, i], record["pv"][frame, i] = tuple(body.position), tuple(body.velocity)

    extent = np.array([(s.radius, s.radius) if s.shape == "circle" else tuple(s.size) for s in scene.bodies],
                      dtype=np.float64).reshape(n_b, 2)
    return Simulation(fps=fps, width=width, height=height, body_position=record["bp"], body_velocity=record["bv"],
                      body_angle=record["ba"], body_shape=tuple(s.shape for s in scene.bodies), body_extent=extent,
                      particle_position=record["pp"], particle_velocity=record["pv"],
                      particle_emitter=np.array(emitter_of, dtype=np.int64),
                      collision_frames=tuple(sorted(state["hits"])))


# ---- motion conditioning at latent resolution --------------------------------------------------

@dataclass
class MotionConditioning:
    """What the denoiser receives from the simulation (carried in stages.MediaLatents)."""
    flow: torch.Tensor              # (T-1, h, w, 2) int16: (dy, dx) cells each cell moves from latent k to k+1
    layer: torch.Tensor             # (T-1, h, w) uint8: 0 background, 1 particles, 2 + b body b (occlusion order)
    tracks: torch.Tensor            # (N, T, TRACK_FEATURES) float: one trajectory per body and emitter
    track_cells: torch.Tensor       # (N, T, 2) float: (y, x) of each track, in latent cells
    collision_frames: tuple[int, ...]   # video frames of rigid hits (from the simulator)
    audio_cues: tuple[int, ...]         # the audio latents at those times: round(frame / fps * 25)


def audio_cue_indices(frames: tuple[int, ...], fps: float, audio_frames: int) -> tuple[int, ...]:
    """Video frames -> the audio latents at the same instants (25 per second), within the clip."""
    cues = {round(f / fps * AUDIO_LATENT_RATE) for f in frames}
    return tuple(sorted(c for c in cues if 0 <= c < audio_frames))


def _cells(points: np.ndarray, cell: float, h: int, w: int) -> np.ndarray:
    """(..., 2) pixel (x, y) -> (..., 2) long (row, col) of the latent cell holding it (clamped)."""
    rows = np.clip(np.floor(points[..., 1] / cell), 0, h - 1)
    cols = np.clip(np.floor(points[..., 0] / cell), 0, w - 1)
    return np.stack([rows, cols], -1).astype(np.int64)


def body_cover(sim: Simulation, b: int, frame: int, cell: float, h: int, w: int) -> np.ndarray:
    """(h, w) bool: latent cells whose centre lies inside body b at `frame` (its own cell always)."""
    ys, xs = np.meshgrid((np.arange(h) + 0.5) * cell, (np.arange(w) + 0.5) * cell, indexing="ij")
    dx, dy = xs - sim.body_position[frame, b, 0], ys - sim.body_position[frame, b, 1]
    if sim.body_shape[b] == "circle":
        inside = dx ** 2 + dy ** 2 <= sim.body_extent[b, 0] ** 2
    else:
        a = sim.body_angle[frame, b]
        u, v = dx * math.cos(a) + dy * math.sin(a), -dx * math.sin(a) + dy * math.cos(a)  # body frame
        inside = (np.abs(u) <= sim.body_extent[b, 0] / 2) & (np.abs(v) <= sim.body_extent[b, 1] / 2)
    x, y = sim.body_position[frame, b]
    if 0 <= x < sim.width and 0 <= y < sim.height:
        row, col = _cells(sim.body_position[frame, b], cell, h, w)
        inside[row, col] = True
    return inside


def motion_conditioning(sim: Simulation, latent_frames: int, latent_height: int, latent_width: int,
                        audio_frames: int, frames_per_latent: int) -> MotionConditioning:
    T, h, w = latent_frames, latent_height, latent_width
    cell = sim.width / w
    frames = [min(first_frame(k, frames_per_latent), sim.frames - 1) for k in range(T)]   # the frame each latent shows
    flow = np.zeros((max(T - 1, 0), h, w, 2), dtype=np.int64)
    layer = np.zeros((max(T - 1, 0), h, w), dtype=np.int64)
    for k in range(T - 1):
        f0, f1 = frames[k], frames[k + 1]
        # particles (layer 1): the mean displacement of the particles in a cell, in whole cells
        if sim.particle_position.shape[1]:
            c0 = _cells(sim.particle_position[f0], cell, h, w)                # (P, 2)
            c1 = _cells(sim.particle_position[f1], cell, h, w)
            total = np.zeros((h, w, 2))
            count = np.zeros((h, w))
            np.add.at(total, (c0[:, 0], c0[:, 1]), (c1 - c0).astype(np.float64))
            np.add.at(count, (c0[:, 0], c0[:, 1]), 1)
            moved = count > 0
            flow[k][moved] = np.round(total[moved] / count[moved, None]).astype(np.int64)
            layer[k][moved] = 1
        # bodies (layers 2 + b, later bodies on top): every covered cell moves with the body
        for b in range(sim.body_position.shape[1]):
            cover = body_cover(sim, b, f0, cell, h, w)
            d = _cells(sim.body_position[f1, b], cell, h, w) - _cells(sim.body_position[f0, b], cell, h, w)
            flow[k][cover] = d
            layer[k][cover] = 2 + b

    tracks, track_cells = track_features(sim, frames, cell)
    return MotionConditioning(flow=torch.from_numpy(flow).to(torch.int16), layer=torch.from_numpy(layer).to(torch.uint8),
                              tracks=torch.from_numpy(tracks).float(), track_cells=torch.from_numpy(track_cells).float(),
                              collision_frames=sim.collision_frames,
                              audio_cues=audio_cue_indices(sim.collision_frames, sim.fps, audio_frames))


def track_features(sim: Simulation, frames: list[int], cell: float) -> tuple[np.ndarray, np.ndarray]:
    """-> (N, T, TRACK_FEATURES) features and (N, T, 2) (y, x) positions in latent cells."""
    W, H = float(sim.width), float(sim.height)
    rows = []
    for b in range(sim.body_position.shape[1]):
        p, v, a = sim.body_position[frames, b], sim.body_velocity[frames, b], sim.body_angle[frames, b]
        size = np.full(len(frames), sim.body_extent[b].max() / W)
        rows.append((p, v, np.sin(a), np.cos(a), size, np.zeros(len(frames))))
    for e in range(sim.emitters):
        members = sim.particle_emitter == e
        p = sim.particle_position[frames][:, members].mean(1)                 # (T, 2) centroid
        v = sim.particle_velocity[frames][:, members].mean(1)
        spread = sim.particle_position[frames][:, members].std(1).mean(-1) / W
        rows.append((p, v, np.zeros(len(frames)), np.ones(len(frames)), spread, np.ones(len(frames))))
    tracks = np.zeros((len(rows), len(frames), TRACK_FEATURES))
    cells = np.zeros((len(rows), len(frames), 2))
    for n, (p, v, sin, cos, size, is_particles) in enumerate(rows):
        tracks[n] = np.stack([p[:, 0] / W, p[:, 1] / H, v[:, 0] / W, v[:, 1] / H, sin, cos, size, is_particles], -1)
        cells[n] = np.stack([p[:, 1] / cell, p[:, 0] / cell], -1)
    return tracks, cells


def plan_motion(plan: ScenePlan) -> MotionConditioning:
    """A ScenePlan's scene (canonical JSON) -> its motion conditioning at the plan's latent shape."""
    scene = PhysicsScene.model_validate_json(plan.physics)
    sim = simulate(scene, plan.width, plan.height, plan.fps, plan.num_frames)
    return motion_conditioning(sim, plan.latent_frames, plan.latent_height, plan.latent_width, plan.audio_frames,
                               plan.frames_per_latent)


# ---- noise transport ---------------------------------------------------------------------------

def warp_noise(noise: torch.Tensor, flow: torch.Tensor, layer: torch.Tensor) -> torch.Tensor:
    """noise (C, T, h, w) i.i.d. N(0, 1) -> the same shape, each latent frame k + 1 carried from
    frame k along `flow` (T-1, h, w, 2) with occlusion by `layer` (T-1, h, w); still i.i.d. N(0, 1)
    within every frame. Cells nothing moves into keep noise[:, k + 1] (otherwise unused: fresh)."""
    C, T, h, w = noise.shape
    flow, layer = flow.long(), layer.long()
    out = noise.clone()
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    for k in range(T - 1):
        ty, tx = ys + flow[k, ..., 0], xs + flow[k, ..., 1]                         # (h, w) targets
        inside = ((ty >= 0) & (ty < h) & (tx >= 0) & (tx < w)).flatten()           # (h*w,)
        source = torch.arange(h * w)[inside]                                        # (n,) cells that land
        target = (ty * w + tx).flatten()[inside]                                    # (n,)
        rank = layer[k].flatten()[inside]                                           # (n,)
        top = torch.full((h * w,), -1, dtype=rank.dtype).scatter_reduce(0, target, rank, "amax")
        keep = rank == top[target]                                                  # occluded samples drop out
        source, target = source[keep], target[keep]
        count = torch.zeros(h * w, dtype=noise.dtype).index_add_(0, target, torch.ones_like(target, dtype=noise.dtype))
        moved = torch.zeros(C, h * w, dtype=noise.dtype).index_add_(1, target, out[:, k].reshape(C, -1)[:, source])
        fresh = noise[:, k + 1].reshape(C, -1)
        out[:, k + 1] = torch.where(count > 0, moved / count.clamp(min=1).sqrt(), fresh).view(C, h, w)
    return out
