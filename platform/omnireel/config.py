"""The generation request (pydantic) and its limits, its canonical form, and its artifact key.

Every violation is reported as "<field path>: <message naming the limit>" (DESIGN.md §5);
`request_error_message` turns a `ValidationError` into that one line.
"""
from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from .model.config import LANGUAGES, MAX_SHOTS

MAX_PROMPT_CHARS = 2000
"""Longest prompt (of a request or a shot), in characters after stripping whitespace."""
MAX_CAMERA_CHARS = 200
"""Longest camera direction of a shot, in characters."""
MAX_SECONDS = 20.0
"""Longest clip, in seconds."""
MIN_SIDE = 32
"""Smallest frame width or height, in pixels."""
MAX_SIDE = 1920
"""Largest frame width or height, in pixels."""
SIZE_MULTIPLE = 16
"""Frame sides are multiples of this: the VAE's x8 downsampling times the backbone's 2x2 patch."""
MIN_FPS = 1
"""Lowest frame rate."""
MAX_FPS = 60
"""Highest frame rate."""
MAX_STEPS = 100
"""Most denoising steps."""
MAX_GUIDANCE = 30.0
"""Largest classifier-free guidance scale (video or audio)."""
SEED_LIMIT = 2**63
"""Seeds lie in [0, SEED_LIMIT)."""
SECONDS_TOLERANCE = 1e-6
"""How far the shots' seconds may add up from the request's seconds."""
FLOAT_DECIMALS = 6
"""Floats in the canonical form are rounded to this many decimals."""
# MAX_SHOTS (most shots in one request) and LANGUAGES (language tags) come from the model config.


def canonical_json(value: Any) -> bytes:
    """UTF-8 JSON with sorted keys and no whitespace: equal values give equal bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def _show(value: Any) -> str:
    """A number as a person writes it: 20.0 -> "20", 0.25 -> "0.25"."""
    text = repr(value)
    return text[:-2] if isinstance(value, float) and text.endswith(".0") else text


def _within(low, high, *, low_open: bool = False, high_open: bool = False) -> AfterValidator:
    """Checks low <= value <= high (strict where open); NaN never passes."""
    low_sign, high_sign = (">" if low_open else ">="), ("<" if high_open else "<=")

    def check(value):
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (above and below):
            raise ValueError(f"must be {low_sign} {_show(low)} and {high_sign} {_show(high)} "
                             f"(got {_show(value)})")
        return value

    return AfterValidator(check)


def _text(max_chars: int) -> AfterValidator:
    """Strips whitespace; the rest must be non-empty and at most `max_chars` long."""

    def check(value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("must not be empty or blank")
        if len(value) > max_chars:
            raise ValueError(f"must be at most {max_chars} characters (got {len(value)})")
        return value

    return AfterValidator(check)


def _check_size(value: str) -> str:
    """"WxH" -> the same, normalized; sides multiples of SIZE_MULTIPLE within [MIN_SIDE, MAX_SIDE]."""
    sides = value.strip().lower().split("x")
    if len(sides) != 2 or not all(side.isdigit() for side in sides):
        raise ValueError(f'must be "WxH" with whole-number sides, e.g. "256x256" (got {value!r})')
    width, height = (int(side) for side in sides)
    if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
        raise ValueError(f"width and height must be within [{MIN_SIDE}, {MAX_SIDE}] "
                         f"(got {width}x{height})")
    if width % SIZE_MULTIPLE or height % SIZE_MULTIPLE:
        raise ValueError(f"width and height must be multiples of {SIZE_MULTIPLE} "
                         f"(got {width}x{height})")
    return f"{width}x{height}"


def _check_shot_count(shots: list) -> list:
    if len(shots) > MAX_SHOTS:
        raise ValueError(f"at most {MAX_SHOTS} shots (got {len(shots)})")
    return shots


Prompt = Annotated[str, _text(MAX_PROMPT_CHARS)]
Seconds = Annotated[float, _within(0, MAX_SECONDS, low_open=True)]
Guidance = Annotated[float, _within(0.0, MAX_GUIDANCE)]
Language = Literal[LANGUAGES]


class Shot(BaseModel):
    """One shot of a multi-shot scene: its own caption and duration."""

    model_config = ConfigDict(extra="forbid")

    prompt: Prompt
    seconds: Seconds
    camera: Optional[Annotated[str, _text(MAX_CAMERA_CHARS)]] = None


class GenerationRequest(BaseModel):
    """One video (or image) to generate. Optional sampler settings default to the checkpoint's."""

    model_config = ConfigDict(extra="forbid")

    prompt: Prompt
    seconds: Seconds = 2.0
    size: Annotated[str, AfterValidator(_check_size)] = "256x256"
    fps: Annotated[int, _within(MIN_FPS, MAX_FPS)] = 24
    seed: Annotated[int, _within(0, SEED_LIMIT, high_open=True)] = 0
    steps: Optional[Annotated[int, _within(1, MAX_STEPS)]] = None
    guidance_video: Optional[Guidance] = None
    guidance_audio: Optional[Guidance] = None
    language: Language = "en"
    shots: Annotated[list[Shot], AfterValidator(_check_shot_count)] = Field(default_factory=list)
    output: Literal["video", "image"] = "video"

    @model_validator(mode="after")
    def _check_duration(self) -> "GenerationRequest":
        if self.shots:
            total = sum(shot.seconds for shot in self.shots)
            if "seconds" not in self.model_fields_set:
                if total > MAX_SECONDS:
                    raise ValueError(f"shots: seconds add up to {_show(total)} "
                                     f"but must be <= {_show(MAX_SECONDS)}")
                self.seconds = total
            elif abs(total - self.seconds) > SECONDS_TOLERANCE:
                raise ValueError(f"shots: seconds add up to {_show(total)} but must equal "
                                 f"seconds ({_show(self.seconds)}) within {SECONDS_TOLERANCE:g}")
        if self.output == "video" and round(self.seconds * self.fps) < 1:
            raise ValueError(f"seconds, fps: round(seconds * fps) must be >= 1 frame "
                             f"(got round({_show(self.seconds)} * {self.fps}) = 0)")
        return self

    @property
    def width(self) -> int:
        return int(self.size.split("x")[0])

    @property
    def height(self) -> int:
        return int(self.size.split("x")[1])

    @property
    def frames(self) -> int:
        """Frames to render: round(seconds * fps), or 1 for an image."""
        return 1 if self.output == "image" else round(self.seconds * self.fps)


def request_error_message(exc: ValidationError) -> str:
    """One line: each violation as "<field path>: <message>", joined by "; "."""
    return "; ".join(_describe(error) for error in exc.errors())


def _describe(error: dict) -> str:
    path = ".".join(str(part) for part in error["loc"])
    kind = error["type"]
    if kind == "value_error":
        message = str(error["ctx"]["error"])
    elif kind == "missing":
        message = "required"
    elif kind == "extra_forbidden":
        model = Shot if error["loc"][0] == "shots" else GenerationRequest
        message = f"unknown field; allowed: {', '.join(model.model_fields)}"
    else:
        message = error["msg"]
        shown = error.get("input")
        if isinstance(shown, (str, int, float)) and len(repr(shown)) <= 80:
            message += f" (got {shown!r})"
    message = " ".join(message.split())  # one line
    return f"{path}: {message}" if path else message


def normalized(request: GenerationRequest) -> dict:
    """The canonical JSON-able form: every field with defaults filled, floats rounded."""
    return _round_floats(request.model_dump(mode="json"))


def _round_floats(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, FLOAT_DECIMALS) + 0.0  # + 0.0 turns -0.0 into 0.0
    if isinstance(value, dict):
        return {key: _round_floats(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_round_floats(item) for item in value]
    return value


def request_key(request: GenerationRequest, checkpoint_digest: str) -> str:
    """sha256 hex naming this request's artifact on this checkpoint."""
    document = {"request": normalized(request), "checkpoint": checkpoint_digest}
    return hashlib.sha256(canonical_json(document)).hexdigest()
