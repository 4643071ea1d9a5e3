"""Voice binding: the GE2E speaker encoder tells espeak-ng voices apart in three languages; the
registry keeps voices durably, refuses unusable recordings with a reason, and a bound voice reaches
the backbone through the encode_voice stage every driver runs."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from omnireel import media
from omnireel.cli import main as cli_main
from omnireel.config import GenerationRequest
from omnireel.plan import plan_request
from omnireel.stages import STAGE_GRAPH, run_stage
from omnireel.voices import VoiceNotFound, VoiceRegistry, VoiceRejected

from media_support import encode_wav
from voice_support import silent_wav, speak, transcode

VOICES = ("m3", "f4", "klatt")          # espeak-ng variants: the speakers
LANGUAGES = ("en", "es", "cmn")         # English, Spanish, Mandarin
SENTENCES = {
    "en": ("The quick brown fox jumps over the lazy dog near the river bank.",
           "Please call Stella and ask her to bring these things with her from the store."),
    "es": ("El veloz murciélago hindú comía feliz cardillo y kiwi en la mañana.",
           "Por favor, llama a Estela y pídele que traiga estas cosas de la tienda."),
    "cmn": ("今天天气很好，我们一起去公园散步吧。", "请你明天早上八点到火车站来接我。"),
}
STAGES = {stage.name: stage for stage in STAGE_GRAPH}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    return VoiceRegistry(str(tmp_path_factory.mktemp("voices")))


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("speech")
    return {(lang, voice, i): speak(text, f"{lang}+{voice}", tmp)
            for lang, voice in itertools.product(LANGUAGES, VOICES) for i, text in enumerate(SENTENCES[lang])}


@pytest.fixture(scope="module")
def added(registry, recordings):
    """Every recording registered as a voice: (language, voice, sentence) -> Voice."""
    return {key: registry.add(data, "+".join(map(str, key))) for key, data in recordings.items()}


def test_same_voice_is_closer_than_other_voices_in_three_languages(added):
    embedding = {key: torch.tensor(voice.embedding) for key, voice in added.items()}
    lines = []
    for lang, voice in itertools.product(LANGUAGES, VOICES):
        same = float(embedding[(lang, voice, 0)] @ embedding[(lang, voice, 1)])
        others = [float(embedding[(lang, voice, i)] @ embedding[(lang, other, j)])
                  for other in VOICES if other != voice for i in (0, 1) for j in (0, 1)]
        lines.append(f"{lang}+{voice}: same voice {same:.3f}, closest other voice {max(others):.3f}")
        assert same > max(others), lines[-1]
    print("\nGE2E cosine, two sentences of one voice vs. any recording of another voice:\n  " + "\n  ".join(lines))
    for e in embedding.values():
        assert abs(float(e.norm()) - 1) < 1e-5


def test_recordings_as_wav_mp3_and_flac_give_the_same_voice(registry, recordings, added):
    wav = recordings[("en", "f4", 1)]
    by_format = {name: torch.tensor(registry.add(data, name).embedding) for name, data in
                 (("mp3", transcode(wav, "libmp3lame", "mp3")), ("flac", transcode(wav, "flac", "flac")))}
    by_format["wav"] = torch.tensor(added[("en", "f4", 1)].embedding)
    assert float(by_format["wav"] @ by_format["flac"]) > 0.999          # lossless
    assert float(by_format["wav"] @ by_format["mp3"]) > 0.98


@pytest.mark.parametrize("make,reason", [
    (lambda tmp: silent_wav(3.0), "recording is silent (digital silence"),
    (lambda tmp: encode_wav(np.random.default_rng(0).normal(0, 1e-4, 48000).astype(np.float32), 16000),
     "recording is silent (-80 dBFS"),
    (lambda tmp: speak("Hi.", "en+m3", tmp), "recording is too short:"),
    (lambda tmp: b"this is not audio at all" * 40, "recording not a readable audio file"),
    (lambda tmp: media.encode_png(np.zeros((8, 8, 3), np.uint8)), "is not accepted; use one of wav, mp3, flac"),
    (lambda tmp: media.encode_audio(np.zeros(24000, np.float32), 24000), "is not accepted; use one of wav, mp3, flac"),
    (lambda tmp: silent_wav(61.0, 8000), "recording must be at most 60 s long (got 61.00 s)"),
])
def test_unusable_recordings_are_rejected_with_a_reason(registry, tmp_path, make, reason):
    before = len(registry.list())
    with pytest.raises(VoiceRejected) as caught:
        registry.add(make(tmp_path), "bad")
    assert reason in str(caught.value)
    assert len(registry.list()) == before                     # nothing stored


def test_registry_is_durable_and_unknown_ids_are_not_found(registry, added):
    voice, kept = added[("es", "klatt", 0)], added[("es", "klatt", 1)]
    reopened = VoiceRegistry(registry.prefix)                  # a new process would see the same
    assert reopened.get(voice.id) == voice
    assert voice.id in [v.id for v in reopened.list()]
    assert voice.public()["name"] == "es+klatt+0" and "embedding" not in voice.public()
    reopened.delete(voice.id)
    for action in (registry.get, registry.delete):
        with pytest.raises(VoiceNotFound, match=f"unknown voice '{voice.id}'"):
            action(voice.id)
    with pytest.raises(VoiceNotFound):
        registry.get("../../etc/passwd")                       # never becomes a storage key
    with pytest.raises(VoiceNotFound, match="voices.1.voice_id: unknown voice 'voice_gone'"):
        registry.check_bindings([("A", kept.id), ("B", "voice_gone")])


def test_a_bound_voice_resolves_through_the_encode_voice_stage(tiny_engine, registry, added, monkeypatch):
    """The stage reads the registry that is its component (LocalEngine(voices=), the Serve app's
    voices_uri, batch --voice-store); every driver runs it with run_stage, so the speaker embedding
    the backbone sees is the registry's, bit for bit."""
    monkeypatch.setitem(tiny_engine.components, "voices", registry)
    anna, bob = added[("en", "f4", 0)], added[("en", "m3", 0)]

    def request(voice_id, character="ANNA"):
        return GenerationRequest(prompt="ANNA says hello", seconds=0.5, size="32x32", fps=8, steps=2, seed=3,
                                 voices=[{"character": character, "voice_id": voice_id}])

    plan = plan_request(request(anna.id), tiny_engine.config)
    assert plan.voices == (("ANNA", anna.id),)
    voice = run_stage(STAGES["encode_voice"], tiny_engine.components, {"plan": plan})
    assert torch.equal(voice.speakers, torch.tensor([anna.embedding]))
    text = run_stage(STAGES["encode_text"], tiny_engine.components, {"plan": plan})
    assert len(text.characters) == 1 and text.characters[0].shape[1] == tiny_engine.config.text.dim

    a = tiny_engine.render(request(anna.id)).latents
    assert torch.equal(a.video, tiny_engine.render(request(anna.id)).latents.video)
    b = tiny_engine.render(request(bob.id)).latents
    c = tiny_engine.render(request(anna.id, character="BOB")).latents
    # (an untrained tiny model: small effects, but a render is bit-for-bit deterministic on CPU)
    assert (a.audio - b.audio).abs().max() > 1e-5               # the voice reaches the backbone
    assert (a.audio - c.audio).abs().max() > 1e-5               # and so does the character it is bound to
    registry.delete(bob.id)
    with pytest.raises(VoiceNotFound, match="voices.0.voice_id"):
        tiny_engine.render(request(bob.id))


def test_voices_cli_add_list_rm_and_render_errors(registry, recordings, tmp_path, capsys, tiny_checkpoint):
    store = str(tmp_path / "cli-voices")
    wav = tmp_path / "lee.wav"
    wav.write_bytes(recordings[("cmn", "klatt", 1)])
    cli_main(["voices", "add", str(wav), "--name", "Lee", "--store", store, "-q"])
    voice_id = capsys.readouterr().out.strip()
    cli_main(["voices", "list", "--store", store])
    assert voice_id in capsys.readouterr().out and "Lee" in VoiceRegistry(store).get(voice_id).name

    def one_line_error(argv) -> str:
        with pytest.raises(SystemExit) as exit_info:
            cli_main(argv)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
        return err

    silent = tmp_path / "silent.wav"
    silent.write_bytes(silent_wav(2.0))
    assert "recording is silent" in one_line_error(["voices", "add", str(silent), "--store", store])
    assert "voices.0.voice_id: unknown voice 'voice_nobody'" in one_line_error(
        ["render", "LEE sings", "--voice", "LEE=voice_nobody", "--voice-store", store,
         "--checkpoint", str(tiny_checkpoint)])
    assert "--voice: expected CHARACTER=VOICE_ID" in one_line_error(["render", "x", "--voice", "LEE"])
    out = tmp_path / "lee.mp4"
    cli_main(["render", "LEE sings", "--voice", f"LEE={voice_id}", "--voice-store", store, "-q", "-o", str(out),
              "--checkpoint", str(tiny_checkpoint), "--seconds", "0.5", "--size", "32x32", "--fps", "8",
              "--steps", "1"])
    assert out.stat().st_size > 0
    cli_main(["voices", "rm", voice_id, "--store", store, "-q"])
    assert f"unknown voice '{voice_id}'" in one_line_error(["voices", "rm", voice_id, "--store", store])
