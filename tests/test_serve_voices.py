"""The HTTP side of the Omni features on the session's Serve app (conftest.py `served`, tiny preset):

- voices: real espeak-ng recordings registered through POST /v1/voices, listed, read and deleted;
  unusable recordings refused with the reason (400), oversized uploads refused before decoding (413),
  unknown ids 404 (GET, DELETE, and a voice bound by POST /v1/videos: no job is made);
- a voice registered over HTTP resolves identically in the CLI's engine, in Serve and in batch: the
  encode_voice stage reads the same speaker embedding, and the latents agree;
- input_video / input_audio / mode through HTTP: allow-listed URIs, uploads, audio alone as an M4A;
- the storyboard field: the rule-based planner end to end, and 'llm' without vLLM refused naming it.
"""
from __future__ import annotations

import base64
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from omnireel import media, storage
from omnireel.config import GenerationRequest, request_key
from omnireel.stages import STAGE_GRAPH, run_stage

from media_support import encode_wav
from serve_support import TINY, create, psnr, served_latents, wait_done
from voice_support import silent_wav, speak, transcode

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

STAGES = {stage.name: stage for stage in STAGE_GRAPH}
SENTENCE = "Please call Stella and ask her to bring these things with her from the store."
# the tiny request of the parity checks: 4 frames, 2 steps, one bound character
BOUND = dict(prompt="ANNA says hello", seconds=0.5, size="32x32", fps=8, steps=2, seed=3)
MAX_ERROR = 1e-4                          # "equal to LocalEngine" (DESIGN.md §2)


def mp3(wav: bytes) -> bytes:
    """The served app takes uploads up to 64 KiB: an espeak-ng sentence fits as MP3 (~16 KB)."""
    return transcode(wav, "libmp3lame", "mp3")


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> dict[str, bytes]:
    tmp = tmp_path_factory.mktemp("speech")
    return {voice: mp3(speak(SENTENCE, f"en+{voice}", tmp)) for voice in ("f4", "m3")}


def register(http, recording: bytes, name: str, filename: str = "speech.mp3"):
    return http.post("/v1/voices", data={"name": name}, files={"file": (filename, recording, "audio/mpeg")})


@pytest.fixture(scope="module")
def voices(served, speech) -> dict[str, dict]:
    """Both recordings registered through the API: espeak voice -> the Voice object."""
    with served.http() as http:
        registered = {}
        for voice, recording in speech.items():
            response = register(http, recording, f"en+{voice}")
            assert response.status_code == 200, response.text
            registered[voice] = response.json()
    return registered


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


# ---- the voice endpoints ---------------------------------------------------------------------------

def test_voices_are_registered_listed_read_and_deleted(served, voices, speech):
    anna = voices["f4"]
    assert anna["object"] == "voice" and anna["id"].startswith("voice_") and anna["name"] == "en+f4"
    assert anna["encoder"] == "resemblyzer-ge2e" and 1.0 <= anna["speech_seconds"] <= 10.0
    assert "embedding" not in anna
    with served.http() as http:
        assert http.get(f"/v1/voices/{anna['id']}").json() == anna
        listed = http.get("/v1/voices").json()
        assert listed["object"] == "list" and {v["id"] for v in listed["data"]} >= {v["id"] for v in voices.values()}
        assert all(v["object"] == "voice" for v in listed["data"])

        extra = register(http, speech["m3"], "  ", filename="lee.mp3")   # a blank name: the file name
        assert extra.status_code == 200, extra.text
        extra = extra.json()
        assert extra["name"] == "lee"
        assert (served.voices / f"{extra['id']}.json").is_file()       # durable, in AppArgs.voices_uri
        assert http.delete(f"/v1/voices/{extra['id']}").json() == {
            "id": extra["id"], "object": "voice.deleted", "deleted": True}
        assert not (served.voices / f"{extra['id']}.json").exists()
        assert extra["id"] not in {v["id"] for v in http.get("/v1/voices").json()["data"]}
        for method in ("get", "delete"):
            error = error_of(getattr(http, method)(f"/v1/voices/{extra['id']}"), 404)
            assert error["message"] == f"unknown voice {extra['id']!r}" and error["param"] == "voice_id"

    with served.http(key=None) as http:
        assert http.get("/v1/voices").status_code == 401
        assert register(http, speech["m3"], "x").status_code == 401
        paths = http.get("/openapi.json").json()["paths"]
    assert {"get", "post"} <= set(paths["/v1/voices"]) and {"get", "delete"} <= set(paths["/v1/voices/{voice_id}"])
    form = paths["/v1/voices"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"file", "name"} <= set(form["properties"])


@pytest.mark.parametrize("make,reason", [
    (lambda tmp: mp3(speak("Hi.", "en+m3", tmp)), "file: recording is too short:"),
    (lambda tmp: silent_wav(1.5, 8000), "file: recording is silent (digital silence"),
    (lambda tmp: b"this is not audio at all" * 40, "file: recording not a readable audio file"),
    (lambda tmp: media.encode_png(np.zeros((8, 8, 3), np.uint8)), "is not accepted; use one of wav, mp3, flac"),
], ids=["too-short", "silent", "not-audio", "an-image"])
def test_unusable_recordings_get_400_with_the_reason(served, voices, tmp_path, make, reason):
    with served.http() as http:
        before = http.get("/v1/voices").json()["data"]
        error = error_of(register(http, make(tmp_path), "bad"), 400)
        assert reason in error["message"] and error["param"] == "file" and "\n" not in error["message"]
        assert http.get("/v1/voices").json()["data"] == before                # nothing stored


def test_a_voice_request_without_a_file_or_with_a_bad_name_gets_400(served, speech):
    with served.http() as http:
        error = error_of(http.post("/v1/voices", data={"name": "anna"}), 400)
        assert error["param"] == "file" and "file: required" in error["message"]
        error = error_of(http.post("/v1/voices", json={"name": "anna", "file": "UklGRg=="}), 400)
        assert error["param"] == "file"
        error = error_of(register(http, speech["f4"], "n" * 65), 400)
        assert error["param"] == "name" and "name must be 1 to 64 characters" in error["message"]


def test_an_oversized_recording_gets_413_before_it_is_decoded(served):
    """Over max_upload_bytes (64 KiB): 413 even for bytes no decoder could read, so nothing read them."""
    with served.http() as http:
        for data in (b"\0" * (65 << 10), silent_wav(3.0, 16000)):          # 66560 and 96044 bytes
            error = error_of(register(http, data, "big", filename="big.wav"), 413)
            assert error["message"] == f"file: the upload is {len(data)} bytes; the limit is 65536 bytes"


def test_an_unknown_bound_voice_is_a_404_and_no_job(served, voices):
    anna = voices["f4"]["id"]
    with served.http() as http:
        before = [v["id"] for v in http.get("/v1/videos", params={"limit": 100}).json()["data"]]
        bindings = [{"character": "ANNA", "voice_id": anna}, {"character": "BOB", "voice_id": "voice_nobody"}]
        error = error_of(http.post("/v1/videos", json={"prompt": "ANNA and BOB talk", **TINY, "voices": bindings}), 404)
        assert error["param"] == "voices.1.voice_id" and error["message"] == \
            "voices.1.voice_id: unknown voice 'voice_nobody'"
        form = {"prompt": "BOB talks", **{k: str(v) for k, v in TINY.items()},
                "voices": json.dumps([{"character": "BOB", "voice_id": "voice_gone"}])}
        assert error_of(http.post("/v1/videos", data=form), 404)["param"] == "voices.0.voice_id"
        after = [v["id"] for v in http.get("/v1/videos", params={"limit": 100}).json()["data"]]
    assert after == before


# ---- one voice, three drivers ----------------------------------------------------------------------

def test_a_bound_voice_resolves_identically_in_the_cli_serve_and_batch(served, voices, ray_session,
                                                                      tiny_checkpoint, tmp_path, monkeypatch):
    from ray import serve

    from omnireel.cli import main as cli_main
    from omnireel.deployments.app import APP_NAME
    from omnireel.deployments.stage_replica import NO_JOB
    from omnireel.engine import LocalEngine
    from omnireel.pipelines import rows
    from omnireel.pipelines.render import LATENTS_EXTENSION
    from omnireel.plan import plan_request
    from omnireel.voices import VoiceRegistry

    from batch_support import driver_env, write_manifest

    store = str(served.voices)                # registered over HTTP; the CLI and batch are pointed at it
    anna, bob = voices["f4"], voices["m3"]
    bound = [{"character": "ANNA", "voice_id": anna["id"]}]
    request = GenerationRequest(**BOUND, voices=bound)
    embedding = torch.tensor([VoiceRegistry(store).get(anna["id"]).embedding])

    # the CLI's engine: LocalEngine on the --voice-store registry
    engine = LocalEngine(tiny_checkpoint, voices=store)
    plan = plan_request(request, engine.config)
    local_voice = run_stage(STAGES["encode_voice"], engine.components, {"plan": plan})
    assert torch.equal(local_voice.speakers, embedding)
    local = engine.render(request)
    other = engine.render(GenerationRequest(**BOUND, voices=[{"character": "ANNA", "voice_id": bob["id"]}]))
    # the voice reaches the latents by more than the parity tolerance, so the checks below can tell voices apart
    assert (local.latents.video - other.latents.video).abs().max() > MAX_ERROR

    # ... and the command line itself, on the same registry
    monkeypatch.delenv("OMNIREEL_VOICES", raising=False)     # only --voice-store leads to the registry
    out = tmp_path / "cli.mp4"
    cli_main(["render", BOUND["prompt"], "--voice", f"ANNA={anna['id']}", "--voice-store", store, "-q",
              "-o", str(out), "--checkpoint", str(tiny_checkpoint), "--seconds", "0.5", "--size", "32x32",
              "--fps", "8", "--steps", "2", "--seed", "3"])
    assert np.array_equal(media.decode_video(out.read_bytes()), media.decode_video(local.artifact.data))

    # Serve: the VoiceEncoder replica reads the same embedding; the job completes with the voice bound
    voice_stage = serve.get_deployment_handle("VoiceEncoder", APP_NAME)
    served_voice = voice_stage.run.remote("encode_voice", NO_JOB, plan).result(timeout_s=120)
    assert torch.equal(served_voice.speakers, embedding)
    with served.http() as http:
        video = create(http, **{**BOUND, "seconds": "0.5"}, voices=bound)
        assert wait_done(http, video["id"])["status"] == "completed"
        mp4 = http.get(f"/v1/videos/{video['id']}/content").content
    assert psnr(media.decode_video(mp4), media.decode_video(local.artifact.data)) >= 40
    latents = served_latents(request)
    assert (latents.video - local.latents.video).abs().max() <= MAX_ERROR
    assert (latents.audio - local.latents.audio).abs().max() <= MAX_ERROR

    # batch: a one-row manifest, the same registry as --voice-store, latents saved beside the artifact
    manifest = write_manifest(str(tmp_path / "manifest.parquet"),
                              [{"id": "anna", **BOUND, "voices": json.dumps(bound)}])
    out_uri = str(tmp_path / "batch")
    proc = subprocess.run([sys.executable, "-m", "omnireel.pipelines.render", manifest, "--out", out_uri,
                           "--checkpoint", str(tiny_checkpoint), "--threads", "2", "--save-latents",
                           "--voice-store", store, "-q"],
                          env=driver_env(ray_session), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    key = request_key(request, engine.digest)
    batch = rows.decode_payload("latents", storage.read_bytes(storage.artifact_uri(out_uri, key, LATENTS_EXTENSION)))
    assert (batch.video - local.latents.video).abs().max() <= MAX_ERROR
    assert (batch.audio - local.latents.audio).abs().max() <= MAX_ERROR


# ---- input_video, input_audio, mode ------------------------------------------------------------------

def clip_mp4(frames: int = 4) -> bytes:
    return media.encode_video(np.stack([np.full((32, 32, 3), 50 * i, np.uint8) for i in range(frames)]), fps=8)


def tone_wav(seconds: float, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    return encode_wav((0.4 * np.sin(2 * np.pi * 330 * t)).astype(np.float32), rate)


@pytest.mark.parametrize("fields,param,fragment", [
    ({"input_video": "s3://someone-elses-bucket/clip.mp4"}, "input_video", "not in the allow-list"),
    ({"input_audio": "file:///etc/passwd"}, "input_audio", "scheme 'file' is not allowed"),
    ({"input_video": {"video_url": "http://example.com/clip.mp4"}}, "input_video", "scheme 'http' is not allowed"),
    ({"input_audio": {"audio_url": "https://10.1.2.3/a.wav"}}, "input_audio", "private"),
    ({"input_video": "/etc/passwd"}, "input_video", "local paths are not allowed"),
    ({"mode": "gif"}, "mode", "mode: Input should be 'video' or 'audio'"),
    ({"mode": "audio", "input_audio": "s3://omnireel-inputs/a.wav"}, "input_audio", "not available with mode 'audio'"),
    ({"input_video": "s3://omnireel-inputs/uploads/" + "ab" * 32}, "input_video", "names a stored upload"),
    ({"elements": [{"image_url": "https://media.example.com/uploads/" + "cd" * 32}]}, "elements.0",
     "names a stored upload"),
], ids=["bucket", "file", "http", "private", "local-path", "bad-mode", "audio-with-input-audio", "upload",
        "element-upload"])
def test_media_fields_outside_the_rules_are_refused(served, fields, param, fragment):
    with served.http() as http:
        error = error_of(http.post("/v1/videos", json={"prompt": "waves", **TINY, **fields}), 400)
    assert fragment in error["message"] and error["param"] == param


@pytest.mark.parametrize("fields", [
    {"input_video": "s3://omnireel-inputs/clip.mp4"},
    {"input_audio": {"audio_url": "https://media.example.com/a.wav"}},
    {"input_video": {"video_url": "gs://omnireel-inputs/clip.mp4"}, "input_audio": "s3://omnireel-inputs/a.wav"},
], ids=["s3-video", "https-audio", "both"])
def test_allow_listed_media_uris_pass_validation(served, fields):
    """An allow-listed URI passes every check before the job (the unknown voice, checked last, answers)."""
    nobody = [{"character": "A", "voice_id": "voice_nobody"}]
    with served.http() as http:
        error = error_of(http.post("/v1/videos", json={"prompt": "waves", **TINY, **fields, "voices": nobody}), 404)
    assert error["param"] == "voices.0.voice_id"


@pytest.mark.parametrize("name,upload,status,fragment", [
    ("input_audio", ("pic.png", media.encode_png(np.zeros((8, 8, 3), np.uint8)), "image/png"), 400,
     "input_audio: needs an audio stream; the file holds video"),
    ("input_video", ("tone.wav", tone_wav(0.5), "audio/wav"), 400, "input_video: needs an image or video stream"),
    ("input_audio", ("long.wav", tone_wav(1.5, 8000), "audio/wav"), 400, "the upload is 1.50 s long; the limit is 1 s"),
    ("input_audio", ("big.wav", tone_wav(1.0, 40000), "audio/wav"), 413, "input_audio: the upload is 80044 bytes"),
    ("input_video", ("notes.txt", b"not media", "text/plain"), 400, "input_video: not an image, video or audio file"),
], ids=["audio-is-image", "video-is-audio", "over-long", "oversize", "not-media"])
def test_media_uploads_are_checked_before_decoding(served, name, upload, status, fragment):
    with served.http() as http:
        response = http.post("/v1/videos", data={"prompt": "waves", **{k: str(v) for k, v in TINY.items()}},
                             files={name: upload})
    error = error_of(response, status)
    assert fragment in error["message"] and error["param"] == name


def test_uploaded_input_video_and_audio_render_like_local_engine(served, tiny_engine):
    clip, tone = clip_mp4(), tone_wav(0.5)
    fields = {"prompt": "waves roll in", **{k: str(v) for k, v in TINY.items()}, "seed": "5"}
    with served.http() as http:
        response = http.post("/v1/videos", data=fields, files={"input_video": ("clip.mp4", clip, "video/mp4"),
                                                               "input_audio": ("tone.wav", tone, "audio/wav")})
        assert response.status_code == 200, response.text
        job = response.json()["id"]
        assert wait_done(http, job)["status"] == "completed"
        listed = http.get("/v1/videos", params={"limit": 100}).content
    record = json.loads((served.storage / "jobs" / f"{job}.json").read_bytes())   # the JobStore's file
    stored = {storage.upload_uri(str(served.storage), data): data for data in (clip, tone)}
    assert sorted(record["uploads"]) == sorted(stored) == sorted([record["request"]["input_video"],
                                                                  record["request"]["input_audio"]])
    assert all(storage.read_bytes(uri) == data for uri, data in stored.items())      # stored once, by content
    for blob in ((served.storage / "jobs" / f"{job}.json").read_bytes(), listed):
        assert base64.b64encode(tone)[:512] not in blob and tone[-512:] not in blob
    request = GenerationRequest(prompt="waves roll in", **{**TINY, "seconds": 0.5}, seed=5,
                                input_video="data:video/mp4;base64," + base64.b64encode(clip).decode(),
                                input_audio="data:audio/wav;base64," + base64.b64encode(tone).decode())
    local = tiny_engine.render(request).latents
    latents = served_latents(request)
    assert (latents.video - local.video).abs().max() <= MAX_ERROR
    assert (latents.audio - local.audio).abs().max() <= MAX_ERROR


def test_mode_audio_is_an_m4a_through_the_content_endpoint(served):
    with served.http() as http:
        video = create(http, mode="audio", seed=21)
        assert wait_done(http, video["id"])["status"] == "completed"
        content = http.get(f"/v1/videos/{video['id']}/content")
        assert content.status_code == 200 and content.headers["content-type"] == "audio/mp4"
        streams = media.probe(content.content)
        assert [s["type"] for s in streams] == ["audio"] and streams[0]["codec"] == "aac"
        wave, rate = media.decode_audio(content.content)
        assert wave.shape[0] == round(0.5 * rate)                # exact to the sample
        error = error_of(http.get(f"/v1/videos/{video['id']}/content", params={"variant": "thumbnail"}), 400)
        assert error["param"] == "variant"
    assert any(served.storage.glob("artifacts/*/*.m4a"))


def test_the_create_schema_documents_every_request_field(served):
    with served.http(key=None) as http:
        schema = http.get("/openapi.json").json()["paths"]["/v1/videos"]["post"]["requestBody"]["content"]
    documented = set(schema["application/json"]["schema"]["properties"])
    assert set(GenerationRequest.model_fields) - {"output"} <= documented     # output: /v1/images/generations


# ---- storyboard ------------------------------------------------------------------------------------

STORY = "a fox wakes up in its den. then it runs across the snow"


def test_the_rules_storyboard_plans_shots_end_to_end(served, tiny_engine):
    """One prompt, no shots: the served job is the two-shot storyboard the rule-based planner makes,
    the same as LocalEngine rendering those shots given explicitly."""
    from omnireel.plan import plan_request
    from omnireel.storyboard import plan_shots_rules

    fields = dict(prompt=STORY, seconds=1.0, size="32x32", fps=8, steps=2, seed=9)
    request = GenerationRequest(**fields, storyboard="rules")
    plan = plan_request(request, tiny_engine.config)
    assert [s.caption for s in plan.shots] == ["a fox wakes up in its den", "it runs across the snow"]
    assert plan.captions == (STORY, "a fox wakes up in its den", "it runs across the snow")
    with served.http() as http:
        video = create(http, **{**fields, "seconds": "1"}, storyboard="rules")
        assert wait_done(http, video["id"])["status"] == "completed"
    explicit = GenerationRequest(**fields, shots=[s.model_dump() for s in plan_shots_rules(STORY, 1.0, fps=8)])
    local = tiny_engine.render(explicit).latents
    single = tiny_engine.render(GenerationRequest(**fields, shots=[{"prompt": STORY, "seconds": 1.0}])).latents
    assert (local.video - single.video).abs().max() > MAX_ERROR              # the storyboard matters
    latents = served_latents(request)
    assert (latents.video - local.video).abs().max() <= MAX_ERROR
    assert (latents.audio - local.audio).abs().max() <= MAX_ERROR


def test_an_llm_storyboard_without_vllm_is_a_400_naming_the_field(served):
    from omnireel.model.text import vllm_installed
    if vllm_installed():
        pytest.skip("vLLM is installed here; tests/vllm_suite covers the LLM planner")
    with served.http() as http:
        before = [v["id"] for v in http.get("/v1/videos", params={"limit": 100}).json()["data"]]
        for response in (http.post("/v1/videos", json={"prompt": STORY, **TINY, "storyboard": "llm"}),
                         http.post("/v1/videos", data={"prompt": STORY, "storyboard": "llm"})):
            error = error_of(response, 400)
            assert error["param"] == "storyboard" and error["message"].startswith("storyboard: 'llm' is not available")
            assert "vLLM" in error["message"] and "\n" not in error["message"]
        error = error_of(http.post("/v1/videos", json={"prompt": STORY, **TINY, "storyboard": "gpt"}), 400)
        assert error["param"] == "storyboard" and "'rules' or 'llm'" in error["message"]
        # with explicit shots there is nothing to plan: the field is accepted as is
        shots = [{"prompt": "a fox wakes", "seconds": 0.5}]
        video = create(http, storyboard="llm", shots=shots, seed=31)
        assert wait_done(http, video["id"])["status"] == "completed"
        after = [v["id"] for v in http.get("/v1/videos", params={"limit": 100}).json()["data"]]
    assert [v for v in after if v not in before] == [video["id"]]
