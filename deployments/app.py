"""build_app(args): the OmniReel Serve application (the import_path of `serve run`, `serve deploy`
and KubeRay's serveConfigV2), the Serve config YAML beside it, and `omnireel serve`.

    Ingress ──create/get/list/delete──> JobStore ──run(ticket)──> JobRunner ──STAGE_GRAPH──┐
       │ storyboard "llm": plan, once, before the job exists  ^                                │
       └──> StoryboardPlanner        TextEncoder, VoiceEncoder, MediaEncoder, Backbone (TP group),
            (only with a planner model)                       VideoDecoder, AudioDecoder

Where things are set: replicas and autoscaling only in serve_config.yaml's `deployments:` section;
per-replica resources, the Backbone's placement group bundles, queue bounds and request limits
from AppArgs (the YAML's `args:`), applied here. The StoryboardPlanner is the exception: it exists
only where a planner model is configured, so the YAML does not list it and its replicas and
resources come from AppArgs (storyboard_model, planner_replicas, planner_cpus, planner_gpus).
"""
from __future__ import annotations

import copy
import os
import tempfile
import time
from pathlib import Path

import yaml
from ray.serve.config import BackpressureConfig

from omnireel.parallel.group import MAX_QUEUED_JOBS, BackboneGroup
from omnireel.parallel.inprocess import host_resources
from omnireel.stages import STAGE_GRAPH
from omnireel.storyboard import llm_unavailable, planner_model

from .args import AppArgs
from .backbone import Backbone
from .decoders import AudioDecoder, VideoDecoder
from .encoders import MediaEncoder, TextEncoder, VoiceEncoder
from .ingress import Ingress
from .job_runner import JobRunner
from .job_store import JobStore
from .planner import StoryboardPlanner

APP_NAME = "omnireel"
CONFIG_PATH = Path(__file__).with_name("serve_config.yaml")
STAGE_DEPLOYMENTS = {cls.name: cls for cls in (TextEncoder, VoiceEncoder, MediaEncoder, Backbone, VideoDecoder,
                                                   AudioDecoder)}   # by name: each stage's `deployment`
DEPLOYMENTS = (Ingress, JobStore, JobRunner, *STAGE_DEPLOYMENTS.values())   # the YAML lists these (not the planner)
LOCAL_CPUS = {"replica_cpus": 0.2, "cpus_per_rank": 0.2, "control_cpus": 0.05}   # `omnireel serve` on one machine


def build_app(args: dict | AppArgs):
    """The Serve application for `args` (a dict, as the YAML gives it, or AppArgs)."""
    args = AppArgs.model_validate(args if isinstance(args, dict) else args.model_dump()).resolved()
    args = args.model_copy(update={"storyboard_model": planner_model(args.storyboard_model)})
    control = {"num_cpus": args.control_cpus}
    store = JobStore.options(ray_actor_options=control).bind(args)
    stages = {}                                   # stage name -> the bound deployment that runs it
    bound = {}                                    # deployment name -> bound deployment
    for stage in STAGE_GRAPH:
        if not stage.deployment:                  # no model (mux): runs in the JobRunner
            continue
        if stage.deployment not in bound:
            bound[stage.deployment] = bind_stage_deployment(STAGE_DEPLOYMENTS[stage.deployment], stage, args, store)
        stages[stage.name] = bound[stage.deployment]
    runner = JobRunner.options(ray_actor_options=control, max_ongoing_requests=args.runner_max_ongoing,
                               max_queued_requests=args.runner_max_queued).bind(args, store, stages)
    overflow = BackpressureConfig(status_code=503, retry_after_s=args.retry_after_s)   # a full ingress queue
    return Ingress.options(ray_actor_options=control, max_ongoing_requests=args.ingress_max_ongoing,
                           max_queued_requests=args.ingress_max_queued,
                           backpressure_config=overflow).bind(args, store, runner, stages, bind_planner(args))


def bind_planner(args: AppArgs):
    """The StoryboardPlanner, where it can run (a planner model configured, vLLM installed), else None:
    the ingress then refuses storyboard 'llm' with storyboard.llm_unavailable's reason."""
    if llm_unavailable(args.storyboard_model):
        return None
    resources = {"num_cpus": args.planner_cpus, "num_gpus": args.planner_gpus if args.use_gpu else 0}
    return StoryboardPlanner.options(num_replicas=args.planner_replicas, ray_actor_options=resources).bind(args)


def bind_stage_deployment(deployment, stage, args: AppArgs, store):
    """One stage deployment with its resources: the backbone host takes the rank's resources with one
    rank and, above, a placement group of one bundle per mesh rank (cfg_parallel x sp x tp; its own CPUs
    joined to bundle 0)."""
    if stage.on_backbone:
        ranks = args.mesh.ranks
        host = host_resources(ranks, args.use_gpu, args.cpus_per_rank, args.replica_cpus)
        group = {} if ranks == 1 else {
            "placement_group_bundles": BackboneGroup.bundles(ranks, args.use_gpu, args.cpus_per_rank,
                                                             host={"CPU": args.replica_cpus}),
            "placement_group_strategy": "STRICT_PACK"}
        return deployment.options(ray_actor_options=host, **backbone_queue(args), **group).bind(args, store)
    return deployment.options(ray_actor_options={"num_cpus": args.replica_cpus,
                                                 "num_gpus": args.gpus_for(stage)}).bind(args)


def backbone_queue(args: AppArgs) -> dict:
    """A Backbone replica batches (on itself at tp=1, on its group's rank 0 above): a running batch of
    max_batch_jobs and as many waiting to join it at the next step boundary (a group takes at most
    MAX_QUEUED_JOBS in flight)."""
    if args.tp == 1:
        return {"max_ongoing_requests": 2 * args.max_batch_jobs}
    return {"max_ongoing_requests": min(2 * args.max_batch_jobs, MAX_QUEUED_JOBS)}


# ---- the Serve config YAML -------------------------------------------------------------------------

def load_serve_config(path: str | Path = CONFIG_PATH) -> dict:
    return yaml.safe_load(Path(path).read_text())


def configure(config: dict, *, args: dict | None = None, deployments: dict[str, dict] | None = None,
              host: str | None = None, port: int | None = None) -> dict:
    """A copy of a Serve config with the OmniReel app's args and deployment options overridden (an
    option set to None is removed), validated against ServeDeploySchema and AppArgs."""
    from ray.serve.schema import ServeDeploySchema

    config = copy.deepcopy(config)
    application = next(a for a in config["applications"] if a["name"] == APP_NAME)
    application["args"] = {**(application.get("args") or {}), **(args or {})}
    entries = {d["name"]: d for d in application.setdefault("deployments", [])}
    for name, options in (deployments or {}).items():
        if name not in entries:
            entries[name] = {"name": name}
            application["deployments"].append(entries[name])
        entries[name].update(options)
        for key in [k for k, v in entries[name].items() if v is None]:
            del entries[name][key]
    http = config.setdefault("http_options", {})
    http.update({k: v for k, v in (("host", host), ("port", port)) if v is not None})
    ServeDeploySchema.model_validate(config)
    AppArgs.model_validate(application["args"])
    return config


def serve_run(config: dict, address: str | None = None) -> None:
    """Submits `config` exactly as `serve run CONFIG.yaml --non-blocking` does (it runs that command)."""
    from ray.serve.scripts import cli

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as file:
        yaml.safe_dump(config, file, sort_keys=False)
    argv = ["run", file.name, "--non-blocking", *(["--address", address] if address else [])]
    try:
        cli.main(args=argv, prog_name="serve", standalone_mode=False)
    finally:
        os.unlink(file.name)


def wait_until_running(name: str = APP_NAME, timeout_s: float = 900.0) -> None:
    """Blocks until the app is RUNNING (every replica constructed, so loaded and warmed up)."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(name)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RuntimeError(f"Serve app {name!r} is {status.status}: {status.message}")
        time.sleep(1.0)
    raise TimeoutError(f"Serve app {name!r} not running within {timeout_s:g}s")


def parse_set(items: list[str] | None) -> dict:
    """`--set ARG=VALUE` options (repeatable) as build_app args, each VALUE read as YAML; a malformed
    one is a one-line error (cli.fail)."""
    from omnireel.cli import fail
    from omnireel.driver_args import yaml_value

    args = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"--set: expected ARG=VALUE (got {item!r})")
        try:
            args[key] = yaml_value(value)
        except ValueError as e:
            fail(f"--set {key}: {e}")
    return args


def serve_command(options) -> None:
    """`omnireel serve`: the Serve config YAML with the command line's overrides, on localhost."""
    import pydantic
    import ray
    from ray import serve

    from omnireel.cli import fail, flag_values
    from omnireel.driver_args import args_error

    flags = flag_values(options, AppArgs).model_dump(exclude_unset=True)   # its flags are AppArgs' fields
    args = {**parse_set(options.set), **flags}
    if options.address is None:     # one local machine: every stage shares its cores (logical CPUs)
        for key, value in LOCAL_CPUS.items():
            args.setdefault(key, value)
    host = options.host or (None if options.config else "127.0.0.1")   # the YAML's own is for clusters
    try:
        config = configure(load_serve_config(options.config or CONFIG_PATH), args=args, host=host, port=options.port)
    except pydantic.ValidationError as e:
        if e.title != AppArgs.__name__:
            raise
        fail(args_error(e, AppArgs, flags=False))     # a --set or config file value, named by its arg
    serve_run(config, options.address)
    wait_until_running()
    http = config["http_options"]
    print(f"omnireel: serving {APP_NAME} at http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}/v1 "
          f"(OpenAPI schema at /openapi.json)", flush=True)
    if options.non_blocking:
        return
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
        ray.shutdown()
