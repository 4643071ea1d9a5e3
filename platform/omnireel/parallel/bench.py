"""Backbone benchmark: per-step time, tokens/s, achieved TFLOP/s, and TP parity (DESIGN.md §3).

One step is one classifier-free-guided model evaluation, as the sampler runs it: cond and uncond as
one batch of 2 over `tokens` packed tokens (one shot, so plain SDPA with no mask). FLOPs come from
`OmniBackbone.flops_per_forward` (matmuls only, 2 per multiply-add).

At --tp 1 this imports nothing but torch and omnireel.model, so a GPU box without Ray runs it. At
--tp N it spawns N processes (torch.multiprocessing; gloo on CPU, NCCL on GPU) that load their shards
of a temporary checkpoint through the sharded loader, and --check-parity compares rank 0's velocities
with a TP=1 run on the same weights and inputs.
"""
from __future__ import annotations

import math
import statistics
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..model.backbone import ConditionTokens, OmniBackbone
from ..model.config import BackboneConfig, preset
from ..model.layout import LayoutSpec, build_layout
from ..model.sampler import Guidance, guided_velocity

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_SEED, INPUT_SEED = 0, 1
FPS = 24.0


@dataclass
class BenchResult:
    preset: str
    tp: int
    device: str
    dtype: str
    tokens: int                   # packed sequence length L (per batch row)
    batch: int                    # 2: cond + uncond
    steps: int
    step_s: float                 # median seconds per step
    tokens_per_s: float           # batch * L / step_s
    tflops: float                 # achieved TFLOP/s (all ranks together)
    flops_per_step: float         # matmul FLOPs of one step (one forward over batch 2)
    parity_max_abs: float | None  # max |TP=N - TP=1| over the velocities, with check_parity

    def lines(self) -> list[str]:
        out = [f"backbone {self.preset} tp={self.tp} on {self.device} ({self.dtype}): L={self.tokens} tokens x "
               f"batch {self.batch}, {self.steps} steps",
               f"  FLOPs per step  {self.flops_per_step / 1e9:,.1f} GFLOP (forward, batch {self.batch})",
               f"  per-step time   {self.step_s * 1e3:.2f} ms (median)",
               f"  tokens/s        {self.tokens_per_s:,.0f}",
               f"  achieved        {self.tflops:.4f} TFLOP/s"]
        if self.parity_max_abs is not None:
            out.append(f"  parity vs tp=1  max abs diff {self.parity_max_abs:.3e}")
        return out


def synthetic_spec(tokens: int, fps: float = FPS) -> LayoutSpec:
    """A one-shot layout of about `tokens` tokens: 16:9 video latents, matching audio, one caption."""
    frames = max(1, min(21, tokens // 512))                  # 21 latents = 81 frames, as in 720p x 81
    audio = max(1, round((1 + 4 * (frames - 1)) / fps * 25))
    caption = max(1, min(64, tokens // 32))
    per_frame = max(1, (tokens - caption - 1 - audio) // frames)   # patch tokens per latent frame
    rows = max(1, round(math.sqrt(per_frame * 9 / 16)))
    cols = max(1, per_frame // rows)
    return LayoutSpec(latent_frames=frames, latent_height=2 * rows, latent_width=2 * cols, fps=fps,
                      audio_frames=audio, caption_lengths=(caption,))


def synthetic_inputs(cfg: BackboneConfig, spec: LayoutSpec, device, dtype):
    """Seeded inputs drawn on the CPU: every process and TP degree sees the same."""
    g = torch.Generator().manual_seed(INPUT_SEED)
    cond = ConditionTokens(captions=torch.randn(1, sum(spec.caption_lengths), cfg.text_dim, generator=g),
                           language=torch.zeros(1, dtype=torch.long),
                           voices=torch.zeros(1, 0, cfg.speaker_dim),
                           refs=torch.zeros(1, 0, cfg.video_channels, spec.latent_height, spec.latent_width))
    video = torch.randn(1, cfg.video_channels, spec.latent_frames, spec.latent_height, spec.latent_width, generator=g)
    audio = torch.randn(1, cfg.audio_channels, spec.audio_frames, generator=g)
    cond = ConditionTokens(cond.captions.to(device, dtype), cond.language.to(device),
                           cond.voices.to(device, dtype), cond.refs.to(device, dtype))
    return video.to(device, dtype), audio.to(device, dtype), cond


def build_on(device, dtype: torch.dtype, build):
    """`build()` with its parameters made directly on `device` in `dtype` (seeded): a large model never
    has a full float32 copy on the GPU."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(WEIGHT_SEED)
            return build().eval()
    finally:
        torch.set_default_dtype(previous)


def seeded_backbone(cfg: BackboneConfig, device="cpu", dtype: torch.dtype = torch.float32) -> OmniBackbone:
    """The benchmark's omni backbone (seeded), built directly on `device` in `dtype`."""
    return build_on(device, dtype, lambda: OmniBackbone(cfg))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(step, steps: int, device, barrier=None):
    """Runs 1 warm-up + `steps` calls of `step()` (a tuple of tensors); returns (median seconds per
    call, the last call's tensors as float32 on the CPU)."""
    times = []
    with torch.inference_mode():
        for i in range(steps + 1):
            if barrier:
                barrier()
            _sync(device)
            start = time.perf_counter()
            out = step()
            _sync(device)
            if i:
                times.append(time.perf_counter() - start)
    return statistics.median(times), tuple(t.float().cpu() for t in out)


def time_steps(backbone: OmniBackbone, tokens: int, steps: int, device, dtype, barrier=None, call=None):
    """Runs 1 warm-up + `steps` guided steps (the model called as `call`, default `backbone`);
    returns (median seconds per step, last velocities, L)."""
    spec = synthetic_spec(tokens)
    prep = backbone.prepare(build_layout(spec, backbone.cfg), device)
    video, audio, cond = synthetic_inputs(backbone.cfg, spec, device, dtype)
    guidance = Guidance(video=5.0, audio=4.0)
    step_s, out = time_calls(lambda: guided_velocity(call or backbone, video, audio, 0.5, cond, prep, guidance),
                             steps, device, barrier)
    return step_s, out, prep.layout.length


def _device_for(rank: int) -> torch.device:
    return torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")


def load_tp_shard(checkpoint: str, world: int, device, dtype: torch.dtype):
    """A rank's TP shard over a 1-D mesh of `world` ranks -> (module, the call a step makes)."""
    from torch.distributed.device_mesh import init_device_mesh

    from ..checkpoint import load_backbone_shard

    backbone = load_backbone_shard(checkpoint, init_device_mesh(device.type, (world,)), device, dtype)
    return backbone, backbone


@contextmanager
def joined_group(rank: int, world: int, port: int, threads: int):
    """A bench rank's process group (gloo on the CPU, NCCL on its GPU) -> its device."""
    import torch.distributed as dist

    torch.set_num_threads(threads)
    device = _device_for(rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world)
    try:
        yield device
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    """A free local port for the ranks' rendezvous (released just before the ranks bind it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, checkpoint: str, tokens: int, steps: int, dtype: str,
               threads: int, out_dir: str, load=load_tp_shard) -> None:
    """One bench rank: join the group, `load(checkpoint, world, device, dtype)`, time the steps."""
    import torch.distributed as dist

    with joined_group(rank, world, port, threads) as device:
        backbone, call = load(checkpoint, world, device, DTYPES[dtype])
        step_s, out, length = time_steps(backbone, tokens, steps, device, DTYPES[dtype], barrier=dist.barrier,
                                         call=call)
        if rank == 0:
            torch.save({"step_s": step_s, "out": out, "length": length}, Path(out_dir) / "rank0.pt")


def _write_backbone_checkpoint(backbone: OmniBackbone, config_name: str, directory: Path) -> None:
    """The checkpoint layout (config.json + model.safetensors with `backbone.` keys), backbone only."""
    import json

    from safetensors.torch import save_file

    from ..checkpoint import CHECKPOINT_FORMAT, CONFIG_FILE, WEIGHTS_FILE
    config = preset(config_name)
    (directory / CONFIG_FILE).write_text(json.dumps({"format": CHECKPOINT_FORMAT, "model": config.to_dict()}))
    save_file({f"backbone.{k}": v.contiguous() for k, v in backbone.state_dict().items()}, directory / WEIGHTS_FILE)


def bench_backbone(preset_name: str = "tiny", tp: int = 1, steps: int = 5, tokens: int = 1024,
                   dtype: str = "float32", check_parity: bool = False) -> BenchResult:
    """Benchmarks the backbone at `tp` ranks on this machine; prints and returns the figures."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} (got {dtype!r})")
    cfg = preset(preset_name).backbone
    device = _device_for(0)
    if tp == 1:
        backbone = seeded_backbone(cfg, device, DTYPES[dtype])
        step_s, _, length = time_steps(backbone, tokens, steps, device, DTYPES[dtype])
        parity = None                      # tp=1 is the reference itself
        if check_parity:
            print("parity: nothing to compare at tp=1 (it is the reference)")
    else:
        step_s, length, parity = _bench_tp(preset_name, cfg, tp, steps, tokens, dtype, check_parity)
    with torch.device("meta"):
        flops = OmniBackbone(cfg).flops_per_forward(length, batch=2)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = BenchResult(preset=preset_name, tp=tp, device=device_name, dtype=dtype, tokens=length, batch=2,
                         steps=steps, step_s=step_s, tokens_per_s=2 * length / step_s,
                         tflops=flops / step_s / 1e12, flops_per_step=flops, parity_max_abs=parity)
    print("\n".join(result.lines()), flush=True)
    return result


def _bench_tp(preset_name: str, cfg: BackboneConfig, tp: int, steps: int, tokens: int, dtype: str,
              check_parity: bool):
    import torch.multiprocessing as mp

    from .tp import check_tp_degree

    check_tp_degree(cfg, tp)
    if torch.cuda.is_available() and torch.cuda.device_count() < tp:
        raise ValueError(f"tp={tp} needs {tp} GPUs; this machine has {torch.cuda.device_count()}")
    backbone = seeded_backbone(cfg)
    with tempfile.TemporaryDirectory(prefix="omnireel-bench-") as tmp:
        _write_backbone_checkpoint(backbone, preset_name, Path(tmp))
        threads = max(1, torch.get_num_threads() // tp) if not torch.cuda.is_available() else torch.get_num_threads()
        mp.spawn(_rank_main, args=(tp, free_port(), tmp, tokens, steps, dtype, threads, tmp), nprocs=tp, join=True)
        rank0 = torch.load(Path(tmp) / "rank0.pt")
    parity = None
    if check_parity:
        device = _device_for(0)
        reference = backbone.to(device, DTYPES[dtype])
        _, expected, _ = time_steps(reference, tokens, 1, device, DTYPES[dtype])
        parity = max((a - b).abs().max().item() for a, b in zip(rank0["out"], expected))
    return rank0["step_s"], rank0["length"], parity


def run(args) -> int:
    """Run the bench for parsed `args`; a bad preset or TP degree is one line and exit code 2. A dtype
    of None (the DriverArgs field left out) is float32, the seeded weights' own, on every device."""
    import sys
    if args.dtype is None:
        args.dtype = "float32"
    try:
        if getattr(args, "family", "omni") == "ltx2":
            return run_ltx2(args)
        if getattr(args, "family", "omni") == "wan":
            return run_wan(args)
        if getattr(args, "sp", 1) != 1 or getattr(args, "cfg_parallel", 1) != 1:
            return run_mesh(args)
        bench_backbone(args.preset, args.tp, args.steps, args.tokens, args.dtype, args.check_parity)
    except ValueError as exc:
        print(f"omnireel: error: {exc}", file=sys.stderr)
        return 2
    return 0


def run_mesh(args) -> int:
    """`--sp N` / `--cfg-parallel 2` (with any --tp): the omni step on a (cfg, sp, tp) mesh (bench_mesh.py)."""
    from .bench_mesh import bench_mesh
    from .mesh import MeshShape

    shape = MeshShape(cfg=args.cfg_parallel, sp=args.sp, tp=args.tp)
    print("\n".join(bench_mesh(args.preset, shape, args.steps, args.tokens, args.dtype, args.check_parity)), flush=True)
    return 0


def run_ltx2(args) -> int:
    """`--family ltx2`: FLOPs per step of diffusers' LTX-2 transformer, and its time on a GPU; with
    --tp / --sp / --cfg-parallel, its step on a mesh."""
    from .bench_ltx2 import LTX2StepShape
    from .bench_ltx2 import run as run_bench

    if args.preset not in ("real", "tiny"):
        raise ValueError(f"--preset: the ltx2 family has presets real and tiny (got {args.preset!r})")
    width, _, height = args.size.partition("x")
    if not (width.isdigit() and height.isdigit()) or int(width) % 32 or int(height) % 32 or not int(width) * int(height):
        raise ValueError(f'--size: must be "WxH" with sides multiples of 32, e.g. 768x512 (got {args.size!r})')
    if args.frames < 1 or (args.frames - 1) % 8:
        raise ValueError(f"--frames: must be 1 + 8k, e.g. 121 (got {args.frames})")
    if mesh_flags(args):
        return run_family_mesh("ltx2", args, int(width), int(height))
    shape = LTX2StepShape(width=int(width), height=int(height), frames=args.frames)
    print("\n".join(run_bench(args.preset, shape, args.steps)), flush=True)
    return 0


def mesh_flags(args) -> bool:
    return args.tp != 1 or getattr(args, "sp", 1) != 1 or getattr(args, "cfg_parallel", 1) != 1


def run_family_mesh(family: str, args, width: int, height: int) -> int:
    """`--family ltx2|wan` with --tp / --sp / --cfg-parallel: its step on a (cfg, sp, tp) mesh (bench_mesh.py)."""
    from .bench_mesh import bench_family_mesh
    from .mesh import MeshShape

    shape = MeshShape(cfg=args.cfg_parallel, sp=args.sp, tp=args.tp)
    print("\n".join(bench_family_mesh(family, args.preset, shape, width, height, args.frames, args.steps, args.dtype,
                                      args.check_parity)), flush=True)
    return 0


def run_wan(args) -> int:
    """`--family wan`: WanDenoiser.step against diffusers' WanTransformer3DModel forward alone, on the CPU;
    with --tp / --sp / --cfg-parallel, its step on a mesh."""
    from .bench_wan import PRESETS
    from .bench_wan import run as run_bench

    if args.preset not in PRESETS:
        raise ValueError(f"--preset: the wan family has presets {', '.join(PRESETS)} (got {args.preset!r})")
    width, _, height = args.size.partition("x")
    if not (width.isdigit() and height.isdigit()) or int(width) % 16 or int(height) % 16 or not int(width) * int(height):
        raise ValueError(f'--size: must be "WxH" with sides multiples of 16, e.g. 320x192 (got {args.size!r})')
    if args.frames < 1 or (args.frames - 1) % 4:
        raise ValueError(f"--frames: must be 1 + 4k, e.g. 9 (got {args.frames})")
    if mesh_flags(args):
        return run_family_mesh("wan", args, int(width), int(height))
    print("\n".join(run_bench(args.preset, int(width), int(height), args.frames, args.steps)), flush=True)
    return 0
