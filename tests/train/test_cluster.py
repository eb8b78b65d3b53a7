"""The cluster recipes parse and say what they must (they cannot be run here)."""

from __future__ import annotations

from pathlib import Path

import yaml

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def test_runtime_env_excludes_local_state_and_sets_node_local_caches():
    env = load("runtime_env.yaml")
    assert env["working_dir"] == "."
    for excluded in (".git/", ".venv/", "data/", "mlruns/", "mlflow.db"):
        assert excluded in env["excludes"]
    assert env["env_vars"]["TRITON_CACHE_DIR"].startswith("/tmp/")
    assert env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http")


def test_cluster_launcher_has_a_cpu_head_and_gpu_workers():
    config = load("gpu-cluster.yaml")
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"]["GPU"] == 0
    assert types["gpu_worker"]["resources"]["GPU"] == 8
    assert types["gpu_worker"]["max_workers"] <= config["max_workers"]


def test_rayjob_trains_the_kuairand_recipe_on_gpus():
    job = load("rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    entrypoint = job["spec"]["entrypoint"]
    assert "launch.py train" in entrypoint and "--use-gpu" in entrypoint
    assert "recipes/kuairand_dlrm_hstu.config" in entrypoint
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert "TRITON_CACHE_DIR" in runtime_env["env_vars"]
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    limits = worker["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "8"
    assert (Path(__file__).resolve().parents[2] / "recipes/kuairand_dlrm_hstu.config").is_file()


def test_every_recipe_says_what_has_not_run():
    for name in ("gpu-cluster.yaml", "rayjob.yaml"):
        assert "NOT RUN BY THIS PROJECT" in (CLUSTER / name).read_text(), name
    assert "NOT RUN ON A REAL CLUSTER" in (CLUSTER / "runtime_env.yaml").read_text()
