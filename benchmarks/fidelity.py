"""Fidelity of the trained demo checkpoint next to a random one, on held-out scenes.

    python benchmarks/fidelity.py [--checkpoint DIR] [--prompts 32] [--language en] [--threads N]

For each of `--prompts` scenes from seeds training never saw (recipe.BENCHMARK_SEEDS onwards), every
checkpoint renders the scene's caption twice through LocalEngine (the path `omnireel render`
takes): once from the caption alone and once with the scene as `physics` conditioning. The frames
(VAE decode, before H.264) and the waveform (codec + vocoder) are scored by
omnireel.training.fidelity against the scene's labels. A third column scores the scenes' own
renders (frames and soundtrack from the dataset): the ceiling of each measure; a fourth, those
renders through the trained checkpoint's video VAE and audio codec + vocoder: the ceiling its
decoders leave the backbone. Prints figures; asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np


def render(engine, scene, recipe, physics: bool):
    """(frames uint8 (F, H, W, 3), wave float32) of the scene's caption, with or without physics."""
    import torch

    from omnireel import media
    from omnireel.training.trainer import scene_request

    result = engine.render(scene_request(scene, recipe, physics))
    plan = result.plan
    vae = engine.components["vae"]
    with torch.inference_mode():
        frames = vae.decode(result.latents.video[None])[0, :, :plan.num_frames]
        wave = engine.components["audio_decoder"](result.latents.audio[None])[0, :plan.audio_samples]
    return media.video_to_uint8(frames.float()), wave.float().numpy()


def through_autoencoders(engine, scene, truth, recipe):
    """(frames, wave) of the scene's own render and soundtrack through the checkpoint's video VAE
    and audio codec + vocoder: the most its decoders can give back, whatever the backbone does."""
    import torch

    from omnireel import media
    from omnireel.model.audio import MelSpectrogram
    from omnireel.plan import plan_request
    from omnireel.training.scenes import soundtrack
    from omnireel.training.trainer import frames_tensor, pad_frames, scene_request

    plan = plan_request(scene_request(scene, recipe, physics=False), engine.config)
    vae, decoder = engine.components["vae"], engine.components["audio_decoder"]
    rate = decoder.codec.cfg.sample_rate
    clip = frames_tensor(pad_frames(truth, plan.frame_count))[None]     # (1, 3, F, H, W)
    mel = MelSpectrogram(decoder.codec.cfg).clip(torch.from_numpy(soundtrack(scene, rate)), plan.audio_frames)
    with torch.inference_mode():
        frames = vae.decode(vae.encode(clip))[0, :, :plan.num_frames]
        wave = decoder(decoder.codec.encode(mel[None]))[0, :plan.audio_samples]
    return media.video_to_uint8(frames.float()), wave.float().numpy()


def summarise(scores_text, scores_physics) -> dict:
    """Aggregate figures of one column."""
    def share(values):
        values = list(values)
        return 100.0 * sum(values) / len(values) if values else float("nan")

    count_frames = sum(s.count_frames for s in scores_physics)
    contacts = sum(s.contacts for s in scores_physics)
    onsets = sum(s.onsets for s in scores_physics)
    heard = sum(s.contacts_heard for s in scores_physics)
    seen = sum(s.onsets_seen for s in scores_physics)
    errors = [e for s in scores_physics for e in s.track_errors]
    recall = 100.0 * heard / contacts if contacts else 0.0
    precision = 100.0 * seen / onsets if onsets else 0.0
    return {
        "colour (caption only)": share(s.colour_ok for s in scores_text),
        "colour (physics)": share(s.colour_ok for s in scores_physics),
        "count (physics)": 100.0 * sum(s.count_ok for s in scores_physics) / count_frames if count_frames else float("nan"),
        "shape (physics, 1 object)": share(s.shape_ok for s in scores_physics if s.shape_measured),
        "shape (caption only, 1 object)": share(s.shape_ok for s in scores_text if s.shape_measured),
        "track error px (physics)": float(np.mean(errors)),
        "track found % (physics)": 100.0 * sum(s.track_found for s in scores_physics) / sum(s.track_total for s in scores_physics),
        "sync: contacts heard %": recall,
        "sync: onsets seen %": precision,
        "contacts / onsets per clip": f"{contacts / len(scores_physics):.1f} / {onsets / len(scores_physics):.1f}",
        "frames vary %": share(s.frames_vary for s in scores_text + scores_physics),
        "audio not silent %": share(s.audio_sounds for s in scores_text + scores_physics),
    }


GOALS = {"colour (caption only)": ">= 80", "colour (physics)": ">= 80", "track error px (physics)": "<= 8 (a latent cell)",
         "sync: contacts heard %": ">= 70", "sync: onsets seen %": ">= 70", "frames vary %": "100", "audio not silent %": "100"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", help="trained checkpoint (default: the shipped demo checkpoint)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--language", default="en", help="caption language of the held-out scenes (en, zh, ja, ko, es)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()

    import torch

    from omnireel.checkpoint import load_checkpoint, save_checkpoint
    from omnireel.engine import LocalEngine
    from omnireel.model.omni import build_model
    from omnireel.training.fidelity import PALETTE_NAMES, score
    from omnireel.checkpoint import DEMO_CHECKPOINT
    from omnireel.training.recipe import BENCHMARK_SEEDS, demo_recipe
    from omnireel.training.scenes import make_scene, render_frames, soundtrack

    torch.set_num_threads(args.threads)
    trained = args.checkpoint or str(DEMO_CHECKPOINT)
    recipe = demo_recipe()
    config = load_checkpoint(trained).config
    scenes = [make_scene(BENCHMARK_SEEDS + i, recipe.width, recipe.height, recipe.fps, recipe.seconds,
                         language=args.language) for i in range(args.prompts)]
    truths = [render_frames(s) for s in scenes]
    rate = config.audio.sample_rate
    print(f"trained checkpoint: {trained} ({config.name}); {args.prompts} held-out scenes (seeds "
          f"{BENCHMARK_SEEDS}..{BENCHMARK_SEEDS + args.prompts - 1}), captions in {args.language}, "
          f"{recipe.size} at {recipe.fps} fps, {recipe.seconds:g} s; {config.sampler.steps} steps, "
          f"CFG video {config.sampler.cfg_video:g} / audio {config.sampler.cfg_audio:g}; threads {args.threads}")
    print(f"objects per scene: {[len(s.objects) for s in scenes].count(1)} with 1, "
          f"{[len(s.objects) for s in scenes].count(2)} with 2, {[len(s.objects) for s in scenes].count(3)} with 3; "
          f"colour chance (a uniform guess among {len(PALETTE_NAMES)} names hits a caption colour): "
          f"{100 * np.mean([len(s.objects) / len(PALETTE_NAMES) for s in scenes]):.1f} %; shape chance 33.3 %")

    columns = {}
    truth_scores = [score(s, t, soundtrack(s, rate), rate, t) for s, t in zip(scenes, truths)]
    columns["scenes (truth)"] = summarise(truth_scores, truth_scores)
    engine = LocalEngine(trained)
    rebuilt = [score(s, *through_autoencoders(engine, s, t, recipe), rate, t) for s, t in zip(scenes, truths)]
    columns["autoencoders"] = summarise(rebuilt, rebuilt)
    with tempfile.TemporaryDirectory() as tmp:
        random_dir = os.path.join(tmp, "random")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            save_checkpoint(build_model(config), config, random_dir)
        for name, checkpoint in (("trained", trained), ("random", random_dir)):
            engine = LocalEngine(checkpoint)
            start = time.perf_counter()
            text, physics = [], []
            for scene, truth in zip(scenes, truths):
                frames, wave = render(engine, scene, recipe, physics=False)
                text.append(score(scene, frames, wave, rate, truth))
                frames, wave = render(engine, scene, recipe, physics=True)
                physics.append(score(scene, frames, wave, rate, truth))
            columns[name] = summarise(text, physics)
            print(f"{name}: {2 * len(scenes)} renders in {time.perf_counter() - start:.0f} s", file=sys.stderr)

    names = list(columns)
    print(f"\n{'measure':32s}" + "".join(f"{n:>16s}" for n in names) + "   goal")
    for metric in columns[names[0]]:
        cells = []
        for n in names:
            v = columns[n][metric]
            cells.append(f"{v:>16s}" if isinstance(v, str) else f"{v:>16.1f}")
        print(f"{metric:32s}" + "".join(cells) + f"   {GOALS.get(metric, '')}")


if __name__ == "__main__":
    main()
