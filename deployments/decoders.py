"""The decoder deployments: latents -> encoded streams (H.264 MP4 or PNG; AAC), never raw frames,
so only compressed bytes travel on to the JobRunner. Each runs the stages STAGE_GRAPH places on it (see stage_replica.py)."""
from __future__ import annotations

from ray import serve

from .stage_replica import StageReplica


@serve.deployment
class VideoDecoder(StageReplica):
    """Video latents -> an H.264 MP4 (or a PNG)."""


@serve.deployment
class AudioDecoder(StageReplica):
    """Audio latents -> an AAC stream."""
