"""`omnireel render | checkpoint` — the command line.

Bad input never prints a traceback: one line naming the field and the limit, exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys

DEFAULT_PROMPT = "a red paper boat drifting down a rainy street gutter, puddles rippling, soft rain sounds"


def fail(message: str, code: int = 2) -> None:
    print(f"omnireel: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def render_command(args) -> None:
    import pydantic

    from .config import GenerationRequest, request_error_message
    fields = dict(prompt=args.prompt, seconds=args.seconds, size=args.size, fps=args.fps, seed=args.seed,
                  steps=args.steps, language=args.language, output="image" if args.image else "video")
    if args.shots:
        try:
            fields["shots"] = json.loads(args.shots)
        except json.JSONDecodeError as e:
            fail(f"--shots: not valid JSON ({e.msg} at position {e.pos})")
    fields = {k: v for k, v in fields.items() if v is not None}
    try:
        request = GenerationRequest(**fields)
    except pydantic.ValidationError as e:
        fail(request_error_message(e))

    import torch
    from tqdm import tqdm

    from . import storage
    from .engine import LocalEngine
    from .plan import PlanError
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        engine = LocalEngine(args.checkpoint)
    except (FileNotFoundError, ValueError) as e:
        fail(f"--checkpoint: {e}", code=1)
    try:
        plan = engine.plan(request)
    except PlanError as e:
        fail(str(e))
    output = args.output or ("out.png" if args.image else "out.mp4")
    with tqdm(total=plan.steps, desc="denoising", unit="step", disable=args.quiet) as bar:
        result = engine.render(request, progress=lambda i, n: bar.update(i - bar.n))
    storage.write_bytes(output, result.artifact.data)
    if not args.quiet:
        what = "image" if args.image else f"{plan.num_frames} frames, {plan.seconds:g} s, {plan.fps} fps"
        print(f"wrote {output} ({plan.width}x{plan.height}, {what}) in {sum(result.timings.values()):.1f} s")


def checkpoint_command(args) -> None:
    from .checkpoint import init_checkpoint, load_checkpoint, read_config, read_digest
    if args.action == "init":
        try:
            digest = init_checkpoint(args.preset, args.directory, seed=args.seed)
        except ValueError as e:
            fail(f"--preset: {e}")
        print(f"wrote {args.directory} (preset {args.preset}, seed {args.seed}, digest {digest[:16]})")
    else:
        try:
            config = read_config(args.directory)
            model = load_checkpoint(args.directory)
        except (FileNotFoundError, ValueError) as e:
            fail(f"{args.directory}: {e}", code=1)
        params = {name: sum(p.numel() for p in part.parameters()) for name, part in model.named_children()}
        print(json.dumps({"name": config.name, "digest": read_digest(args.directory), "parameters": params,
                          "config": config.to_dict()}, indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omnireel", description="Render video with native audio.")
    sub = parser.add_subparsers(dest="command", required=True)

    r = sub.add_parser("render", help="render one prompt to an MP4 (or a PNG with --image)")
    r.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    r.add_argument("-o", "--output", help="output path or URI (default out.mp4, or out.png with --image)")
    r.add_argument("--seconds", type=float, help="clip length in seconds (default 2)")
    r.add_argument("--size", help="WIDTHxHEIGHT, multiples of 16 (default 256x256)")
    r.add_argument("--fps", type=int, help="frames per second (default 24)")
    r.add_argument("--seed", type=int, help="noise seed (default 0)")
    r.add_argument("--steps", type=int, help="denoising steps (default: the checkpoint's)")
    r.add_argument("--language", help="speech language: en, zh, ja, ko or es")
    r.add_argument("--shots", help='storyboard as JSON: [{"prompt": ..., "seconds": ..., "camera": ...}, ...]')
    r.add_argument("--image", action="store_true", help="render one frame to a PNG")
    r.add_argument("--checkpoint", help="checkpoint folder (default: the embedded small checkpoint)")
    r.add_argument("--threads", type=int, help="torch CPU threads")
    r.add_argument("-q", "--quiet", action="store_true")
    r.set_defaults(func=render_command)

    c = sub.add_parser("checkpoint", help="create or inspect a checkpoint")
    csub = c.add_subparsers(dest="action", required=True)
    ci = csub.add_parser("init", help="write a random-initialized checkpoint")
    ci.add_argument("directory")
    ci.add_argument("--preset", default="small")
    ci.add_argument("--seed", type=int, default=0)
    cs = csub.add_parser("show", help="print a checkpoint's config, digest and parameter counts")
    cs.add_argument("directory")
    c.set_defaults(func=checkpoint_command)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
