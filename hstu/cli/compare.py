"""`launch.py compare RUN...`: MLflow runs side by side (params that differ, final metrics).

RUN is an MLflow run id or a run name (the Ray run name `launch.py train` printed). The parent
run of `train --repeat K` shows each metric as mean ± standard deviation over its seeds (its
`mean/<key>` and `std/<key>`), on the same row as a single run's value of that metric.
"""

from __future__ import annotations

import argparse
import math
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="MLflow run ids or run names")
    parser.add_argument("--mlflow-uri", default=None,
                        help="tracking URI (default $MLFLOW_TRACKING_URI, else "
                        "sqlite:///<cwd>/mlflow.db)")
    parser.add_argument("--all-params", action="store_true",
                        help="show every param, not only those that differ")
    parser.add_argument("--metrics", default="",
                        help="only metrics whose name contains this text (e.g. eval/auc)")


class RunNotFound(LookupError):
    pass


def find_run(mlflow_client, key: str):
    """A run by id, else by name (the most recent run of that name, in any experiment)."""
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_run(key)
    except MlflowException:
        pass
    experiments = [e.experiment_id for e in mlflow_client.search_experiments()]
    escaped = key.replace("'", "\\'")
    runs = mlflow_client.search_runs(
        experiments, filter_string=f"attributes.run_name = '{escaped}'",
        order_by=["attributes.start_time DESC"], max_results=1,
    ) if experiments else []
    if not runs:
        raise RunNotFound(f"no MLflow run with id or name {key!r}")
    return runs[0]


def _value(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def _spread_text(mean: float, std: float | None) -> str:
    if math.isnan(mean):
        return "nan"
    if std is None or math.isnan(std):
        return f"{mean:.4f}"
    return f"{mean:.4f} ± {std:.4f}"


def metric_cells(run) -> dict[str, str]:
    """{metric: text} of one run: its own values, and a --repeat parent's mean/<key> and
    std/<key> as "mean ± std" under <key>."""
    metrics = run.data.metrics
    cells = {key: _value(value) for key, value in metrics.items()
             if not key.startswith(("mean/", "std/"))}
    for key, value in metrics.items():
        if key.startswith("mean/"):
            base = key.removeprefix("mean/")
            cells[base] = _spread_text(value, metrics.get(f"std/{base}"))
    return cells


def comparison(runs, *, all_params: bool = False, metric_filter: str = "") -> str:
    """The text `compare` prints for these MLflow Run objects."""
    from hstu.train.progress import table

    header = ["", *[run.info.run_name or run.info.run_id[:8] for run in runs]]
    overview = [
        ["run id", *[run.info.run_id for run in runs]],
        ["status", *[run.info.status for run in runs]],
        ["duration", *[_duration(run) for run in runs]],
    ]
    if any("hstu.seeds" in run.data.tags for run in runs):
        overview.append(["seeds (mean ± std)",
                         *[run.data.tags.get("hstu.seeds", "-") for run in runs]])
    keys = sorted(set().union(*[run.data.params for run in runs]))
    differing = [
        key for key in keys
        if all_params or len({run.data.params.get(key) for run in runs}) > 1
    ]
    params = [[key, *[run.data.params.get(key, "-") for run in runs]] for key in differing]
    cells = [metric_cells(run) for run in runs]
    metric_keys = sorted(
        set().union(*cells),
        key=lambda k: (not k.startswith("eval/"), k),
    )
    metrics = [
        [key, *[run_cells.get(key, "-") for run_cells in cells]]
        for key in metric_keys
        if metric_filter in key
    ]
    parts = [table(header, overview)]
    title = "params" if all_params else "params that differ"
    parts.append(f"\n{title}:\n" + (table(["param", *header[1:]], params) if params else
                                    "  (none)"))
    parts.append("\nfinal metrics (latest value of each):\n" +
                 (table(["metric", *header[1:]], metrics) if metrics else "  (none)"))
    return "\n".join(parts)


def _duration(run) -> str:
    from hstu.train.progress import format_duration

    if not run.info.end_time:
        return "running" if run.info.status == "RUNNING" else "-"
    return format_duration((run.info.end_time - run.info.start_time) / 1000)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hstu.train import tracking

    uri = tracking.resolve_tracking_uri(args.mlflow_uri, Path.cwd())
    mlflow_client = tracking.client(uri)
    try:
        runs = [find_run(mlflow_client, key) for key in args.runs]
    except RunNotFound as error:
        print(f"launch.py compare: {error} at {uri}", file=sys.stderr)
        return 1
    print(comparison(runs, all_params=args.all_params, metric_filter=args.metrics))
    return 0
