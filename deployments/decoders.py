"""The decoder deployments: latents -> encoded streams (H.264 MP4 or PNG; AAC), never raw frames,
so only compressed bytes travel on to the JobRunner. Each runs one stage (see stage_replica.py)."""
from __future__ import annotations

from ray import serve

from .stage_replica import StageReplica


@serve.deployment
class VideoDecoder(StageReplica):
    stage_names = ("decode_video",)


@serve.deployment
class AudioDecoder(StageReplica):
    stage_names = ("decode_audio",)
