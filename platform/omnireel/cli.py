"""`omnireel render | voices | checkpoint | batch | serve` — the command line.

Bad input never prints a traceback: one line naming the field and the limit, exit code 2 (argparse's
own errors too: OneLineParser). The flags of `serve` and `batch` are made from their args models'
fields (AppArgs, BatchOptions; omnireel/driver_args.py), so a field added there is a flag at once;
`render` and `bench backbone` take the DriverArgs fields that apply to them (RENDER_FIELDS,
BENCH_BACKBONE_FIELDS), made the same way.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

DEFAULT_PROMPT = "a red paper boat drifting down a rainy street gutter, puddles rippling, soft rain sounds"
# The DriverArgs fields that are flags of `omnireel render` (one process: no mesh, no Ray, no batching)
# and of `omnireel bench backbone` (seeded weights on a mesh: no checkpoint, its ranks' threads its own).
RENDER_FIELDS = ("checkpoint", "threads", "dtype", "voices_uri", "storyboard_model")
BENCH_BACKBONE_FIELDS = ("tp", "sp", "cfg_parallel", "dtype")


def fail(message: str, code: int = 2) -> None:
    print(f"omnireel: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def json_option(name: str, value: str):
    """A JSON option's value, given inline or as @FILE."""
    try:
        if value.startswith("@"):
            with open(value[1:], encoding="utf-8") as f:
                value = f.read()
        return json.loads(value)
    except OSError as e:
        fail(f"{name}: cannot read {value[1:]} ({e.strerror})")
    except json.JSONDecodeError as e:
        fail(f"{name}: not valid JSON ({e.msg} at position {e.pos})")


def flag_values(args, model):
    """`model` (AppArgs, BatchOptions) of the flags given on the command line (driver_args.add_flags);
    each flag checked its own value as argparse read it, so this refuses what a field's validator
    checks (stage_threads' stage names), in one line naming the flag."""
    import pydantic

    from .driver_args import args_error, given
    try:
        return model(**given(args, model))
    except pydantic.ValidationError as e:
        fail(args_error(e, model))


def voice_bindings(values: list[str]) -> list[dict]:
    """--voice CHARACTER=VOICE_ID options -> [{character, voice_id}]."""
    bindings = []
    for value in values:
        character, sep, voice_id = value.rpartition("=")
        if not sep or not character.strip() or not voice_id.strip():
            fail(f"--voice: expected CHARACTER=VOICE_ID (got {value!r})")
        bindings.append({"character": character.strip(), "voice_id": voice_id.strip()})
    return bindings


def render_command(args) -> None:
    import pydantic

    from .config import TRUSTED, parse_request, request_error_message
    fields = dict(prompt=args.prompt, seconds=args.seconds, size=args.size, fps=args.fps, seed=args.seed,
                  steps=args.steps, language=args.language, output="image" if args.image else "video",
                  mode="audio" if args.audio_only else None, input_reference=args.reference,
                  input_video=args.input_video, input_audio=args.input_audio, elements=args.element,
                  voices=voice_bindings(args.voice) if args.voice else None, storyboard=args.storyboard)
    if args.shots:
        fields["shots"] = json_option("--shots", args.shots)
    if args.physics:
        fields["physics"] = json_option("--physics", args.physics)
    fields = {k: v for k, v in fields.items() if v is not None}
    try:
        request = parse_request(fields, TRUSTED)      # the CLI may name local files
    except pydantic.ValidationError as e:
        fail(request_error_message(e))
    from .storyboard import StoryboardError, resolve_storyboard
    try:
        request = resolve_storyboard(request, model=args.storyboard_model)  # --storyboard llm: planned once
    except StoryboardError as e:
        fail(str(e))
    from .voices import VoiceNotFound, VoiceRegistry
    try:
        VoiceRegistry(args.voices_uri).check_bindings(request.voices)
    except VoiceNotFound as e:
        fail(str(e))

    import torch
    from tqdm import tqdm

    from . import storage
    from .engine import LocalEngine
    from .plan import PlanError
    from .references import MediaReferenceError
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        engine = LocalEngine(args.checkpoint, device=args.device, voices=args.voices_uri, dtype=args.dtype)
    except (FileNotFoundError, ValueError) as e:
        fail(f"--checkpoint: {e}", code=1)
    try:
        plan = engine.plan(request)
    except PlanError as e:
        fail(str(e))
    output = args.output or ("out.png" if args.image else "out.m4a" if args.audio_only else "out.mp4")
    bars = []   # the progress bar appears with the first step, after the encoders checked their inputs

    def progress(i: int, n: int) -> None:
        if not bars:
            bars.append(tqdm(total=n, desc="denoising", unit="step", disable=args.quiet))
        bars[0].update(i - bars[0].n)

    try:
        result = engine.render(request, progress=progress)
    except (VoiceNotFound, MediaReferenceError) as e:   # messages name the field
        fail(str(e))
    finally:
        for bar in bars:
            bar.close()
    storage.write_bytes(output, result.artifact.data)
    if not args.quiet:
        what = ("image" if args.image else f"{plan.num_frames} frames, {plan.seconds:g} s, {plan.fps} fps")
        what = f"audio, {plan.seconds:g} s" if args.audio_only else f"{plan.width}x{plan.height}, {what}"
        print(f"wrote {output} ({what}) in {sum(result.timings.values()):.1f} s")


def voices_command(args) -> None:
    from .voices import VoiceNotFound, VoiceRegistry, VoiceRejected
    registry = VoiceRegistry(args.store)
    if args.action == "add":
        try:
            with open(args.recording, "rb") as f:
                recording = f.read()
        except OSError as e:
            fail(f"{args.recording}: {e.strerror}")
        try:
            voice = registry.add(recording, args.name or os.path.splitext(os.path.basename(args.recording))[0])
        except VoiceRejected as e:
            fail(f"{args.recording}: {e}")
        print(voice.id if args.quiet else f"added {voice.id} ({voice.name!r}, {voice.speech_seconds:.1f} s of speech)")
    elif args.action == "list":
        voices = registry.list()
        if args.json:
            print(json.dumps([v.public() for v in voices], indent=2))
        for v in [] if args.json else voices:
            print(f"{v.id}  {v.speech_seconds:5.1f} s  {v.name}")
    else:
        try:
            registry.delete(args.voice_id)
        except VoiceNotFound as e:
            fail(str(e))
        if not args.quiet:
            print(f"removed {args.voice_id}")


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


def batch_command(args) -> None:
    from .pipelines.render import command
    command(args)


def serve_command(args) -> None:
    from .deployments.app import serve_command as run
    run(args)


def train_command(args) -> None:
    import torch

    from .training.recipe import recipe
    from .training.trainer import Trainer
    try:
        chosen = recipe(args.recipe)
    except ValueError as e:
        fail(f"--recipe: {e}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device: {args.device} asked for, but torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    trainer = Trainer(chosen, args.out, device=args.device, quiet=args.quiet)
    if not args.quiet and (trainer.stage != "vae" or trainer.step):
        print(f"resuming {args.out} at stage {trainer.stage}, step {trainer.step}")
    result = trainer.run(stop_after=args.stop_after, max_minutes=args.max_minutes)
    latest = trainer.latest_checkpoint()
    print(f"{args.out}: stage {result['stage']}, step {result['step']}; latest checkpoint: {latest or 'none yet'}")


def add_backbone_bench_arguments(parser) -> None:
    """Options of `omnireel bench backbone`, shared with benchmarks/backbone.py; the mesh and the dtype
    are DriverArgs' fields (a flag left out: the field's default; dtype None: float32)."""
    from .driver_args import DriverArgs, add_flags
    parser.add_argument("--family", default="omni", choices=("omni", "ltx2", "wan"),
                        help="model family: omni (presets tiny, small, wan14b), ltx2 (presets real, tiny) or wan (presets tiny, cpu)")
    parser.add_argument("--preset", default="small", help="model preset (omni: tiny, small, wan14b; ltx2: real, tiny; wan: tiny, cpu)")
    parser.add_argument("--size", default="768x512", help="ltx2, wan: WIDTHxHEIGHT of the clip (default 768x512)")
    parser.add_argument("--frames", type=int, default=121, help="ltx2, wan: frames of the clip (default 121)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up)")
    parser.add_argument("--tokens", type=int, default=1024, help="packed sequence length, about")
    add_flags(parser, DriverArgs, BENCH_BACKBONE_FIELDS, defaults=True)
    parser.add_argument("--check-parity", action="store_true", help="compare the mesh (or TP=N) with one rank")


def bench_command(args) -> None:
    from .parallel.bench import run
    code = run(args)
    if code:
        raise SystemExit(code)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (`omnireel batch: error: --tp: must be >= 1 (got 0)`), exit 2."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message.removeprefix('argument ')}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    from .deployments.args import AppArgs
    from .driver_args import DriverArgs, add_flags
    from .pipelines.args import BatchOptions
    parser = OneLineParser(prog="omnireel", description="Render video with native audio.")
    sub = parser.add_subparsers(dest="command", required=True)

    r = sub.add_parser("render", help="render one prompt to an MP4 (or a PNG with --image)")
    r.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    r.add_argument("-o", "--output", help="output path or URI (default out.mp4, or out.png with --image)")
    r.add_argument("--seconds", type=float, help="clip length in seconds (default 2)")
    r.add_argument("--size", help="WIDTHxHEIGHT, multiples of 16, or of the checkpoint family's multiple (default 256x256)")
    r.add_argument("--fps", type=int, help="frames per second (default 24)")
    r.add_argument("--seed", type=int, help="noise seed (default 0)")
    r.add_argument("--steps", type=int, help="denoising steps (default: the checkpoint's)")
    r.add_argument("--language", help="speech language: en, zh, ja, ko or es")
    r.add_argument("--shots", help='storyboard as JSON: [{"prompt": ..., "seconds": ..., "camera": ...}, ...]')
    r.add_argument("--storyboard", choices=("rules", "llm"),
                   help="without --shots, who splits the prompt into shots: rules (default: at sentence ends, "
                        "';' and 'then') or llm (an LLM on vLLM; model folder: --storyboard-model)")
    r.add_argument("--image", action="store_true", help="render one frame to a PNG")
    r.add_argument("--audio-only", action="store_true", help="generate audio alone to an M4A (mode 'audio')")
    r.add_argument("--voice", action="append", metavar="CHARACTER=VOICE_ID",
                   help="bind a registered voice (omnireel voices) to a character; repeatable")
    r.add_argument("--element", action="append", metavar="IMAGE",
                   help="reference image (path or URI) seen by every shot; repeatable")
    r.add_argument("--reference", metavar="IMAGE", help="image-to-video: this image is the first frame")
    r.add_argument("--input-video", metavar="VIDEO", help="continue this video (its frames lead the clip)")
    r.add_argument("--input-audio", metavar="AUDIO", help="generate video to this soundtrack")
    r.add_argument("--physics", metavar="JSON", help='scene to simulate, JSON or @FILE: {"bodies": [...], "gravity": ...}')
    add_flags(r, DriverArgs, RENDER_FIELDS, defaults=True)
    r.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ... (default cpu)")
    r.add_argument("-q", "--quiet", action="store_true")
    r.set_defaults(func=render_command)

    v = sub.add_parser("voices", help="register, list and remove voices (reference recordings)")
    vsub = v.add_subparsers(dest="action", required=True)
    va = vsub.add_parser("add", help="register a voice from a WAV, MP3 or FLAC recording; prints its id")
    va.add_argument("recording")
    va.add_argument("--name", help="a name for the voice (default: the file name)")
    vl = vsub.add_parser("list", help="list registered voices")
    vl.add_argument("--json", action="store_true")
    vr = vsub.add_parser("rm", help="remove a voice")
    vr.add_argument("voice_id")
    for action in (va, vl, vr):
        action.add_argument("--store", help="voice registry URI (default $OMNIREEL_VOICES or ~/.cache/omnireel/voices)")
        action.add_argument("-q", "--quiet", action="store_true")
    v.set_defaults(func=voices_command)

    c = sub.add_parser("checkpoint", help="create or inspect a checkpoint")
    csub = c.add_subparsers(dest="action", required=True)
    ci = csub.add_parser("init", help="write a random-initialized checkpoint")
    ci.add_argument("directory")
    ci.add_argument("--preset", default="small")
    ci.add_argument("--seed", type=int, default=0)
    cs = csub.add_parser("show", help="print a checkpoint's config, digest and parameter counts")
    cs.add_argument("directory")
    c.set_defaults(func=checkpoint_command)

    b = sub.add_parser("batch", help="render a Parquet manifest with Ray Data (artifacts, results.parquet, errors.parquet)",
                       description="Render a Parquet manifest with Ray Data. The flags after --out are "
                                   "BatchOptions' fields (pipelines/args.py), the shared ones DriverArgs'.")
    b.add_argument("manifest", help="Parquet manifest (file or folder), a path or URI (file://, s3://, gs://)")
    b.add_argument("--out", required=True, help="output URI prefix (artifacts/, results.parquet, errors.parquet)")
    add_flags(b, BatchOptions)
    b.add_argument("-q", "--quiet", action="store_true")
    b.set_defaults(func=batch_command)

    s = sub.add_parser("serve", help="serve the OpenAI-style Videos API with Ray Serve (deployments/serve_config.yaml)",
                       description="Serve the OpenAI-style Videos API with Ray Serve. The flags after --set are "
                                   "build_app's args (AppArgs, the Serve config's `args:`); given, they override "
                                   "the --config file's.")
    s.add_argument("--config", help="Serve config YAML (default: the packaged deployments/serve_config.yaml)")
    s.add_argument("--host", help="HTTP host (default 127.0.0.1, or the --config file's)")
    s.add_argument("--port", type=int, help="HTTP port (default 8000, or the --config file's)")
    s.add_argument("--address", help="Ray cluster to join (default: start a local one)")
    s.add_argument("--non-blocking", action="store_true", help="return once the app is running")
    s.add_argument("--set", action="append", metavar="ARG=VALUE", help="any build_app arg (YAML value); repeatable")
    add_flags(s, AppArgs)
    s.set_defaults(func=serve_command)

    t = sub.add_parser("train", help="train the demo model on generated scenes (VAE, audio codec, backbone); resumable")
    t.add_argument("--recipe", default="demo", help="training recipe: demo (the shipped checkpoint) or tiny (tests)")
    t.add_argument("--out", default="runs/demo", help="run folder: training state, log.jsonl, checkpoints/ (resumed if present)")
    t.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    t.add_argument("--threads", type=int, help="torch CPU threads")
    t.add_argument("--max-minutes", type=float, help="stop (saving the state) after this many minutes")
    t.add_argument("--stop-after", type=int, help="stop (saving the state) after this many optimizer steps")
    t.add_argument("-q", "--quiet", action="store_true")
    t.set_defaults(func=train_command)

    bench = sub.add_parser("bench", help="benchmarks that print figures")
    bench_sub = bench.add_subparsers(dest="target", required=True)
    bb = bench_sub.add_parser("backbone", help="backbone step time, tokens/s, TFLOP/s, TP parity")
    add_backbone_bench_arguments(bb)
    bb.set_defaults(func=bench_command)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
