"""The voice registry: named speaker embeddings made from reference recordings, stored durably.

A voice is one JSON record under a storage prefix (any URI storage.py takes):

    {prefix}/{voice_id}.json   {"id", "name", "created_at", "speech_seconds", "encoder", "embedding": [256 floats]}

`add` checks a recording before decoding it (size, container format WAV/MP3/FLAC, duration from the
header), decodes it to 16 kHz mono, and refuses silence and too little speech, each with a reason
(`VoiceRejected`). An unknown id raises `VoiceNotFound` (what HTTP maps to 404). Requests bind
voices to characters (`voices: [{character, voice_id}]`); the `encode_voice` stage reads the bound
embeddings from here, so every driver resolves a voice the same way.
"""
from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import storage
from .config import MAX_UPLOAD_BYTES, VOICE_ID_PATTERN
from .model.voice import EMBEDDING_DIM

RECORDING_FORMATS = ("wav", "mp3", "flac")
MAX_RECORDING_SECONDS = 60.0      # longest reference recording (from its header, before decoding)
MIN_SPEECH_SECONDS = 1.0          # least speech left after trimming silences
MAX_NAME_CHARS = 64
ENCODER_NAME = "resemblyzer-ge2e"


class VoiceNotFound(LookupError):
    """No voice with this id (HTTP 404)."""

    def __init__(self, voice_id: str, field: str | None = None):
        self.voice_id, self.field = voice_id, field
        prefix = f"{field}: " if field else ""
        super().__init__(f"{prefix}unknown voice {voice_id!r}")


class VoiceRejected(ValueError):
    """A recording that cannot make a voice; the message is the reason (HTTP 400)."""


@dataclass(frozen=True)
class Voice:
    id: str
    name: str
    created_at: float                 # unix seconds
    speech_seconds: float             # speech left after trimming silences
    encoder: str
    embedding: tuple[float, ...]      # (EMBEDDING_DIM,) unit length

    def public(self) -> dict:
        """The record without the embedding (what listings show)."""
        return {k: v for k, v in asdict(self).items() if k != "embedding"}


def default_voice_prefix() -> str:
    """$OMNIREEL_VOICES, else $OMNIREEL_HOME/voices (OMNIREEL_HOME defaults to ~/.cache/omnireel)."""
    if os.environ.get("OMNIREEL_VOICES"):
        return os.environ["OMNIREEL_VOICES"]
    return str(Path(os.environ.get("OMNIREEL_HOME", "~/.cache/omnireel")).expanduser() / "voices")


class VoiceRegistry:
    def __init__(self, prefix: str | None = None, encoder=None):
        self.prefix = prefix or default_voice_prefix()
        self._encoder = encoder           # a SpeakerEncoder; loaded on the first `add`
        self._loading = threading.Lock()  # concurrent first adds (the Serve ingress's threads) load it once

    @property
    def encoder(self):
        if self._encoder is None:
            with self._loading:
                if self._encoder is None:
                    from .model.voice import SpeakerEncoder
                    self._encoder = SpeakerEncoder.pretrained()
        return self._encoder

    def __getstate__(self) -> dict:       # a registry travels to Ray workers without its lock
        return {**self.__dict__, "_loading": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _loading=threading.Lock())

    def _uri(self, voice_id: str) -> str:
        if not re.fullmatch(VOICE_ID_PATTERN, voice_id):
            raise VoiceNotFound(voice_id)     # never a storage key built from an odd id
        return storage.join(self.prefix, f"{voice_id}.json")

    def embed_recording(self, recording: bytes) -> tuple[torch.Tensor, float]:
        """Recording bytes -> (unit speaker embedding (256,), seconds of speech); VoiceRejected if unusable."""
        from .model.voice import SAMPLE_RATE, SILENCE_DBFS, dbfs
        from .references import MediaReferenceError, load_audio

        if len(recording) > MAX_UPLOAD_BYTES:
            raise VoiceRejected(f"recording must be at most {MAX_UPLOAD_BYTES} bytes (got {len(recording)})")
        try:
            wave = torch.from_numpy(load_audio(recording, SAMPLE_RATE, MAX_RECORDING_SECONDS, RECORDING_FORMATS))
        except MediaReferenceError as e:
            raise VoiceRejected(f"recording {e}") from None
        level = dbfs(wave)
        if level < SILENCE_DBFS:
            shown = "digital silence" if level == float("-inf") else f"{level:.0f} dBFS"
            raise VoiceRejected(f"recording is silent ({shown}; speech must be louder than {SILENCE_DBFS:g} dBFS)")
        speech = self.encoder.preprocess(wave)
        seconds = speech.shape[0] / SAMPLE_RATE
        if seconds < MIN_SPEECH_SECONDS:
            raise VoiceRejected(f"recording is too short: {seconds:.2f} s of speech, "
                                f"at least {MIN_SPEECH_SECONDS:g} s needed")
        return self.encoder.embed(speech), seconds

    def add(self, recording: bytes, name: str) -> Voice:
        name = (name or "").strip()
        if not name or len(name) > MAX_NAME_CHARS:
            raise VoiceRejected(f"name must be 1 to {MAX_NAME_CHARS} characters (got {len(name)})")
        embedding, seconds = self.embed_recording(recording)
        voice = Voice(id=f"voice_{uuid.uuid4().hex[:24]}", name=name, created_at=round(time.time(), 3),
                      speech_seconds=round(seconds, 3), encoder=ENCODER_NAME,
                      embedding=tuple(float(x) for x in embedding))
        storage.write_bytes(self._uri(voice.id), json.dumps(asdict(voice)).encode())
        return voice

    def get(self, voice_id: str) -> Voice:
        uri = self._uri(voice_id)
        try:
            record = json.loads(storage.read_bytes(uri))
        except FileNotFoundError:
            raise VoiceNotFound(voice_id) from None
        record["embedding"] = tuple(record["embedding"])
        return Voice(**record)

    def list(self) -> list[Voice]:
        """Every voice, oldest first."""
        voices = []
        for uri in storage.list_prefix(self.prefix):
            stem = uri.rsplit("/", 1)[-1]
            if stem.endswith(".json") and re.fullmatch(VOICE_ID_PATTERN, stem[:-5]):
                try:
                    voices.append(self.get(stem[:-5]))
                except VoiceNotFound:       # deleted meanwhile
                    continue
        return sorted(voices, key=lambda v: (v.created_at, v.id))

    def delete(self, voice_id: str) -> None:
        uri = self._uri(voice_id)
        if not storage.exists(uri):
            raise VoiceNotFound(voice_id)
        storage.delete(uri)

    def check_bindings(self, voices) -> None:
        """VoiceNotFound naming the field (voices.<i>.voice_id) for the first unknown bound voice."""
        for i, binding in enumerate(voices):
            voice_id = binding[1] if isinstance(binding, tuple) else binding.voice_id
            try:
                known = storage.exists(self._uri(voice_id))
            except VoiceNotFound:
                known = False
            if not known:
                raise VoiceNotFound(voice_id, field=f"voices.{i}.voice_id")

    def embeddings(self, voice_ids) -> torch.Tensor:
        """Bound voices -> (V, 256) float32, in binding order; one read per voice. An unknown id is
        VoiceNotFound naming its field (voices.<i>.voice_id), as in check_bindings."""
        rows = []
        for i, voice_id in enumerate(voice_ids):
            try:
                rows.append(self.get(voice_id).embedding)
            except VoiceNotFound:
                raise VoiceNotFound(voice_id, field=f"voices.{i}.voice_id") from None
        return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), EMBEDDING_DIM)
