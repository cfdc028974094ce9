"""The cluster configs a user applies (cluster/configs/*.yaml): they parse, carry the fields their
tools require, match this project's Ray version, and their entrypoints name real commands and configs."""

from __future__ import annotations

import importlib
import importlib.util
import json
import shlex
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from cluster.placement import ROLLOUT_NODES, TRAIN_NODES
from rlhf.cli import STAGE_MODULES, parse_args
from rlhf.cli_jobs import check_command
from rlhf.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "cluster" / "configs"
PROJECT_IN_IMAGE = "/home/ray/rlhf"  # where the launcher syncs, and the image installs, this checkout
SHARED = "/mnt/shared"  # the ReadWriteMany volume every KubeRay pod mounts


def load(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def test_the_configs_ship_with_the_package():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == ["ray-cluster.yaml", "rayjob.yaml", "rayservice.yaml"]
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "configs/*.yaml" in pyproject["tool"]["setuptools"]["package-data"]["cluster"]


# --------------------------------------------------------------------------------------------------
# Cluster launcher
# --------------------------------------------------------------------------------------------------


def test_cluster_launcher_config_is_valid_and_runs_this_project():
    cfg = load("ray-cluster.yaml")
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)  # Ray's own schema for `ray up`

    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert types[cfg["head_node_type"]]["resources"].get("GPU", 0) == 0
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    node_resources = {r for t in workers.values() for r in t["resources"] if r.startswith("rlhf_")}
    assert node_resources == {TRAIN_NODES, ROLLOUT_NODES}
    for t in workers.values():
        assert t["resources"]["GPU"] > 0 and 0 <= t["min_workers"] <= t["max_workers"]
    assert sum(t["min_workers"] for t in workers.values()) <= cfg["max_workers"]

    image = cfg["docker"]["image"]
    assert image == f"rayproject/ray:{ray.__version__}-py{sys.version_info.major}{sys.version_info.minor}-gpu"
    # This checkout is synced and installed, so `rlhf` is on PATH for jobs.
    assert cfg["file_mounts"][PROJECT_IN_IMAGE] == "."
    assert any(c.startswith("pip install") and f"{PROJECT_IN_IMAGE}[gpu]" in c for c in cfg["setup_commands"])
    assert any(c.startswith("rlhf ") for c in cfg["setup_commands"])
    assert {".venv", ".git", "runs", ".cache"} <= set(cfg["rsync_exclude"])
    # Token authentication for every Ray process, with the client's token file.
    assert "--env RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    assert cfg["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "ray start --head" in head_start and "--dashboard-host=127.0.0.1" in head_start  # via `ray dashboard`
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in cfg["worker_start_ray_commands"])


# --------------------------------------------------------------------------------------------------
# KubeRay
# --------------------------------------------------------------------------------------------------


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def ray_resources(group: dict) -> dict:
    """rayStartParams.resources is a quoted JSON string, as KubeRay passes it to `ray start`."""
    raw = group["rayStartParams"].get("resources")
    return json.loads(json.loads(raw)) if raw else {}


def gpus(group: dict) -> int:
    limits = containers(group["template"])[0]["resources"]["limits"]
    return int(limits.get("nvidia.com/gpu", 0))


def check_ray_cluster_spec(spec: dict) -> dict[str, dict]:
    """Fields KubeRay needs, Ray's version, token auth, GPU groups; returns the worker groups by name."""
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"]["mode"] == "token"  # KubeRay sets RAY_AUTH_MODE and RAY_AUTH_TOKEN everywhere
    head = spec["headGroupSpec"]
    image = containers(head["template"])[0]["image"]
    assert image and gpus(head) == 0
    assert {p["containerPort"] for p in containers(head["template"])[0]["ports"]} >= {6379, 8265}
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert len(groups) == len(spec["workerGroupSpecs"])
    for group in groups.values():
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (container,) = containers(group["template"])
        assert container["image"] == image
        assert container["resources"]["requests"] == container["resources"]["limits"]
        assert gpus(group) > 0
        assert SHARED in {m["mountPath"] for m in container["volumeMounts"]}
    return groups


def test_rayjob_runs_the_pipeline_on_gpu_worker_groups():
    job = load("rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob") and job["metadata"]["name"]
    spec = job["spec"]
    groups = check_ray_cluster_spec(spec["rayClusterSpec"])
    assert {r for g in groups.values() for r in ray_resources(g)} == {TRAIN_NODES, ROLLOUT_NODES}
    assert spec["submissionMode"] == "K8sJobMode"  # working_dir is uploaded from the submitter pod
    assert spec["shutdownAfterJobFinishes"] is True

    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == PROJECT_IN_IMAGE
    assert runtime_env["env_vars"]["RLHF_HOME"].startswith(SHARED + "/")

    argv = shlex.split(spec["entrypoint"])
    assert argv[:4] == ["rlhf", "run", "-c", "configs/demo.yaml"]
    assert f"output_dir={SHARED}/runs/demo" in argv
    if not (REPO / "configs" / "demo.yaml").is_file():
        pytest.skip("configs/demo.yaml (the pipeline's preset) is not in this checkout yet")
    check_command(argv, REPO, parse_args)  # parses as the job will, and the config loads


def test_rayservice_serves_the_aligned_policy():
    service = load("rayservice.yaml")
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService") and service["metadata"]["name"]
    groups = check_ray_cluster_spec(service["spec"]["rayClusterSpec"])

    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    module, _, builder = app["import_path"].partition(":")
    assert module == STAGE_MODULES["serve"] and builder == "build_app"
    cfg = load_config("serve", app["args"]["config"], app["args"]["overrides"])
    assert cfg.model.path == f"{SHARED}/runs/demo/ppo/final"
    assert cfg.host == "0.0.0.0" and cfg.api_key is None  # the key comes from a Secret, as $RLHF_API_KEY
    assert cfg.gpus_per_replica <= min(gpus(g) for g in groups.values())
    head = containers(service["spec"]["rayClusterSpec"]["headGroupSpec"]["template"])[0]
    assert cfg.port in {p["containerPort"] for p in head["ports"]}
    for container in [head, *(containers(g["template"])[0] for g in groups.values())]:
        assert {e["name"] for e in container["env"]} >= {"RLHF_API_KEY"}
    if importlib.util.find_spec(module) is not None:
        assert callable(getattr(importlib.import_module(module), builder, None)), f"{module} has no {builder}"


def test_a_submitted_jobs_plugins_must_be_inside_its_working_directory(tmp_path, monkeypatch):
    """The job imports plugins from the working directory it is shipped with: a file outside it would
    not reach the cluster, so `rlhf submit` refuses it; one inside passes."""
    outside = tmp_path / "my_algos.py"
    outside.write_text("from rlhf.algorithms import register_kl_estimator\n\n\n"
                       "@register_kl_estimator('abs_log_ratio')\ndef abs_log_ratio(log_ratio):\n    return log_ratio.abs()\n")
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match=r"plugins: .*my_algos.py is outside the job's working directory"):
        check_command(["rlhf", "ppo", "-c", "configs/tiny/grpo.yaml", f"plugins=[{outside}]"], REPO, parse_args)
    config = check_command(["rlhf", "ppo", "-c", "configs/tiny/grpo.yaml", "plugins=[tests/data/my_algos.py]",
                            "ppo.advantage=signed_outcome"], REPO, parse_args)
    assert config.ppo.advantage == "signed_outcome"
