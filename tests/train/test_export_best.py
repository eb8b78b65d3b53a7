"""A run's export: --export-best picks the checkpoint, and the export is checked against
training on the eval set (train vs serve) before it is logged as the run's model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def exported(ray_session, smoke_data, smoke_recipe, mlflow_uri, tmp_path_factory):
    import contextlib
    import io

    spec = importlib.util.spec_from_file_location("launch", REPO / "launch.py")
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)
    root = tmp_path_factory.mktemp("export_best")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = launch.main([
            "train", "--recipe", smoke_recipe, "--train", smoke_data["train"], "--eval",
            smoke_data["eval"], "--workers", "2", "--storage", str(root / "runs"),
            "--mlflow-uri", mlflow_uri, "--run-name", "best-loss",
            "--export-best", "loss/is_click",
            "--set", "data_config.batch_size=8", "--set", "train_config.num_epochs=1",
            "--set", "train_config.save_checkpoints_steps=2"])
    from hstu.train.tracking import client

    mlflow_client = client(mlflow_uri)
    run = mlflow_client.search_runs(
        [e.experiment_id for e in mlflow_client.search_experiments()],
        filter_string="attributes.run_name = 'best-loss'")[0]
    return status, out.getvalue(), err.getvalue(), run, mlflow_client, root


def test_the_best_checkpoint_by_the_metric_is_exported(exported):
    status, out, err, run, mlflow_client, root = exported
    assert status == 0, err[-3000:]
    history = mlflow_client.get_metric_history(run.info.run_id, "eval/loss/is_click")
    best = min(history, key=lambda m: (m.value, m.step))
    name = f"checkpoint_{best.step:08d}"
    assert run.data.tags["hstu.exported_checkpoint"].endswith(name)
    assert run.data.tags["hstu.export_reason"] == (
        f"best eval/loss/is_click {best.value:.4f} at step {best.step}")
    export_line = next(line for line in out.splitlines() if line.startswith("export "))
    assert f"({name}: best eval/loss/is_click" in export_line
    manifest = (root / "runs" / "best-loss" / "export" / "export_manifest.json").read_text()
    assert name in manifest  # exported from that checkpoint


def test_the_export_matches_training_and_says_so(exported):
    status, out, _, run, mlflow_client, _ = exported
    assert status == 0
    metrics = run.data.metrics
    # The 2-worker evaluation against the exported program scoring the same rows alone.
    assert metrics["serve/max_score_diff"] <= 1e-4
    assert metrics["serve/max_metric_diff"] <= 1e-3
    assert metrics["serve/metric_diff/auc/is_click"] <= 1e-3
    assert "serving      train vs serve on " in out
    listed = {a.path for a in mlflow_client.list_artifacts(run.info.run_id)}
    assert "export" in listed  # logged once it had passed
