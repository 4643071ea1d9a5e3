"""The FastAPI ingress: the OpenAI Videos API (and images, models, health) over the JobStore.

The ingress is stateless (any number of replicas): it checks and parses requests, then asks the
JobStore, which owns every job. Routes (shapes as in the `openai` package's types):

    POST   /v1/videos                   create (JSON or multipart) -> Video (status "queued")
    GET    /v1/videos                   cursor list: after, limit (1..100), order -> {data, first_id, last_id, has_more}
    GET    /v1/videos/{id}              Video: status, progress 0-100, created/completed/expires_at,
                                        error {code, message}
    GET    /v1/videos/{id}/content      the MP4 (variant=thumbnail: a PNG of the first frame)
    DELETE /v1/videos/{id}              cancels (job ends failed, code "cancelled") or deletes -> {id, object, deleted}
    POST   /v1/images/generations       one frame through the same pipeline -> {created, data: [{b64_json}]}
    POST   /v1/voices                   register a voice (multipart: file = WAV/MP3/FLAC, name) -> Voice
    GET    /v1/voices                   every voice, oldest first -> {object: "list", data}
    GET    /v1/voices/{id}              Voice: id, name, created_at, speech_seconds, encoder
    DELETE /v1/voices/{id}              -> {id, object: "voice.deleted", deleted}
    GET    /v1/models, /v1/models/{id}  the served model
    GET    /healthz                     the app's health: 200 once every deployment has started, and while
                                        its replicas are busy; 503 "starting" before that, or "unhealthy"
                                        naming each deployment with no running replica (see health())
    GET    /readyz                      readiness (Kubernetes): 200 once started while the API can answer
                                        (Ingress and JobStore running), else 503
    GET    /livez                       liveness: 200 whenever this ingress answers (asks nothing else)
    GET    /metrics                     this node's Prometheus text (Ray's endpoint; OmniReel names carry `ray_`)

Every route but /healthz, /readyz, /livez and /metrics (OPEN_PATHS) needs the API key when AppArgs.api_keys
is set: one FastAPI dependency of the whole app (require_api_key), so no route can forget it.

Errors are {"error": {message, type, param, code}}: 400 bad input, 401 missing/wrong API key, 404
unknown id (a video, a voice, or a voice bound by a create: param voices.<i>.voice_id), 409
Idempotency-Key reuse, 413 too large, 415 content type, 429/503 with Retry-After.

Uploads (a form file or a data: URL in input_reference, input_video, input_audio, elements) are
decoded once here, stored once under `<storage_uri>/uploads/<sha256>` and named by that URI in the
job; the JobStore deletes an upload with the last job naming it.

Voices live in the registry at AppArgs.voices_uri, the one the encode_voice stage reads (and
`omnireel voices` and batch --voice-store share). Registering one runs the speaker encoder here, in
a thread; its weights load on the first registration, never at start-up.
"""
# No `from __future__ import annotations`: FastAPI must see real types on Serve's wrapped methods.
import asyncio
import base64
import hashlib
import io
import logging
import secrets
import time
import urllib.request
import uuid
from typing import Literal, Optional

import av
import ray
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from tenacity import retry, retry_if_exception_type, stop_after_attempt

from omnireel import metrics, storage
from omnireel.checkpoint import read_config, read_digest
from omnireel.config import normalized, request_key
from omnireel.families import get_family
from omnireel.media import encode_png
from omnireel.plan import PlanError, plan_request
from omnireel.storyboard import StoryboardError, StoryboardTask, llm_unavailable, needs_llm_plan, validate_shots
from omnireel.voices import VoiceNotFound, VoiceRegistry, VoiceRejected

from .job_book import IdempotencyConflict, JobRecord, QueueFull, Refusal, UnknownCursor, UploadGone
from .job_store import riding_out_restarts
from .request_parsing import (APIError, VideoCreateBody, VoiceCreateBody, admit_request, parse_body, read_body,
                              reference_policy, voice_upload)
from .stage_replica import REPLICA_LOST

logger = logging.getLogger("ray.serve")

STORE_TIMEOUT_S = 30.0          # how long a request waits for the job store (e.g. while it restarts)
MAX_WAIT_S = 60.0               # longest long poll of GET /v1/videos/{id}?wait_s=
WAIT_MARGIN_S = 2.0             # a long poll answers within wait_s + this, whatever the store does
HEALTH_REFRESH_S = 1.0          # a probe finding the controller's view older than this starts a fresh read
HEALTH_STALE_S = 10.0           # ... and waits for it only when the view is older than this (or absent)
CONTROLLER_TIMEOUT_S = 5.0      # a status read that takes longer keeps the last one (the controller restarts)
UPLOAD_ATTEMPTS = 3             # tries to store a create's uploads and create its job (see _create)
API_DEPLOYMENTS = ("Ingress", "JobStore")   # what /readyz needs: without them no request is answered


# ---- response shapes (documented in /openapi.json) ----------------------------------------------

class VideoError(BaseModel):
    code: str
    message: str


class Video(BaseModel):
    id: str
    object: Literal["video"] = "video"
    model: str
    status: Literal["queued", "in_progress", "completed", "failed"]
    progress: int
    created_at: int
    completed_at: Optional[int] = None
    expires_at: Optional[int] = None
    error: Optional[VideoError] = None
    prompt: Optional[str] = None
    seconds: str
    size: str
    remixed_from_video_id: Optional[str] = None


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Video]
    first_id: Optional[str] = None
    last_id: Optional[str] = None
    has_more: bool


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool


class ImageData(BaseModel):
    b64_json: str


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: Literal["png"] = "png"
    size: str


class Voice(BaseModel):
    id: str
    object: Literal["voice"] = "voice"
    name: str
    created_at: float                 # unix seconds
    speech_seconds: float             # speech left in the recording after trimming silences
    encoder: str                      # the speaker encoder that made the embedding


class VoiceList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Voice]


class VoiceDeleted(BaseModel):
    id: str
    object: Literal["voice.deleted"] = "voice.deleted"
    deleted: bool


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "omnireel"
    family: str                                   # the model family (omni, ltx2, ...)
    limits: dict                                  # what requests it serves: FamilyLimits.describe()


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = {401: "authentication_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


OPEN_PATHS = ("/healthz", "/readyz", "/livez", "/metrics")   # probes and Prometheus's scrape: no API key


async def require_api_key(request: Request) -> None:
    """The one auth check: a dependency of every route of `app` but the OPEN_PATHS. 401 unless the
    request sends `Authorization: Bearer <key>` with one of AppArgs.api_keys (none configured: open)."""
    if getattr(request.scope.get("route"), "path", None) in OPEN_PATHS:
        return
    keys = serve.get_replica_context().servable_object.args.api_keys     # this replica's Ingress
    if not keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not any(secrets.compare_digest(token.strip(), key) for key in keys):
        raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


# App-level, so a route added later needs the key unless its path is listed in OPEN_PATHS.
app = FastAPI(title="OmniReel", version="0.1.0", dependencies=[Depends(require_api_key)],
              description="Text/image/video/audio -> video with native audio, in the OpenAI Videos API's shapes.")


@app.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError):
    return JSONResponse(error_body(exc.status, exc.message, exc.param, exc.code), exc.status, headers=exc.headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"][1:]) or None
    return JSONResponse(error_body(400, f"{param}: {first['msg']}" if param else first["msg"], param,
                                   "invalid_value"), 400)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    return JSONResponse(error_body(exc.status_code, str(exc.detail)), exc.status_code, headers=exc.headers)


@app.middleware("http")
async def _count_requests(request: Request, call_next):
    response = await call_next(request)
    route = request.scope.get("route")
    metrics.record("omnireel_http_requests", route=getattr(route, "path", "unmatched"), code=str(response.status_code))
    return response


# Helpers come before the deployment class: Serve pickles the class when it is decorated.
def deployment_health(app, started: bool) -> dict:
    """Each deployment of `app` (a serve.status() ApplicationStatusOverview) sorted into running,
    waiting (no running replica yet, before the app has `started`), unhealthy (no running replica
    after that, or its deployment failed) and degraded (running, but some replica failed a check)."""
    started = started or app.status == "RUNNING"
    health = {"deployments": {}, "waiting_for": [], "unhealthy": {}, "degraded": {}}
    for name, deployment in sorted(app.deployments.items()):
        states = {str(getattr(k, "value", k)): n for k, n in deployment.replica_states.items() if n}
        running = states.get("RUNNING", 0)
        status = str(getattr(deployment.status, "value", deployment.status))
        health["deployments"][name] = {"status": status, "running": running}
        reason = f"{status}: {deployment.message}" if deployment.message else status
        if running == 0 and (started or status == "DEPLOY_FAILED"):
            others = ", ".join(f"{k} {n}" for k, n in sorted(states.items())) or "none"
            health["unhealthy"][name] = f"no running replica (replicas: {others}); {reason}"
        elif running == 0:
            health["waiting_for"].append(name)
        elif status in ("UNHEALTHY", "DEPLOY_FAILED"):      # e.g. one replica of two failed its check
            health["degraded"][name] = reason
    return health


def unknown(video_id: str) -> APIError:
    return APIError(404, f"no video with id {video_id!r}", param="video_id", code="not_found")


def unknown_voice(exc: VoiceNotFound) -> APIError:
    return APIError(404, str(exc), param=exc.field or "voice_id", code="voice_not_found")


def voice_object(voice) -> dict:
    return {**voice.public(), "object": "voice"}


MEDIA_TYPES = {"mp4": "video/mp4", "m4a": "audio/mp4", "png": "image/png"}


def media_type(artifact_uri: str) -> str:
    """The Content-Type of an artifact, from its extension (config.artifact_extension's rule)."""
    return MEDIA_TYPES.get(artifact_uri.rsplit(".", 1)[-1], "application/octet-stream")


def first_frame_png(mp4: bytes) -> bytes:
    """The first frame of an MP4 (or the PNG itself), as PNG; decodes one frame only."""
    if mp4[:8] == b"\x89PNG\r\n\x1a\n":
        return mp4
    with av.open(io.BytesIO(mp4)) as container:
        frame = next(container.decode(video=0)).to_ndarray(format="rgb24")   # (H, W, 3)
    return encode_png(frame)


CREATE_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": VideoCreateBody.model_json_schema()},
    "multipart/form-data": {"schema": VideoCreateBody.model_json_schema()}}}}
VOICE_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": VoiceCreateBody.model_json_schema()}}}}


@serve.deployment
@serve.ingress(app)
class Ingress:
    def __init__(self, args, store, runner, stages: dict, planner=None):
        self.args, self.store = args, store      # runner, stages: bound here so that the app deploys them
        self.planner = planner                   # the StoryboardPlanner's handle, None where it cannot run
        config = read_config(args.checkpoint)
        self.config, self.digest = config, read_digest(args.checkpoint)
        self.family = get_family(config.family)
        self.model_id = args.model_name or self.family.model_id(config)
        self.limits = self.family.limits_for(config)     # this checkpoint's (Wan TI2V-5B: sides of 32)
        self.started = int(time.time())
        self.policy = reference_policy(args)                 # the allow-list, as the core validates it
        self.voices = VoiceRegistry(args.voices_uri)         # the speaker encoder loads on the first add
        self._app_name = serve.get_replica_context().app_name
        self._status, self._status_at, self._status_read = None, 0.0, None   # the controller's view (_health)
        self._started = False

    # -- videos --

    @app.post("/v1/videos", response_model=Video, openapi_extra=CREATE_BODY)
    async def create_video(self, request: Request) -> dict:
        fields = await parse_body(request, await read_body(request, self.args.max_body_bytes))
        record = await self._create(request, fields, "video")
        return record.video()

    @app.get("/v1/videos", response_model=VideoList)
    async def list_videos(self, after: Optional[str] = None,
                          limit: int = Query(20, ge=1, le=100), order: Literal["asc", "desc"] = "desc") -> dict:
        try:
            records, has_more = await self._ask_store("listing", "video", after, limit, order)
        except UnknownCursor as exc:
            raise APIError(400, str(exc), param="after")
        data = [r.video() for r in records]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": has_more}

    @app.get("/v1/videos/{video_id}", response_model=Video)
    async def retrieve_video(self, video_id: str,
                             wait_s: float = Query(0, ge=0, le=MAX_WAIT_S, description=(
                                 "long poll (an OmniReel extension): answer as soon as the job has ended, "
                                 f"or after this many seconds (at most {MAX_WAIT_S:g}) with its state then"))) -> dict:
        record = await self._video(video_id)
        if wait_s and record.active:     # answered by wait_s + WAIT_MARGIN_S even if the store is slow or away
            try:
                record = await self._ask_store("wait", video_id, wait_s, timeout_s=wait_s + WAIT_MARGIN_S) or record
            except APIError:
                pass                     # the state read above stands
        return record.video()

    @app.get("/v1/videos/{video_id}/content", response_class=Response,
             responses={200: {"content": {"video/mp4": {}, "image/png": {}}}})
    async def download_content(self, video_id: str,
                               variant: Literal["video", "thumbnail", "spritesheet"] = "video") -> Response:
        record = await self._video(video_id)
        if record.status != "completed":
            raise APIError(400, f"video {video_id} has no content: its status is {record.status}",
                           param="video_id", code="not_ready")
        if variant == "spritesheet":
            raise APIError(400, "variant: 'spritesheet' is not available; use 'video' or 'thumbnail'", param="variant")
        try:
            data = await asyncio.to_thread(storage.read_bytes, record.artifact)
        except FileNotFoundError:
            raise APIError(404, f"the content of video {video_id} is gone (deleted or expired)", param="video_id")
        if variant == "thumbnail":
            if media_type(record.artifact) == "audio/mp4":
                raise APIError(400, f"variant: video {video_id} is audio alone (mode 'audio'); it has no thumbnail",
                               param="variant")
            return Response(await asyncio.to_thread(first_frame_png, data), media_type="image/png")
        return Response(data, media_type=media_type(record.artifact))

    @app.delete("/v1/videos/{video_id}", response_model=VideoDeleted)
    async def delete_video(self, video_id: str) -> dict:
        await self._video(video_id)
        if await self._ask_store("delete", video_id) is None:
            raise unknown(video_id)
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    # -- images --

    @app.post("/v1/images/generations", response_model=ImagesResponse)
    async def generate_image(self, request: Request) -> dict:
        fields = await parse_body(request, await read_body(request, self.args.max_body_bytes))
        fields.pop("user", None)
        if fields.pop("n", 1) not in (1, "1"):
            raise APIError(400, "n: only 1 image per request is supported", param="n")
        if fields.pop("response_format", None) not in (None, "b64_json"):
            raise APIError(400, "response_format: only 'b64_json' is supported", param="response_format")
        if fields.pop("output_format", None) not in (None, "png"):
            raise APIError(400, "output_format: only 'png' is supported", param="output_format")
        record = await self._create(request, fields, "image")
        record = await self._ask_store("wait", record.id, self.args.job_timeout_s,
                                       timeout_s=self.args.job_timeout_s + 30)
        if record is None or record.status != "completed":
            error = record.error if record is not None and record.error else None
            raise APIError(500, f"image generation failed: {error.message if error else 'no result'}",
                           code=error.code if error else None)
        png = await asyncio.to_thread(storage.read_bytes, record.artifact)
        return {"created": int(record.created_at), "data": [{"b64_json": base64.b64encode(png).decode()}],
                "output_format": "png", "size": record.request["size"]}

    # -- voices --

    @app.post("/v1/voices", response_model=Voice, openapi_extra=VOICE_BODY)
    async def create_voice(self, request: Request) -> dict:
        fields = await parse_body(request, await read_body(request, self.args.max_body_bytes))
        recording, name = voice_upload(fields, self.args)            # 413 before anything decodes it
        try:
            voice = await asyncio.to_thread(self.voices.add, recording, name)
        except VoiceRejected as exc:
            param = "name" if str(exc).startswith("name") else "file"
            message = str(exc) if param == "name" else f"file: {exc}"
            raise APIError(400, message, param=param, code="voice_rejected")
        return voice_object(voice)

    @app.get("/v1/voices", response_model=VoiceList)
    async def list_voices(self) -> dict:
        voices = await asyncio.to_thread(self.voices.list)
        return {"object": "list", "data": [voice_object(v) for v in voices]}

    @app.get("/v1/voices/{voice_id}", response_model=Voice)
    async def retrieve_voice(self, voice_id: str) -> dict:
        try:
            return voice_object(await asyncio.to_thread(self.voices.get, voice_id))
        except VoiceNotFound as exc:
            raise unknown_voice(exc)

    @app.delete("/v1/voices/{voice_id}", response_model=VoiceDeleted)
    async def delete_voice(self, voice_id: str) -> dict:
        try:
            await asyncio.to_thread(self.voices.delete, voice_id)
        except VoiceNotFound as exc:
            raise unknown_voice(exc)
        return {"id": voice_id, "object": "voice.deleted", "deleted": True}

    # -- models, health, metrics --

    @app.get("/v1/models", response_model=ModelList)
    async def list_models(self) -> dict:
        return {"object": "list", "data": [self._model()]}

    @app.get("/v1/models/{model_id}", response_model=Model)
    async def retrieve_model(self, model_id: str) -> dict:
        if model_id != self.model_id:
            raise APIError(404, f"model {model_id!r} not found; this server serves {self.model_id!r}", param="model")
        return self._model()

    @app.get("/healthz", responses={503: {"description": "starting, or a deployment is unhealthy"}})
    async def healthz(self) -> JSONResponse:
        """The app's health as the Serve controller sees it (it health-checks every replica itself,
        beside the request queues, so a busy replica is never mistaken for a missing one): 200 once
        every deployment has a running replica, and from then on while each still has one, however
        busy; 503 "starting" before that; 503 "unhealthy" naming each deployment with no running
        replica (dead, or its replicas failed their health checks) or whose deployment failed."""
        health = await self._health()
        if health["unhealthy"]:
            body = {"status": "unhealthy", "unhealthy": health["unhealthy"]}
        elif health["waiting_for"]:
            body = {"status": "starting", "waiting_for": health["waiting_for"]}
        else:
            body = {"status": "ok", "model": self.model_id, "deployments": health["deployments"]}
            return JSONResponse(body | ({"degraded": health["degraded"]} if health["degraded"] else {}))
        return JSONResponse(body, 503, headers={"Retry-After": str(self.args.retry_after_s)})

    @app.get("/readyz", responses={503: {"description": "starting, or the API cannot answer"}})
    async def readyz(self) -> JSONResponse:
        """Readiness: 200 once every deployment has started, and then while the API can answer (the
        ingress and the job store are running; a stage being replaced leaves jobs queued, not refused)."""
        health = await self._health()
        down = {name: why for name, why in health["unhealthy"].items() if name in API_DEPLOYMENTS}
        if down:
            body = {"status": "unhealthy", "unhealthy": down}
        elif health["waiting_for"]:
            body = {"status": "starting", "waiting_for": health["waiting_for"]}
        else:
            return JSONResponse({"status": "ready", **({"degraded": sorted(health["unhealthy"])}
                                                       if health["unhealthy"] else {})})
        return JSONResponse(body, 503, headers={"Retry-After": str(self.args.retry_after_s)})

    @app.get("/livez")
    async def livez(self) -> dict:
        """Liveness: this ingress answers. It asks nothing else, so no load or other deployment fails it."""
        return {"status": "alive"}

    @app.get("/metrics", response_class=Response)
    async def prometheus_metrics(self) -> Response:
        """This node's metrics from Ray's Prometheus endpoint (what Prometheus scrapes per node)."""
        node_id = ray.get_runtime_context().get_node_id()
        node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        scraped = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read())
        return Response(scraped, media_type="text/plain; version=0.0.4")

    # -- helpers --

    async def _health(self) -> dict:
        """{deployments: {name: {status, running}}, waiting_for: [names], unhealthy: {name: reason},
        degraded: {name: reason}} from the controller's view of this app (_app_status). "Started"
        latches once every deployment has had a running replica (or the app was RUNNING): after that a
        missing replica is unhealthy, never "starting" again."""
        app = await self._app_status()
        if app is None:
            return {"deployments": {}, "waiting_for": ["ServeController"], "unhealthy": {}, "degraded": {}}
        health = deployment_health(app, self._started)
        self._started = self._started or not health["waiting_for"] and not health["unhealthy"]
        return health

    async def _app_status(self):
        """This app's ApplicationStatusOverview (serve.status(): the controller's view, under a second
        old). A probe answers from the view it finds and, when that is older than HEALTH_REFRESH_S,
        starts one fresh read in the background, so a probe never waits on the controller (a status read
        takes 0.2-2 s on a loaded node) unless the view is older than HEALTH_STALE_S. While the
        controller does not answer (it restarts; the data plane runs on without it) the last view stands."""
        age = time.monotonic() - self._status_at
        if age >= HEALTH_REFRESH_S and (self._status_read is None or self._status_read.done()):
            self._status_read = asyncio.ensure_future(self._read_status())
        if self._status is None or age >= HEALTH_STALE_S:
            await asyncio.wait({self._status_read}, timeout=CONTROLLER_TIMEOUT_S)
        return self._status

    async def _read_status(self) -> None:
        try:
            status = await asyncio.wait_for(asyncio.to_thread(serve.status), CONTROLLER_TIMEOUT_S)
        except Exception as exc:        # a controller restart or timeout: keep what was seen last
            logger.warning("/healthz: no status from the Serve controller (%s)", type(exc).__name__)
            return
        if self._app_name in status.applications:
            self._status, self._status_at = status.applications[self._app_name], time.monotonic()

    def _model(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.started, "owned_by": "omnireel",
                "family": self.family.name, "limits": self.limits.describe()}

    async def _create(self, request: Request, fields: dict, kind: str) -> JobRecord:
        model = fields.pop("model", None)
        if model not in (None, "", self.model_id):
            raise APIError(400, f"model: unknown model {model!r}; this server serves {self.model_id!r}",
                           param="model", code="model_not_found")
        generation, uploads = admit_request(fields, "image" if kind == "image" else "video", self.args, self.policy)
        if needs_llm_plan(generation):            # planned once, here: the job carries the shots
            generation = await self._plan_storyboard(generation)
        try:
            plan_request(generation, self.config)
        except PlanError as exc:
            raise APIError(400, str(exc), param=exc.field, code="invalid_value")
        try:                                      # an unknown voice is a 404 now, never a job that fails later
            await asyncio.to_thread(self.voices.check_bindings, generation.voices)
        except VoiceNotFound as exc:
            raise unknown_voice(exc)
        create = (kind, self.model_id, normalized(generation), request_key(generation, self.digest),
                  self._idempotency_key(request), sorted(uploads))
        try:
            return await self._store_uploads_and_create(uploads, create)
        except UploadGone:
            raise APIError(503, "uploads were collected while the job was being created; retry",
                           code="unavailable", headers={"Retry-After": str(self.args.retry_after_s)})
        except (QueueFull, IdempotencyConflict) as exc:
            if uploads:                           # no job names them: the store drops those no other job names
                await self._ask_store("release", sorted(uploads))
            if isinstance(exc, QueueFull):
                raise APIError(429, str(exc), code="queue_full",
                               headers={"Retry-After": str(self.args.retry_after_s)})
            raise APIError(409, str(exc), code="idempotency_conflict")

    @retry(retry=retry_if_exception_type(UploadGone), stop=stop_after_attempt(UPLOAD_ATTEMPTS), reraise=True)
    async def _store_uploads_and_create(self, uploads: dict, create: tuple) -> JobRecord:
        """Writes the uploads (absent ones only) before the job that names them exists, then creates the
        job; the store checks they still exist as it does (a job deleted meanwhile may have taken them:
        UploadGone, and this runs again, up to UPLOAD_ATTEMPTS times in all)."""
        await asyncio.to_thread(lambda: [storage.write_once(uri, data) for uri, data in uploads.items()])
        record, _ = await self._ask_store("create", *create)
        return record

    async def _plan_storyboard(self, generation):
        """The request with the StoryboardPlanner's shots; 400 naming `storyboard` where it cannot plan it."""
        if self.planner is None:
            raise APIError(400, llm_unavailable(self.args.storyboard_model) or "storyboard: 'llm' is not available here",
                           param="storyboard", code="storyboard_unavailable")
        try:
            planned = await self.planner.plan.remote(StoryboardTask.of(generation))
        except REPLICA_LOST:
            raise APIError(503, "the storyboard planner is not answering; retry later", code="unavailable",
                           headers={"Retry-After": str(self.args.retry_after_s)})
        try:
            if "error" in planned:
                raise StoryboardError(planned["error"])
            return generation.model_copy(update={"shots": validate_shots(planned["shots"])})
        except StoryboardError as exc:
            raise APIError(400, str(exc), param="storyboard", code="storyboard_unavailable")

    def _idempotency_key(self, request: Request) -> str:
        """The client's Idempotency-Key (scoped to its API key), or a fresh one so that this
        ingress can retry the create safely while the store restarts."""
        given = request.headers.get("idempotency-key")
        if not given:
            return f"request:{uuid.uuid4().hex}"
        scope = hashlib.sha256(request.headers.get("authorization", "").encode()).hexdigest()[:16]
        return f"{scope}:{given}"

    async def _video(self, video_id: str) -> JobRecord:
        record = await self._ask_store("get", video_id)
        if record is None or record.kind != "video":
            raise unknown(video_id)
        return record

    async def _ask_store(self, method: str, *args, timeout_s: float = STORE_TIMEOUT_S):
        """A JobStore call; retried while the store restarts, 503 if it stays away."""
        deadline = time.monotonic() + timeout_s
        try:
            async for attempt in riding_out_restarts(timeout_s, wait_s=0.25):
                with attempt:
                    result = await asyncio.wait_for(getattr(self.store, method).remote(*args),
                                                    max(0.1, deadline - time.monotonic()))
        except (*REPLICA_LOST, asyncio.TimeoutError):
            raise APIError(503, "the job store is not answering; retry later", code="unavailable",
                           headers={"Retry-After": str(self.args.retry_after_s)})
        if isinstance(result, Refusal):
            raise result
        return result
