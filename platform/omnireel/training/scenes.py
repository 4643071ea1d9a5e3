"""The synthetic scene dataset: pymunk scenes of 1-3 shapes, their frames, sound, captions and labels.

A scene is a pure function of its seed (`make_scene(seed, ...)`): which shapes (circle, square,
triangle), their colours (a palette of 8 named colours, distinct within a scene), sizes, starting
places and speeds, the plain background, the caption's language. It is simulated by the same
`physics.simulate` the render pipeline runs for `physics` conditioning (so a scene's `PhysicsScene`
is also a valid request field, and a request replays exactly the training simulation), then:

- frames: the shapes drawn at every simulated frame on the background, (F, H, W, 3) uint8;
- sound: a short impact at every simulated contact (the simulator's collision frames, i.e. the
  pipeline's audio cues), pitch from the size of the body that hit (small = high), loudness from its
  impact speed, silence between;
- caption: a template naming colours, shapes, the motion and the number of floor bounces, in one
  of five languages (en, zh, ja, ko, es);
- labels: the simulated tracks (body centres per frame), the collision frames, the floor bounces.

Triangles are simulated as circles of the same radius (physics.py has circles and boxes) and drawn
as equilateral triangles turning with the body.

Shape names: F video frames, K bodies, H, W pixels, S audio samples.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..config import Body, PhysicsScene
from ..physics import MIN_IMPACT_SPEED, Simulation, simulate

# name -> RGB. Object colours are far apart in RGB; backgrounds are kept out of the object palette.
PALETTE = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230), "yellow": (240, 220, 40),
    "orange": (245, 140, 20), "purple": (140, 50, 200), "cyan": (40, 210, 220), "pink": (250, 120, 190),
}
BACKGROUNDS = {"grey": (105, 105, 105), "black": (20, 20, 20), "white": (235, 235, 235)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 5.0, "medium": 7.0, "large": 9.0}   # radius (circle, triangle) / half side (square), px at 64
LANGUAGE_CYCLE = ("en", "zh", "ja", "ko", "es")
LANGUAGE_SHARES = (0.4, 0.15, 0.15, 0.15, 0.15)   # English leads: the frozen MiniLM reads it best
GRAVITY = 300.0                # px/s^2 at 64 px height (scaled with the frame height)
SAMPLE_RATE_DEFAULT = 16000

# ---- caption templates -----------------------------------------------------------------------

COLOUR_WORDS = {
    "en": {c: c for c in PALETTE},
    "zh": {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "orange": "橙色",
           "purple": "紫色", "cyan": "青色", "pink": "粉色"},
    "ja": {"red": "赤い", "green": "緑の", "blue": "青い", "yellow": "黄色い", "orange": "オレンジ色の",
           "purple": "紫の", "cyan": "水色の", "pink": "ピンクの"},
    "ko": {"red": "빨간", "green": "초록", "blue": "파란", "yellow": "노란", "orange": "주황",
           "purple": "보라", "cyan": "하늘색", "pink": "분홍"},
    # (masculine, feminine) forms
    "es": {"red": ("rojo", "roja"), "green": ("verde", "verde"), "blue": ("azul", "azul"),
           "yellow": ("amarillo", "amarilla"), "orange": ("naranja", "naranja"),
           "purple": ("morado", "morada"), "cyan": ("cian", "cian"), "pink": ("rosa", "rosa")},
}
BACKGROUND_WORDS = {
    "en": {b: b for b in BACKGROUNDS},
    "zh": {"grey": "灰色", "black": "黑色", "white": "白色"},
    "ja": {"grey": "灰色の", "black": "黒い", "white": "白い"},
    "ko": {"grey": "회색", "black": "검은", "white": "하얀"},
    "es": {"grey": "gris", "black": "negro", "white": "blanco"},
}
SHAPE_WORDS = {
    "en": {"circle": "ball", "square": "square", "triangle": "triangle"},
    "zh": {"circle": "球", "square": "方块", "triangle": "三角形"},
    "ja": {"circle": "ボール", "square": "四角", "triangle": "三角形"},
    "ko": {"circle": "공", "square": "네모", "triangle": "삼각형"},
    "es": {"circle": ("pelota", "f"), "square": ("cuadrado", "m"), "triangle": ("triángulo", "m")},
}
SIZE_WORDS = {
    "en": {"small": "small ", "medium": "", "large": "big "},
    "zh": {"small": "小", "medium": "", "large": "大"},
    "ja": {"small": "小さな", "medium": "", "large": "大きな"},
    "ko": {"small": "작은 ", "medium": "", "large": "큰 "},
    "es": {"small": ("pequeño", "pequeña"), "medium": ("", ""), "large": ("grande", "grande")},
}
BOUNCE_WORDS = {
    "en": ["without bouncing", "once", "twice", "three times", "four times", "many times"],
    "zh": ["没有弹起", "一次", "两次", "三次", "四次", "很多次"],
    "ja": ["跳ねずに", "1回", "2回", "3回", "4回", "何度も"],
    "ko": ["튀지 않고", "한 번", "두 번", "세 번", "네 번", "여러 번"],
    "es": ["sin rebotar", "una vez", "dos veces", "tres veces", "cuatro veces", "muchas veces"],
}


def object_phrase(language: str, colour: str, shape: str, size: str) -> str:
    """'a small red ball' in `language`."""
    c, s, z = COLOUR_WORDS[language][colour], SHAPE_WORDS[language][shape], SIZE_WORDS[language][size]
    if language == "en":
        return f"a {z}{c} {s}"
    if language == "zh":
        return f"一个{z}{c}的{s}"
    if language == "ja":
        return f"{z}{c}{s}"
    if language == "ko":
        return f"{z}{c} {s}"
    noun, gender = s
    g = 0 if gender == "m" else 1
    article = "un" if g == 0 else "una"
    words = [article, noun, c[g]] + ([z[g]] if z[g] else [])
    return " ".join(words)


def caption(language: str, objects: list[tuple[str, str, str]], background: str, bounces: list[int],
            collide: bool) -> str:
    """The template caption: objects [(colour, shape, size)], floor bounces per object, whether two
    objects hit each other. No sentence ends, ';' or 'then' (the storyboard planner would cut there)."""
    bg = BACKGROUND_WORDS[language][background]
    phrases = [object_phrase(language, *o) for o in objects]
    n = min(max(bounces), 5) if bounces else 0
    bw = BOUNCE_WORDS[language][n]
    if language == "en":
        subject = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        verb = ("falls and bounces" if len(phrases) == 1 else "fall and bounce") if n else (
            "falls" if len(phrases) == 1 else "fall")
        motion = f"{verb} {bw}"
        hit = " and hit each other" if collide else ""
        return f"{subject} {motion}{hit} on a {bg} floor"
    if language == "zh":
        subject = "和".join(phrases)
        hit = "，互相碰撞" if collide else ""
        return f"{subject}落下，在{bg}的地面上弹跳了{bw}{hit}" if n else f"{subject}落下，{bw}{hit}，{bg}的地面"
    if language == "ja":
        subject = "と".join(phrases)
        hit = "、ぶつかり合う" if collide else ""
        return f"{subject}が落ちて、{bg}床で{bw}跳ねる{hit}" if n else f"{subject}が{bg}床に{bw}落ちる{hit}"
    if language == "ko":
        subject = "과 ".join(phrases)
        hit = ", 서로 부딪친다" if collide else ""
        return f"{subject}이 떨어져 {bg} 바닥에서 {bw} 튄다{hit}" if n else f"{subject}이 {bw} {bg} 바닥에 떨어진다{hit}"
    subject = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " y " + phrases[-1]
    plural = len(phrases) > 1
    verb = ("caen y rebotan" if plural else "cae y rebota") if n else ("caen" if plural else "cae")
    hit = " y chocan entre sí" if collide else ""
    return f"{subject} {verb} {bw}{hit} sobre un suelo {bg}"


# ---- scenes ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    size: str
    radius: float       # px at the scene's resolution


@dataclass
class Scene:
    """One generated scene and everything derived from it."""
    seed: int
    width: int
    height: int
    fps: int
    frames: int
    language: str
    background: str
    objects: tuple[SceneObject, ...]
    physics: PhysicsScene        # what a request's `physics` field carries to replay it
    simulation: Simulation
    bounces: tuple[int, ...]     # floor bounces per object (labels)
    collide: bool                # two objects touched (label)
    caption: str

    @property
    def tracks(self) -> np.ndarray:
        """(F, K, 2) simulated body centres, px (x right, y down)."""
        return self.simulation.body_position

    @property
    def collision_frames(self) -> tuple[int, ...]:
        return self.simulation.collision_frames


def make_scene(seed: int, width: int = 64, height: int = 64, fps: int = 12, seconds: float = 2.0,
               language: str | None = None, objects: int | None = None) -> Scene:
    """The scene of `seed` (deterministic): 1-3 objects falling on a plain background."""
    rng = np.random.default_rng(seed)
    scale = height / 64.0
    n = int(objects or rng.choice([1, 1, 2, 3]))
    colours = rng.choice(list(PALETTE), size=n, replace=False)
    background = str(rng.choice(list(BACKGROUNDS)))
    lang = language or LANGUAGE_CYCLE[int(rng.choice(len(LANGUAGE_CYCLE), p=LANGUAGE_SHARES))]
    chosen, bodies = [], []
    for i in range(n):
        shape = str(rng.choice(SHAPES))
        size = str(rng.choice(list(SIZES)))
        r = SIZES[size] * scale
        # starting places spread across the width, in the upper half; no overlap at the start
        slot = (i + rng.uniform(0.2, 0.8)) / n
        x = float(np.clip(slot * width, r + 1, width - r - 1))
        y = float(rng.uniform(r + 2, height * 0.45))
        velocity = (float(rng.uniform(-40, 40) * scale), float(rng.uniform(-30, 30) * scale))
        elasticity = float(rng.uniform(0.85, 1.0))
        common = dict(position=(x, y), velocity=velocity, mass=r * r, elasticity=elasticity, friction=0.4,
                      angular_velocity=float(rng.uniform(-2, 2)))
        if shape == "square":
            bodies.append(Body(shape="box", size=(2 * r, 2 * r), angle=float(rng.uniform(0, math.pi / 2)), **common))
        else:
            bodies.append(Body(shape="circle", radius=r, angle=float(rng.uniform(0, 2 * math.pi)), **common))
        chosen.append(SceneObject(str(colours[i]), shape, size, r))
    physics = PhysicsScene(gravity=(0.0, GRAVITY * scale), bodies=bodies, walls=True)
    frames = round(seconds * fps)
    sim = simulate(physics, width, height, fps, frames)
    bounces = tuple(floor_bounces(sim, b, height) for b in range(n))
    collide = touched(sim, chosen)
    text = caption(lang, [(o.colour, o.shape, o.size) for o in chosen], background, list(bounces), collide)
    return Scene(seed=seed, width=width, height=height, fps=fps, frames=frames, language=lang,
                 background=background, objects=tuple(chosen), physics=physics, simulation=sim,
                 bounces=bounces, collide=collide, caption=text)


def floor_bounces(sim: Simulation, body: int, height: int) -> int:
    """Visible floor bounces of `body`: frames where its vertical velocity turns from falling (at
    least MIN_IMPACT_SPEED) to rising while it is near the floor."""
    vy = sim.body_velocity[:, body, 1]
    y = sim.body_position[:, body, 1]
    extent = sim.body_extent[body].max()
    count = 0
    for f in range(1, sim.frames):
        if vy[f - 1] >= MIN_IMPACT_SPEED * 0.8 and vy[f] < 0 and y[f] > height - 2.5 * extent:
            count += 1
    return count


def touched(sim: Simulation, objects) -> bool:
    """Whether any two bodies came within touching distance in some frame."""
    p = sim.body_position                                      # (F, K, 2)
    for a in range(len(objects)):
        for b in range(a + 1, len(objects)):
            d = np.linalg.norm(p[:, a] - p[:, b], axis=-1)
            reach = objects[a].radius + objects[b].radius
            if (d <= reach * 1.05).any():
                return True
    return False


# ---- rendering ---------------------------------------------------------------------------------

def shape_mask(shape: str, centre, radius: float, angle: float, width: int, height: int) -> np.ndarray:
    """(H, W) bool: the pixels whose centre lies inside the shape."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    dx, dy = xs - centre[0], ys - centre[1]
    if shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    c, s = math.cos(angle), math.sin(angle)
    u, v = dx * c + dy * s, -dx * s + dy * c                      # body frame
    if shape == "square":
        return (np.abs(u) <= radius) & (np.abs(v) <= radius)
    # equilateral triangle of circumradius `radius` (pointing along -v at angle 0)
    inside = np.ones_like(u, dtype=bool)
    for k in range(3):
        theta = 2 * math.pi * k / 3
        nx, ny = math.sin(theta), -math.cos(theta)               # edge normals of the three sides
        inside &= (u * -nx + v * -ny) <= radius / 2
    return inside


def render_frames(scene: Scene) -> np.ndarray:
    """(F, H, W, 3) uint8 frames of the scene."""
    sim = scene.simulation
    out = np.empty((scene.frames, scene.height, scene.width, 3), dtype=np.uint8)
    out[:] = BACKGROUNDS[scene.background]
    for f in range(scene.frames):
        for b, obj in enumerate(scene.objects):
            mask = shape_mask(obj.shape, sim.body_position[f, b], obj.radius, sim.body_angle[f, b],
                              scene.width, scene.height)
            out[f][mask] = PALETTE[obj.colour]
    return out


# ---- sound -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Impact:
    frame: int          # video frame the contact first shows in (the simulator's collision frame)
    body: int           # the body with the largest velocity change there
    speed: float        # its velocity change, px/s


def impacts(scene: Scene) -> list[Impact]:
    """One impact per simulated collision frame, attributed to the body whose velocity changed most."""
    sim = scene.simulation
    gravity = np.array(scene.physics.gravity) / scene.fps
    out = []
    for f in scene.collision_frames:
        if f == 0:
            continue
        dv = sim.body_velocity[f] - sim.body_velocity[f - 1] - gravity         # (K, 2)
        change = np.linalg.norm(dv, axis=-1)
        b = int(np.argmax(change))
        out.append(Impact(frame=f, body=b, speed=float(change[b])))
    return out


def impact_pitch(radius: float, height: int) -> float:
    """Hz: small bodies sound high, large ones low (radius 5 px at 64 px -> 880 Hz)."""
    return 880.0 * 5.0 / (radius * 64.0 / height)


def impact_loudness(speed: float, height: int) -> float:
    """Peak amplitude from the impact speed (px/s, scaled to a 64 px frame)."""
    return float(np.clip(0.12 + 0.5 * speed * 64.0 / height / 250.0, 0.12, 0.7))


def soundtrack(scene: Scene, sample_rate: int = SAMPLE_RATE_DEFAULT) -> np.ndarray:
    """(S,) float32: a decaying two-partial knock at every contact, silence elsewhere."""
    samples = round(scene.frames / scene.fps * sample_rate)
    wave = np.zeros(samples, dtype=np.float64)
    length = int(0.15 * sample_rate)
    t = np.arange(length) / sample_rate
    envelope = np.exp(-t / 0.035) * np.minimum(1.0, t / 0.002)             # 2 ms attack, 35 ms decay
    for hit in impacts(scene):
        radius = scene.objects[hit.body].radius
        f0 = impact_pitch(radius, scene.height)
        tone = np.sin(2 * math.pi * f0 * t) + 0.4 * np.sin(2 * math.pi * 2.76 * f0 * t)
        start = round(hit.frame / scene.fps * sample_rate)
        piece = (impact_loudness(hit.speed, scene.height) / 1.4) * envelope * tone
        end = min(samples, start + length)
        if start < samples:
            wave[start:end] += piece[: end - start]
    return np.clip(wave, -1, 1).astype(np.float32)
