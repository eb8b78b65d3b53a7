"""The export in MLflow: artifacts in the training run, and a pyfunc model (models from code)
that loads and scores a DataFrame of sample rows."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml


@pytest.mark.slow
def test_export_is_logged_to_the_training_run_and_loads_as_pyfunc(
    smoke_export, smoke_predictor, samples, tmp_path, reuse_smoke_predictor
):
    import mlflow
    from mlflow.tracking import MlflowClient

    from hstu.export.exporter import _log_to_mlflow
    from hstu.train.tracking import write_run_link

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri)
    experiment = client.create_experiment(
        "export-test", artifact_location=(tmp_path / "mlruns").as_uri()
    )
    run_id = client.create_run(experiment).info.run_id
    # The trainer's layout: <run dir>/mlflow_run.json beside <run dir>/checkpoint_<...>.
    run_dir = tmp_path / "run"
    write_run_link(run_dir, tracking_uri, run_id)
    (run_dir / "checkpoint_000001").mkdir()

    _log_to_mlflow(smoke_export.export_dir, run_dir / "checkpoint_000001", "auto")

    assert client.get_run(run_id).info.status == "RUNNING"  # the trainer still owns the run
    logged = {a.path for a in client.list_artifacts(run_id, "export")}
    assert {"export/model.pt2", "export/model_acc.json", "export/export_manifest.json"} <= logged
    models = client.search_logged_models(experiment_ids=[experiment])
    assert [(m.name, m.source_run_id) for m in models] == [("hstu_ranker", run_id)]

    previous_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        model = mlflow.pyfunc.load_model(f"models:/{models[0].model_id}")
        model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{models[0].model_id}"))
    finally:
        mlflow.set_tracking_uri(previous_uri)
    table = pq.read_table(min(samples["eval"].glob("*.parquet")))
    scores = model.predict(table.to_pandas())
    expected = smoke_predictor.predict_table(table).to_pandas()
    assert list(scores.columns) == list(expected.columns)
    assert scores["sample_id"].tolist() == expected["sample_id"].tolist()
    for got, want in zip(scores["probs_is_click"], expected["probs_is_click"]):
        assert list(got) == list(want)
    # Models from code: MLflow rebuilds the model by running pyfunc_model.py; nothing pickled.
    flavor = yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert flavor["model_code_path"].endswith("pyfunc_model.py")
    assert not list(model_dir.rglob("*.pkl"))
