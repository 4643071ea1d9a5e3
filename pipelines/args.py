"""BatchOptions: a batch run's arguments (run_batch's `options`) and the flags of `omnireel batch`.
The fields the Serve app shares (checkpoint, mesh, threads, dtype, niceness, voices) are DriverArgs'
(omnireel/driver_args.py); the ones below are the pipeline's own. Light to import: the CLI builds its
parser from it before anything loads Ray."""
from __future__ import annotations

from typing import Optional

from pydantic import ConfigDict, Field

from omnireel.driver_args import DriverArgs


class BatchOptions(DriverArgs):
    """A batch run's arguments and the flags of `omnireel batch`: DriverArgs' (checkpoint, mesh, threads,
    dtype, niceness, voices: shared with the Serve app) and the pipeline's own below."""
    model_config = ConfigDict(frozen=True)

    replicas: int = Field(1, ge=1, description="denoise actors, each its own backbone group (a fixed pool)")
    encoders: int = Field(1, ge=1, description="encode actors")
    decoders: int = Field(1, ge=1, description="decode actors")
    limit: Optional[int] = Field(None, ge=1, description="only the first N manifest rows")
    save_latents: bool = Field(False, description="also write each row's latents (<key>.latents.safetensors)")
    pushgateway: Optional[str] = Field(None, description="host:port of a Prometheus Pushgateway for the run's totals")
    validate_only: bool = Field(False, description=(
        "only validate the manifest (errors.parquet: refused and duplicate rows); render nothing"))
    planners: int = Field(1, ge=1, description=(
        "storyboard planner actors (one vLLM engine each), where rows ask for an LLM storyboard"))
