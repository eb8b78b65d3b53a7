"""Evaluation metrics as accumulators whose state merges across ranks.

Each accumulator has update(...), compute() -> float, merge(other) (combine two states, used by
tests and by sync) and sync() (merge the state of every rank when torch.distributed is
initialised; call it on every rank before compute()).

- AUC(thresholds=0): exact ROC AUC (ties count one half), from all scores and labels.
- AUC(thresholds=T): binned like torchmetrics' binary AUROC with `thresholds=T`: T thresholds
  linspace(0, 1, T); per threshold the counts of positives / negatives scoring >= it; the ROC
  through those points (plus the (0, 0) corner) integrated with the trapezoid rule. The state
  is 2*T counts, summed across ranks.
- GroupedAUC: exact AUC per group (e.g. per user), unweighted mean over the groups that have
  both classes.
- MeanAbsoluteError: sum |pred - label| / count.

global_average_scale (used by DlrmHSTU.compute_losses) lives here too: like sync, it is a
cross-rank reduction, and keeping it here keeps this module free of torchrec.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gather_cat(local: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D tensor of every rank (lengths may differ between ranks)."""
    world = _world()
    if world == 1:
        return local
    size = torch.tensor([local.numel()], dtype=torch.int64)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(int(s) for s in sizes))
    padded = torch.zeros(longest, dtype=local.dtype)
    padded[: local.numel()] = local
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(s)] for g, s in zip(gathered, sizes)])


def global_average_scale(num_targets: torch.Tensor) -> float | torch.Tensor:
    """local candidates / mean candidates per rank (1.0 without torch.distributed, else a
    float32 0-dim tensor on num_targets' device).

    A loss averaged over the local candidates, times this, has a gradient whose average over
    ranks (what DDP and sharded embeddings compute) equals that of the mean over every
    candidate of every rank. One all_reduce; every rank must call it. The result stays on the
    device: reading it on the host would stall every training step until the GPU catches up.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 1.0
    local = num_targets.sum().to(torch.float64).reshape(1)
    total = local.clone()
    # SUM then divide: gloo has no AVG reduction.
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    mean = total / dist.get_world_size()
    scale = torch.where(mean > 0, local / mean.clamp(min=1e-30), torch.ones_like(local))
    return scale.reshape(()).to(torch.float32)


def exact_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Mann-Whitney AUC with midranks for ties; nan when one class is missing."""
    scores = scores.double().flatten()
    positive = labels.flatten() > 0
    num_pos = int(positive.sum())
    num_neg = positive.numel() - num_pos
    if num_pos == 0 or num_neg == 0:
        return float("nan")
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    # Midrank of each distinct score: (first rank + last rank) / 2, ranks counted from 1.
    _, inverse, counts = torch.unique_consecutive(
        sorted_scores, return_inverse=True, return_counts=True
    )
    last_rank = torch.cumsum(counts, 0).double()
    midrank = last_rank - (counts.double() - 1) / 2
    ranks = torch.empty_like(scores)
    ranks[order] = midrank[inverse]
    rank_sum = float(ranks[positive].sum())
    return (rank_sum - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg)


class AUC:
    def __init__(self, thresholds: int = 200) -> None:
        if thresholds == 1:
            raise ValueError("AUC thresholds must be 0 (exact) or >= 2")
        self.thresholds = thresholds
        if thresholds:
            # float32 edges and scores, compared as torchmetrics compares them.
            self.edges = torch.linspace(0, 1, thresholds, dtype=torch.float32)
            self.positives_above = torch.zeros(thresholds, dtype=torch.int64)
            self.negatives_above = torch.zeros(thresholds, dtype=torch.int64)
        else:
            self.scores: list[torch.Tensor] = []
            self.labels: list[torch.Tensor] = []

    def update(self, scores: torch.Tensor, labels: torch.Tensor) -> None:
        scores = scores.detach().flatten().cpu()
        positive = labels.detach().flatten().cpu() > 0
        if not self.thresholds:
            self.scores.append(scores.double())
            self.labels.append(positive)
            return
        # passed[i] = how many thresholds score i reaches (edges[0 .. passed-1] <= score).
        passed = torch.searchsorted(self.edges, scores.float(), right=True)
        self.positives_above += self._reaching(passed[positive])
        self.negatives_above += self._reaching(passed[~positive])

    def _reaching(self, passed: torch.Tensor) -> torch.Tensor:
        """[T]: how many of the scores reach each threshold (>= it)."""
        counts = torch.bincount(passed, minlength=self.thresholds + 1)[1:]
        return counts.flip(0).cumsum(0).flip(0)

    def merge(self, other: "AUC") -> None:
        if other.thresholds != self.thresholds:
            raise ValueError("cannot merge AUCs with different thresholds")
        if self.thresholds:
            self.positives_above += other.positives_above
            self.negatives_above += other.negatives_above
        else:
            self.scores.extend(other.scores)
            self.labels.extend(other.labels)

    def sync(self) -> None:
        if _world() == 1:
            return
        if self.thresholds:
            dist.all_reduce(self.positives_above)
            dist.all_reduce(self.negatives_above)
        else:
            scores, labels = self._flat()
            self.scores = [_gather_cat(scores)]
            self.labels = [_gather_cat(labels.to(torch.int64)) > 0]

    def _flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.scores:
            return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.bool)
        return torch.cat(self.scores), torch.cat(self.labels)

    def compute(self) -> float:
        if not self.thresholds:
            return exact_auc(*self._flat())
        num_pos = int(self.positives_above[0])  # every score is >= the first threshold, 0
        num_neg = int(self.negatives_above[0])
        if num_pos == 0 or num_neg == 0:
            return float("nan")
        # Points from the highest threshold down, starting at the (0, 0) corner.
        tpr = torch.cat([torch.zeros(1), self.positives_above.flip(0).double() / num_pos])
        fpr = torch.cat([torch.zeros(1), self.negatives_above.flip(0).double() / num_neg])
        return float(torch.trapezoid(tpr, fpr))


class GroupedAUC:
    def __init__(self) -> None:
        self.scores: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.groups: list[torch.Tensor] = []

    def update(self, scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> None:
        self.scores.append(scores.detach().flatten().cpu().double())
        self.labels.append(labels.detach().flatten().cpu() > 0)
        self.groups.append(groups.detach().flatten().cpu().to(torch.int64))

    def merge(self, other: "GroupedAUC") -> None:
        self.scores.extend(other.scores)
        self.labels.extend(other.labels)
        self.groups.extend(other.groups)

    def sync(self) -> None:
        if _world() == 1:
            return
        scores, labels, groups = self._flat()
        self.scores = [_gather_cat(scores)]
        self.labels = [_gather_cat(labels.to(torch.int64)) > 0]
        self.groups = [_gather_cat(groups)]

    def _flat(self):
        if not self.scores:
            empty = torch.zeros(0)
            return empty.double(), empty.bool(), empty.long()
        return torch.cat(self.scores), torch.cat(self.labels), torch.cat(self.groups)

    def compute(self) -> float:
        scores, labels, groups = self._flat()
        if groups.numel() == 0:
            return float("nan")
        order = torch.argsort(groups, stable=True)
        scores, labels, groups = scores[order], labels[order], groups[order]
        _, counts = torch.unique_consecutive(groups, return_counts=True)
        aucs = []
        for group_scores, group_labels in zip(
            torch.split(scores, counts.tolist()), torch.split(labels, counts.tolist())
        ):
            positives = int(group_labels.sum())
            if 0 < positives < group_labels.numel():
                aucs.append(exact_auc(group_scores, group_labels))
        return sum(aucs) / len(aucs) if aucs else float("nan")


class MeanAbsoluteError:
    def __init__(self) -> None:
        self.total = torch.zeros((), dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.int64)

    def update(self, predictions: torch.Tensor, labels: torch.Tensor) -> None:
        error = (predictions.detach().double() - labels.detach().double()).abs().sum()
        self.total += error.cpu()
        self.count += predictions.numel()

    def merge(self, other: "MeanAbsoluteError") -> None:
        self.total += other.total
        self.count += other.count

    def sync(self) -> None:
        if _world() > 1:
            dist.all_reduce(self.total)
            dist.all_reduce(self.count)

    def compute(self) -> float:
        return float(self.total / self.count) if int(self.count) else float("nan")


class TaskMetrics:
    """The metrics of every task of a DlrmHSTU, keyed like TorchEasyRec's: auc_<task>,
    grouped_auc_<task>, mae_<task>."""

    def __init__(self, tasks) -> None:
        self.tasks = list(tasks)
        self.metrics: dict[str, tuple[object, str, object]] = {}
        for task in self.tasks:
            for kind, argument in task.metrics:
                if kind == "auc":
                    self.metrics[f"auc_{task.name}"] = (AUC(int(argument)), task.name, None)
                elif kind == "grouped_auc":
                    self.metrics[f"grouped_auc_{task.name}"] = (GroupedAUC(), task.name, argument)
                elif kind == "mean_absolute_error":
                    self.metrics[f"mae_{task.name}"] = (MeanAbsoluteError(), task.name, None)

    def update(self, model, output, batch) -> None:
        """Add one batch: model is the DlrmHSTU (for labels and grouping keys)."""
        labels = model.task_labels(batch)
        for metric, task, grouping_key in self.metrics.values():
            if isinstance(metric, GroupedAUC):
                groups = model.grouping_key(batch, grouping_key, output.num_targets)
                metric.update(output.probs[task], labels[task], groups)
            else:
                metric.update(output.probs[task], labels[task])

    def sync(self) -> None:
        for metric, _, _ in self.metrics.values():
            metric.sync()

    def compute(self) -> dict[str, float]:
        return {name: metric.compute() for name, (metric, _, _) in self.metrics.items()}
