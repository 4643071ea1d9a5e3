"""k8s/ manifests: they parse, validate against KubeRay's CRDs, and stay in step with the repo.

The CRDs come from ../shared/kuberay-crds (skipped with a message when that folder is absent).
Kubernetes prunes or rejects unknown fields, so the validator here treats every object schema that
lists its properties as closed: a typo in a field name fails this test instead of a cluster apply.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
CRDS = REPO.parent / "shared" / "kuberay-crds"
CRD_FILES = {"RayService": "ray.io_rayservices.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayCluster": "ray.io_rayclusters.yaml"}
# Cluster values the RayService may set differently from deployments/serve_config.yaml; nothing else.
CLUSTER_ARGS = {"checkpoint", "tp", "sp", "cfg_parallel", "use_gpu", "storage_uri", "allowed_buckets"}


def manifests() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def closed(schema):
    """A copy of an OpenAPI v3 schema where objects with listed properties refuse unknown keys."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def crd_validator(kind: str):
    jsonschema = pytest.importorskip("jsonschema")
    if not CRDS.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRDS}: cannot validate k8s/ manifests")
    crd = yaml.safe_load((CRDS / CRD_FILES[kind]).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft7Validator(closed(version["schema"]["openAPIV3Schema"]))


def test_every_manifest_parses_and_names_its_kind():
    docs = manifests()
    kinds = {d["kind"] for _, d in docs}
    assert {"RayService", "RayJob"} <= kinds, kinds
    for name, doc in docs:
        assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), name


def embedded_clusters() -> list[tuple[str, dict]]:
    """The RayCluster specs inside RayServices and RayJobs, as RayCluster objects."""
    out = []
    for name, doc in manifests():
        spec = doc["spec"].get("rayClusterConfig") or doc["spec"].get("rayClusterSpec")
        if doc["kind"] in ("RayService", "RayJob") and spec:
            out.append((f"{name} (cluster)", {"apiVersion": "ray.io/v1", "kind": "RayCluster",
                                              "metadata": {"name": doc["metadata"]["name"]}, "spec": spec}))
    return out


@pytest.mark.parametrize("kind", sorted(CRD_FILES))
def test_kuberay_manifests_validate_against_their_crd(kind):
    docs = [(name, d) for name, d in manifests() + embedded_clusters() if d["kind"] == kind]
    if not docs:
        pytest.skip(f"no {kind} manifest in k8s/")
    validator = crd_validator(kind)
    for name, doc in docs:
        assert doc["apiVersion"] == "ray.io/v1", name
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
        assert not errors, f"{name}: " + "; ".join(errors[:5])


def test_a_typo_in_a_field_name_is_caught():
    service = rayservice("rayservice.yaml")
    broken = copy.deepcopy(service)
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 3
    assert any("maxReplica" in e.message for e in crd_validator("RayService").iter_errors(broken))


# Each RayService and the Serve config its serveConfigV2 must equal (cluster values aside).
SERVICE_CONFIGS = {"rayservice.yaml": "serve_config.yaml", "rayservice-ltx2.yaml": "serve_config_ltx2.yaml",
                   "rayservice-wan.yaml": "serve_config_wan.yaml"}


def rayservice(name: str) -> dict:
    return next(d for n, d in manifests() if n == name and d["kind"] == "RayService")


def test_every_rayservice_has_its_serve_config():
    services = {n for n, d in manifests() if d["kind"] == "RayService"}
    assert services == set(SERVICE_CONFIGS), "a RayService without a serve config to check it against"


@pytest.mark.parametrize("name", sorted(SERVICE_CONFIGS))
def test_serve_config_v2_is_the_repo_serve_config(name):
    from ray.serve.schema import ServeDeploySchema
    cluster = yaml.safe_load(rayservice(name)["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(cluster)
    repo = yaml.safe_load((REPO / "deployments" / SERVICE_CONFIGS[name]).read_text())
    cluster_app, repo_app = cluster["applications"][0], repo["applications"][0]
    changed = {k for k in set(cluster_app["args"]) | set(repo_app["args"])
               if cluster_app["args"].get(k) != repo_app["args"].get(k)}
    assert changed <= CLUSTER_ARGS, f"serveConfigV2 args drifted from {SERVICE_CONFIGS[name]}: {sorted(changed - CLUSTER_ARGS)}"
    strip = lambda app: {k: v for k, v in app.items() if k != "args"}  # noqa: E731
    assert strip(cluster_app) == strip(repo_app), "import path, route or deployments drifted"
    assert {k: v for k, v in cluster.items() if k != "applications"} == \
           {k: v for k, v in repo.items() if k != "applications"}
    from omnireel.deployments.args import AppArgs
    AppArgs.model_validate(cluster_app["args"])      # the cluster's args are valid build_app args


def gpus(group: dict) -> int:
    return int(group["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))


@pytest.mark.parametrize("name", sorted(SERVICE_CONFIGS))
def test_cluster_shape_fits_the_serve_config(name):
    spec = rayservice(name)["spec"]
    cluster = spec["rayClusterConfig"]
    args = yaml.safe_load(spec["serveConfigV2"])["applications"][0]["args"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    for g in groups.values():
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    # a Backbone replica is one placement group of cfg_parallel x sp x tp GPUs on one node; a stage with
    # stage_gpus needs a GPU pod that holds one replica
    from omnireel.deployments.args import AppArgs
    ranks = AppArgs.model_validate(args).mesh.ranks
    assert max(gpus(g) for g in groups.values()) >= ranks, "no GPU group can hold one Backbone group"
    for stage, count in args.get("stage_gpus", {}).items():
        assert count == 0 or max(gpus(g) for g in groups.values()) >= count, f"no GPU group for {stage}"
    for g in groups.values():
        if gpus(g):
            assert any(t["key"] == "nvidia.com/gpu" for t in g["template"]["spec"].get("tolerations", []))


def test_rayjob_entrypoint_is_a_valid_batch_command():
    import shlex

    from omnireel.cli import build_parser, flag_values
    from omnireel.pipelines.args import BatchOptions
    job = next(d for _, d in manifests() if d["kind"] == "RayJob")
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "omnireel.pipelines.render"]
    args = build_parser().parse_args(["batch", *argv[3:]])
    options = flag_values(args, BatchOptions)                # what the entrypoint's run_batch receives
    assert args.manifest.startswith("s3://") and args.out.startswith("s3://") and options.pushgateway
    ranks = options.mesh.ranks                               # one denoise actor's group, on one node
    assert any(gpus(g) >= ranks for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"])
