"""The Serve config YAML and build_app's args (no Ray needed), and the form-body parsing rules."""
from __future__ import annotations

import numpy as np
import pydantic
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from omnireel import media
from omnireel.deployments.app import APP_NAME, CONFIG_PATH, DEPLOYMENTS, configure, load_serve_config, parse_set
from omnireel.deployments.args import AppArgs
from omnireel.deployments.request_parsing import APIError, check_upload, decode_structured, unflatten


def omnireel_app(config: dict) -> dict:
    return next(a for a in config["applications"] if a["name"] == APP_NAME)


def test_the_serve_config_is_a_valid_deploy_schema_for_build_app():
    config = yaml.safe_load(CONFIG_PATH.read_text())
    schema = ServeDeploySchema.model_validate(config)          # what `serve deploy` and KubeRay check
    app = next(a for a in schema.applications if a.name == APP_NAME)
    assert app.import_path == "omnireel.deployments.app:build_app"
    AppArgs.model_validate(app.args)                           # extra="forbid": a typo fails here
    assert {d.name for d in app.deployments} == {d.name for d in DEPLOYMENTS}


def test_autoscaling_is_set_per_deployment_in_the_yaml_and_the_store_is_one_replica():
    entries = {d["name"]: d for d in omnireel_app(load_serve_config())["deployments"]}
    assert entries["JobStore"] == {"name": "JobStore", "num_replicas": 1}
    for name, entry in entries.items():
        if name != "JobStore":
            scaling = entry["autoscaling_config"]
            assert 1 <= scaling["min_replicas"] <= scaling["max_replicas"], name
            assert scaling["target_ongoing_requests"] > 0, name
    batch = omnireel_app(load_serve_config())["args"]["max_batch_jobs"]
    assert entries["Backbone"]["autoscaling_config"]["target_ongoing_requests"] == batch   # a full batch per replica


def test_code_leaves_autoscaling_to_the_yaml():
    for deployment in DEPLOYMENTS:
        assert deployment._deployment_config.autoscaling_config is None, deployment.name


def test_configure_overrides_args_and_deployments_and_validates():
    config = configure(load_serve_config(), args={"tp": 2, "api_keys": ["k"]},
                       deployments={"Ingress": {"num_replicas": 2, "autoscaling_config": None}}, port=9123)
    app = omnireel_app(config)
    assert app["args"]["tp"] == 2 and app["args"]["api_keys"] == ["k"]
    assert next(d for d in app["deployments"] if d["name"] == "Ingress") == {"name": "Ingress", "num_replicas": 2}
    assert config["http_options"]["port"] == 9123
    with pytest.raises(pydantic.ValidationError, match="tpp"):
        configure(load_serve_config(), args={"tpp": 2})
    with pytest.raises(pydantic.ValidationError, match="max_active_jobs"):
        configure(load_serve_config(), args={"max_active_jobs": 0})


def test_a_backbone_replica_holds_one_bundle_per_mesh_rank():
    from omnireel.deployments.app import STAGE_DEPLOYMENTS, bind_stage_deployment
    from omnireel.stages import BACKBONE_STAGE

    def replica(**mesh):
        args = AppArgs(cpus_per_rank=0.5, replica_cpus=0.25, **mesh)
        bound = bind_stage_deployment(STAGE_DEPLOYMENTS[BACKBONE_STAGE.deployment], BACKBONE_STAGE, args, None)
        return bound._bound_deployment._replica_config, args.mesh

    config, mesh = replica(tp=2, sp=2, cfg_parallel=2)
    assert (mesh.cfg, mesh.sp, mesh.tp, mesh.ranks) == (2, 2, 2, 8)
    assert config.placement_group_bundles == [{"CPU": 0.75}] + [{"CPU": 0.5}] * 7   # the replica joins bundle 0
    assert config.placement_group_strategy == "STRICT_PACK"
    config, mesh = replica(sp=2)
    assert len(config.placement_group_bundles) == 2
    config, _ = replica()                                     # one rank: the replica is the rank
    assert config.placement_group_bundles is None and config.ray_actor_options["num_cpus"] == 0.75
    with pytest.raises(pydantic.ValidationError, match="cfg_parallel"):
        AppArgs(cfg_parallel=3)


def test_stage_threads_name_model_stages_and_override_threads_for_their_replicas():
    args = AppArgs(threads=2, stage_threads={"decode_audio": 1})
    assert args.threads_for(["decode_audio"]) == 1 and args.threads_for(["decode_video"]) == 2
    with pytest.raises(pydantic.ValidationError, match="stage_threads: unknown stage 'mux'"):
        AppArgs(stage_threads={"mux": 1})             # no model: it runs in the JobRunner
    with pytest.raises(pydantic.ValidationError, match="stage_threads.denoise: must be >= 1"):
        AppArgs(stage_threads={"denoise": 0})
    with pytest.raises(pydantic.ValidationError, match="compute_niceness"):
        AppArgs(compute_niceness=20)


def test_set_options_are_build_app_args_read_as_yaml():
    args = parse_set(["stage_threads={}", "compute_niceness=null", "api_keys=[a, b]", "model_name=x=y"])
    assert args == {"stage_threads": {}, "compute_niceness": None, "api_keys": ["a", "b"], "model_name": "x=y"}
    app = omnireel_app(configure(load_serve_config(), args=args))
    assert app["args"]["stage_threads"] == {} and app["args"]["compute_niceness"] is None


def test_form_fields_flattened_in_brackets_become_nested_values():
    items = [("prompt", "a fox"), ("shots[0][prompt]", "runs"), ("shots[0][seconds]", "0.5"),
             ("shots[1][prompt]", "stops"), ("shots[1][seconds]", "0.5"), ("tags[]", "a"), ("tags[]", "b")]
    assert unflatten(items) == {"prompt": "a fox", "tags": ["a", "b"],
                                "shots": [{"prompt": "runs", "seconds": "0.5"}, {"prompt": "stops", "seconds": "0.5"}]}
    assert decode_structured({"shots": '[{"prompt": "runs", "seconds": 1}]'}) == {
        "shots": [{"prompt": "runs", "seconds": 1}]}
    as_openai_sends_it = [("shots[][prompt]", "runs"), ("shots[][prompt]", "stops"), ("shots[][seconds]", "0.5"),
                          ("shots[][seconds]", "1"), ("shots[][camera]", "pan"), ("shots[][camera]", "tilt")]
    assert unflatten(as_openai_sends_it) == {"shots": [{"prompt": "runs", "seconds": "0.5", "camera": "pan"},
                                                       {"prompt": "stops", "seconds": "1", "camera": "tilt"}]}
    with pytest.raises(APIError, match="shots: not valid JSON"):
        decode_structured({"shots": "[{"})


def test_upload_length_is_read_from_the_header_without_decoding():
    limits = AppArgs(max_upload_bytes=1 << 20, max_upload_seconds=1.0)
    clip = media.encode_video(np.zeros((24, 32, 32, 3), np.uint8), fps=8)      # 3 s
    broken = corrupt_frames(clip)
    with pytest.raises(Exception):
        media.decode_video(broken)                 # decoding this file fails ...
    with pytest.raises(APIError, match=r"3\.00 s long; the limit is 1 s") as refused:
        check_upload(broken, limits)               # ... so the duration check never decoded it
    assert refused.value.status == 400
    with pytest.raises(APIError, match="limit is 100 bytes") as too_big:
        check_upload(clip, AppArgs(max_upload_bytes=100))
    assert too_big.value.status == 413


def corrupt_frames(mp4: bytes) -> bytes:
    """The same MP4 with its frame data (the mdat box payload) overwritten; the header is intact."""
    at = mp4.index(b"mdat") + 4
    return mp4[:at] + bytes(len(mp4) - at)


def test_the_ltx2_serve_config_validates_and_puts_the_text_encoder_on_a_gpu():
    from omnireel.stages import STAGE_GRAPH

    config = configure(load_serve_config(CONFIG_PATH.with_name("serve_config_ltx2.yaml")))
    args = AppArgs.model_validate(omnireel_app(config)["args"])
    gpus = {stage.name: args.gpus_for(stage) for stage in STAGE_GRAPH if stage.component}
    assert gpus == {"encode_text": 1, "encode_voice": 0, "encode_media": 1, "denoise": 1, "decode_video": 1,
                    "decode_audio": 0}
    assert AppArgs().gpus_for(STAGE_GRAPH[0]) == 0 == AppArgs(stage_gpus={"encode_text": 1}).gpus_for(STAGE_GRAPH[0])
    with pytest.raises(pydantic.ValidationError, match="stage_gpus: unknown stage 'mux'"):
        AppArgs(stage_gpus={"mux": 1})


def test_the_wan_serve_config_validates_with_a_tp_group_and_no_audio_gpu():
    from omnireel.stages import STAGE_GRAPH

    config = configure(load_serve_config(CONFIG_PATH.with_name("serve_config_wan.yaml")))
    args = AppArgs.model_validate(omnireel_app(config)["args"])
    assert args.tp == 2 and args.dtype == "bfloat16"
    assert {stage.name: args.gpus_for(stage) for stage in STAGE_GRAPH if stage.component} == {
        "encode_text": 1, "encode_voice": 0, "encode_media": 1, "denoise": 1, "decode_video": 1, "decode_audio": 0}


def test_a_batching_backbone_takes_a_batch_and_as_many_waiting_and_the_bounds_are_checked():
    from omnireel.deployments.app import backbone_queue
    assert backbone_queue(AppArgs(max_batch_jobs=8)) == {"max_ongoing_requests": 16}
    assert backbone_queue(AppArgs(max_batch_jobs=1)) == {"max_ongoing_requests": 2}    # batching off
    assert backbone_queue(AppArgs(tp=2, max_batch_jobs=8)) == {"max_ongoing_requests": 16}   # rank 0 batches
    with pytest.raises(pydantic.ValidationError, match="max_batch_jobs"):
        AppArgs(max_batch_jobs=0)
    with pytest.raises(pydantic.ValidationError, match="max_batch_tokens"):
        AppArgs(max_batch_tokens=0)
