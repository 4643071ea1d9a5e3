"""Fidelity measures of a rendered scene against the scene it was asked for (benchmarks/fidelity.py).

Each measure reads only pixels and samples (uint8 frames (F, H, W, 3), a float waveform) plus the
scene's labels (scenes.Scene): colours, shapes, simulated tracks. None of them looks at latents or
at the model, so the same code scores a trained checkpoint, a random one and the ground-truth
render itself (the ceiling of each measure).

- background: the median colour of the frame's border pixels; foreground: pixels more than
  FOREGROUND_DISTANCE from it (RGB);
- colour: every foreground pixel votes for its nearest palette colour; the dominant colour of a
  clip is the most voted;
- objects: 8-connected foreground components of at least MIN_COMPONENT pixels;
- shape: a component's area over the disc through its farthest pixel (from its centroid): a circle
  fills ~1, a square 2/pi = 0.64, an equilateral triangle 0.41;
- tracks: per object, the centroid of the foreground pixels nearest its colour, per frame;
- visible contacts: frames where a tracked centroid's vertical velocity turns from falling to rising
  or its horizontal velocity reverses;
- audio onsets: 10 ms energy frames rising by ONSET_RISE_DB over 30 ms above an absolute floor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .scenes import PALETTE, SHAPES, Scene

FOREGROUND_DISTANCE = 60.0
MIN_COMPONENT = 4              # pixels
MIN_TRACK_PIXELS = 3
ONSET_RISE_DB = 9.0
ONSET_FLOOR_DB = -45.0         # dBFS of a 10 ms frame's RMS
ONSET_GAP_SECONDS = 0.08
CONTACT_SPEED = 0.5            # px per frame, either side of a vertical reversal
PALETTE_NAMES = tuple(PALETTE)
PALETTE_RGB = np.array([PALETTE[n] for n in PALETTE_NAMES], dtype=np.float64)   # (8, 3)


def background(frame: np.ndarray) -> np.ndarray:
    """(3,) the median colour of the frame's border pixels."""
    border = np.concatenate([frame[0], frame[-1], frame[:, 0], frame[:, -1]]).astype(np.float64)
    return np.median(border, axis=0)


def foreground(frames: np.ndarray) -> np.ndarray:
    """(F, H, W) bool: pixels far from their frame's background."""
    out = np.zeros(frames.shape[:3], dtype=bool)
    for f, frame in enumerate(frames):
        out[f] = np.linalg.norm(frame.astype(np.float64) - background(frame), axis=-1) > FOREGROUND_DISTANCE
    return out


def nearest_palette(pixels: np.ndarray) -> np.ndarray:
    """(..., 3) RGB -> (...,) index of the nearest palette colour."""
    d = np.linalg.norm(pixels.astype(np.float64)[..., None, :] - PALETTE_RGB, axis=-1)
    return d.argmin(-1)


def dominant_colour(frames: np.ndarray) -> str | None:
    """The palette colour most foreground pixels of the clip are nearest to (None: no foreground)."""
    mask = foreground(frames)
    if not mask.any():
        return None
    votes = np.bincount(nearest_palette(frames[mask]), minlength=len(PALETTE_NAMES))
    return PALETTE_NAMES[int(votes.argmax())]


def components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a (H, W) bool mask with >= MIN_COMPONENT pixels: [(n, 2) (row, col)].
    Labels by min-propagation over 3 x 3 neighbourhoods until nothing changes (numpy, no Python loop
    over pixels)."""
    height, width = mask.shape
    big = height * width
    labels = np.where(mask, np.arange(big).reshape(height, width), big)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        neighbours = np.stack([padded[1 + dr:1 + dr + height, 1 + dc:1 + dc + width]
                               for dr in (-1, 0, 1) for dc in (-1, 0, 1)])
        updated = np.where(mask, neighbours.min(0), big)
        if (updated == labels).all():
            break
        labels = updated
    out = []
    for label in np.unique(labels[mask]):
        pixels = np.argwhere(labels == label)
        if len(pixels) >= MIN_COMPONENT:
            out.append(pixels)
    return out


def shape_of(pixels: np.ndarray) -> str:
    """circle | square | triangle of one component, from its fill of the disc through its farthest pixel."""
    centre = pixels.mean(0)
    reach = np.linalg.norm(pixels - centre, axis=1).max() + 0.5
    fill = len(pixels) / (math.pi * reach * reach)
    return "circle" if fill > 0.8 else "square" if fill > 0.5 else "triangle"


def touches_border(pixels: np.ndarray, height: int, width: int) -> bool:
    return bool((pixels.min(0) <= 0).any() or pixels[:, 0].max() >= height - 1 or pixels[:, 1].max() >= width - 1)


def track(frames: np.ndarray, colour: str, mask: np.ndarray | None = None) -> np.ndarray:
    """(F, 2) centroid (x, y) px of the foreground pixels (`mask`, default foreground(frames)) nearest
    `colour`, NaN where fewer than MIN_TRACK_PIXELS."""
    mask = foreground(frames) if mask is None else mask
    target = PALETTE_NAMES.index(colour)
    out = np.full((frames.shape[0], 2), np.nan)
    for f in range(frames.shape[0]):
        rows, cols = np.nonzero(mask[f])
        if rows.size == 0:
            continue
        mine = nearest_palette(frames[f, rows, cols]) == target
        if mine.sum() >= MIN_TRACK_PIXELS:
            out[f] = (cols[mine].mean() + 0.5, rows[mine].mean() + 0.5)
    return out


def visible_contacts(centres: np.ndarray) -> list[int]:
    """Frames where a (F, 2) track bounces: its vertical velocity turns from falling to rising (the
    floor, another body), or its horizontal velocity reverses (a wall, another body)."""
    out = []
    for f in range(1, len(centres) - 1):
        window = centres[f - 1:f + 2]
        if np.isnan(window).any():
            continue
        before, after = window[1] - window[0], window[2] - window[1]            # (dx, dy) per frame
        vertical = before[1] > CONTACT_SPEED and after[1] < -CONTACT_SPEED
        horizontal = abs(before[0]) > CONTACT_SPEED and abs(after[0]) > CONTACT_SPEED and before[0] * after[0] < 0
        if vertical or horizontal:
            out.append(f)
    return out


def audio_onsets(wave: np.ndarray, sample_rate: int) -> list[float]:
    """Seconds at which the 10 ms energy rises by ONSET_RISE_DB within 30 ms, above ONSET_FLOOR_DB."""
    hop = sample_rate // 100
    n = len(wave) // hop
    if n < 4:
        return []
    rms = np.sqrt(np.mean(wave[: n * hop].astype(np.float64).reshape(n, hop) ** 2, axis=1) + 1e-12)
    db = 20 * np.log10(rms)
    out, last = [], -1.0
    for i in range(3, n):
        t = i * hop / sample_rate
        if db[i] > ONSET_FLOOR_DB and db[i] - db[i - 3:i].min() > ONSET_RISE_DB and t - last > ONSET_GAP_SECONDS:
            # the onset is the first frame of the rise
            start = i - 3 + int(np.argmin(db[i - 3:i])) + 1
            out.append(start * hop / sample_rate)
            last = t
    return out


@dataclass
class SceneScores:
    colour_ok: bool
    count_frames: int               # frames where the ground truth shows the objects apart
    count_ok: int
    shape_measured: bool
    shape_ok: bool
    track_errors: list[float]       # px, per (object, frame); a missed frame counts as the frame's centre
    track_found: int
    track_total: int
    contacts: int                   # visible contacts in the video
    onsets: int                     # audio onsets
    contacts_heard: int             # contacts with an onset within one video frame
    onsets_seen: int                # onsets within one video frame of a visible contact
    frames_vary: bool
    audio_sounds: bool


def score(scene: Scene, frames: np.ndarray, wave: np.ndarray, sample_rate: int, truth: np.ndarray) -> SceneScores:
    """Scores one rendered clip (`frames`, `wave`) of `scene`; `truth` is the scene's own render (for
    which frames show the objects apart)."""
    n_frames, height, width = frames.shape[:3]
    colours = {o.colour for o in scene.objects}
    dominant = dominant_colour(frames)

    fg, fg_truth = foreground(frames), foreground(truth[:n_frames])
    count_frames = count_ok = 0
    shape_votes = {s: 0 for s in SHAPES}
    for f in range(n_frames):
        parts_truth = components(fg_truth[f])
        if len(parts_truth) != len(scene.objects) or any(touches_border(p, height, width) for p in parts_truth):
            continue
        count_frames += 1
        parts = components(fg[f])
        count_ok += len(parts) == len(scene.objects)
        if len(scene.objects) == 1 and parts:
            shape_votes[shape_of(max(parts, key=len))] += 1
    shape_measured = len(scene.objects) == 1 and count_frames > 0
    shape_ok = shape_measured and max(shape_votes, key=shape_votes.get) == scene.objects[0].shape \
        and sum(shape_votes.values()) > 0

    errors, found = [], 0
    contacts: list[int] = []
    centre = np.array([width / 2, height / 2])
    for b, obj in enumerate(scene.objects):
        centres = track(frames, obj.colour, fg)
        truth_xy = scene.tracks[:n_frames, b]
        for f in range(n_frames):
            if np.isnan(centres[f, 0]):
                errors.append(float(np.linalg.norm(centre - truth_xy[f])))
            else:
                found += 1
                errors.append(float(np.linalg.norm(centres[f] - truth_xy[f])))
        contacts += visible_contacts(centres)

    onsets = audio_onsets(wave, sample_rate)
    window = 1.0 / scene.fps                       # one video frame
    contact_times = [f / scene.fps for f in contacts]
    heard = sum(any(abs(t - o) <= window for o in onsets) for t in contact_times)
    seen = sum(any(abs(t - o) <= window for t in contact_times) for o in onsets)
    frames_vary = float(frames.astype(np.float64).std(axis=0).mean()) > 1.0 and float(frames.std()) > 2.0
    audio_sounds = float(np.sqrt(np.mean(wave.astype(np.float64) ** 2))) > 1e-3
    return SceneScores(colour_ok=dominant in colours,
                       count_frames=count_frames, count_ok=count_ok, shape_measured=shape_measured,
                       shape_ok=bool(shape_ok), track_errors=errors, track_found=found,
                       track_total=len(scene.objects) * n_frames, contacts=len(contacts), onsets=len(onsets),
                       contacts_heard=heard, onsets_seen=seen, frames_vary=frames_vary, audio_sounds=audio_sounds)
