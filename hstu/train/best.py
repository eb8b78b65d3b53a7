"""Which evaluation was best, per metric, and which checkpoint to export for it.

On little data the last epoch is often not the best (README, "Recipes"), so a run reports,
for every eval metric, the best value over all its evaluations and the step it came from
(MLflow: `best/<metric>` logged at that step, `best_step/<metric>`), and `--export-best METRIC`
exports the checkpoint whose own evaluation was best by METRIC instead of the last one.

Metric names are the eval keys, `eval/<kind>/<task>` (`eval/auc/is_click`, `eval/loss/is_like`),
also accepted without the `eval/` prefix. Losses, error metrics and NE are better when lower;
AUCs and accuracies when higher; calibration when closer to 1.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Iterable, Mapping

# Metric kinds (the middle part of eval/<kind>/<task>) that are better when smaller.
LOWER_IS_BETTER = ("loss", "mae", "mse", "ne")
# ...and that are better when closer to 1 (predicted positives / actual positives).
CLOSER_TO_ONE_IS_BETTER = ("calibration",)


class MetricNameError(ValueError):
    """--export-best names no metric the evaluations produce; the message lists them."""


@dataclasses.dataclass(frozen=True)
class Best:
    step: int
    value: float


def metric_kind(key: str) -> str:
    parts = key.split("/")
    return parts[1] if len(parts) == 3 and parts[0] == "eval" else ""


def lower_is_better(key: str) -> bool:
    return metric_kind(key) in LOWER_IS_BETTER


def better(key: str, value: float, than: float) -> bool:
    if metric_kind(key) in CLOSER_TO_ONE_IS_BETTER:
        return abs(value - 1.0) < abs(than - 1.0)
    return value < than if lower_is_better(key) else value > than


def eval_metric_keys(tasks) -> list[str]:
    """The per-task keys every evaluation of a model with these TaskSpecs produces."""
    from hstu.metrics import CalibrationMetrics, TaskMetrics
    from hstu.train.evaluation import metric_key

    keys = [metric_key(name) for name in TaskMetrics(tasks).metrics]
    keys += [metric_key(name) for name in CalibrationMetrics(tasks).metrics]
    keys += [f"eval/loss/{task.name}" for task in tasks]
    return keys


def resolve_metric(name: str, keys: Iterable[str]) -> str:
    """The eval key `name` stands for (with or without its eval/ prefix)."""
    keys = list(keys)
    key = name if name.startswith("eval/") else f"eval/{name}"
    if key in keys:
        return key
    close = difflib.get_close_matches(key, keys, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise MetricNameError(
        f"--export-best {name}: the evaluations give no such metric{hint} (they give "
        f"{', '.join(sorted(keys))})"
    )


def best_per_metric(history: Mapping[str, Iterable[tuple[int, float, int]]]) -> dict[str, Best]:
    """{key: Best} from each key's logged values (step, value, timestamp).

    A step evaluated twice (a restart replays steps after its checkpoint; the first attempt's
    weights at those steps are gone) counts with its latest value. NaN (an AUC without a
    positive label) never wins; a key with only NaNs is left out."""
    result = {}
    for key, entries in history.items():
        latest: dict[int, tuple[int, float]] = {}
        for step, value, timestamp in entries:
            if step not in latest or timestamp >= latest[step][0]:
                latest[step] = (timestamp, float(value))
        best = None
        for step in sorted(latest):
            value = latest[step][1]
            if math.isnan(value):
                continue
            if best is None or better(key, value, best.value):
                best = Best(step, value)
        if best is not None:
            result[key] = best
    return result


def best_checkpoint(checkpoints: Iterable[tuple[str, Mapping]], key: str):
    """(checkpoint path, Best) of the checkpoint whose own evaluation was best by `key`, from
    (path, metrics reported with it) pairs; checkpoints saved without an evaluation do not
    count. None when no checkpoint has one. A tie goes to the earlier step, as in
    best_per_metric."""
    chosen = None
    evaluated = [
        (path, Best(int(metrics.get("global_step", -1)), float(metrics[key])))
        for path, metrics in checkpoints
        if metrics.get(key) is not None and not math.isnan(float(metrics[key]))
    ]
    for path, candidate in sorted(evaluated, key=lambda item: item[1].step):
        if chosen is None or better(key, candidate.value, chosen[1].value):
            chosen = (path, candidate)
    return chosen
