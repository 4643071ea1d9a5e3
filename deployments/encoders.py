"""The encoder deployments: captions -> text embeddings, bound voices -> speaker embeddings, and
reference media -> clean latents. Each runs one stage of the core's graph (see stage_replica.py)."""
from __future__ import annotations

from ray import serve

from .stage_replica import StageReplica


@serve.deployment
class TextEncoder(StageReplica):
    stage_names = ("encode_text",)


@serve.deployment
class VoiceEncoder(StageReplica):
    stage_names = ("encode_voice",)


@serve.deployment
class MediaEncoder(StageReplica):
    stage_names = ("encode_media",)
