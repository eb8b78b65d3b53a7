"""Evaluation over every rank's eval shard: per-task AUC (and grouped AUC, MAE) and loss.

Each rank scores its own shard; the metric accumulators (hstu/metrics.py) merge their state over
all ranks before computing, so the AUC is that of the whole eval set, not an average of
per-rank AUCs. The eval set is split unequally (trainer.py) so that no row is dropped, and
ranks that run out first pad with a filler batch whose results are ignored (collectives.py).
Metric keys: eval/auc/<task>, eval/grouped_auc/<task>, eval/mae/<task>, eval/ne/<task> and
eval/calibration/<task> (every classification task), eval/loss/<task> (the
per-candidate mean over the whole eval set), eval/rows (rows scored), eval/skipped_rows (bad rows
left out under on_bad_rows SKIP: eval/rows does not include them).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable

import torch

from hstu.metrics import CalibrationMetrics, TaskMetrics
from hstu.train.collectives import LockstepStats, all_reduce_sum, lockstep_padded

# hstu.metrics' names (auc_<task>) -> the MLflow / report keys used here.
_METRIC_PREFIXES = (("grouped_auc_", "grouped_auc"), ("auc_", "auc"), ("mae_", "mae"),
                    ("ne_", "ne"), ("calibration_", "calibration"))


@dataclasses.dataclass(frozen=True)
class RowsLeftOut:
    """Rows a pass read but did not deliver, summed over ranks: bad rows skipped (on_bad_rows
    SKIP) and rows dropped by drop_last."""

    skipped: int = 0
    dropped: int = 0

    def __add__(self, other: RowsLeftOut) -> RowsLeftOut:
        return RowsLeftOut(self.skipped + other.skipped, self.dropped + other.dropped)

    def describe(self) -> str:
        """'3 bad row(s) skipped, 2 row(s) dropped (drop_last)'; '' when nothing was left out."""
        parts = []
        if self.skipped:
            parts.append(
                f"{self.skipped} bad row(s) skipped (on_bad_rows SKIP; the workers' warnings "
                "name files and reasons)"
            )
        if self.dropped:
            parts.append(f"{self.dropped} row(s) dropped (drop_last: the last partial batch)")
        return ", ".join(parts)


def local_rows_left_out(batches) -> tuple[int, int]:
    """(skipped, dropped) of this rank's latest pass; (0, 0) for a plain list of batches."""
    stats = getattr(batches, "stats", None)  # hstu.data.pipeline.JaggedBatches has them
    if stats is None:
        return 0, 0
    return int(stats.skipped.rows), int(stats.dropped_rows)


def rows_left_out(batches) -> RowsLeftOut:
    """This pass's rows left out, summed over ranks (one collective: every rank calls it)."""
    skipped, dropped = all_reduce_sum(list(local_rows_left_out(batches)))
    return RowsLeftOut(int(skipped), int(dropped))


def metric_key(name: str) -> str:
    for prefix, kind in _METRIC_PREFIXES:
        if name.startswith(prefix):
            return f"eval/{kind}/{name[len(prefix):]}"
    return f"eval/{name}"


def evaluate(
    model: torch.nn.Module,
    module,
    batches: Iterable,
    *,
    device: torch.device,
    autocast=contextlib.nullcontext,
    tokens_of=lambda batch: batch.num_tokens(),
) -> dict[str, float]:
    """model: what to call (the DistributedModelParallel wrapper, or the plain model); module:
    the DlrmHSTU inside it (for labels, losses and grouping keys). Every rank must call this."""
    metrics = TaskMetrics(module.tasks)
    # NE and calibration of every classification task, MAE of regression tasks (whatever the
    # config lists): hstu.metrics.CalibrationMetrics.
    calibration = CalibrationMetrics(module.tasks)
    tasks = [task.name for task in module.tasks]
    # Per task: sum of per-candidate losses, and the candidate count, over this rank's rows.
    loss_sums = {task: 0.0 for task in tasks}
    candidates = 0
    stats = LockstepStats()
    was_training = model.training
    # The global-average loss rescales by other ranks' counts (a collective, and skewed by
    # filler batches); here each batch's local per-candidate mean is what we want.
    global_average = module.enable_global_average_loss
    module.enable_global_average_loss = False
    model.eval()
    try:
        with torch.no_grad():
            for batch, is_real in lockstep_padded(batches, stats, tokens_of):
                batch = batch.to(device, non_blocking=True)
                with autocast():
                    output = model(batch)
                    _, losses = module.compute_losses(output, batch)
                if not is_real:
                    continue
                count = int(output.num_targets.sum())
                candidates += count
                for task, value in losses.items():
                    loss_sums[task] += float(value) * count
                metrics.update(module, output, batch)
                calibration.update(module, output, batch)
    finally:
        module.enable_global_average_loss = global_average
        model.train(was_training)
    metrics.sync()
    calibration.sync()
    results = {metric_key(name): value for name, value in metrics.compute().items()}
    results.update({metric_key(name): value for name, value in calibration.compute().items()})
    # The pass's skipped and dropped rows ride on the same collective as the loss sums.
    skipped, dropped = local_rows_left_out(batches)
    totals = all_reduce_sum(
        [loss_sums[task] for task in tasks] + [skipped, dropped, candidates]
    )
    total_skipped, total_dropped, total_candidates = totals[-3:]
    for task, value in zip(tasks, totals[:-3]):
        results[f"eval/loss/{task}"] = value / total_candidates if total_candidates else float("nan")
    results["eval/rows"] = float(stats.rows)
    results["eval/skipped_rows"] = float(total_skipped)
    if total_dropped:  # evaluation reads with drop_last off; a caller's batches might not
        results["eval/dropped_rows"] = float(total_dropped)
    results["eval/candidates"] = float(total_candidates)
    results["eval/steps"] = float(stats.steps)
    if stats.unused_batches:
        results["eval/unused_batches"] = float(stats.unused_batches)
    return results
