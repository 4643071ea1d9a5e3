"""AppArgs: build_app's arguments, the `args:` of the Serve config YAML and the flags of `omnireel
serve`. The fields the batch pipeline shares (checkpoint, mesh, threads, dtype, niceness, voices) are
DriverArgs' (omnireel/driver_args.py); the ones below are the Serve app's own. Every replica receives
the resolved AppArgs (a small pydantic model: unpickling it imports nothing heavy)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from pydantic import Field, field_validator

from omnireel.driver_args import DriverArgs


class AppArgs(DriverArgs):
    """build_app's arguments: the `args:` of the Serve config YAML."""

    model_name: Optional[str] = Field(None, description='model id in the API (default "omnireel-<preset>")')
    use_gpu: bool = Field(False, description="ranks and GPU stages take a GPU each")
    stage_threads: dict[str, int] = Field(default_factory=dict, description=(
        "torch threads of one stage's replicas, over `threads` (e.g. {decode_audio: 1}: it runs beside "
        "the video decoder, and two decoders of `threads` each oversubscribe a small node)"))
    stage_gpus: dict[str, float] = Field(default_factory=dict, description=(
        "with use_gpu: GPUs of one stage's replicas, over the graph's default (1 for denoise and "
        "decode_video, else 0), e.g. {encode_text: 1} for LTX-2's 12B Gemma 3 text encoder"))
    replica_cpus: float = Field(1.0, gt=0, description="CPUs of each stage replica")
    control_cpus: float = Field(0.25, ge=0, description="CPUs of each ingress, job store and runner replica")
    storage_uri: Optional[str] = Field(None, json_schema_extra={"flag": "--storage"},
                                       description="jobs and artifacts (default $OMNIREEL_HOME/serve)")
    api_keys: list[str] = Field(default_factory=list, json_schema_extra={"flag": "--api-key"},
                                description="Bearer keys, one a flag; empty: no auth")
    max_body_bytes: int = Field(32 << 20, ge=1024, description="largest request body (413 beyond)")
    max_upload_bytes: int = Field(16 << 20, ge=1, description="largest uploaded file (413 beyond)")
    max_upload_seconds: float = Field(20.0, gt=0, description="longest uploaded video or audio")
    allowed_schemes: list[str] = Field(["s3", "gs", "https"], description="reference URI schemes allowed")
    allowed_buckets: Optional[list[str]] = Field(None, description="s3/gs buckets allowed (None: any)")
    max_active_jobs: int = Field(64, ge=1, description="jobs queued or in progress in the store (429 beyond)")
    runner_max_ongoing: int = Field(4, ge=1, description="jobs one JobRunner replica runs at once")
    runner_max_queued: int = Field(16, ge=1, description="jobs waiting for a runner before they wait in the store")
    ingress_max_ongoing: int = Field(64, ge=1, description="requests one ingress replica serves at once")
    ingress_max_queued: int = Field(256, ge=1, description="requests waiting for an ingress replica (503 beyond)")
    job_attempts: int = Field(2, ge=1, description="tries of a job whose replica was lost")
    job_timeout_s: float = Field(1800.0, gt=0, description="a job not done by then fails (code timeout)")
    lease_s: float = Field(30.0, gt=0, description="a running job without a heartbeat this long is retried")
    video_ttl_s: float = Field(86400.0, gt=0, description="finished jobs and videos expire this long after")
    collect_interval_s: float = Field(60.0, gt=0, description="how often expired jobs are collected")
    retry_after_s: int = Field(5, ge=1, description="Retry-After of 429 and 503 answers")
    # the LLM storyboard planner (storyboard_model: DriverArgs): the StoryboardPlanner deployment (deployments/planner.py)
    planner_replicas: int = Field(1, ge=1, description="StoryboardPlanner replicas (one vLLM engine each)")
    planner_cpus: float = Field(1.0, gt=0, description="CPUs of each StoryboardPlanner replica")
    planner_gpus: float = Field(1.0, ge=0, description="GPUs of each StoryboardPlanner replica with use_gpu (vLLM needs one)")

    @field_validator("stage_threads", "stage_gpus")
    @classmethod
    def _per_stage(cls, value: dict, info) -> dict:
        from omnireel.stages import STAGE_GRAPH
        stages = [stage.name for stage in STAGE_GRAPH if stage.component is not None]
        least = 1 if info.field_name == "stage_threads" else 0
        for name, amount in value.items():
            if name not in stages:
                raise ValueError(f"{info.field_name}: unknown stage {name!r}; stages are {', '.join(stages)}")
            if amount < least:
                raise ValueError(f"{info.field_name}.{name}: must be >= {least}, got {amount}")
        return value

    def gpus_for(self, stage) -> float:
        """GPUs of one replica of `stage` (a stages.Stage): none without use_gpu."""
        if not self.use_gpu:
            return 0
        return self.stage_gpus.get(stage.name, 1 if stage.resources.get("GPU") else 0)

    def threads_for(self, stages) -> Optional[int]:
        """Torch threads of a replica that runs `stages` (names): stage_threads where set, else threads."""
        values = [self.stage_threads[name] for name in stages if name in self.stage_threads]
        return max(values) if values else self.threads

    def resolved(self) -> "AppArgs":
        """Defaults that need the environment, fixed once so that every replica sees the same."""
        from omnireel.checkpoint import default_checkpoint
        from omnireel.voices import default_voice_prefix
        home = Path(os.environ.get("OMNIREEL_HOME", "~/.cache/omnireel")).expanduser()
        return self.model_copy(update={
            "checkpoint": str(Path(self.checkpoint).expanduser()) if self.checkpoint else str(default_checkpoint()),
            "storage_uri": self.storage_uri or str(home / "serve"),
            "voices_uri": self.voices_uri or default_voice_prefix()})
