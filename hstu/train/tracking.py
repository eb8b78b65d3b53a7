"""MLflow: the driver creates (or resumes) the run, rank 0 of the workers logs into it.

Ray Train V2 does not accept MLflowLoggerCallback, so the driver makes the run with
MlflowClient, logs the flattened config as params and the Ray identifiers as tags, and passes
the run id to the workers in the job; rank 0 logs metrics and artifacts with its own client.

Layout of a run (docs/training.md):
    params     every set config field, keyed by its path (`model_config.dlrm_hstu.max_seq_len`,
               repeated messages by element name: `feature_configs.user_id.id_feature.num_buckets`),
               plus `run.*` (workers, devices, data paths, sharding overrides)
    tags       hstu.ray_run_name, hstu.ray_job_id, hstu.ray_submission_id, hstu.storage_path,
               hstu.recipe, hstu.resumed
    metrics    train/loss, train/loss/<task>, train/samples_per_s, train/tokens_per_s,
               train/lr/dense, train/lr/sparse (each log interval, step = global step);
               train/skipped_rows, train/dropped_rows (rows the data pipeline left out so far,
               summed over workers, at the end of each epoch; checkpointed, so a restart
               or resume goes on counting);
               eval/auc/<task>, eval/grouped_auc/<task>, eval/mae/<task>, eval/loss/<task>,
               eval/rows, eval/skipped_rows (each evaluation)
    artifacts  pipeline.config, sharding_plan.txt, sharding_plan.json, final_metrics.json,
               locations.json (checkpoint, export and Ray storage paths), summary.txt
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from google.protobuf import descriptor
from google.protobuf.message import Message

DEFAULT_EXPERIMENT = "hstu"
RUN_LINK_FILE = "mlflow_run.json"  # in the Ray run directory: ties it to its MLflow run
_MAX_PARAM_VALUE = 6000  # MLflow's limit; the full config is an artifact anyway
_NAME_FIELDS = ("group_name", "task_name", "sequence_name", "feature_name")


def resolve_tracking_uri(cli_uri: str | None, default_dir: str | os.PathLike) -> str:
    """--mlflow-uri, else $MLFLOW_TRACKING_URI, else a sqlite database in default_dir."""
    if cli_uri:
        return cli_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    path = Path(default_dir).resolve() / "mlflow.db"
    return f"sqlite:///{path}"


class TrackingServerError(RuntimeError):
    """The MLflow tracking server named for the run does not answer."""


def check_server_reachable(uri: str, source: str, timeout_s: float = 10.0) -> None:
    """Fail fast, before Ray starts, when an http(s) tracking URI does not answer.

    Without this, MLflow's client retries each request for minutes and the run ends in a chain
    of tracebacks. Any HTTP answer counts as reachable (a server behind authentication answers
    401, a TLS handshake urllib does not trust also counts); only a refused connection, an
    unknown host or a timeout is an error. Other schemes (sqlite, file, databricks) are left to
    MLflow.
    """
    import ssl
    import urllib.error
    import urllib.parse
    import urllib.request

    if urllib.parse.urlparse(uri).scheme not in ("http", "https"):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s):
            pass
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        if isinstance(reason, ssl.SSLError) or isinstance(error, ssl.SSLError):
            # It answered with TLS that urllib does not trust (a private CA, or one MLflow is
            # told to accept through MLFLOW_TRACKING_INSECURE_TLS / _SERVER_CERT_PATH):
            # reachable; certificates are MLflow's business.
            return
        raise TrackingServerError(
            f"MLflow tracking server {uri} (from {source}) is not reachable: {reason}. "
            "Start it, or point --mlflow-uri / MLFLOW_TRACKING_URI at a server every node can "
            "reach (sqlite:///PATH works on one machine)"
        ) from None


def tracking_uri_source(cli_uri: str | None) -> str:
    """Where resolve_tracking_uri took the URI from, for error messages."""
    if cli_uri:
        return "--mlflow-uri"
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return "MLFLOW_TRACKING_URI"
    return "the default"


def _element_key(element: Message, index: int) -> str:
    name = None
    candidates = [element]
    for oneof in element.DESCRIPTOR.oneofs:
        which = element.WhichOneof(oneof.name)
        if which is not None and isinstance(getattr(element, which), Message):
            candidates.append(getattr(element, which))
    for candidate in candidates:
        for field_name in _NAME_FIELDS:
            if field_name in candidate.DESCRIPTOR.fields_by_name and getattr(candidate, field_name):
                name = getattr(candidate, field_name)
                break
        if name:
            break
    return re.sub(r"[^\w\-]", "_", name) if name else str(index)


def _scalar_text(field: descriptor.FieldDescriptor, value) -> str:
    if field.type == descriptor.FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values_by_number[value].name
    if isinstance(value, bool):
        return "true" if value else "false"
    if field.type == descriptor.FieldDescriptor.TYPE_FLOAT:
        # float32 fields read back as the nearest double (0.001 -> 0.0010000000474974513);
        # numpy's shortest float32 text gives the value the config wrote ("0.001", "0.0").
        import numpy as np

        return str(np.float32(value))
    return str(value)


def flatten_config(message: Message, prefix: str = "") -> dict[str, str]:
    """Every set field of the config as {dotted path: text value}."""
    flat: dict[str, str] = {}
    for field, value in message.ListFields():
        key = f"{prefix}{field.name}"
        if field.type == descriptor.FieldDescriptor.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry:
                for map_key in sorted(value):
                    flat[f"{key}.{map_key}"] = str(value[map_key])
            elif field.is_repeated:
                for index, element in enumerate(value):
                    element_prefix = f"{key}.{_element_key(element, index)}."
                    nested = flatten_config(element, element_prefix)
                    flat.update(nested or {element_prefix.rstrip("."): "{}"})
            else:
                nested = flatten_config(value, f"{key}.")
                flat.update(nested or {key: "{}"})  # a set but empty message (a oneof choice)
        elif field.is_repeated:
            flat[key] = ",".join(_scalar_text(field, v) for v in value)
        else:
            flat[key] = _scalar_text(field, value)
    return flat


def _clip(value: str) -> str:
    return value if len(value) <= _MAX_PARAM_VALUE else value[: _MAX_PARAM_VALUE - 3] + "..."


def clip(value: str) -> str:
    """A param or tag value cut to what MLflow stores."""
    return _clip(value)


def client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _artifact_root(tracking_uri: str) -> str | None:
    """For a local sqlite store, keep artifacts beside the database (not in the cwd)."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlruns").as_uri()
    return None


def experiment_id(mlflow_client, name: str, tracking_uri: str) -> str:
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return mlflow_client.create_experiment(name, artifact_location=_artifact_root(tracking_uri))
    except Exception:
        # Another process created it between the lookup and the create.
        experiment = mlflow_client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def start_run(
    tracking_uri: str,
    experiment: str,
    run_name: str,
    *,
    tags: Mapping[str, str],
    params: Mapping[str, str],
    resume_run_id: str | None = None,
) -> str:
    """Create the MLflow run (or reopen `resume_run_id`), log params and tags; its id."""
    from mlflow.entities import Param, RunTag

    mlflow_client = client(tracking_uri)
    if resume_run_id:
        run = mlflow_client.get_run(resume_run_id)
        run_id = run.info.run_id
        mlflow_client.update_run(run_id, status="RUNNING")
        # A param may not change value within a run: log only the ones not there yet, and
        # say which differ (a --resume with different --set values is allowed, but visible).
        existing = run.data.params
        changed = {k: (existing[k], v) for k, v in params.items() if k in existing and existing[k] != _clip(v)}
        for key, (old, new) in sorted(changed.items()):
            print(f"mlflow: param {key} was {old!r} in this run, now {new!r} (kept {old!r})",
                  file=sys.stderr)
        params = {k: v for k, v in params.items() if k not in existing}
    else:
        run = mlflow_client.create_run(
            experiment_id(mlflow_client, experiment, tracking_uri), run_name=run_name
        )
        run_id = run.info.run_id
    items = [Param(k, _clip(str(v))) for k, v in sorted(params.items())]
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        mlflow_client.log_batch(run_id, params=items[start : start + 100])
    mlflow_client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    return run_id


def end_run(tracking_uri: str, run_id: str, status: str) -> None:
    client(tracking_uri).set_terminated(run_id, status=status)


def write_run_link(run_dir: str | os.PathLike, tracking_uri: str, run_id: str) -> None:
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / RUN_LINK_FILE).write_text(
        json.dumps({"tracking_uri": tracking_uri, "run_id": run_id}, indent=2)
    )


def read_run_link(run_dir: str | os.PathLike) -> dict | None:
    path = Path(run_dir) / RUN_LINK_FILE
    return json.loads(path.read_text()) if path.is_file() else None


class RunLogger:
    """Logging from inside the training loop (rank 0 only). A failing tracking server must not
    stop training: errors are printed (the first few in full) and counted, then ignored."""

    def __init__(self, tracking_uri: str | None, run_id: str | None) -> None:
        self.run_id = run_id
        self.failures = 0
        self._client = None
        if tracking_uri and run_id:
            try:
                self._client = client(tracking_uri)
            except Exception as error:  # noqa: BLE001 - tracking must not stop training
                self.failures += 1
                print(f"mlflow: cannot log to {tracking_uri}: {error}", file=sys.stderr)

    @property
    def enabled(self) -> bool:
        return self._client is not None

    def _call(self, what: str, method: str, *args) -> None:
        if self._client is None:
            return
        try:
            getattr(self._client, method)(self.run_id, *args)
        except Exception as error:  # noqa: BLE001 - keep training; report the problem
            self.failures += 1
            if self.failures <= 3:
                print(f"mlflow: could not {what}: {error}", file=sys.stderr)

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # NaN is logged too (e.g. an AUC with no positive label in the eval set): a missing
        # metric would look like a bug, a NaN says "undefined".
        items = [Metric(k, float(v), now, step) for k, v in values.items()]
        self._call("log metrics", "log_batch", items)

    def text(self, text: str, artifact_file: str) -> None:
        self._call(f"log {artifact_file}", "log_text", text, artifact_file)

    def tags(self, values: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self._call("set tags", "log_batch", [], [], [RunTag(k, clip(str(v)))
                                                   for k, v in values.items()])

    def artifact(self, path: str) -> None:
        self._call(f"log {Path(path).name}", "log_artifact", path)

    def json(self, payload, artifact_file: str) -> None:
        self.text(json.dumps(payload, indent=2, sort_keys=True, default=str), artifact_file)
