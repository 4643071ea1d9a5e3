"""HTTP bodies -> GenerationRequest, with every limit checked before anything is decoded.

A create body is JSON or a form (multipart or urlencoded). A form carries strings only: nested
fields arrive flattened in bracket form (`shots[0][prompt]`, as the openai client sends them) or,
for the structured fields, as one JSON string (`shots='[{"prompt": ...}]'`); both are accepted.
Order of checks: body size (413, before reading past the limit) -> parse (400) -> for each media
upload (input_reference, input_video, input_audio, elements): size (413), then its streams and
duration from the container header (400; no frame or sample is decoded) -> request validation with
the core's GenerationRequest under the app's ReferencePolicy (400 naming the field; reference URIs
meet the allow-list there, the same check manifests and the CLI get).
An upload is decoded here once (a data: URL's base64; a form file is bytes already) and named from
then on by the URI it is stored at, `<storage_uri>/uploads/<sha256>` (admit_request); the ingress
writes it once, then creates the job. A request naming a stored upload itself is a 400 naming the field.
A voice upload (POST /v1/voices) gets the same size check (413) before the registry decodes it.
"""
from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any, Literal, Optional

from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request

from omnireel import media, storage
from omnireel.config import GenerationRequest, ReferencePolicy, parse_request, request_error_message

STRUCTURED_FIELDS = ("shots", "voices", "elements", "physics")
JSON_TYPES = ("application/json",)
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
_BRACKETS = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")


class APIError(Exception):
    """An error answered as the OpenAI error body {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


class VideoCreateBody(BaseModel):
    """POST /v1/videos, as documented in the OpenAPI schema (JSON or form). Structured fields may
    also be given as one JSON string; the core's GenerationRequest validates the values. Media
    references are a form file upload, a base64 data: URL, an allow-listed URI, or {"image_url": ...}."""
    prompt: str
    model: Optional[str] = None
    seconds: Optional[str] = None                  # "4", "0.5"
    size: Optional[str] = None                     # "WxH", e.g. "720x1280"
    input_reference: Optional[Any] = None          # image-to-video: the first frame
    input_video: Optional[Any] = None              # continue this video (its frames lead the clip)
    input_audio: Optional[Any] = None              # audio-driven video: generated to this soundtrack
    mode: Optional[Literal["video", "audio"]] = None   # "audio": the soundtrack alone (an M4A)
    seed: Optional[int] = None
    steps: Optional[int] = None
    fps: Optional[int] = None
    language: Optional[str] = None
    guidance_video: Optional[float] = None
    guidance_audio: Optional[float] = None
    shots: Optional[Any] = None                    # [{"prompt", "seconds", "camera"}] or its JSON string
    storyboard: Optional[Literal["rules", "llm"]] = None   # without shots: who splits the prompt into shots
    voices: Optional[Any] = None                   # [{"character", "voice_id"}] (ids from POST /v1/voices)
    elements: Optional[Any] = None                 # reference images seen by every shot
    physics: Optional[Any] = None                  # {"bodies": [...], "particles": [...], "gravity": [x, y]}


class VoiceCreateBody(BaseModel):
    """POST /v1/voices (multipart/form-data): a reference recording and a name."""
    file: bytes = Field(json_schema_extra={"format": "binary"},
                        description="the recording: WAV, MP3 or FLAC, at least 1 s of speech")
    name: Optional[str] = Field(None, description="a name for the voice, 1 to 64 characters (default: the file name)")


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, or 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large("request body", int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large("request body", size, limit, at_least=True)
        chunks.append(chunk)
    return b"".join(chunks)


def too_large(what: str, size: int, limit: int, at_least: bool = False, param: str | None = None) -> APIError:
    return APIError(413, f"{what} is {'over ' if at_least else ''}{size} bytes; the limit is {limit} bytes",
                    param=param, code="too_large")


async def parse_body(request: Request, body: bytes) -> dict:
    """JSON object or form -> fields (form values: str, or (filename, content_type, bytes) for a file)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type in JSON_TYPES or (not content_type and body.lstrip().startswith(b"{")):
        try:
            fields = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"request body is not valid JSON: {getattr(exc, 'msg', exc)} "
                                f"(at position {getattr(exc, 'pos', 0)})", code="invalid_json")
        if not isinstance(fields, dict):
            raise APIError(400, f"request body must be a JSON object, not {type(fields).__name__}",
                           code="invalid_json")
        return fields
    if content_type in FORM_TYPES:
        return await _parse_form(request, body)
    raise APIError(415, f"Content-Type must be application/json or multipart/form-data "
                        f"(got {content_type or 'none'!r})", code="unsupported_media_type")


async def _parse_form(request: Request, body: bytes) -> dict:
    async def replay():   # the body was already read (bounded); hand it to the form parser once
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_part_size=len(body) + 1)
    except Exception as exc:   # a malformed multipart body
        raise APIError(400, f"malformed form body: {exc}", code="invalid_form")
    items = []
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            value = (value.filename or "", value.content_type or "", await value.read())
        items.append((key, value))
    return decode_structured(unflatten(items))


def unflatten(items: list[tuple[str, Any]]) -> dict:
    """Bracket-flattened form keys -> nested values: `a[0][b]=1` -> {"a": [{"b": "1"}]}; `a[]=1` appends.
    In `a[][b]` (how the openai client flattens a list of objects), the n-th `b` goes to element n,
    whatever order the fields come in; an optional field present in some elements only cannot be
    placed from this form, which is why structured fields are also taken as one JSON string."""
    root: dict = {}
    taken: dict[tuple[int, str], int] = {}        # (list node, field) -> elements that have the field
    for key, value in items:
        match = _BRACKETS.match(key)
        if not match:
            raise APIError(400, f"malformed form field name {key!r}", param=key)
        parts = [match.group(1), *re.findall(r"\[([^\[\]]*)\]", match.group(2))]
        node = root
        for depth, part in enumerate(parts):
            if part == "":                            # `[]`: the next element (for this field)
                following = parts[depth + 1] if depth + 1 < len(parts) else ""
                index = taken.get((id(node), following), 0) if following else len(node)
                taken[(id(node), following)] = index + 1
                part = str(index)
            if depth == len(parts) - 1:
                node[part] = value
                break
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise APIError(400, f"form field {key!r} mixes a value and nested fields", param=key)
    return _lists(root)


def _lists(value):
    """Dicts keyed "0".."n-1" (from brackets) -> lists."""
    if isinstance(value, dict):
        value = {k: _lists(v) for k, v in value.items()}
        if value and all(k.isdigit() for k in value) and sorted(map(int, value)) == list(range(len(value))):
            return [value[str(i)] for i in range(len(value))]
    return value


def decode_structured(fields: dict) -> dict:
    """Structured fields given as one JSON string -> their value."""
    for name in STRUCTURED_FIELDS:
        if isinstance(fields.get(name), str):
            try:
                fields[name] = json.loads(fields[name])
            except json.JSONDecodeError as exc:
                raise APIError(400, f"{name}: not valid JSON ({exc.msg} at position {exc.pos})", param=name)
    return fields


# ---- uploads and references --------------------------------------------------------------------

def reference_policy(limits) -> ReferencePolicy:
    """The app's allow-list (AppArgs.allowed_schemes / allowed_buckets) as the core's ReferencePolicy:
    what a request's reference URIs are validated with (an untrusted caller: no local paths, and no
    stored upload under AppArgs.storage_uri unless admitted, ReferencePolicy.admitting)."""
    buckets = limits.allowed_buckets
    return ReferencePolicy(trusted=False, schemes=tuple(limits.allowed_schemes),
                           buckets=tuple(buckets) if buckets is not None else None,
                           uploads=storage.uploads_prefix(limits.storage_uri) if limits.storage_uri else None)


def check_upload_size(data: bytes, limits, param: str) -> None:
    """413 for an upload over AppArgs.max_upload_bytes, before anything reads it."""
    if len(data) > limits.max_upload_bytes:
        raise too_large(f"{param}: the upload", len(data), limits.max_upload_bytes, param=param)


# the stream a media field needs (an image is a one-frame "video" stream to the demuxer)
NEEDED_STREAM = {"input_reference": "video", "input_video": "video", "input_audio": "audio", "elements": "video"}


def check_upload(data: bytes, limits, param: str = "input_reference") -> list[dict]:
    """Size, then streams and duration read from the container header: nothing is decoded.
    Returns the streams."""
    check_upload_size(data, limits, param)
    try:
        streams = media.probe(data)                 # demuxer header only
    except Exception:
        raise APIError(400, f"{param}: not an image, video or audio file that can be read", param=param)
    if not streams:
        raise APIError(400, f"{param}: the file holds no image, video or audio stream", param=param)
    needed = NEEDED_STREAM.get(param.split(".")[0])
    if needed and not any(s["type"] == needed for s in streams):
        what = {"video": "an image or video", "audio": "an audio"}[needed]
        raise APIError(400, f"{param}: needs {what} stream; the file holds {', '.join(s['type'] for s in streams)}",
                       param=param)
    longest = max((s["duration"] or 0.0) for s in streams)
    if longest > limits.max_upload_seconds:
        raise APIError(400, f"{param}: the upload is {longest:.2f} s long; the limit is "
                            f"{limits.max_upload_seconds:g} s", param=param, code="too_long")
    return streams


MEDIA_FIELDS = ("input_reference", "input_video", "input_audio")   # one reference each; "elements": a list


def check_media_fields(fields: dict, limits) -> dict[str, bytes]:
    """Every media reference of a request (input_reference, input_video, input_audio, elements)
    turned into the string the core's request takes: an upload (a form file or a data: URL, decoded
    here once) by the URI it is stored at once its size, streams and duration passed
    (storage.upload_uri: `<storage_uri>/uploads/<sha256>`; not written yet); a URI as given (the
    core's validation checks it against the allow-list and refuses stored uploads, `reference_policy`).
    Returns the uploads {URI: bytes}: the caller admits them in the policy, then stores them."""
    uploads: dict[str, bytes] = {}

    def reference(value, param: str) -> str:
        value = media_reference(value, limits, param)
        if isinstance(value, bytes):
            uri = storage.upload_uri(limits.storage_uri, value)
            uploads[uri] = value
            return uri
        return value

    for name in MEDIA_FIELDS:
        if fields.get(name) in (None, ""):
            fields.pop(name, None)
        else:
            fields[name] = reference(fields[name], name)
    if isinstance(fields.get("elements"), list):
        fields["elements"] = [reference(v, f"elements.{i}") for i, v in enumerate(fields["elements"])]
    return uploads


URL_KEYS = ("image_url", "video_url", "audio_url", "url")       # {"<key>": URI} reference objects


def media_reference(value, limits, param: str) -> str | bytes:
    """A form file, an OpenAI reference object ({"image_url"} / {"file_id"}), a data: URL or a URI
    -> the bytes of a checked upload (a data: URL's base64 decoded once, here), or the URI (checked
    by the core's validation). No frame or sample is decoded here."""
    if isinstance(value, tuple):                      # a form file: (filename, content_type, bytes)
        data = value[2]
        check_upload(data, limits, param)
        return data
    if isinstance(value, dict):
        if value.get("file_id") is not None:
            raise APIError(400, f"{param}.file_id: file ids are not supported; upload the file or give image_url",
                           param=f"{param}.file_id")
        key = next((k for k in URL_KEYS if k in value), "image_url")
        value = value.get(key)
        param = f"{param}.{key}"
    if not isinstance(value, str) or not value.strip():
        raise APIError(400, f"{param}: give a URL, a base64 data URL or a file upload", param=param)
    value = value.strip()
    if value.startswith("data:"):
        header, _, payload = value.partition(",")
        if len(payload) * 3 // 4 > limits.max_upload_bytes:      # before decoding the base64
            raise too_large(f"{param}: the data URL", len(payload) * 3 // 4, limits.max_upload_bytes, param=param)
        try:
            data = base64.b64decode(payload, validate=True) if header.endswith(";base64") else payload.encode()
        except (binascii.Error, ValueError):
            raise APIError(400, f"{param}: the data URL is not valid base64", param=param)
        check_upload(data, limits, param)
        return data
    return value                                      # a URI: the allow-list is the core's (reference_policy)


# ---- the request ---------------------------------------------------------------------------------

def generation_request(fields: dict, output: str, policy: ReferencePolicy) -> GenerationRequest:
    """The core's request from the API fields (model taken out, media references checked by
    check_media_fields), validated under the app's reference policy."""
    if "output" in fields:
        raise APIError(400, "output: not a field of this API (images: POST /v1/images/generations)", param="output")
    try:
        return parse_request({**fields, "output": output}, policy)
    except ValidationError as exc:
        message = request_error_message(exc)
        raise APIError(400, message, param=".".join(map(str, exc.errors()[0]["loc"])) or named_field(message),
                       code="invalid_value")


def admit_request(fields: dict, output: str, limits, policy: ReferencePolicy) -> tuple[GenerationRequest, dict[str, bytes]]:
    """The validated request of a create's fields, with its uploads (check_media_fields) named by their
    stored URIs, and those uploads {URI: bytes}, still to be written (storage.write_once each) before
    the job is created. Only these uploads are admitted: a request naming any other is a 400."""
    uploads = check_media_fields(fields, limits)
    return generation_request(fields, output, policy.admitting(uploads)), uploads


def named_field(message: str) -> str | None:
    """The (first) field a cross-field message names: "input_reference, input_video: ..." -> input_reference."""
    head, sep, _ = message.partition(": ")
    first = head.split(", ")[0]
    return first if sep and re.fullmatch(r"[A-Za-z_][\w.]*", first) else None


# ---- voices ------------------------------------------------------------------------------------

def voice_upload(fields: dict, limits) -> tuple[bytes, str]:
    """POST /v1/voices fields -> (recording bytes, name): the file is required and its size checked
    (413) before the registry reads it; the registry checks the rest (format, duration, speech)."""
    recording, name = fields.get("file"), fields.get("name")
    if not isinstance(recording, tuple):
        raise APIError(400, "file: required, a WAV, MP3 or FLAC recording sent as a multipart/form-data file",
                       param="file")
    data = recording[2]
    check_upload_size(data, limits, "file")
    if name is not None and not isinstance(name, str):
        raise APIError(400, "name: must be a string", param="name")
    if name is None or not name.strip():
        name = (recording[0] or "").rsplit(".", 1)[0]     # like `omnireel voices add`: the file name
    return data, name
