"""The batch manifest: a Parquet file (or a folder of them), one row per video; its columns, and the
validation of one row, which IS the request validator (config.GenerationRequest) plus the planner.

Columns: `id` (string or integer, unique) and one column per GenerationRequest field, so a field
added to the request model is a manifest column with no change here. Only `id` and `prompt` are
required; a null, NaN or absent value takes the request's default. Structured fields (shots,
voices, elements, physics, ...) are either nested Arrow values (list<struct<...>>, list<string>) or
the same as a JSON string. A manifest is untrusted input: reference URIs pass the request model's
allow-list (DESIGN.md §4). A row asking for an LLM storyboard (`storyboard: llm`, no shots) is left
for the batch's planner pool (pipelines/triage.py) when the run has one (`plan_llm`), else refused
naming `storyboard` (plan.py says why the LLM planner cannot run).
"""
from __future__ import annotations

import json
import math
import typing
from dataclasses import dataclass

import pydantic

from omnireel.config import GenerationRequest, request_error_message
from omnireel.model.config import ModelConfig
from omnireel.plan import PlanError, plan_request
from omnireel.storyboard import needs_llm_plan

REQUIRED = ("id", "prompt")
REQUEST_COLUMNS = tuple(GenerationRequest.model_fields)
COLUMNS = ("id", *REQUEST_COLUMNS)
MAX_ID_CHARS = 256


class ManifestError(ValueError):
    """The manifest as a whole cannot be used (missing or unknown columns); one line."""


def check_columns(names) -> None:
    missing = [c for c in REQUIRED if c not in names]
    unknown = [c for c in names if c not in COLUMNS]
    if missing:
        raise ManifestError(f"manifest: missing required column(s) {', '.join(missing)}")
    if unknown:
        raise ManifestError(f"manifest: unknown column(s) {', '.join(unknown)}; allowed: {', '.join(COLUMNS)}")


@dataclass
class CheckedRow:
    """One manifest row after validation: its request, or the field and the reason it was refused."""
    id: str
    request: GenerationRequest | None = None
    field: str = ""
    message: str = ""


def check_row(row: dict, config: ModelConfig, plan_llm: bool = False) -> CheckedRow:
    """Validates one manifest row (column -> value, as pyarrow's to_pylist gives it). With `plan_llm`
    a request waiting for its LLM storyboard passes as it is (needs_llm_plan): the planner pool plans
    it and then checks its plan."""
    values = {k: v for k, v in row.items() if not _missing(v)}
    row_id = values.pop("id", None)
    if isinstance(row_id, int) and not isinstance(row_id, bool):
        row_id = str(row_id)
    if not isinstance(row_id, str) or not row_id.strip():
        return CheckedRow("", field="id", message="id: required, a non-empty string")
    if len(row_id) > MAX_ID_CHARS:
        return CheckedRow(row_id[:MAX_ID_CHARS], field="id",
                          message=f"id: must be at most {MAX_ID_CHARS} characters (got {len(row_id)})")
    for name, value in values.items():
        if isinstance(value, str) and name in STRUCTURED:
            try:
                values[name] = json.loads(value)
            except json.JSONDecodeError as e:
                return CheckedRow(row_id, field=name, message=f"{name}: not valid JSON ({e.msg} at position {e.pos})")
    try:
        request = GenerationRequest(**values)
        if plan_llm and needs_llm_plan(request):  # every other field checked now, with the rules' shots
            plan_request(request.model_copy(update={"storyboard": "rules"}), config)
        else:                                     # refuses an LLM storyboard nobody will plan, naming the field
            plan_request(request, config)
    except pydantic.ValidationError as e:
        message = request_error_message(e)        # "<field path>: <reason>; ..."
        return CheckedRow(row_id, field=message.split(":", 1)[0], message=message)
    except PlanError as e:
        return CheckedRow(row_id, field=e.field, message=str(e))
    return CheckedRow(row_id, request=request)


def _structured(annotation) -> bool:
    """Whether a field holds lists or objects (so a JSON string may stand for it)."""
    if typing.get_origin(annotation) in (list, tuple, dict) or annotation in (list, tuple, dict):
        return True
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return True
    return any(_structured(arg) for arg in typing.get_args(annotation))


STRUCTURED = frozenset(name for name, f in GenerationRequest.model_fields.items() if _structured(f.annotation))


def _missing(value) -> bool:
    """Null, or NaN (what pandas writes for a missing number)."""
    return value is None or (isinstance(value, float) and math.isnan(value))
