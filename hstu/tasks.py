"""The multi-task heads' contract (reference 2.10-2.13): what each task is, its labels and its
losses. DlrmHSTU (hstu/model.py) parses the tasks from the config and calls task_losses on its
outputs; evaluation (hstu/train/evaluation.py) reads task_labels for the metrics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from hstu.config.errors import ModelConfigError

CLASSIFICATION_LOSSES = ("binary_cross_entropy", "softmax_cross_entropy")
SUPPORTED_LOSSES = CLASSIFICATION_LOSSES + ("l2_loss",)
SUPPORTED_METRICS = ("auc", "grouped_auc", "mean_absolute_error")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One entry of fusion_mtl_tower.task_configs, resolved."""

    name: str
    label_name: str
    bitmask: int | None  # labels become ((label & bitmask) != 0) when set
    num_class: int
    weight: float
    # (loss kind, label smoothing): "binary_cross_entropy" | "softmax_cross_entropy" | "l2_loss"
    losses: tuple[tuple[str, float], ...]
    # ("auc", thresholds) | ("grouped_auc", grouping_key) | ("mean_absolute_error", None)
    metrics: tuple[tuple[str, object], ...]

    @property
    def is_regression(self) -> bool:
        return all(kind == "l2_loss" for kind, _ in self.losses)


def parse_tasks(tower_cfg) -> list[TaskSpec]:
    """fusion_mtl_tower.task_configs -> TaskSpecs; unsupported losses and metrics are named."""
    tasks = []
    for index, task in enumerate(tower_cfg.task_configs):
        path = f"dlrm_hstu.fusion_mtl_tower.task_configs[{index}]"
        losses = []
        for loss_index, loss in enumerate(task.losses):
            kind = loss.WhichOneof("loss")
            if kind not in SUPPORTED_LOSSES:
                raise ModelConfigError(
                    f"{path}.losses[{loss_index}]",
                    f"{kind} is not implemented; supported: {', '.join(SUPPORTED_LOSSES)}",
                )
            smoothing = 0.0
            if kind in CLASSIFICATION_LOSSES:
                smoothing = float(getattr(loss, kind).label_smoothing)
            if kind == "binary_cross_entropy" and task.num_class != 1:
                raise ModelConfigError(path, "binary_cross_entropy needs num_class 1")
            if kind == "softmax_cross_entropy" and task.num_class < 2:
                raise ModelConfigError(path, "softmax_cross_entropy needs num_class >= 2")
            if kind == "l2_loss" and task.num_class != 1:
                raise ModelConfigError(path, "l2_loss needs num_class 1")
            losses.append((kind, smoothing))
        if not losses:
            raise ModelConfigError(path, f"task {task.task_name!r} has no losses")
        if {kind for kind, _ in losses} & {"l2_loss"} and len(
            {kind for kind, _ in losses}
        ) > 1:
            raise ModelConfigError(path, "l2_loss cannot be mixed with classification losses")
        metrics = []
        for metric_index, metric in enumerate(task.metrics):
            kind = metric.WhichOneof("metric")
            if kind == "auc":
                metrics.append(("auc", int(metric.auc.thresholds)))
            elif kind == "grouped_auc":
                metrics.append(("grouped_auc", metric.grouped_auc.grouping_key))
            elif kind == "mean_absolute_error":
                metrics.append(("mean_absolute_error", None))
            else:
                raise ModelConfigError(
                    f"{path}.metrics[{metric_index}]",
                    f"{kind} is not implemented; supported: {', '.join(SUPPORTED_METRICS)}",
                )
        tasks.append(
            TaskSpec(
                name=task.task_name,
                label_name=task.label_name,
                bitmask=int(task.task_bitmask) if task.HasField("task_bitmask") else None,
                num_class=int(task.num_class),
                weight=float(task.weight),
                losses=tuple(losses),
                metrics=tuple(metrics),
            )
        )
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ModelConfigError("dlrm_hstu.fusion_mtl_tower.task_configs", "task names repeat")
    return tasks


def task_labels(tasks: Sequence[TaskSpec], batch) -> dict[str, torch.Tensor]:
    """Per task, the label of every candidate: bitmask tasks -> 0/1 (int64), else as stored."""
    labels = {}
    for task in tasks:
        if task.label_name not in batch.labels:
            raise KeyError(
                f"batch.labels has no column {task.label_name!r} (task {task.name})"
            )
        label = batch.labels[task.label_name]
        if task.bitmask is not None:
            if label.is_floating_point():
                raise TypeError(
                    f"task {task.name}: task_bitmask needs an integer label column; "
                    f"{task.label_name!r} is {label.dtype}"
                )
            label = ((label & task.bitmask) != 0).to(label.dtype)
        labels[task.name] = label
    return labels

def task_losses(
    tasks: Sequence[TaskSpec], logits: dict[str, torch.Tensor], batch, scale
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total, {task: weighted loss}). Each loss is a mean over the local candidates; with
    enable_global_average_loss and torch.distributed initialised it is rescaled by
    local count / mean count over ranks, so that averaging gradients over ranks gives the
    mean over all candidates of all ranks. total = plain sum over tasks.

    logits: per task, as ModelOutput.logits; scale: 1.0, or the global-average factor
    (hstu.metrics.global_average_scale) the caller computed."""
    losses = _bitmask_bce_losses(tasks, logits, batch, scale)
    rest = [task for task in tasks if task.name not in losses]
    labels = task_labels(rest, batch) if rest else {}
    for task in rest:
        task_logits, label = logits[task.name], labels[task.name]
        task_loss = task_logits.new_zeros(())
        for kind, smoothing in task.losses:
            if kind == "binary_cross_entropy":
                target = label.float()
                if smoothing:
                    target = target * (1.0 - smoothing) + 0.5 * smoothing
                task_loss = task_loss + F.binary_cross_entropy_with_logits(task_logits, target)
            elif kind == "softmax_cross_entropy":
                task_loss = task_loss + F.cross_entropy(
                    task_logits, label.long(), label_smoothing=smoothing
                )
            else:
                task_loss = task_loss + F.mse_loss(task_logits, label.float())
        losses[task.name] = task_loss * task.weight * scale
    losses = {task.name: losses[task.name] for task in tasks}  # config order
    total = torch.stack(list(losses.values())).sum()
    return total, losses

def _bitmask_bce_losses(
    tasks: Sequence[TaskSpec], logits: dict[str, torch.Tensor], batch, scale
) -> dict[str, torch.Tensor]:
    """The weighted losses of the tasks that are one binary cross-entropy on a bit of an
    integer label column (all eight KuaiRand tasks), computed together: one label
    expansion and one loss over a [candidates, tasks] block instead of a handful of small
    kernels per task (each a launch, forward and backward). Same values as the per-task
    formula: the mean over the candidates of each task's column."""
    by_column: dict[str, list[TaskSpec]] = {}
    for task in tasks:
        plain = (
            task.num_class == 1
            and task.bitmask is not None
            and len(task.losses) == 1
            and task.losses[0][0] == "binary_cross_entropy"
            and task.label_name in batch.labels
            and not batch.labels[task.label_name].is_floating_point()
        )
        if plain:
            by_column.setdefault(task.label_name, []).append(task)
    losses = {}
    for column, group in by_column.items():
        if len(group) < 2:
            continue  # nothing to share; the per-task path does it
        label = batch.labels[column]
        bits = torch.tensor([t.bitmask for t in group], dtype=label.dtype, device=label.device)
        target = ((label.unsqueeze(1) & bits) != 0).float()
        smoothing = [t.losses[0][1] for t in group]
        if any(smoothing):
            amount = torch.tensor(smoothing, dtype=torch.float32, device=label.device)
            target = target * (1.0 - amount) + 0.5 * amount
        stacked = torch.stack([logits[t.name] for t in group], dim=1)
        per_task = F.binary_cross_entropy_with_logits(
            stacked, target, reduction="none"
        ).mean(dim=0)
        weights = torch.tensor([t.weight for t in group], dtype=per_task.dtype,
                               device=per_task.device)
        weighted = per_task * weights * scale
        for index, task in enumerate(group):
            losses[task.name] = weighted[index]  # a view: no kernel per task
    return losses
