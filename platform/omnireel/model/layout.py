"""Packs every modality into one token sequence and unpacks the prediction (DESIGN.md §3).

Order of streams: text (global caption, then shot captions), lang, voice, ref, [motion], video,
audio. That order makes the per-modality weight groups contiguous: text group = text + lang + voice,
video group = ref + motion + video, audio group = audio. The motion stream (trajectory tokens of a
simulated scene: one per track per latent frame, at that frame's time and the track's place) is
optional: it and its span exist only when the spec has tracks.

Every token carries: a modality id, a shot id (-1 = global), a shot-caption flag, a timestep index
into the per-row sigma table (0 clean, 1 video sigma, 2 audio sigma) and a position
(t seconds, y, x). Video latent k covers frames 4k-3..4k (latent 0: frame 0) and sits at the time of
its first frame; audio latent i sits at i / 25 s; each cut adds `shot_gap_seconds`. Audio cue tokens
(the audio latents at collision times of a simulated scene) carry a `cue` flag.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import MODALITY_ID, BackboneConfig

CLEAN, VIDEO_SIGMA, AUDIO_SIGMA = 0, 1, 2
AUDIO_LATENT_RATE = 25.0
# Global (non-media) streams sit at negative times.
TEXT_TIME, LANG_TIME, VOICE_TIME, FIRST_REF_TIME = -1.0, -2.0, -3.0, -4.0


@dataclass(frozen=True)
class LayoutSpec:
    """What the layout needs to know about one request (built by the planner)."""
    latent_frames: int                 # T: video latents (1 + n)
    latent_height: int                 # h: video latent rows (before patchify)
    latent_width: int                  # w
    fps: float
    audio_frames: int                  # Ta: audio latents (25 per second)
    frames_per_latent: int = 4         # video frames per latent after the first (the VAE's time factor)
    shot_starts: tuple[int, ...] = (0,)        # first latent frame of each shot
    caption_lengths: tuple[int, ...] = (1,)    # tokens per caption: global, then one per shot (if > 1 shot)
    voices: int = 0                    # bound characters
    refs: int = 0                      # reference images (one latent frame each, same h, w)
    video_clean_frames: int = 0        # leading clean video latents (image-to-video, extension)
    audio_clean: bool = False          # audio given (audio-driven video)
    tracks: int = 0                    # trajectory tracks (motion tokens: tracks x latent_frames)
    track_cells: tuple[float, ...] = ()   # (tracks, latent_frames, 2) flattened (y, x) in latent cells
    audio_cues: tuple[int, ...] = ()   # audio latents flagged as cues (collision times)

    def __post_init__(self):
        shots = len(self.shot_starts)
        if self.shot_starts[0] != 0 or list(self.shot_starts) != sorted(set(self.shot_starts)):
            raise ValueError(f"shot_starts must start at 0 and increase: {self.shot_starts}")
        if self.shot_starts[-1] >= self.latent_frames:
            raise ValueError("every shot needs at least one latent frame")
        if len(self.caption_lengths) not in (1, shots + 1) or (shots > 1 and len(self.caption_lengths) == 1):
            raise ValueError(f"need a global caption plus one per shot for {shots} shots")
        if self.track_cells and len(self.track_cells) != 2 * self.tracks * self.latent_frames:
            raise ValueError(f"track_cells needs 2 x {self.tracks} tracks x {self.latent_frames} frames numbers")
        if any(not 0 <= c < self.audio_frames for c in self.audio_cues):
            raise ValueError(f"audio_cues must index the {self.audio_frames} audio latents: {self.audio_cues}")


def latent_first_frame(k: torch.Tensor, frames_per_latent: int) -> torch.Tensor:
    """Index of the first video frame covered by latent frame k (plan.first_frame, on tensors)."""
    return torch.where(k == 0, torch.zeros_like(k), frames_per_latent * (k - 1) + 1)


@dataclass
class TokenLayout:
    modality: torch.Tensor    # (L,) long
    shot: torch.Tensor        # (L,) long, -1 global
    caption: torch.Tensor     # (L,) bool, shot captions
    timestep: torch.Tensor    # (L,) long in {CLEAN, VIDEO_SIGMA, AUDIO_SIGMA}
    position: torch.Tensor    # (L, 3) float (t seconds, y, x)
    spans: dict[str, slice]   # stream name -> token span
    video_grid: tuple[int, int, int]  # (T, h', w') patch grid
    spec: LayoutSpec
    cue: torch.Tensor | None = None   # (L,) bool, audio cue tokens

    @property
    def length(self) -> int:
        return self.modality.shape[0]

    def group_spans(self) -> tuple[slice, slice, slice]:
        """Contiguous spans of the text, video and audio weight groups."""
        s = self.spans
        return (slice(0, s["voice"].stop), slice(s["ref"].start, s["video"].stop), s["audio"])


def build_layout(spec: LayoutSpec, cfg: BackboneConfig) -> TokenLayout:
    pt, ph, pw = cfg.patch
    T, gh, gw = spec.latent_frames // pt, spec.latent_height // ph, spec.latent_width // pw
    gap = cfg.shot_gap_seconds
    shot_starts = torch.tensor(spec.shot_starts)

    parts: list[dict] = []  # one dict of per-token tensors per stream, in order

    def add(name, n, modality, time, *, shot=None, caption=False, timestep=None, yx=None):
        shot = torch.full((n,), -1) if shot is None else shot
        position = torch.zeros(n, 3)
        position[:, 0] = time
        if yx is not None:
            position[:, 1:] = yx
        parts.append(dict(name=name, modality=torch.full((n,), MODALITY_ID[modality]), shot=shot,
                          caption=caption if torch.is_tensor(caption) else torch.full((n,), caption),
                          position=position,
                          timestep=torch.full((n,), CLEAN) if timestep is None else timestep))

    # text: global caption (shot -1), then shot captions (shot s, flagged as captions)
    text_shot = torch.cat([torch.full((n,), i - 1) for i, n in enumerate(spec.caption_lengths)])
    add("text", sum(spec.caption_lengths), "text", TEXT_TIME, shot=text_shot, caption=text_shot >= 0)
    add("lang", 1, "lang", LANG_TIME)
    add("voice", spec.voices, "voice", VOICE_TIME)

    yy, xx = torch.meshgrid(torch.arange(gh, dtype=torch.float32), torch.arange(gw, dtype=torch.float32),
                            indexing="ij")
    grid_yx = torch.stack([yy.flatten(), xx.flatten()], 1)  # (h'*w', 2)
    ref_time = (FIRST_REF_TIME - torch.arange(spec.refs, dtype=torch.float32)).repeat_interleave(gh * gw)
    add("ref", spec.refs * gh * gw, "ref", ref_time, yx=grid_yx.repeat(spec.refs, 1))

    # video: per latent frame shot id, time, clean/noisy
    k = torch.arange(spec.latent_frames)
    frame_shot = torch.searchsorted(shot_starts, k, right=True) - 1           # (T,)
    frame_time = latent_first_frame(k, spec.frames_per_latent) / spec.fps + gap * frame_shot   # (T,)
    if spec.tracks:   # motion: track-major, one token per latent frame; (y, x) in patch units, where
        # patch token i covers latent cells [ph*i, ph*(i+1)) and a point at cell c sits at (c + .5) / ph - .5
        cells = (torch.tensor(spec.track_cells, dtype=torch.float32).view(-1, 2) if spec.track_cells
                 else torch.zeros(spec.tracks * spec.latent_frames, 2))
        add("motion", spec.tracks * spec.latent_frames, "motion", frame_time.repeat(spec.tracks),
            shot=frame_shot.repeat(spec.tracks), yx=(cells + 0.5) / torch.tensor([ph, pw]) - 0.5)
    frame_step = torch.where(k < spec.video_clean_frames, CLEAN, VIDEO_SIGMA)
    per_frame = gh * gw
    add("video", T * per_frame, "video", frame_time.repeat_interleave(per_frame),
        shot=frame_shot.repeat_interleave(per_frame), timestep=frame_step.repeat_interleave(per_frame),
        yx=grid_yx.repeat(T, 1))

    # audio: shot by time (a shot spans from its first frame to the next shot's first frame)
    i = torch.arange(spec.audio_frames)
    audio_time = i / AUDIO_LATENT_RATE
    shot_start_times = latent_first_frame(shot_starts, spec.frames_per_latent) / spec.fps
    audio_shot = (torch.searchsorted(shot_start_times, audio_time, right=True) - 1).clamp(min=0)
    add("audio", spec.audio_frames, "audio", audio_time + gap * audio_shot, shot=audio_shot,
        timestep=torch.full((spec.audio_frames,), CLEAN if spec.audio_clean else AUDIO_SIGMA))
    audio_cue = torch.zeros(spec.audio_frames, dtype=torch.bool)
    audio_cue[list(spec.audio_cues)] = True

    spans, start = {}, 0
    for p in parts:
        n = p["modality"].shape[0]
        spans[p["name"]] = slice(start, start + n)
        start += n
    cat = lambda key: torch.cat([p[key] for p in parts])  # noqa: E731
    cue = torch.zeros(start, dtype=torch.bool)
    cue[spans["audio"]] = audio_cue
    return TokenLayout(modality=cat("modality"), shot=cat("shot"), caption=cat("caption"),
                       timestep=cat("timestep"), position=cat("position"), spans=spans,
                       video_grid=(T, gh, gw), spec=spec, cue=cue)


def patchify(video: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, T, h, w) -> (B, T'*h'*w', C*pt*ph*pw) in (t, y, x) raster order."""
    B, C, T, h, w = video.shape
    pt, ph, pw = patch
    x = video.reshape(B, C, T // pt, pt, h // ph, ph, w // pw, pw)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # (B, T', h', w', C, pt, ph, pw)
    return x.reshape(B, (T // pt) * (h // ph) * (w // pw), C * pt * ph * pw)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int]) -> torch.Tensor:
    """(B, T'*h'*w', C*pt*ph*pw) -> (B, C, T, h, w)."""
    B = tokens.shape[0]
    (T, gh, gw), (pt, ph, pw) = grid, patch
    x = tokens.reshape(B, T, gh, gw, -1, pt, ph, pw)
    x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)  # (B, C, T', pt, h', ph, w', pw)
    return x.reshape(B, x.shape[1], T * pt, gh * ph, gw * pw)
