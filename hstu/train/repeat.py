"""`launch.py train --repeat K`: the same training with K seeds, and the spread of its numbers.

Published figures in this field rarely come with their variance, so nobody can tell noise from
an improvement. Here K runs train the same config with seeds S, S+1, ..., S+K-1 (--seed S),
one after the other, each a complete run of its own (run directory `<name>-seed<s>`,
checkpoints, export) and an MLflow child run of one parent run `<name>`. The parent logs, for
every per-task eval metric of the runs' final evaluations, `mean/<key>` and `std/<key>` (the
sample standard deviation, K-1 in the denominator) and `repeat/runs`; `launch.py compare`
shows such a run's metrics as mean +- std.

A seed fixes the model's initialisation, dropout and the data order (the files' order, each
worker's shuffle buffer, and Ray Data's split, kept in block order), so on CPU the same seed
repeats a run's numbers to the last digit, and the spread over seeds is the spread of the
training itself.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from hstu.train import tracking
from hstu.train.best import metric_kind
from hstu.train.progress import EVAL_COLUMNS, format_duration, table


@dataclasses.dataclass(frozen=True)
class Spread:
    mean: float
    std: float  # sample standard deviation; NaN with fewer than 2 finite values
    n: int  # finite values it was computed from


@dataclasses.dataclass
class RepeatResult:
    name: str
    seeds: list[int]
    runs: list  # trainer.RunResult, one per seed
    tasks: list[str]
    spreads: dict[str, Spread]
    tracking_uri: str
    parent_run_id: str
    seconds: float


def spread(values: Iterable[float]) -> Spread:
    """Mean and sample standard deviation of the finite values (an AUC is NaN when the eval
    set has no positive of that task: the same set for every seed, so then it is NaN for all)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return Spread(math.nan, math.nan, 0)
    std = statistics.stdev(finite) if len(finite) > 1 else math.nan
    return Spread(statistics.fmean(finite), std, len(finite))


def spreads(metrics: list[Mapping[str, float]]) -> dict[str, Spread]:
    """Spread of every per-task eval metric (eval/<kind>/<task>) the runs' final metrics share."""
    keys = set.intersection(*(set(m) for m in metrics)) if metrics else set()
    return {key: spread(m[key] for m in metrics) for key in sorted(keys) if metric_kind(key)}


def format_spread(value: Spread) -> str:
    if not math.isfinite(value.mean):
        return "-"
    if not math.isfinite(value.std):
        return f"{value.mean:.4f}"
    return f"{value.mean:.4f} ± {value.std:.4f}"


def spread_table(found: Mapping[str, Spread], tasks: list[str]) -> str:
    present = [(kind, title) for kind, title in EVAL_COLUMNS
               if any(f"eval/{kind}/{task}" in found for task in tasks)]
    rows = [[task] + [format_spread(found[f"eval/{kind}/{task}"])
                      if f"eval/{kind}/{task}" in found else "-" for kind, _ in present]
            for task in tasks]
    return table(["task"] + [title for _, title in present], rows)


def summary_text(result: RepeatResult) -> str:
    seeds = ", ".join(str(seed) for seed in result.seeds)
    lines = [
        f"{len(result.runs)} runs, seeds {seeds}: the final evaluation of each, mean ± sample "
        "standard deviation over the seeds",
        spread_table(result.spreads, result.tasks),
        "",
        table(["seed", "run"], [[seed, run.run_name] for seed, run in zip(result.seeds,
                                                                            result.runs)]),
        "",
        f"MLflow run   {result.parent_run_id} (parent of the {len(result.runs)} runs; "
        f"{result.tracking_uri})",
        f"compare it   python launch.py compare {result.name}",
    ]
    return "\n".join(lines)


def run_repeated(options, repeat: int) -> RepeatResult:
    """Train `options` with seeds options.seed ... options.seed + repeat - 1 (module
    docstring). Raises on the first run that fails (the parent is then marked FAILED)."""
    from hstu.train.console import filtered_console

    # Ray starts here, once for all runs; its loggers keep the stream they find at start.
    with filtered_console():
        return _run_repeated(options, repeat)


def _run_repeated(options, repeat: int) -> RepeatResult:
    from hstu.config.loader import load_config
    from hstu.train.errors import one_line
    from hstu.train.trainer import (
        SNAPSHOT_FILE,
        TrainSetupError,
        _is_uri,
        _local,
        init_ray,
        run_training,
    )

    started = time.perf_counter()
    if repeat < 2:
        raise TrainSetupError(f"--repeat {repeat}: a spread needs at least 2 runs")
    if options.resume:
        raise TrainSetupError("--repeat starts new runs; it does not combine with --resume")
    cfg = load_config(options.recipe, options.overrides)
    name = options.run_name or f"{Path(options.recipe).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    seeds = [options.seed + index for index in range(repeat)]
    storage = _local(options.storage or cfg.model_dir or "experiments")
    if not _is_uri(storage):
        taken = [f"{name}-seed{seed}" for seed in seeds
                 if (Path(storage) / f"{name}-seed{seed}" / SNAPSHOT_FILE).is_file()]
        if taken:
            raise TrainSetupError(f"--repeat: run {taken[0]!r} already exists under {storage}; "
                                  "pass another --run-name")
    tracking_uri = tracking.resolve_tracking_uri(options.tracking_uri, Path.cwd())
    tracking.check_server_reachable(tracking_uri, tracking.tracking_uri_source(
        options.tracking_uri))
    # As each run logs them: the data it read, not the recipe's default paths.
    if options.train_paths:
        cfg.train_input_path = ",".join(options.train_paths)
    if options.eval_paths:
        cfg.eval_input_path = ",".join(options.eval_paths)
    params = tracking.flatten_config(cfg)
    params.update({"run.repeat": str(repeat), "run.seeds": ",".join(map(str, seeds)),
                   "run.workers": str(options.workers), "run.use_gpu": str(options.use_gpu).lower()})
    parent = tracking.start_run(
        tracking_uri, options.experiment, name,
        tags={"hstu.kind": "repeat", "hstu.recipe": options.recipe,
              "hstu.seeds": ",".join(map(str, seeds))},
        params=params)
    print(f"repeat {name}: {repeat} runs of {options.recipe}, seeds {seeds[0]}..{seeds[-1]}; "
          f"MLflow parent run {parent} at {tracking_uri}", flush=True)
    # One Ray for all the runs (each run_training leaves a Ray it did not start running).
    started_ray = init_ray(options.show_ray_data_progress)
    runs = []
    try:
        for index, seed in enumerate(seeds):
            print(f"\n== seed {seed} ({index + 1} of {repeat}) ==", flush=True)
            run = run_training(dataclasses.replace(
                options, seed=seed, run_name=f"{name}-seed{seed}", tracking_uri=tracking_uri,
                parent_run_id=parent))
            runs.append(run)
            print(f"seed {seed}: run {run.run_name} finished at step "
                  f"{run.metrics.get('global_step', '?')} in {format_duration(run.seconds)}"
                  + (f"; {run.export_note}" if run.export_note else ""), flush=True)
        found = spreads([run.metrics for run in runs])
        logger = tracking.RunLogger(tracking_uri, parent)
        values = {"repeat/runs": float(repeat)}
        for key, value in found.items():
            values[f"mean/{key}"] = value.mean
            values[f"std/{key}"] = value.std
        logger.metrics(values, step=0)
        result = RepeatResult(name=name, seeds=seeds, runs=runs, tasks=runs[0].tasks,
                              spreads=found, tracking_uri=tracking_uri, parent_run_id=parent,
                              seconds=time.perf_counter() - started)
        logger.text(summary_text(result) + "\n", "repeat_summary.txt")
        tracking.end_run(tracking_uri, parent, "FINISHED")
        return result
    except BaseException as error:
        try:
            where = f"seed {seeds[len(runs)]}: " if len(runs) < len(seeds) else ""
            tracking.client(tracking_uri).set_tag(
                parent, "hstu.error", tracking.clip(where + one_line(error)))
            tracking.end_run(tracking_uri, parent,
                             "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        except Exception as mlflow_error:  # noqa: BLE001 - the original error matters more
            print(f"mlflow: could not mark the parent run failed: {mlflow_error}",
                  file=sys.stderr)
        raise
    finally:
        if started_ray:
            import ray

            ray.shutdown()
