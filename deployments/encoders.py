"""The encoder deployments: captions -> text embeddings, bound voices -> speaker embeddings, and
reference media -> clean latents. Each runs the stages STAGE_GRAPH places on it (see stage_replica.py)."""
from __future__ import annotations

from ray import serve

from .stage_replica import StageReplica


@serve.deployment
class TextEncoder(StageReplica):
    """Captions and character names -> text embeddings."""


@serve.deployment
class VoiceEncoder(StageReplica):
    """Bound voices -> speaker embeddings, from the voice registry."""


@serve.deployment
class MediaEncoder(StageReplica):
    """Reference images, input video and audio -> clean latents."""
