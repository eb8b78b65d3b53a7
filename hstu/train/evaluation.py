"""Evaluation over every rank's eval shard: per-task AUC (and grouped AUC, MAE) and loss.

Each rank scores its own shard; the metric accumulators (hstu/metrics.py) merge their state over
all ranks before computing, so the AUC is that of the whole eval set, not an average of
per-rank AUCs. Metric keys: eval/auc/<task>, eval/grouped_auc/<task>, eval/mae/<task>,
eval/loss/<task> (mean over eval steps of the global per-candidate loss), eval/rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

from hstu.metrics import TaskMetrics
from hstu.train.collectives import LockstepStats, all_reduce_sum, lockstep, world_size

# hstu.metrics' names (auc_<task>) -> the MLflow / report keys used here.
_METRIC_PREFIXES = (("grouped_auc_", "grouped_auc"), ("auc_", "auc"), ("mae_", "mae"))


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
    tasks = [task.name for task in module.tasks]
    loss_sums = {task: 0.0 for task in tasks}
    stats = LockstepStats()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in lockstep(batches, stats, tokens_of):
                batch = batch.to(device, non_blocking=True)
                with autocast():
                    output = model(batch)
                    _, losses = module.compute_losses(output, batch)
                for task, value in losses.items():
                    loss_sums[task] += float(value)
                metrics.update(module, output, batch)
    finally:
        model.train(was_training)
    metrics.sync()
    results = {metric_key(name): value for name, value in metrics.compute().items()}
    steps = max(stats.steps, 1)
    # With the global-average loss, a rank's loss is its local mean scaled by its share of the
    # candidates, so the mean over ranks is the per-candidate mean over all ranks.
    summed = all_reduce_sum([loss_sums[task] for task in tasks])
    world = world_size()
    for task, value in zip(tasks, summed):
        results[f"eval/loss/{task}"] = value / world / steps
    results["eval/rows"] = float(stats.rows)
    results["eval/steps"] = float(stats.steps)
    if stats.unused_batches:
        results["eval/unused_batches"] = float(stats.unused_batches)
    return results
