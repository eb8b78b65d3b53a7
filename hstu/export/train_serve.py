"""Train against serve: does the exported program give the numbers training reported?

The exporter already checks the program against the eager model on synthetic batches
(exporter.check_program). This check runs at the end of every training run's export, on the
run's own eval set, and compares what serving will see with what training reported:

- scores: per task, the largest |difference| between the exported program's score (Predictor,
  as `launch.py predict` runs it) and the trained model's (the checkpoint read in one process,
  as in training's evaluation: the same ops, without the sharding), over every candidate of
  the eval set;
- metrics: per task, |AUC (grouped AUC, MAE, MSE) of the exported program's scores - the
  in-training evaluation's value for that checkpoint|, computed with the same metric code and
  the same bad-row policy (rows training skipped are skipped here too).

The differences go to MLflow (`serve/score_diff/<task>`, `serve/metric_diff/<kind>/<task>`,
`serve/max_score_diff`, `serve/max_metric_diff`). Above SCORE_TOLERANCE or METRIC_TOLERANCE the
export fails with a message naming the task, the difference and the tolerance.

Tolerances: the program and the eager model run the same float32 ops on CPU, so their scores
agree to about 1e-6; 1e-4 leaves room for a different operator order and catches anything
that changes a prediction. Training's AUC comes from 200 score bins (TorchEasyRec's), computed
by the sharded model over several workers: a score that lands in the neighbouring bin moves the
AUC of a rare task by up to a few 1e-4 on a small eval set, so 1e-3.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

SCORE_TOLERANCE = 1e-4
METRIC_TOLERANCE = 1e-3
# TaskMetrics names compared: deterministic functions of the scores and labels (XAUC samples
# pairs; multiclass metrics need the logits, which the program does not output).
COMPARED_METRICS = ("grouped_auc_", "auc_", "mae_", "mse_")


class TrainServeMismatch(ValueError):
    """The exported program disagrees with training beyond the tolerance."""


@dataclasses.dataclass
class TrainServeReport:
    rows: int
    candidates: int
    score_diff: dict[str, float]  # task -> max |program - model| over every candidate
    serve_metrics: dict[str, float]  # eval key -> value from the program's scores
    metric_diff: dict[str, float]  # eval key -> |serve - training|
    trained_metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # compared
    note: str = ""

    @property
    def max_score_diff(self) -> float:
        return max(self.score_diff.values(), default=0.0)

    @property
    def max_metric_diff(self) -> float:
        return max(self.metric_diff.values(), default=0.0)

    def mlflow_metrics(self) -> dict[str, float]:
        values = {"serve/max_score_diff": self.max_score_diff,
                  "serve/max_metric_diff": self.max_metric_diff,
                  "serve/rows": float(self.rows)}
        values.update({f"serve/score_diff/{task}": d for task, d in self.score_diff.items()})
        values.update({f"serve/metric_diff/{key.removeprefix('eval/')}": d
                       for key, d in self.metric_diff.items()})
        values.update({f"serve/{key.removeprefix('eval/')}": v
                       for key, v in self.serve_metrics.items()})
        return values

    def describe(self) -> str:
        text = (f"train vs serve on {self.rows} eval rows ({self.candidates} candidates): "
                f"largest score difference {self.max_score_diff:.2g} (tolerance "
                f"{SCORE_TOLERANCE:g})")
        if self.metric_diff:
            text += (f", largest metric difference {self.max_metric_diff:.2g} (tolerance "
                     f"{METRIC_TOLERANCE:g})")
        return text + (f"; {self.note}" if self.note else "")

    def check(self) -> None:
        for task, diff in sorted(self.score_diff.items(), key=lambda item: -item[1]):
            if not diff <= SCORE_TOLERANCE:  # NaN fails too
                raise TrainServeMismatch(
                    f"train vs serve: the exported program's {task} scores differ from the "
                    f"trained model's by up to {diff:.3g} on the eval set (tolerance "
                    f"{SCORE_TOLERANCE:g}); the export would not serve what was trained")
        for key, diff in sorted(self.metric_diff.items(), key=lambda item: -item[1]):
            if not diff <= METRIC_TOLERANCE:
                raise TrainServeMismatch(
                    f"train vs serve: {key} of the exported program's scores is "
                    f"{self.serve_metrics[key]:.4f}, training's evaluation reported "
                    f"{self.trained_metrics[key]:.4f} (difference {diff:.3g}, tolerance "
                    f"{METRIC_TOLERANCE:g})")


def compare_train_serve(
    cfg,
    export_dir: str,
    checkpoint: str,
    eval_paths: Sequence[str],
    training_metrics: Mapping[str, float] | None,
    *,
    batch_size: int = 256,
) -> TrainServeReport:
    """Score the eval set with the export and with the checkpoint (see the module docstring).
    `training_metrics`: the in-training evaluation of `checkpoint` (eval/<kind>/<task>), or None
    when there is none to compare with (only the scores are compared then)."""
    import numpy as np
    import torch

    from hstu.config.features import feature_specs, label_specs
    from hstu.data.pipeline import arrow_to_batch
    from hstu.data.validate import BadRowReport
    from hstu.export.predict import Predictor, _batches, parquet_files, score_column
    from hstu.metrics import TaskMetrics
    from hstu.model import ModelOutput
    from hstu.ops import Kernel
    from hstu.train.checkpoint import load_for_inference
    from hstu.train.evaluation import metric_key

    features, labels = feature_specs(cfg), label_specs(cfg)
    policy = "skip" if cfg.data_config.on_bad_rows == 1 else "error"  # BadRowPolicy SKIP = 1
    predictor = Predictor(export_dir)
    model = load_for_inference(cfg, checkpoint, device="cpu")
    model.set_kernel(Kernel.PYTORCH)
    tasks = [task.name for task in model.tasks]
    metrics = TaskMetrics(model.tasks)
    metrics.metrics = {name: entry for name, entry in metrics.metrics.items()
                       if name.startswith(COMPARED_METRICS)}
    score_diff = {task: 0.0 for task in tasks}
    rows = candidates = 0
    columns = list(dict.fromkeys(predictor.needed_columns()
                                 + [label.column for label in labels]))
    with torch.no_grad():
        for path, first_row, table in _batches(parquet_files(eval_paths), columns, batch_size):
            batch = arrow_to_batch(table, features, labels, source=str(path),
                                   row_offset=first_row, on_bad_rows=policy,
                                   bad_rows=BadRowReport())
            served = predictor.predict_table(table, source=str(path), row_offset=first_row,
                                             on_bad_rows=policy)
            if batch.batch_size == 0:
                continue
            output = model(batch)
            serve_probs = {}
            for task in tasks:
                values = served.column(score_column(task)).combine_chunks().flatten()
                serve_probs[task] = torch.from_numpy(np.array(values, dtype=np.float32))
                ours = output.probs[task].float()
                if serve_probs[task].shape != ours.shape:
                    raise TrainServeMismatch(
                        f"train vs serve: the exported program gave {serve_probs[task].numel()} "
                        f"{task} scores for {path}, the trained model {ours.numel()}")
                if ours.numel():
                    diff = float((serve_probs[task] - ours).abs().max())
                    score_diff[task] = max(score_diff[task], diff)
            metrics.update(model, ModelOutput(logits=output.logits, probs=serve_probs,
                                              num_targets=output.num_targets), batch)
            rows += batch.batch_size
            candidates += int(output.num_targets.sum())
    serve_metrics = {metric_key(name): value for name, value in metrics.compute().items()}
    report = TrainServeReport(rows=rows, candidates=candidates, score_diff=score_diff,
                              serve_metrics=serve_metrics, metric_diff={})
    if training_metrics is None:
        report.note = "no in-training evaluation of this checkpoint to compare metrics with"
    elif cfg.eval_config.HasField("num_steps"):
        report.note = ("metrics not compared: eval_config.num_steps limits training's "
                       "evaluation to part of the eval set")
    else:
        for key, value in serve_metrics.items():
            trained = training_metrics.get(key)
            if trained is None or math.isnan(value) or math.isnan(float(trained)):
                continue  # e.g. no positive label of a rare task: NaN on both sides
            report.trained_metrics[key] = float(trained)
            report.metric_diff[key] = abs(value - float(trained))
    return report
