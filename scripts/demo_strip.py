"""A PNG frame strip of the demo render: every few frames side by side, the soundtrack below.

    python scripts/demo_strip.py [-o docs/demo_strip.png] [--checkpoint DIR] [--prompt TEXT] [--seed N]
                                 [--physics scripts/demo_scene.json | --physics '']

Renders the prompt through LocalEngine (what `make demo` runs), decodes the frames (VAE) and the
sound (codec + vocoder), and draws: a row of frames (every `--every`th, scaled up, nearest
neighbour), and under it the waveform's envelope on the same time axis with the audio onsets the
fidelity benchmark detects marked in red.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

DEMO_PROMPT = "a red ball falls and bounces twice on a grey floor"
# held-out scene 30000130 of the dataset (make_scene(30000130, language="en", objects=1)), whose caption
# is DEMO_PROMPT: the demo renders the prompt with this scene as physics conditioning
DEMO_SCENE = str(Path(__file__).resolve().parent / "demo_scene.json")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-o", "--output", default="docs/demo_strip.png")
    p.add_argument("--checkpoint", help="default: the shipped demo checkpoint")
    p.add_argument("--prompt", default=DEMO_PROMPT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--physics", default=DEMO_SCENE, help="scene JSON file for physics conditioning ('' for none); "
                                                      "default: the demo's (what make demo passes)")
    p.add_argument("--every", type=int, default=2, help="one frame in this many")
    p.add_argument("--scale", type=int, default=2)
    args = p.parse_args()

    import torch
    from PIL import Image

    from omnireel import media
    from omnireel.config import GenerationRequest
    from omnireel.engine import LocalEngine
    from omnireel.training.fidelity import audio_onsets
    from omnireel.checkpoint import DEMO_CHECKPOINT
    from omnireel.training.recipe import demo_recipe

    recipe = demo_recipe()
    engine = LocalEngine(args.checkpoint or DEMO_CHECKPOINT)
    physics = json.loads(Path(args.physics).read_text()) if args.physics else None
    result = engine.render(GenerationRequest(prompt=args.prompt, seconds=recipe.seconds, size=recipe.size,
                                             fps=recipe.fps, seed=args.seed, physics=physics))
    plan = result.plan
    with torch.inference_mode():
        frames = engine.components["vae"].decode(result.latents.video[None])[0, :, :plan.num_frames]
        wave = engine.components["audio_decoder"](result.latents.audio[None])[0, :plan.audio_samples].numpy()
    pixels = media.video_to_uint8(frames.float())                      # (F, H, W, 3)
    picked = pixels[::args.every]
    s, gap = args.scale, 2
    h, w = plan.height * s, plan.width * s
    strip_w = len(picked) * (w + gap) - gap
    band = 48
    canvas = np.full((h + gap + band, strip_w, 3), 255, dtype=np.uint8)
    for i, frame in enumerate(picked):
        canvas[:h, i * (w + gap): i * (w + gap) + w] = frame.repeat(s, 0).repeat(s, 1)
    # the waveform's envelope on the frames' time axis: column x covers [x, x+1) / strip_w of the clip
    seconds = plan.num_frames / plan.fps
    rate = engine.config.audio.sample_rate
    columns = np.array_split(np.abs(wave), strip_w)
    peak = max(1e-6, float(np.abs(wave).max()))
    for x, chunk in enumerate(columns):
        level = int((band - 2) * min(1.0, float(chunk.max()) / peak)) if chunk.size else 0
        mid = h + gap + band // 2
        canvas[mid - level // 2: mid + level // 2 + 1, x] = (40, 40, 40)
    for onset in audio_onsets(wave, rate):
        x = min(strip_w - 1, int(onset / seconds * strip_w))
        canvas[h + gap:, x] = (220, 30, 30)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(out)
    print(f"wrote {out}: {len(picked)} of {plan.num_frames} frames ({plan.width}x{plan.height}, {plan.fps} fps) "
          f"of {args.prompt!r}, seed {args.seed}, physics {args.physics or 'none'}, and the sound's envelope with "
          f"{len(audio_onsets(wave, rate))} onsets")


if __name__ == "__main__":
    main()
