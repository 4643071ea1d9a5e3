"""The generation request (pydantic) and its limits, its canonical form, and its artifact key.

Every violation is reported as "<field path>: <message naming the limit>" (DESIGN.md §5);
`request_error_message` turns a `ValidationError` into that one line.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import hashlib
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo,
                      model_validator)

from . import storage
from .canonical import canonical_json
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

MAX_VOICES = 4
"""Most characters bound to voices in one request."""
MAX_CHARACTER_CHARS = 64
"""Longest character name of a voice binding."""
VOICE_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
"""What a voice id looks like (ids name storage keys, so nothing else gets through)."""
MAX_ELEMENTS = 4
"""Most reference images (elements) in one request."""
MAX_REFERENCE_CHARS = 2048
"""Longest reference URI (data: URIs excepted: they are limited by MAX_UPLOAD_BYTES)."""
MAX_UPLOAD_BYTES = 20 * 2**20
"""Largest inline upload (a data: URI's decoded bytes) and largest fetched reference (a stored upload
included), in bytes."""
MAX_INPUT_SECONDS = MAX_SECONDS
"""Longest input video or input audio, in seconds (checked from the container before decoding)."""
STORYBOARDS = ("rules", "llm")
"""Storyboard planners a request may choose (storyboard.py): the rule-based default, or an LLM on vLLM."""
MAX_BODIES = 16
"""Most rigid bodies in a physics scene."""
MAX_EMITTERS = 4
"""Most particle emitters in a physics scene."""
MAX_PARTICLES = 256
"""Most particles in a physics scene, all emitters together."""
MAX_SPEED = 10000.0
"""Largest body or particle speed component, in pixels per second."""
MAX_GRAVITY = 10000.0
"""Largest gravity component, in pixels per second squared."""
MAX_MASS = 1000.0
"""Largest body mass (arbitrary units)."""
MAX_FRICTION = 10.0
"""Largest friction coefficient."""
MIN_PARTICLE_RADIUS, MAX_PARTICLE_RADIUS = 0.5, 64.0
"""Particle radius range, in pixels."""


@dataclass(frozen=True)
class ReferencePolicy:
    """Which reference URIs a caller may put in a request (DESIGN.md §4, the trust boundary).

    Untrusted callers (HTTP, manifests) get URIs checked by `storage.check_allowed` against
    `schemes` and `buckets`, plus inline data: URIs; only a trusted caller (the CLI) may name local
    paths and file:// URIs. Pass it as `GenerationRequest.model_validate(data, context=policy.context())`
    or through `parse_request`. Without a context a request is validated as untrusted.

    Stored uploads (`<storage>/uploads/<sha256>`, storage.names_upload; `uploads` is the app's
    uploads_prefix) are readable only through their job: a reference naming one is refused unless
    it is `admitted`, i.e. the ingress stored it for this very request, or the job's record lists it.
    """
    trusted: bool = False
    schemes: tuple[str, ...] = ("s3", "gs", "https")
    buckets: Optional[tuple[str, ...]] = None
    uploads: Optional[str] = None                       # the app's upload store (storage.uploads_prefix)
    admitted: frozenset[str] = frozenset()              # stored uploads this request may name

    def context(self) -> dict:
        return {"reference_policy": self}

    def admitting(self, uploads) -> "ReferencePolicy":
        """This policy, letting a request name the stored uploads `uploads` (URIs) and no others."""
        return dataclasses.replace(self, admitted=frozenset(uploads))


UNTRUSTED = ReferencePolicy()
TRUSTED = ReferencePolicy(trusted=True)


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


def _check_unique_characters(voices: list) -> list:
    if len(voices) > MAX_VOICES:
        raise ValueError(f"at most {MAX_VOICES} voices (got {len(voices)})")
    seen = set()
    for voice in voices:
        key = voice.character.casefold()
        if key in seen:
            raise ValueError(f"character {voice.character!r} is bound more than once")
        seen.add(key)
    return voices


def _check_elements(elements: list) -> list:
    if len(elements) > MAX_ELEMENTS:
        raise ValueError(f"at most {MAX_ELEMENTS} elements (got {len(elements)})")
    return elements


DATA_URI = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?(;[\w.+-]+=[\w.+-]+)*;base64,", re.ASCII)


def data_uri_bytes(uri: str) -> bytes:
    """The decoded payload of a `data:<type>;base64,<payload>` URI (ValueError if malformed)."""
    match = DATA_URI.match(uri)
    if not match:
        raise ValueError('a data: URI must look like "data:<type>;base64,<payload>"')
    try:
        return base64.b64decode(uri[match.end():], validate=True)
    except binascii.Error as e:
        raise ValueError(f"data: URI payload is not valid base64 ({e})") from None


def _check_reference(value: str, info: ValidationInfo) -> str:
    """A reference to media: a data: URI (an inline upload), an allow-listed URI, a stored upload the
    policy admits (the Serve app's, see ReferencePolicy), or (trusted callers only) a local path or
    file:// URI. Sizes of inline uploads are checked here, before decoding."""
    policy = (info.context or {}).get("reference_policy", UNTRUSTED)
    value = value.strip()
    if not value:
        raise ValueError("must not be empty or blank")
    if value.startswith("data:"):
        size = len(data_uri_bytes(value))
        if size > MAX_UPLOAD_BYTES:
            raise ValueError(f"upload must be at most {MAX_UPLOAD_BYTES} bytes (got {size})")
        return value
    if len(value) > MAX_REFERENCE_CHARS:
        raise ValueError(f"must be at most {MAX_REFERENCE_CHARS} characters (got {len(value)})")
    if not policy.trusted and storage.names_upload(value, policy.uploads):
        if value in policy.admitted:
            return value
        raise ValueError("names a stored upload (uploads/...), which is readable only through its own job; "
                         "send the file itself, a data: URL or a URI of your own")
    if "://" in value:
        if policy.trusted and value.startswith("file://"):
            value = value[len("file://"):]
        elif not policy.trusted:
            try:
                return storage.check_allowed(value, policy.schemes, policy.buckets)
            except storage.URINotAllowed as e:
                raise ValueError(str(e)) from None
        else:
            return value
    elif not policy.trusted:
        raise ValueError(f"local paths are not allowed here; give a URI ({', '.join(policy.schemes)}) "
                         f"or an inline data: URI")
    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError(f"no such file: {value}")
    return str(path.resolve())


Prompt = Annotated[str, _text(MAX_PROMPT_CHARS)]
MediaReference = Annotated[str, AfterValidator(_check_reference)]
Seconds = Annotated[float, _within(0, MAX_SECONDS, low_open=True)]
Guidance = Annotated[float, _within(0.0, MAX_GUIDANCE)]
Language = Literal[LANGUAGES]


class Shot(BaseModel):
    """One shot of a multi-shot scene: its own caption and duration."""

    model_config = ConfigDict(extra="forbid")

    prompt: Prompt
    seconds: Seconds
    camera: Optional[Annotated[str, _text(MAX_CAMERA_CHARS)]] = None


class VoiceBinding(BaseModel):
    """A character of the scene speaks with a registered voice (see `omnireel voices`)."""

    model_config = ConfigDict(extra="forbid")

    character: Annotated[str, _text(MAX_CHARACTER_CHARS)]
    voice_id: Annotated[str, Field(pattern=VOICE_ID_PATTERN)]


Point = tuple[float, float]
Speed = Annotated[float, _within(-MAX_SPEED, MAX_SPEED)]
Unit = Annotated[float, _within(0.0, 1.0)]


class Body(BaseModel):
    """A rigid body: a circle (radius) or a box (size), in output pixels (x right, y down)."""

    model_config = ConfigDict(extra="forbid")

    shape: Literal["circle", "box"] = "circle"
    position: Point
    velocity: tuple[Speed, Speed] = (0.0, 0.0)
    radius: Annotated[float, _within(0, MAX_SIDE, low_open=True)] = 16.0
    size: Optional[tuple[Annotated[float, _within(0, MAX_SIDE, low_open=True)],
                         Annotated[float, _within(0, MAX_SIDE, low_open=True)]]] = None
    angle: Annotated[float, _within(-1000.0, 1000.0)] = 0.0                   # radians
    angular_velocity: Annotated[float, _within(-1000.0, 1000.0)] = 0.0       # radians per second
    mass: Annotated[float, _within(0, MAX_MASS, low_open=True)] = 1.0
    elasticity: Unit = 0.6
    friction: Annotated[float, _within(0.0, MAX_FRICTION)] = 0.5
    static: bool = False

    @model_validator(mode="after")
    def _check_shape(self) -> "Body":
        if self.shape == "box" and self.size is None:
            raise ValueError("size: required for a box ([width, height] in pixels)")
        if self.shape == "circle" and self.size is not None:
            raise ValueError("size: only for a box (a circle takes radius)")
        return self


class Particles(BaseModel):
    """An emitter: `count` small circles in a disc of radius `spread` around `position`."""

    model_config = ConfigDict(extra="forbid")

    count: Annotated[int, _within(1, MAX_PARTICLES)]
    position: Point
    spread: Annotated[float, _within(0.0, MAX_SIDE)] = 16.0
    velocity: tuple[Speed, Speed] = (0.0, 0.0)
    radius: Annotated[float, _within(MIN_PARTICLE_RADIUS, MAX_PARTICLE_RADIUS)] = 3.0
    elasticity: Unit = 0.1
    friction: Annotated[float, _within(0.0, MAX_FRICTION)] = 0.0


class PhysicsScene(BaseModel):
    """A small 2D scene simulated with pymunk; its motion conditions the generation."""

    model_config = ConfigDict(extra="forbid")

    gravity: tuple[Annotated[float, _within(-MAX_GRAVITY, MAX_GRAVITY)],
                   Annotated[float, _within(-MAX_GRAVITY, MAX_GRAVITY)]] = (0.0, 980.0)
    bodies: list[Body] = Field(default_factory=list)
    particles: list[Particles] = Field(default_factory=list)
    walls: bool = True                      # the frame's four edges are static walls

    @model_validator(mode="after")
    def _check_counts(self) -> "PhysicsScene":
        if len(self.bodies) > MAX_BODIES:
            raise ValueError(f"bodies: at most {MAX_BODIES} bodies (got {len(self.bodies)})")
        if len(self.particles) > MAX_EMITTERS:
            raise ValueError(f"particles: at most {MAX_EMITTERS} emitters (got {len(self.particles)})")
        total = sum(p.count for p in self.particles)
        if total > MAX_PARTICLES:
            raise ValueError(f"particles: at most {MAX_PARTICLES} particles in all (got {total})")
        if not self.bodies and not self.particles:
            raise ValueError("needs at least one body or particle emitter")
        return self


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
    # which planner turns a single prompt into shots when `shots` is not given (storyboard.py):
    # "rules" (cuts at sentence ends, ";" and "then"), or "llm" (an LLM on vLLM, planned once at admission)
    storyboard: Literal[STORYBOARDS] = "rules"
    # ---- the Omni features (optional; their defaults are plain text-to-video+audio) ----
    mode: Literal["video", "audio"] = "video"   # "audio": text (or video) to audio alone, an M4A
    voices: Annotated[list[VoiceBinding], AfterValidator(_check_unique_characters)] = Field(
        default_factory=list)
    elements: Annotated[list[MediaReference], AfterValidator(_check_elements)] = Field(default_factory=list)
    input_reference: Optional[MediaReference] = None   # image-to-video: the clean first frame
    input_video: Optional[MediaReference] = None       # continue this video: clean leading frames
    input_audio: Optional[MediaReference] = None       # audio-driven video: clean audio tokens
    physics: Optional[PhysicsScene] = None

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
        self._check_features()
        return self

    def _check_features(self) -> None:
        """Cross-field rules of the Omni features, each naming the field."""
        conflicts = {
            "image": ("mode", "input_reference", "input_video", "input_audio", "voices", "physics"),
            "audio": ("elements", "input_reference", "input_audio", "physics", "shots"),
        }
        kind = "image" if self.output == "image" else "audio" if self.mode == "audio" else None
        for name in conflicts.get(kind, ()):
            if name in self.model_fields_set and getattr(self, name) not in (None, [], "video"):
                what = "output 'image' (one frame, no audio)" if kind == "image" else "mode 'audio' (no video)"
                raise ValueError(f"{name}: not available with {what}")
        if kind is not None and self.storyboard == "llm":
            what = "output 'image' (one frame)" if kind == "image" else "mode 'audio' (no video)"
            raise ValueError(f"storyboard: 'llm' plans shots, which {what} does not have")
        if self.input_reference is not None and self.input_video is not None:
            raise ValueError("input_reference, input_video: give at most one (both fill the leading frames)")
        if self.physics is not None:
            for kind, items in (("bodies", self.physics.bodies), ("particles", self.physics.particles)):
                for i, item in enumerate(items):
                    x, y = item.position
                    if not (0 <= x <= self.width and 0 <= y <= self.height):
                        raise ValueError(f"physics.{kind}.{i}.position: must lie inside the frame "
                                         f"[0, {self.width}] x [0, {self.height}] (got [{_show(x)}, {_show(y)}])")

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


def parse_request(data: dict, policy: ReferencePolicy = UNTRUSTED) -> GenerationRequest:
    """Validates a request from a caller with the given trust (the CLI passes TRUSTED)."""
    return GenerationRequest.model_validate(data, context=policy.context())


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
        message = f"unknown field; allowed: {', '.join(_model_at(error['loc'][:-1]).model_fields)}"
    else:
        message = error["msg"]
        shown = error.get("input")
        if isinstance(shown, (str, int, float)) and len(repr(shown)) <= 80:
            message += f" (got {shown!r})"
    message = " ".join(message.split())  # one line
    return f"{path}: {message}" if path else message


def _model_at(loc: tuple) -> type[BaseModel]:
    """The pydantic model that holds the field at `loc` (list indices skipped)."""
    model = GenerationRequest
    for part in loc:
        if isinstance(part, str) and part in model.model_fields:
            inner = _nested_model(model.model_fields[part].annotation)
            model = inner or model
    return model


def _nested_model(annotation) -> Optional[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _nested_model(arg)
        if found is not None:
            return found
    return None


OPTIONAL_FIELDS = ("storyboard", "mode", "voices", "elements", "input_reference", "input_video", "input_audio", "physics")
"""Fields added after the first release: left out of the canonical form while at their defaults, so
artifact keys of requests that do not use them never change."""


def normalized(request: GenerationRequest) -> dict:
    """The canonical JSON-able form: every field with defaults filled (the optional feature fields
    only when set to something other than their default), floats rounded."""
    document = request.model_dump(mode="json")
    for name, default in _optional_defaults().items():
        if document[name] == default:
            del document[name]
    return _round_floats(document)


@functools.cache
def _optional_defaults() -> dict[str, Any]:
    """The OPTIONAL_FIELDS' defaults, made once: pydantic inspects a default factory's signature on
    every get_default, which was most of a manifest row's validation time."""
    return {name: GenerationRequest.model_fields[name].get_default(call_default_factory=True)
            for name in OPTIONAL_FIELDS}


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
