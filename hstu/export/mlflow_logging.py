"""Logging an export to the MLflow run that trained it.

Two things go into the run:
  - the export directory as artifacts, under `export/`;
  - an MLflow model named `hstu_ranker` (MLflow 3 `name=`), logged with "models from code"
    (hstu/export/pyfunc_model.py is the model's code, the export directory its one artifact,
    this package's source its code path), so `mlflow.pyfunc.load_model` rebuilds it by running
    code, never by unpickling an object.

The run keeps the status it had: logging a model reopens the run with MLflow's fluent API, which
marks it finished on exit, so the previous status (RUNNING while the trainer still owns it) is
put back.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import tempfile
import logging
import os
from pathlib import Path

MODEL_NAME = "hstu_ranker"
ARTIFACT_DIR = "export"
# What the pyfunc model imports when it predicts (no TorchRec, no Ray).
REQUIREMENTS = ("torch", "numpy", "pandas", "pyarrow", "protobuf", "grpcio-tools", "mlflow")


def _pinned_requirements() -> list[str]:
    pins = []
    for name in REQUIREMENTS:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pins.append(name)
            continue
        # A local build tag (torch "2.13.0+cpu") is not on the package index.
        pins.append(f"{name}=={version.split('+')[0]}")
    return pins


def log_export(export_dir: str | Path, tracking_uri: str, run_id: str):
    """Log `export_dir` to run `run_id`; returns MLflow's ModelInfo of the pyfunc model."""
    import mlflow
    from mlflow.tracking import MlflowClient

    import hstu
    from hstu.export import pyfunc_model
    from hstu.export.pyfunc_model import EXPORT_ARTIFACT

    export_dir = Path(export_dir)
    client = MlflowClient(tracking_uri=tracking_uri)
    status = client.get_run(run_id).info.status
    client.log_artifacts(run_id, str(export_dir), ARTIFACT_DIR)

    previous_uri = mlflow.get_tracking_uri()
    # log_model reloads the model to check it, drawing a download bar per file on stderr:
    # noise in a training log. Off while we log, restored after.
    previous_bar = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    # The model has no signature on purpose (pyfunc_model.py: predict checks its input
    # itself); MLflow logs a warning about that on every export. Quiet while we log.
    pyfunc_logger = logging.getLogger("mlflow.pyfunc")
    previous_level = pyfunc_logger.level
    pyfunc_logger.setLevel(logging.ERROR)
    staging = Path(tempfile.mkdtemp(prefix="hstu-pyfunc-"))
    try:
        # The package's source, without caches: the model needs it to predict.
        package = Path(hstu.__file__).parent
        shutil.copytree(
            package, staging / "hstu", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
        mlflow.set_tracking_uri(tracking_uri)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                python_model=pyfunc_model.__file__,
                artifacts={EXPORT_ARTIFACT: str(export_dir)},
                code_paths=[str(staging / "hstu")],
                pip_requirements=_pinned_requirements(),
                # Declares the load-time options (cached mode): MLflow drops undeclared keys.
                model_config=dict(pyfunc_model.DEFAULT_MODEL_CONFIG),
            )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        mlflow.set_tracking_uri(previous_uri)
        pyfunc_logger.setLevel(previous_level)
        if previous_bar is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = previous_bar
        client.update_run(run_id, status=status)
    return info
