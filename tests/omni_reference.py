"""Three omni requests whose latents were saved from the code before the model-families refactor
(tests/data/omni_reference_latents.safetensors): text, an image reference, and two shots with a bound
voice. `python tests/omni_reference.py` rewrites the file from the current code (only do that on purpose).

The voice's speaker embedding is a fixed seeded vector (not an espeak recording through GE2E), so the
reference depends on the backbone path alone.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).with_name("data") / "omni_reference_latents.safetensors"


def reference_image(path: Path) -> Path:
    """A 64x64 PNG gradient with a bright square: deterministic bytes."""
    from omnireel import media

    y, x = np.mgrid[0:64, 0:64]
    pixels = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.uint8)
    pixels[20:40, 24:44] = 255
    path.write_bytes(media.encode_png(pixels))
    return path


def requests(image: Path) -> dict:
    from omnireel.config import TRUSTED, parse_request

    common = {"size": "64x64", "seconds": 0.5, "fps": 8, "seed": 7, "steps": 3}
    return {
        "text": parse_request({"prompt": "a red ball bounces on a grey floor", **common}, TRUSTED),
        "image": parse_request({"prompt": "the square drifts left", "input_reference": str(image), **common},
                               TRUSTED),
        "shots_voice": parse_request({
            "prompt": "two friends talk", "seconds": 1.0, "size": "64x64", "fps": 8, "seed": 11, "steps": 3,
            "guidance_video": 3.0, "guidance_audio": 2.0,
            "shots": [{"prompt": "ANNA waves", "seconds": 0.5}, {"prompt": "ANNA laughs", "seconds": 0.5}],
            "voices": [{"character": "ANNA", "voice_id": "anna"}]}, TRUSTED),
    }


def fixed_voice(count: int, dim: int):
    from omnireel.stages import VoiceEmbeddings

    g = torch.Generator().manual_seed(5)
    speakers = torch.nn.functional.normalize(torch.randn(count, dim, generator=g), dim=-1)
    return VoiceEmbeddings(speakers=speakers)


def render_latents(engine, request) -> dict[str, torch.Tensor]:
    """encode_text, encode_media, then denoise, with the fixed voice: {"video": ..., "audio": ...}."""
    from omnireel.stages import STAGE_GRAPH, run_stage

    stages = {stage.name: stage for stage in STAGE_GRAPH}
    values = {"plan": engine.plan(request)}
    values["voice"] = fixed_voice(len(values["plan"].voices), engine.config.backbone.speaker_dim)
    for name in ("encode_text", "encode_media", "denoise"):
        values[stages[name].output] = run_stage(stages[name], engine.components, values)
    return {"video": values["latents"].video, "audio": values["latents"].audio}


def all_latents(engine, workdir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name, request in requests(reference_image(workdir / "ref.png")).items():
        for kind, tensor in render_latents(engine, request).items():
            out[f"{name}.{kind}"] = tensor.contiguous()
    return out


def main() -> None:
    import tempfile

    from safetensors.torch import save_file

    from omnireel.checkpoint import init_checkpoint
    from omnireel.engine import LocalEngine

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        init_checkpoint("tiny", Path(tmp) / "tiny", seed=0)
        latents = all_latents(LocalEngine(Path(tmp) / "tiny"), Path(tmp))
    DATA.parent.mkdir(exist_ok=True)
    save_file(latents, DATA)
    print(f"wrote {DATA}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in latents.items()), file=sys.stderr)


if __name__ == "__main__":
    main()
