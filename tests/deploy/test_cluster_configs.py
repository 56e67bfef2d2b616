"""Cluster configs checked against their owners' schemas, offline.

- ``ray_cluster.yaml`` goes through what ``ray up`` does before it touches AWS: ``prepare_config`` (merge the
  provider's defaults) and ``validate_config`` (Ray's JSON schema plus its cross-field rules).
- ``deploy/kuberay/*.yaml`` are validated against the KubeRay operator's own CRD schemas (``../shared/kuberay-crds``),
  closed to unknown keys: the API server would silently prune a misspelt field such as ``enableInTreeAutoScaling``,
  so the manifest would apply and then quietly do the wrong thing.
- The embedded Serve config and runtime envs are parsed by Ray's own models.

On top of the schemas, the properties the deployment relies on: a head that runs no work, GPU workers that scale
from zero, images that match the Ray this project is tested with, and Ray APIs that stay on loopback/ClusterIP
and want the cluster's token.
"""

from __future__ import annotations

import copy
import importlib
import os
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CRDS = Path(__file__).resolve().parents[3] / "shared" / "kuberay-crds"
KUBERAY = {
    "RayJob": REPO / "deploy" / "kuberay" / "rayjob.yaml",
    "RayService": REPO / "deploy" / "kuberay" / "rayservice.yaml",
}
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml"}
NOT_SOURCE = {".venv", ".git", ".ddpm", "mlruns", "build", "node_modules", ".pytest_cache"}


def _load(path: Path):
    return yaml.safe_load(path.read_text())


def _ray_version() -> str:
    import ray

    return ray.__version__


# ---------------------------------------------------------------------------------------------------------------
# Every YAML file in the repository


def _yaml_files() -> list[Path]:
    """The repository's YAML files, without descending into the virtualenv and other local state."""
    found = []
    for folder, subfolders, files in os.walk(REPO):
        subfolders[:] = [d for d in subfolders if d not in NOT_SOURCE]
        found += [Path(folder) / f for f in files if f.endswith((".yaml", ".yml"))]
    return sorted(found)


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_file_parses(path):
    documents = list(yaml.safe_load_all(path.read_text()))
    assert documents and all(isinstance(d, dict) for d in documents), f"{path} is not a mapping"


# ---------------------------------------------------------------------------------------------------------------
# ray_cluster.yaml: the Ray cluster launcher on AWS


@pytest.fixture(scope="module")
def cluster():
    return _load(REPO / "ray_cluster.yaml")


def _prepared(config: dict) -> dict:
    """What ``ray up`` validates: the config merged with the provider's defaults, then checked by Ray."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_ray_cluster_passes_rays_own_validation(cluster):
    prepared = _prepared(cluster)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["auth"]["ssh_user"] == "ubuntu"


def test_ray_validation_rejects_a_misspelt_key(cluster):
    """Proof that the check above has teeth: Ray's schema is closed at the top level."""
    import jsonschema

    broken = copy.deepcopy(cluster)
    broken["idle_timeout_minute"] = broken.pop("idle_timeout_minutes")
    with pytest.raises(jsonschema.ValidationError, match="idle_timeout_minute"):
        _prepared(broken)


def test_head_node_runs_no_work(cluster):
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"].get("CPU") == 0
    assert head["resources"].get("GPU", 0) == 0


def test_gpu_workers_scale_from_zero(cluster):
    workers = {name: t for name, t in cluster["available_node_types"].items() if name != cluster["head_node_type"]}
    by_instance = {t["node_config"]["InstanceType"]: t for t in workers.values()}
    assert by_instance["g5.xlarge"]["resources"]["GPU"] == 1       # one A10G
    assert by_instance["p4d.24xlarge"]["resources"]["GPU"] == 8    # eight A100s
    for name, node_type in workers.items():
        assert node_type["resources"].get("GPU", 0) >= 1, f"{name} is not a GPU type"
        assert node_type["min_workers"] == 0, f"{name} keeps idle GPU nodes"
        assert node_type["max_workers"] >= 1
    assert 1 <= cluster["idle_timeout_minutes"] <= 30


def test_nodes_use_an_instance_profile_not_keys(cluster):
    for name, node_type in cluster["available_node_types"].items():
        arn = node_type["node_config"]["IamInstanceProfile"]["Arn"]
        assert arn.startswith("arn:aws:iam::") and ":instance-profile/" in arn, name
    text = (REPO / "ray_cluster.yaml").read_text()
    assert "AWS_SECRET_ACCESS_KEY" not in text and "aws_secret_access_key" not in text


def test_images_match_the_installed_ray(cluster):
    docker = cluster["docker"]
    images = [docker[k] for k in ("image", "head_image", "worker_image") if k in docker]
    assert images
    for image in images:
        repo, tag = image.split(":")
        assert repo == "rayproject/ray" and tag.split("-")[0] == _ray_version(), image
    assert docker["worker_image"].endswith("-gpu")


def test_setup_installs_this_project(cluster):
    remote = next(r for r, local in cluster["file_mounts"].items() if local == ".")
    assert any(c.startswith("pip install") and remote in c for c in cluster["setup_commands"])


def test_dashboard_stays_on_loopback_and_wants_the_token(cluster):
    """The dashboard accepts jobs: it binds to the head's loopback, is reached through `ray dashboard`, and every
    node requires the token that `ray get-auth-token --generate` wrote to ~/.ray/auth_token."""
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    commands = [c for key, value in cluster.items() if key.endswith("commands") for c in value]
    assert not any("0.0.0.0" in c for c in commands)
    rules = cluster["provider"].get("security_group", {}).get("IpPermissions", [])
    assert not any(r.get("FromPort", 0) <= 8265 <= r.get("ToPort", -1) for r in rules)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in cluster[key] if "ray start" in c)
        assert "export RAY_AUTH_MODE=token;" in start, key
    assert cluster["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"


# ---------------------------------------------------------------------------------------------------------------
# KubeRay manifests against the operator's CRD schemas


def _closed(schema):
    """A copy of an OpenAPI schema in which every object with declared properties rejects undeclared keys.

    Fields that Kubernetes keeps as free-form (``x-kubernetes-preserve-unknown-fields``) stay open.
    """
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: _closed(value) for key, value in schema.items()}
    if "properties" in closed and "additionalProperties" not in closed and not closed.get(
        "x-kubernetes-preserve-unknown-fields"
    ):
        closed["additionalProperties"] = False
    return closed


@pytest.fixture(scope="module")
def crd_validator():
    """``crd_validator(kind)``: a validator for the CRD's storage version, closed to unknown keys (cached)."""
    if not CRDS.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {CRDS} (the repository's ../shared/kuberay-crds)")
    import jsonschema

    validators = {}

    def get(kind: str):
        if kind not in validators:
            crd = yaml.load((CRDS / CRD_FILES[kind]).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
            version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
            assert crd["spec"]["names"]["kind"] == kind
            # OpenAPI v3 schemas are JSON Schema draft 4 plus extensions (x-kubernetes-*), which the validator ignores.
            validator = jsonschema.Draft4Validator(_closed(version["schema"]["openAPIV3Schema"]))
            validators[kind] = (f"{crd['spec']['group']}/{version['name']}", validator)
        return validators[kind]

    return get


@pytest.fixture(scope="module")
def rayjob():
    return _load(KUBERAY["RayJob"])


@pytest.fixture(scope="module")
def rayservice():
    return _load(KUBERAY["RayService"])


def _cluster_spec(manifest: dict) -> dict:
    return manifest["spec"]["rayClusterSpec" if manifest["kind"] == "RayJob" else "rayClusterConfig"]


def _containers(cluster_spec: dict):
    groups = [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


@pytest.mark.parametrize("kind", sorted(KUBERAY))
def test_manifest_matches_the_kuberay_crd(kind, crd_validator):
    manifest = _load(KUBERAY[kind])
    api_version, validator = crd_validator(kind)
    assert manifest["kind"] == kind and manifest["apiVersion"] == api_version
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]
    assert not errors, "\n".join(errors)


def test_crd_validation_rejects_a_misspelt_field(rayjob, crd_validator):
    """Proof that unknown keys are caught: this typo would otherwise be pruned and disable autoscaling."""
    broken = copy.deepcopy(rayjob)
    spec = _cluster_spec(broken)
    spec["enableInTreeAutoScaling"] = spec.pop("enableInTreeAutoscaling")
    _, validator = crd_validator("RayJob")
    assert any("enableInTreeAutoScaling" in e.message for e in validator.iter_errors(broken))


@pytest.mark.parametrize("kind", sorted(KUBERAY))
def test_kuberay_cluster_autoscales_gpu_workers_with_an_idle_head(kind):
    spec = _cluster_spec(_load(KUBERAY[kind]))
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == _ray_version()
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for group in spec["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1, group["groupName"]
            assert container["image"].endswith("-gpu")
        assert group["minReplicas"] <= group["maxReplicas"]
    for container in _containers(spec):
        repo, tag = container["image"].split(":")
        assert repo == "rayproject/ray" and tag.split("-")[0] == _ray_version(), container["image"]


@pytest.mark.parametrize("kind", sorted(KUBERAY))
def test_kuberay_dashboard_is_not_exposed_and_wants_a_token(kind):
    manifest = _load(KUBERAY[kind])
    assert _cluster_spec(manifest)["authOptions"]["mode"] == "token"
    head = _cluster_spec(manifest)["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress", False)
    assert manifest["spec"].get("serveService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
    assert "0.0.0.0" not in KUBERAY[kind].read_text()


def test_rayjob_runs_the_pipeline_on_a_cluster_that_scales_to_zero(rayjob):
    from ray.runtime_env import RuntimeEnv

    from pipelines.cli import SUBCOMMANDS
    from pipelines.config import load_config

    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:4] == ["python", "-m", "pipelines.cli", "pipeline"] and argv[3] in SUBCOMMANDS
    config = argv[argv.index("--config") + 1]
    load_config(REPO / config)  # the preset the job names exists and is valid
    assert all(group["minReplicas"] == 0 for group in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"])
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    RuntimeEnv(**yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"]))  # Ray's own runtime_env validation


def test_rayjob_entrypoint_parses_with_the_ddpm_cli(rayjob):
    """The job's flags are the ones ``ddpm pipeline`` accepts."""
    from pipelines.cli import build_parser

    argv = shlex.split(rayjob["spec"]["entrypoint"])[3:]
    build_parser(only="pipeline").parse_args(argv)


def _serve_config(rayservice: dict):
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema.model_validate(yaml.safe_load(rayservice["spec"]["serveConfigV2"]))


def test_rayservice_serve_config_is_valid_and_autoscaled(rayservice):
    from ray.runtime_env import RuntimeEnv

    (app,) = _serve_config(rayservice).applications
    assert app.import_path == "deploy.serve_app:build_app"
    assert app.args == {"model_uri": "models:/digits@production"}
    RuntimeEnv(**app.runtime_env)
    for deployment in app.deployments:
        scaling = deployment.autoscaling_config
        assert scaling and 1 <= scaling["min_replicas"] <= scaling["max_replicas"], deployment.name
    assert rayservice["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True


def test_rayservice_import_path_builds_the_configured_deployments(rayservice):
    """The import path resolves to an app builder, and every deployment the config tunes exists in the app."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app

    (app,) = _serve_config(rayservice).applications
    module_name, attribute = app.import_path.split(":")
    builder = getattr(importlib.import_module(module_name), attribute)
    built = build_app(call_user_app_builder_with_args_if_necessary(builder, app.args), name=app.name)
    names = {d.name for d in built.deployments}
    assert {d.name for d in app.deployments} <= names, f"serveConfigV2 tunes deployments the app lacks: {names}"


def test_spot_workers_checkpoint_before_their_pod_stops(rayjob):
    """The ``gpu-spot`` group's preStop hook, run for real: it sends SIGTERM to the processes titled
    ``ray::RayTrainWorker`` (a stand-in that takes 0.5 s to "checkpoint", then exits) and waits for them, leaving
    other processes alone; the groups' maxReplicas add up to the entrypoint's elastic maximum."""
    import signal
    import subprocess
    import sys
    import threading
    import time

    from pipelines.train.resources import Workers

    groups = {g["groupName"]: g for g in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    workers = Workers.parse(argv[argv.index("--set", argv.index("--config")) + 1].split("=", 1)[1])
    assert workers.elastic and sum(g["maxReplicas"] for g in groups.values()) == workers.max
    spot = groups["gpu-spot"]["template"]["spec"]
    [container] = spot["containers"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "python" and spot["terminationGracePeriodSeconds"] > 90

    stand_in = ("import signal, sys, time\n"
                "signal.signal(signal.SIGTERM, lambda *_: (time.sleep(0.5), sys.exit(0)))\n"
                "print('ready', flush=True)\n"
                "time.sleep(60)\n")
    worker = subprocess.Popen(["ray::RayTrainWorker", "-c", stand_in], executable=sys.executable,
                              stdout=subprocess.PIPE, text=True)
    bystander = subprocess.Popen(["ray::ServeReplica", "-c", stand_in], executable=sys.executable,
                                 stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline().strip() == "ready" and bystander.stdout.readline().strip() == "ready"
        threading.Thread(target=worker.wait, daemon=True).start()  # reap it as it exits, as a raylet does
        start = time.monotonic()
        subprocess.run([sys.executable, *command[1:]], check=True, timeout=60)
        assert worker.poll() == 0 and 0.5 <= time.monotonic() - start < 30  # waited for the exit, not longer
        assert bystander.poll() is None
    finally:
        for proc in (worker, bystander):
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            proc.stdout.close()
