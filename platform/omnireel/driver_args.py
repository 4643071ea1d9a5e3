"""DriverArgs: the arguments both Ray drivers of the stage graph take (the Serve app's AppArgs and the
batch pipeline's BatchOptions subclass it), and the command-line flags made from a model's fields.

A field is written once (name, type, limits, description) and is at the same time
  - a key of the Serve config's `args:` (AppArgs) and an attribute of BatchOptions;
  - a flag of `omnireel serve` and `omnireel batch` (add_flags), and, where the field applies to
    them, of `omnireel render` and `omnireel bench backbone`: name -> --flag (cfg_parallel ->
    --cfg-parallel, or the field's json_schema_extra "flag"), description -> help, type and limits ->
    the flag's check, so a bad value is one line naming the flag and the limit.
Importing it imports pydantic alone: Serve unpickles AppArgs in every replica.
"""
from __future__ import annotations

import argparse
import types
import typing
from typing import Literal, Optional

import pydantic
from pydantic import BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo

DTYPES = Literal["float32", "bfloat16", "float16"]
DEFAULT_MAX_BATCH_JOBS = 8          # a backbone's batch bounds (scheduler.py takes them from here)
DEFAULT_MAX_BATCH_TOKENS = 32768


class DriverArgs(BaseModel):
    """What the Serve app and a batch run share: the checkpoint, the backbone's mesh, threads, the
    float type, the compute threads' priority and the voice registry."""
    model_config = ConfigDict(extra="forbid")

    checkpoint: Optional[str] = Field(None, description="checkpoint folder (default: the embedded small one)")
    tp: int = Field(1, ge=1, description=(
        "tensor-parallel degree of the backbone (each Serve Backbone replica, each batch denoise actor)"))
    sp: int = Field(1, ge=1, description="Ulysses sequence-parallel degree of the backbone")
    cfg_parallel: int = Field(1, ge=1, le=2, description=(
        "2: the conditional and unconditional rows of CFG on different ranks; a backbone's "
        "ranks are cfg_parallel x sp x tp (parallel/mesh.py)"))
    threads: Optional[int] = Field(None, ge=1, description=(
        "torch threads of every stage replica or actor and every rank (default: Ray's, its CPUs); "
        "`omnireel render`: of its one process (default: torch's)"))
    dtype: Optional[DTYPES] = Field(None, description=(
        "float type of the model components (default: as stored; bfloat16 on GPUs; `omnireel bench "
        "backbone`'s seeded weights: float32)"))
    compute_niceness: Optional[int] = Field(0, ge=-20, le=19, description=(
        "nice value of each replica's, actor's and rank's compute thread (Ray starts workers at 15; "
        "below that needs CAP_SYS_NICE, else it stays at 15); none: leave it as Ray set it"))
    cpus_per_rank: float = Field(1.0, gt=0, description="CPUs of each backbone rank")
    max_batch_jobs: int = Field(DEFAULT_MAX_BATCH_JOBS, ge=1, description=(
        "jobs one backbone (a Serve Backbone replica, a batch denoise actor; above tp=1 its group's rank 0) "
        "denoises together, joining and leaving the batch at step boundaries (omnireel/scheduler.py); 1 "
        "turns batching off; a Backbone replica's max_ongoing_requests is twice this"))
    max_batch_tokens: int = Field(DEFAULT_MAX_BATCH_TOKENS, ge=1, description=(
        "tokens (layout length x CFG rows) of one batched step; a larger job runs alone"))
    voices_uri: Optional[str] = Field(None, json_schema_extra={"flag": "--voice-store"}, description=(
        "voice registry, shared with `omnireel voices` (default $OMNIREEL_VOICES, else $OMNIREEL_HOME/voices)"))
    storyboard_model: Optional[str] = Field(None, description=(
        "local model folder of the LLM storyboard planner (default $OMNIREEL_STORYBOARD_MODEL); without "
        "one (or without vLLM) nothing plans and storyboard 'llm' is refused"))

    @property
    def mesh(self):
        """The backbone's (cfg, sp, tp) MeshShape; its `ranks` are a replica's or actor's placement group."""
        from omnireel.parallel.mesh import MeshShape
        return MeshShape(cfg=self.cfg_parallel, sp=self.sp, tp=self.tp)


# ---- command-line flags from the fields ----------------------------------------------------------

def flag_name(name: str, field: FieldInfo) -> str:
    """`cfg_parallel` -> `--cfg-parallel`, unless the field names its flag (json_schema_extra "flag")."""
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    return extra.get("flag") or "--" + name.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser, model: type[BaseModel], names: tuple[str, ...] | None = None,
              defaults: bool = False) -> None:
    """One flag per field of `model` (or per field in `names`: a command that takes only some, as
    `omnireel render` the checkpoint, threads, dtype and voices). A flag left out sets nothing (the
    namespace lacks it), so the model's default, or the Serve config file's value, applies: read the
    given ones with `given`; with `defaults`, a flag left out sets the field's default (a command
    with no config file to merge reads the namespace as it is)."""
    unknown = set(names or ()) - set(model.model_fields)
    if unknown:
        raise ValueError(f"{model.__name__} has no field {', '.join(sorted(unknown))}")
    for name, field in model.model_fields.items():
        if names is not None and name not in names:
            continue
        flag = flag_name(name, field)
        default = field.get_default(call_default_factory=True) if defaults else argparse.SUPPRESS
        parser.add_argument(flag, dest=name, default=default, help=flag_help(field),
                            **flag_kind(field, metavar=flag.lstrip("-").replace("-", "_").upper()))


def given(args: argparse.Namespace, model: type[BaseModel]) -> dict:
    """The fields of `model` set on the command line (add_flags), by field name."""
    return {name: getattr(args, name) for name in model.model_fields if hasattr(args, name)}


def flag_help(field: FieldInfo) -> str:
    default = field.get_default(call_default_factory=True)
    shown = "" if default in (None, [], {}) else f" (default {default})"
    return ((field.description or "") + shown).replace("%", "%%")


def flag_kind(field: FieldInfo, metavar: str) -> dict:
    """argparse's action, type, choices and metavar for the field's type."""
    inner = without_none(field.annotation)
    if inner is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(inner) is Literal:
        return {"choices": typing.get_args(inner)}
    if typing.get_origin(inner) is list:                  # repeatable: --api-key A --api-key B
        (item,) = typing.get_args(inner)
        return {"action": "append", "type": FlagValue(item, field.metadata), "metavar": metavar}
    return {"type": FlagValue(field.annotation, field.metadata),
            "metavar": "YAML" if typing.get_origin(inner) is dict else metavar}


def without_none(annotation):
    """Optional[X] -> X."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation


class FlagValue:
    """argparse `type=` of one field: the string read as the field's type within its limits (a dict
    as YAML; `none` for an optional field), else ArgumentTypeError in one line naming the limit."""

    def __init__(self, annotation, metadata: list):
        self.annotation, self.metadata = annotation, metadata
        self.adapter = pydantic.TypeAdapter(typing.Annotated[annotation, *metadata] if metadata else annotation)

    def __call__(self, text: str):
        value = text
        if without_none(self.annotation) is not self.annotation and text.lower() in ("none", "null"):
            value = None
        elif typing.get_origin(without_none(self.annotation)) is dict:
            try:
                value = yaml_value(text)
            except ValueError as e:
                raise argparse.ArgumentTypeError(str(e)) from None
        try:
            return self.adapter.validate_python(value)
        except pydantic.ValidationError as e:
            raise argparse.ArgumentTypeError(describe(e.errors()[0], self.metadata)) from None


def yaml_value(text: str):
    """A value written as YAML (a dict flag, a `--set ARG=VALUE`); ValueError in one line."""
    import yaml
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"not valid YAML ({getattr(e, 'problem', None) or e})") from None


def args_error(error: pydantic.ValidationError, model: type[BaseModel], flags: bool = True) -> str:
    """A model's ValidationError in one line, each violation named by its flag (or, flags=False, by
    its field: a Serve config or --set value) with its limit."""
    parts = []
    for item in error.errors():
        name = str(item["loc"][0]) if item["loc"] else ""
        field = model.model_fields.get(name)
        label = flag_name(name, field) if flags and field else name
        message = describe(item, field.metadata if field else [])
        if item["type"] == "extra_forbidden":
            parts.append(f"{label}: unknown; allowed: {', '.join(model.model_fields)}")
        elif item["type"] == "value_error" and message.startswith(name):   # a validator named the field
            parts.append(label + message[len(name):])
        else:
            parts.append(f"{label}: {message}")
    return "; ".join(parts)


LIMIT_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def describe(item: dict, metadata: list) -> str:
    """One pydantic error as `must be >= 1 (got 0)` / `must be in -20..19 (got 20)` / its message."""
    if item["type"] == "value_error":             # a validator's message names the field already
        return " ".join(str(item["ctx"]["error"]).split())
    if item["type"] in LIMIT_ERRORS:
        message = "must be " + limits(metadata)
    else:
        message = item["msg"][0].lower() + item["msg"][1:]
    shown = item.get("input")
    if isinstance(shown, (str, int, float)) and len(str(shown)) <= 80:
        message += f" (got {shown})"
    return " ".join(message.split())


def limits(metadata: list) -> str:
    """A field's bounds in words: `>= 1`, `> 0`, `in -20..19`."""
    bounds = {key: getattr(item, key) for item in metadata for key in ("ge", "gt", "le", "lt")
              if getattr(item, key, None) is not None}
    if "ge" in bounds and "le" in bounds:
        return f"in {bounds['ge']}..{bounds['le']}"
    words = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    return " and ".join(f"{words[key]} {value}" for key, value in bounds.items())
