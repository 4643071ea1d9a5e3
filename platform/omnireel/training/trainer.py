"""`omnireel train`: the video VAE, then the audio codec, then the backbone, on generated scenes.

Stages, in order (each resumable from the training state saved every `save_every` steps):
  vae       the video VAE as an autoencoder on random clips of the scenes' frames (L1 + MSE, the
            shapes' pixels weighted up), then its latents scaled to unit RMS per channel;
  codec     the audio codec on the soundtracks' log-mels (L1, sound weighted over silence), then
            the same scaling;
  encode    every training scene (and the evaluation scenes) through the frozen VAE, codec and text
            encoder, cached through storage.py (`dataset.safetensors` in the run folder);
  backbone  flow matching (model/sampler.py's convention: x = (1 - s) x0 + s noise, v = noise - x0)
            with caption dropout for CFG, half the examples with physics conditioning (trajectory
            tokens, audio cues and flow-warped noise, exactly as stages.denoise builds them), the
            video loss weighted up on the latent cells a body covers; an EMA of the weights is what
            gets exported. Every `eval_every` steps: the held-out loss
            and a checkpoint folder (checkpoint.py's format) under checkpoints/.

Determinism: a step's batch, noise and sigmas come from a generator seeded by (recipe seed, stage,
step) alone, so a resumed run repeats the uninterrupted run's losses exactly.

Run folder: state.pt (the training state), log.jsonl (one JSON line per step and per evaluation),
dataset.safetensors, checkpoints/step-NNNNNN/, latest (the newest checkpoint's folder name).
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import storage
from ..checkpoint import save_checkpoint
from ..config import GenerationRequest
from ..model.audio import LOG_FLOOR, MelSpectrogram
from ..model.backbone import ConditionTokens, OmniBackbone
from ..model.layout import LayoutSpec, build_layout
from ..model.omni import build_model
from ..model.sampler import shift_sigma
from ..model.vae import to_pixels
from ..physics import plan_motion, warp_noise
from ..plan import ScenePlan, language_index, plan_request
from .recipe import EVAL_SEEDS, Recipe
from .scenes import BACKGROUNDS, Scene, make_scene, render_frames, soundtrack

STAGES = ("vae", "codec", "encode", "backbone", "done")
STATE_FILE = "state.pt"
LOG_FILE = "log.jsonl"
DATASET_FILE = "dataset.safetensors"


def step_seed(recipe: Recipe, stage: str, step: int) -> int:
    """The seed of one step's randomness: a function of (recipe seed, stage, step) only."""
    return (recipe.seed * 1_000_003 + STAGES.index(stage) * 998_244_353 + step * 7_919) % (2**63)


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def frames_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 (F, H, W, 3) -> float (3, F, H, W) in [-1, 1], as the media encoder feeds the VAE."""
    return to_pixels(torch.from_numpy(frames))


def pad_frames(frames: np.ndarray, count: int) -> np.ndarray:
    """Repeat the last frame up to `count` frames (1 + 4n, what the VAE encodes)."""
    return np.concatenate([frames, np.repeat(frames[-1:], count - frames.shape[0], 0)]) if count > frames.shape[0] else frames


def scene_request(scene: Scene, recipe: Recipe, physics: bool = True) -> GenerationRequest:
    """The generation request that replays `scene`: its caption, language, size, fps, length and
    (optionally) its simulated scene as `physics` conditioning."""
    return GenerationRequest(prompt=scene.caption, seconds=recipe.seconds, size=recipe.size, fps=recipe.fps,
                             language=scene.language, physics=scene.physics if physics else None)


@dataclass
class Example:
    """One training scene as the backbone sees it: clean latents and the conditioning of both layouts."""
    video: torch.Tensor        # (C, T, h, w) clean video latents
    audio: torch.Tensor        # (Ca, Ta) clean audio latents
    text: torch.Tensor         # (L, text_dim) caption features
    language: int
    tracks: torch.Tensor       # (N, T, track_dim)
    cells: torch.Tensor        # (N, T, 2)
    flow: torch.Tensor         # (T-1, h, w, 2) int16
    layer: torch.Tensor        # (T-1, h, w) uint8
    cues: tuple[int, ...]
    plan: ScenePlan

    def layout_spec(self, physics: bool) -> LayoutSpec:
        """The same spec stages.denoise_layout_spec builds for this request (with or without physics)."""
        if not physics:
            return self.plan.layout_spec((self.text.shape[0],))
        return self.plan.layout_spec((self.text.shape[0],), tracks=self.tracks.shape[0], audio_cues=self.cues,
                                     track_cells=tuple(self.cells.flatten().tolist()))


class Trainer:
    def __init__(self, recipe: Recipe, out: str | os.PathLike, device: str = "cpu", quiet: bool = False,
                 text_encoder=None):
        self.recipe = recipe
        self.config = recipe.model
        self.out = Path(out)
        self.device = torch.device(device)
        self.quiet = quiet
        self._text_encoder = text_encoder
        self.out.mkdir(parents=True, exist_ok=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)
            self.model = build_model(self.config).to(self.device)
        self.mel = MelSpectrogram(self.config.audio)
        self.stage, self.step = STAGES[0], 0
        self.ema: OmniBackbone | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.data: list[Example] | None = None
        self.eval_data: list[Example] | None = None
        self.state_path = self.out / STATE_FILE
        if self.state_path.exists():
            self._load_state()

    # ---- state ---------------------------------------------------------------------------------

    def _make_optimizer(self, stage: str) -> torch.optim.Optimizer | None:
        params = {"vae": lambda: self.model.vae.parameters(), "codec": lambda: self.model.audio_codec.parameters(),
                  "backbone": lambda: self.model.backbone.parameters()}.get(stage)
        if params is None:
            return None
        schedule = self.schedule(stage)
        return torch.optim.AdamW(params(), lr=schedule.lr, betas=(0.9, 0.99), weight_decay=0.01)

    def schedule(self, stage: str):
        return {"vae": self.recipe.vae, "codec": self.recipe.codec, "backbone": self.recipe.backbone}[stage]

    def save_state(self) -> None:
        state = {"recipe": self.recipe.name, "stage": self.stage, "step": self.step,
                 "model": self.model.state_dict(),
                 "ema": None if self.ema is None else self.ema.state_dict(),
                 "optimizer": None if self.optimizer is None else self.optimizer.state_dict()}
        staging = self.state_path.with_suffix(".tmp")
        torch.save(state, staging)
        os.replace(staging, self.state_path)        # a reader never sees half a state

    def _load_state(self) -> None:
        state = torch.load(self.state_path, map_location=self.device, weights_only=True)
        if state["recipe"] != self.recipe.name:
            raise ValueError(f"{self.state_path} belongs to recipe {state['recipe']!r}, not {self.recipe.name!r}")
        self.model.load_state_dict(state["model"])
        self.stage, self.step = state["stage"], state["step"]
        if state["ema"] is not None:
            self.ema = self._fresh_ema()
            self.ema.load_state_dict(state["ema"])
        self.optimizer = self._make_optimizer(self.stage)
        if state["optimizer"] is not None and self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])

    def _fresh_ema(self) -> OmniBackbone:
        ema = copy.deepcopy(self.model.backbone)
        ema.requires_grad_(False)
        return ema

    def log(self, record: dict) -> None:
        with open(self.out / LOG_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    # ---- data ----------------------------------------------------------------------------------

    def scene(self, seed: int) -> Scene:
        r = self.recipe
        language = r.languages[seed % len(r.languages)] if r.languages else None
        return make_scene(seed, r.width, r.height, r.fps, r.seconds, language=language)

    @property
    def text_encoder(self):
        if self._text_encoder is None:
            from ..model.text import build_text_encoder
            self._text_encoder = build_text_encoder(self.config.text)
        return self._text_encoder

    def log_mel(self, scene: Scene, audio_frames: int) -> torch.Tensor:
        """(M, 4 * audio_frames) log-mel of the scene's soundtrack, cut and padded as the media encoder does."""
        return self.mel.clip(torch.from_numpy(soundtrack(scene, self.config.audio.sample_rate)), audio_frames)

    # ---- stages --------------------------------------------------------------------------------

    def run(self, stop_after: int | None = None, max_minutes: float | None = None) -> dict:
        """Trains from where the state left off; stops after `stop_after` optimizer steps or
        `max_minutes`, saving the state. Returns {"stage", "step", "losses": this call's step losses}."""
        start = time.monotonic()
        losses: list[float] = []

        def should_stop() -> bool:
            return ((stop_after is not None and len(losses) >= stop_after)
                    or (max_minutes is not None and time.monotonic() - start > 60 * max_minutes))

        while self.stage != "done":
            if should_stop():
                break
            if self.stage == "encode":
                self.build_dataset()
                self._advance()
                continue
            self._train_stage(losses, should_stop)
        self.save_state()
        return {"stage": self.stage, "step": self.step, "losses": losses}

    def _advance(self) -> None:
        finished = self.stage
        if finished == "vae":
            self._normalise_vae()
        elif finished == "codec":
            self._normalise_codec()
        self.stage, self.step = STAGES[STAGES.index(finished) + 1], 0
        self.optimizer = self._make_optimizer(self.stage)
        if self.stage == "backbone":
            self.ema = self._fresh_ema()
        if self.stage == "done":
            self.export()
        self.save_state()

    def _train_stage(self, losses: list[float], should_stop) -> None:
        from tqdm import tqdm

        stage, schedule = self.stage, self.schedule(self.stage)
        if self.optimizer is None:
            self.optimizer = self._make_optimizer(stage)
        if stage == "backbone":
            self._ensure_dataset()
            if self.ema is None:
                self.ema = self._fresh_ema()
        step_fn = {"vae": self.vae_step, "codec": self.codec_step, "backbone": self.backbone_step}[stage]
        module = {"vae": self.model.vae, "codec": self.model.audio_codec, "backbone": self.model.backbone}[stage]
        module.train()
        bar = tqdm(total=schedule.steps, initial=self.step, desc=f"train {stage}", unit="step", disable=self.quiet,
                   dynamic_ncols=True)
        try:
            while self.step < schedule.steps:
                if should_stop():
                    return
                lr = learning_rate(self.step, schedule.steps, schedule.lr, schedule.warmup)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                self.optimizer.zero_grad(set_to_none=True)
                loss = step_fn(self.step)
                torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
                self.optimizer.step()
                if stage == "backbone":
                    self._update_ema()
                self.step += 1
                losses.append(loss)
                self.log({"stage": stage, "step": self.step, "loss": loss, "lr": lr, "time": time.time()})
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if stage == "backbone" and self.step % self.recipe.eval_every == 0:
                    self.evaluate()
                if self.step % self.recipe.save_every == 0:
                    self.save_state()
        finally:
            bar.close()
            module.eval()
        self._advance()

    def vae_step(self, step: int) -> float:
        r = self.recipe
        rng = np.random.default_rng(step_seed(r, "vae", step))
        clips, weights = [], []
        for _ in range(r.vae.batch):
            scene = self.scene(int(rng.integers(r.clips)))
            frames = render_frames(scene)
            first = int(rng.integers(0, max(1, scene.frames - r.vae_window + 1)))
            clip = pad_frames(frames[first:first + r.vae_window], r.vae_window)
            shapes = (clip != np.array(BACKGROUNDS[scene.background], dtype=np.uint8)).any(-1)   # (F, H, W)
            clips.append(frames_tensor(clip))
            weights.append(torch.from_numpy(1.0 + 8.0 * shapes).float()[None])
        x = torch.stack(clips).to(self.device)                       # (B, 3, F, H, W)
        w = torch.stack(weights).to(self.device)                     # (B, 1, F, H, W)
        latents = self.model.vae.encode(x)
        rebuilt = self.model.vae.decode(latents)
        error = rebuilt - x
        loss = (w * (error.abs() + error.pow(2))).mean() / w.mean() + 1e-4 * latents.pow(2).mean()
        loss.backward()
        return loss.item()

    def codec_step(self, step: int) -> float:
        r = self.recipe
        rng = np.random.default_rng(step_seed(r, "codec", step))
        audio_frames = self._audio_frames()
        mels = torch.stack([self.log_mel(self.scene(int(rng.integers(r.clips))), audio_frames)
                            for _ in range(r.codec.batch)]).to(self.device)   # (B, M, 4m)
        latents = self.model.audio_codec.encode(mels)
        rebuilt = self.model.audio_codec.decode(latents)
        sound = (mels > math.log(LOG_FLOOR) + 1.0).float()
        w = 1.0 + 4.0 * sound
        loss = (w * (rebuilt - mels).abs()).mean() / w.mean() + 1e-4 * latents.pow(2).mean()
        loss.backward()
        return loss.item()

    def _audio_frames(self) -> int:
        return self._plan(self.scene(0)).audio_frames

    def _plan(self, scene: Scene, physics: bool = False) -> ScenePlan:
        return plan_request(scene_request(scene, self.recipe, physics), self.config)

    # latents scaled to unit RMS per channel, folded into the last encoder and first decoder convs
    # (exact: those convs are linear in their channels, and zero padding scales with them)
    @torch.no_grad()
    def _normalise_vae(self) -> None:
        vae = self.model.vae
        rms = self._latent_rms(lambda scene: vae.encode(frames_tensor(pad_frames(
            render_frames(scene), self._plan(scene).frame_count))[None].to(self.device))[0])
        last, first = vae.enc_out[-1], vae.dec_in
        last.weight.div_(rms.view(-1, *[1] * (last.weight.dim() - 1)))
        last.bias.div_(rms)
        first.weight.mul_(rms.view(1, -1, *[1] * (first.weight.dim() - 2)))
        self.log({"stage": "vae", "latent_rms": rms.tolist()})

    @torch.no_grad()
    def _normalise_codec(self) -> None:
        codec = self.model.audio_codec
        audio_frames = self._audio_frames()
        rms = self._latent_rms(lambda scene: codec.encode(self.log_mel(scene, audio_frames)[None].to(self.device))[0])
        last, first = codec.encoder[-1], codec.decoder[0]
        last.weight.div_(rms.view(-1, 1, 1))
        last.bias.div_(rms)
        first.weight.mul_(rms.view(1, -1, 1))
        self.log({"stage": "codec", "latent_rms": rms.tolist()})

    def _latent_rms(self, encode, clips: int = 32) -> torch.Tensor:
        """(C,) RMS per channel of the latents of the first `clips` training scenes."""
        latents = [encode(self.scene(seed)).flatten(1) for seed in range(min(clips, self.recipe.clips))]
        return torch.cat(latents, 1).pow(2).mean(1).sqrt().clamp(min=1e-4)

    # ---- dataset -------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_scene(self, scene: Scene) -> Example:
        """A scene through the frozen VAE, audio codec and text encoder, with its motion conditioning
        computed by physics.plan_motion from the request that replays it (what encode_media does)."""
        plan = self._plan(scene, physics=True)
        frames = pad_frames(render_frames(scene), plan.frame_count)
        video = self.model.vae.encode(frames_tensor(frames)[None].to(self.device))[0].float().cpu()
        audio = self.model.audio_codec.encode(self.log_mel(scene, plan.audio_frames)[None].to(self.device))[0]
        motion = plan_motion(plan)
        text = self.text_encoder.encode([plan.captions[0]])[0]
        return Example(video=video, audio=audio.float().cpu(), text=text.float(), language=language_index(plan.language),
                       tracks=motion.tracks, cells=motion.track_cells, flow=motion.flow, layer=motion.layer,
                       cues=tuple(motion.audio_cues), plan=self._plan(scene, physics=False))

    def build_dataset(self) -> None:
        from tqdm import tqdm
        r = self.recipe
        seeds = list(range(r.clips)) + [EVAL_SEEDS + i for i in range(r.eval_clips)]
        examples = [self.encode_scene(self.scene(s)) for s in tqdm(seeds, desc="encode scenes", unit="clip",
                                                                     disable=self.quiet, dynamic_ncols=True)]
        self._write_dataset(seeds, examples)
        self.data, self.eval_data = examples[:r.clips], examples[r.clips:]

    def _write_dataset(self, seeds: list[int], examples: list[Example]) -> None:
        from safetensors.torch import save
        tensors, meta = {}, []
        for s, ex in zip(seeds, examples):
            for name in ("video", "audio", "text", "tracks", "cells", "flow", "layer"):
                tensors[f"{s}.{name}"] = getattr(ex, name).contiguous()
            meta.append({"seed": s, "cues": list(ex.cues)})
        storage.write_bytes(str(self.out / DATASET_FILE), save(tensors, metadata={"examples": json.dumps(meta)}))

    def _ensure_dataset(self) -> None:
        if self.data is not None:
            return
        from safetensors.torch import load
        path = str(self.out / DATASET_FILE)
        if not storage.exists(path):
            self.build_dataset()
            return
        blob = storage.read_bytes(path)
        tensors = load(blob)
        header_len = int.from_bytes(blob[:8], "little")     # safetensors: u64 header length, JSON header
        meta = json.loads(json.loads(blob[8:8 + header_len])["__metadata__"]["examples"])
        examples = []
        for m in meta:
            s = m["seed"]
            scene = self.scene(s)
            examples.append(Example(video=tensors[f"{s}.video"], audio=tensors[f"{s}.audio"], text=tensors[f"{s}.text"],
                                    language=language_index(scene.language), tracks=tensors[f"{s}.tracks"],
                                    cells=tensors[f"{s}.cells"], flow=tensors[f"{s}.flow"], layer=tensors[f"{s}.layer"],
                                    cues=tuple(m["cues"]), plan=self._plan(scene, physics=False)))
        self.data, self.eval_data = examples[:self.recipe.clips], examples[self.recipe.clips:]

    # ---- backbone --------------------------------------------------------------------------------

    def example_loss(self, backbone: OmniBackbone, ex: Example, physics: bool, drop: torch.Tensor,
                     generator: torch.Generator) -> torch.Tensor:
        """Flow-matching loss of `draws` (sigma, noise) draws of one example (one layout, one batch)."""
        k = drop.shape[0]
        shift = self.config.sampler.shift
        cfg = backbone.cfg

        u_video = torch.rand(k, generator=generator)
        independent = torch.rand(k, generator=generator) < 0.25      # some audio sigmas apart from video's
        u_audio = torch.where(independent, torch.rand(k, generator=generator), u_video)
        s_video, s_audio = shift_sigma(u_video, shift), shift_sigma(u_audio, shift)   # the sampler's schedule
        noise_v = torch.randn((k, *ex.video.shape), generator=generator)
        if physics:                                                  # stages.initial_noise's transport
            noise_v = torch.stack([warp_noise(n, ex.flow, ex.layer) for n in noise_v])
        noise_a = torch.randn((k, *ex.audio.shape), generator=generator)
        dev = self.device
        x0_v, x0_a = ex.video[None].to(dev), ex.audio[None].to(dev)
        noise_v, noise_a = noise_v.to(dev), noise_a.to(dev)
        sv, sa = s_video.to(dev).view(k, 1, 1, 1, 1), s_audio.to(dev).view(k, 1, 1)
        x_v = (1 - sv) * x0_v + sv * noise_v
        x_a = (1 - sa) * x0_a + sa * noise_a
        sigmas = torch.stack([torch.zeros(k), s_video, s_audio], 1).to(dev)   # (k, 3): clean, video, audio
        T = ex.video.shape[1]
        tracks = ex.tracks if physics else torch.zeros(0, T, cfg.track_dim)
        cond = ConditionTokens(
            captions=ex.text[None].expand(k, -1, -1).to(dev), language=torch.full((k,), ex.language, device=dev),
            voices=torch.zeros(k, 0, cfg.speaker_dim, device=dev),
            refs=torch.zeros(k, 0, cfg.video_channels, *ex.video.shape[2:], device=dev),
            tracks=tracks.flatten(0, 1)[None].expand(k, -1, -1).to(dev))
        prep = backbone.prepare(build_layout(ex.layout_spec(physics), cfg), dev)
        pred_v, pred_a = backbone(x_v, x_a, sigmas, cond, prep, drop_captions=drop.to(dev))
        weight = self.object_weights(ex).to(dev)                              # (T, h, w), mean 1
        video_loss = (weight * (pred_v - (noise_v - x0_v)).pow(2)).mean()
        return 0.5 * (video_loss + F.mse_loss(pred_a, noise_a - x0_a))

    def object_weights(self, ex: Example) -> torch.Tensor:
        """(T, h, w) the video loss's weight per latent cell: 1 + recipe.object_weight where a body
        (or a particle emitter's particles) covers the cell (physics.plan_motion's layer map of frames 0..T-2; the last frame takes the one
        before's), scaled to
        mean 1. The shapes fill a tenth of the frame; unweighted, the plain background is most of the loss."""
        cover = (ex.layer > 0).float()                                       # (T-1, h, w)
        weight = 1.0 + self.recipe.object_weight * torch.cat([cover, cover[-1:]])
        return weight / weight.mean()

    def backbone_step(self, step: int) -> float:
        r = self.recipe
        g = torch.Generator().manual_seed(step_seed(r, "backbone", step))
        total = 0.0
        for index in torch.randint(len(self.data), (r.backbone.batch,), generator=g).tolist():
            physics = bool(torch.rand((), generator=g) < r.physics_share)
            drop = torch.rand(r.draws, generator=g) < r.caption_dropout
            loss = self.example_loss(self.model.backbone, self.data[index], physics, drop, g) / r.backbone.batch
            loss.backward()
            total += loss.item()
        return total

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = min(self.recipe.ema, (1 + self.step) / (10 + self.step))
        for e, p in zip(self.ema.parameters(), self.model.backbone.parameters()):
            e.lerp_(p, 1 - decay)

    @torch.no_grad()
    def eval_loss(self, backbone: OmniBackbone | None = None) -> float:
        """The held-out loss: the evaluation scenes, with and without physics, at fixed draws."""
        self._ensure_dataset()
        backbone = backbone or self.ema or self.model.backbone
        g = torch.Generator().manual_seed(1234)
        losses = [self.example_loss(backbone, ex, physics, torch.zeros(4, dtype=torch.bool), g).item()
                  for ex in self.eval_data for physics in (False, True)]
        return sum(losses) / len(losses)

    def evaluate(self) -> float:
        loss = self.eval_loss()
        self.log({"stage": "backbone", "step": self.step, "eval_loss": loss, "time": time.time()})
        if not self.quiet:
            print(f"\nstep {self.step}: held-out loss {loss:.4f}", flush=True)
        self.export()
        return loss

    def export(self) -> Path:
        """The current model (the backbone's EMA weights) as a checkpoint folder; updates `latest`."""
        name = "final" if self.stage == "done" else f"{self.stage}-{self.step:06d}"
        directory = self.out / "checkpoints" / name
        if not directory.exists():
            state = self.model.state_dict()
            if self.ema is not None:
                state.update({f"backbone.{k}": v for k, v in self.ema.state_dict().items()})
            export = build_model(self.config)
            export.load_state_dict({k: v.cpu() for k, v in state.items()})
            save_checkpoint(export, self.config, directory)
        (self.out / "latest").write_text(directory.name + "\n")
        return directory

    def latest_checkpoint(self) -> Path | None:
        latest = self.out / "latest"
        return self.out / "checkpoints" / latest.read_text().strip() if latest.exists() else None
