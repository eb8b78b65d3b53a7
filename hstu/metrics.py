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
- MeanSquaredError, Accuracy, MulticlassAUC, XAUC, GroupedXAUC: TorchEasyRec's other task
  metrics (each class says how it computes).

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


class _SummedState:
    """merge and sync for accumulators whose whole state is tensors that add up (sums and
    counts): combining two states, or every rank's, is an elementwise sum. `_summed` names
    those tensors."""

    _summed: tuple[str, ...] = ()

    def merge(self, other: "_SummedState") -> None:
        for name in self._summed:
            getattr(self, name).add_(getattr(other, name))

    def sync(self) -> None:
        if _world() > 1:
            for name in self._summed:
                dist.all_reduce(getattr(self, name))


class MeanAbsoluteError(_SummedState):
    _summed = ("total", "count")

    def __init__(self) -> None:
        self.total = torch.zeros((), dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.int64)

    def update(self, predictions: torch.Tensor, labels: torch.Tensor) -> None:
        error = (predictions.detach().double() - labels.detach().double()).abs().sum()
        self.total += error.cpu()
        self.count += predictions.numel()

    def compute(self) -> float:
        return float(self.total / self.count) if int(self.count) else float("nan")


class MeanSquaredError(_SummedState):
    """sum (pred - label)^2 / count (torchmetrics' MeanSquaredError, TorchEasyRec's
    mean_squared_error)."""

    _summed = ("total", "count")

    def __init__(self) -> None:
        self.total = torch.zeros((), dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.int64)

    def update(self, predictions: torch.Tensor, labels: torch.Tensor) -> None:
        error = predictions.detach().double() - labels.detach().double()
        self.total += (error * error).sum().cpu()
        self.count += predictions.numel()

    def compute(self) -> float:
        return float(self.total / self.count) if int(self.count) else float("nan")


class Accuracy(_SummedState):
    """TorchEasyRec's accuracy (torchmetrics.Accuracy, micro average).

    num_class 1: scores are probabilities, a candidate is predicted positive when its score is
    > threshold (strictly, as torchmetrics compares), and counted correct when that matches its
    0/1 label. num_class >= 2: scores are [N, C] class probabilities, a candidate is correct
    when its label is among the top_k classes.
    """

    _summed = ("correct", "count")

    def __init__(self, num_class: int = 1, threshold: float = 0.5, top_k: int = 1) -> None:
        self.num_class, self.threshold, self.top_k = num_class, threshold, top_k
        self.correct = torch.zeros((), dtype=torch.int64)
        self.count = torch.zeros((), dtype=torch.int64)

    def update(self, scores: torch.Tensor, labels: torch.Tensor) -> None:
        scores, labels = scores.detach().cpu(), labels.detach().cpu()
        if self.num_class == 1:
            correct = (scores.flatten() > self.threshold) == (labels.flatten() > 0)
        else:
            top = scores.float().topk(min(self.top_k, self.num_class), dim=1).indices
            correct = (top == labels.long().unsqueeze(1)).any(dim=1)
        self.correct += int(correct.sum())
        self.count += correct.numel()

    def compute(self) -> float:
        return float(self.correct) / float(self.count) if int(self.count) else float("nan")


class MulticlassAUC:
    """TorchEasyRec's multiclass_auc (torchmetrics' multiclass AUROC): one-vs-rest AUC of each
    class's probability, binned with `thresholds` like AUC (exact when 0), averaged over the
    classes: "macro" the plain mean, "weighted" weighted by each class's count of labels.
    A class without positives or without negatives has no AUC and is left out of the mean."""

    def __init__(self, num_class: int, thresholds: int = 200, average: str = "macro") -> None:
        if average not in ("macro", "weighted"):
            raise ValueError(f"multiclass_auc average must be macro or weighted, not {average!r}")
        self.average = average
        self.per_class = [AUC(thresholds) for _ in range(num_class)]
        self.support = torch.zeros(num_class, dtype=torch.int64)

    def update(self, probabilities: torch.Tensor, labels: torch.Tensor) -> None:
        probabilities = probabilities.detach().float().cpu()
        labels = labels.detach().long().cpu()
        for index, auc in enumerate(self.per_class):
            auc.update(probabilities[:, index], labels == index)
        self.support += torch.bincount(labels, minlength=len(self.per_class))[
            : len(self.per_class)
        ]

    def merge(self, other: "MulticlassAUC") -> None:
        for mine, theirs in zip(self.per_class, other.per_class):
            mine.merge(theirs)
        self.support += other.support

    def sync(self) -> None:
        for auc in self.per_class:
            auc.sync()
        if _world() > 1:
            dist.all_reduce(self.support)

    def compute(self) -> float:
        values, weights = [], []
        for auc, support in zip(self.per_class, self.support.tolist()):
            value = auc.compute()
            if value == value:  # not nan
                values.append(value)
                weights.append(float(support))
        if not values:
            return float("nan")
        if self.average == "weighted":
            return sum(v * w for v, w in zip(values, weights)) / sum(weights)
        return sum(values) / len(values)


def _pair_accuracy(
    predictions: torch.Tensor, targets: torch.Tensor, first: torch.Tensor, second: torch.Tensor
) -> torch.Tensor:
    """Per pair (first[k], second[k]): 1.0 when the predictions order the pair as the targets
    do, (t_i - t_j)(p_i - p_j) > 0; ties in either count as wrong (TorchEasyRec's XAUC)."""
    return (
        (targets[first] - targets[second]) * (predictions[first] - predictions[second]) > 0
    ).double()


def exact_xauc(predictions: torch.Tensor, targets: torch.Tensor, block: int = 2048) -> float:
    """Share of all n (n - 1) / 2 pairs i < j that the predictions order as the targets do
    (nan for fewer than two values). Exact, in blocks of rows to bound memory."""
    predictions, targets = predictions.double().flatten(), targets.double().flatten()
    n = predictions.numel()
    if n < 2:
        return float("nan")
    correct = 0.0
    for start in range(0, n, block):
        rows = slice(start, min(start + block, n))
        agree = (targets[rows, None] - targets[None, :]) * (
            predictions[rows, None] - predictions[None, :]
        ) > 0
        # Only pairs i < j: column index above the row index.
        above = torch.arange(n)[None, :] > torch.arange(start, rows.stop)[:, None]
        correct += float((agree & above).sum())
    return correct / (n * (n - 1) / 2)


def sampled_xauc(
    predictions: torch.Tensor, targets: torch.Tensor, pairs: int, generator: torch.Generator
) -> float:
    """XAUC over `pairs` pairs drawn uniformly with replacement from the n (n - 1) / 2 pairs
    i < j (TorchEasyRec's sampling_xauc: a flat pair index k maps to the pair (k - i(i+1)/2,
    i + 1), i = floor((sqrt(1 + 8k) - 1) / 2)); exact when `pairs` covers every pair."""
    n = predictions.numel()
    total = n * (n - 1) // 2
    if n < 2 or pairs <= 0:
        return float("nan")
    if pairs >= total:
        return exact_xauc(predictions, targets)
    flat = torch.randint(0, total, (pairs,), generator=generator, dtype=torch.int64)
    row = torch.floor((torch.sqrt(1 + 8 * flat.double()) - 1) / 2).long()
    # Float rounding can put row one off near a triangle number: correct it exactly.
    row = row - (row * (row + 1) // 2 > flat).long()
    row = row + ((row + 1) * (row + 2) // 2 <= flat).long()
    first = flat - row * (row + 1) // 2
    second = row + 1
    return float(_pair_accuracy(predictions.double(), targets.double(), first, second).mean())


class XAUC:
    """TorchEasyRec's xauc for regression tasks (e.g. watch time): the share of candidate
    pairs whose predictions are ordered as their labels.

    in_batch: exact XAUC within each batch, averaged over batches. Otherwise over the whole
    eval set: max_pairs pairs (or n (n - 1) / 2 * sample_ratio) drawn uniformly; when that
    covers every pair the value is exact (TorchEasyRec would still draw with replacement). The
    draw uses a fixed seed, so a result does not change between evaluations of the same data.
    """

    def __init__(
        self, sample_ratio: float = 1e-3, max_pairs: int | None = None, in_batch: bool = False
    ) -> None:
        if not 0.0 < sample_ratio <= 1.0:
            raise ValueError(f"xauc sample_ratio must be in (0, 1], not {sample_ratio}")
        self.sample_ratio, self.max_pairs, self.in_batch = sample_ratio, max_pairs, in_batch
        self.predictions: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self.batch_sum = torch.zeros((), dtype=torch.float64)
        self.batch_count = torch.zeros((), dtype=torch.int64)

    def update(self, predictions: torch.Tensor, targets: torch.Tensor) -> None:
        predictions = predictions.detach().double().flatten().cpu()
        targets = targets.detach().double().flatten().cpu()
        if self.in_batch:
            value = exact_xauc(predictions, targets)
            if value == value:
                self.batch_sum += value
                self.batch_count += 1
        else:
            self.predictions.append(predictions)
            self.targets.append(targets)

    def merge(self, other: "XAUC") -> None:
        self.predictions.extend(other.predictions)
        self.targets.extend(other.targets)
        self.batch_sum += other.batch_sum
        self.batch_count += other.batch_count

    def sync(self) -> None:
        if _world() == 1:
            return
        if self.in_batch:
            dist.all_reduce(self.batch_sum)
            dist.all_reduce(self.batch_count)
        else:
            predictions, targets = self._flat()
            self.predictions, self.targets = [_gather_cat(predictions)], [_gather_cat(targets)]

    def _flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.predictions:
            empty = torch.zeros(0, dtype=torch.float64)
            return empty, empty
        return torch.cat(self.predictions), torch.cat(self.targets)

    def compute(self) -> float:
        if self.in_batch:
            count = int(self.batch_count)
            return float(self.batch_sum) / count if count else float("nan")
        predictions, targets = self._flat()
        n = predictions.numel()
        pairs = self.max_pairs if self.max_pairs else int(n * (n - 1) // 2 * self.sample_ratio)
        return sampled_xauc(predictions, targets, pairs, torch.Generator().manual_seed(0))


class GroupedXAUC:
    """TorchEasyRec's grouped_xauc: XAUC within each group (e.g. user), over at most
    max_pairs_per_group drawn pairs (exact when that covers the group's pairs), averaged over
    the groups weighted by their sizes. Groups of one candidate have no pair and are left out
    (TorchEasyRec's mean would turn nan there)."""

    def __init__(self, max_pairs_per_group: int = 100) -> None:
        self.max_pairs = max_pairs_per_group
        self.predictions: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self.groups: list[torch.Tensor] = []

    def update(
        self, predictions: torch.Tensor, targets: torch.Tensor, groups: torch.Tensor
    ) -> None:
        self.predictions.append(predictions.detach().double().flatten().cpu())
        self.targets.append(targets.detach().double().flatten().cpu())
        self.groups.append(groups.detach().flatten().cpu().to(torch.int64))

    def merge(self, other: "GroupedXAUC") -> None:
        self.predictions.extend(other.predictions)
        self.targets.extend(other.targets)
        self.groups.extend(other.groups)

    def sync(self) -> None:
        if _world() > 1:
            predictions, targets, groups = self._flat()
            self.predictions = [_gather_cat(predictions)]
            self.targets = [_gather_cat(targets)]
            self.groups = [_gather_cat(groups)]

    def _flat(self):
        if not self.predictions:
            return (torch.zeros(0, dtype=torch.float64),) * 2 + (torch.zeros(0, dtype=torch.int64),)
        return torch.cat(self.predictions), torch.cat(self.targets), torch.cat(self.groups)

    def compute(self) -> float:
        predictions, targets, groups = self._flat()
        order = torch.argsort(groups, stable=True)
        _, counts = torch.unique_consecutive(groups[order], return_counts=True)
        generator = torch.Generator().manual_seed(0)
        weighted, weights = 0.0, 0
        for members in torch.split(order, counts.tolist()):
            if members.numel() < 2:
                continue
            value = sampled_xauc(predictions[members], targets[members], self.max_pairs, generator)
            weighted += value * members.numel()
            weights += members.numel()
        return weighted / weights if weights else float("nan")


class TaskMetrics:
    """The metrics of every task of a DlrmHSTU, keyed like TorchEasyRec's: auc_<task>,
    grouped_auc_<task>, mae_<task>, mse_<task>, accuracy_<task>, multiclass_auc_<task>,
    xauc_<task>, grouped_xauc_<task>."""

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
                elif kind == "mean_squared_error":
                    self.metrics[f"mse_{task.name}"] = (MeanSquaredError(), task.name, None)
                elif kind == "accuracy":
                    threshold, top_k = argument
                    self.metrics[f"accuracy_{task.name}"] = (
                        Accuracy(task.num_class, threshold, top_k), task.name, None
                    )
                elif kind == "multiclass_auc":
                    thresholds, average = argument
                    self.metrics[f"multiclass_auc_{task.name}"] = (
                        MulticlassAUC(task.num_class, thresholds, average), task.name, None
                    )
                elif kind == "xauc":
                    sample_ratio, max_pairs, in_batch = argument
                    self.metrics[f"xauc_{task.name}"] = (
                        XAUC(sample_ratio, max_pairs, in_batch), task.name, None
                    )
                elif kind == "grouped_xauc":
                    grouping_key, max_pairs_per_group = argument
                    self.metrics[f"grouped_xauc_{task.name}"] = (
                        GroupedXAUC(max_pairs_per_group), task.name, grouping_key
                    )
        self.num_class = {task.name: task.num_class for task in self.tasks}

    def update(self, model, output, batch) -> None:
        """Add one batch: model is the DlrmHSTU (for labels and grouping keys)."""
        labels = model.task_labels(batch)
        for metric, task, grouping_key in self.metrics.values():
            if isinstance(metric, (GroupedAUC, GroupedXAUC)):
                groups = model.grouping_key(batch, grouping_key, output.num_targets)
                metric.update(output.probs[task], labels[task], groups)
            elif isinstance(metric, (MulticlassAUC, Accuracy)) and self.num_class[task] > 1:
                # Every class's probability, not only class 1's (output.probs).
                metric.update(torch.softmax(output.logits[task].float(), dim=1), labels[task])
            else:
                metric.update(output.probs[task], labels[task])

    def sync(self) -> None:
        for metric, _, _ in self.metrics.values():
            metric.sync()

    def compute(self) -> dict[str, float]:
        return {name: metric.compute() for name, (metric, _, _) in self.metrics.items()}


# ----------------------------------------------------------------------------- NE, calibration
# The sums and the final ratios come from torchrec.metrics (ne.get_ne_states / compute_ne,
# calibration.get_calibration_states / compute_calibration), imported when first used so that
# importing this module still needs no TorchRec. Only the cross-rank merge is ours: TorchRec's
# RecMetric classes keep their state in a TorchMetrics-style module with windows and fused
# tasks, which the accumulators of this file (update / merge / sync / compute) do not fit.

# TorchRec's NEMetric default: keeps log() of a saturated probability finite.
NE_ETA = 1e-12


def _binary_labels(labels: torch.Tensor) -> torch.Tensor:
    return (labels.detach().flatten().cpu() > 0).double()


class NormalizedEntropy(_SummedState):
    """Normalized entropy (He et al., "Practical lessons from predicting clicks on ads at
    Facebook", 2014; torchrec.metrics.ne): the mean cross entropy of the predicted
    probabilities divided by the entropy of the eval set's base rate p = positives / count,

        NE = -mean(y log q + (1 - y) log(1 - q)) / -(p log p + (1 - p) log(1 - p)).

    1.0 is what always predicting the base rate scores; lower is better. nan when the labels
    hold one class only (the base-rate entropy is 0). Labels > 0 count as positives."""

    _summed = ("state",)

    def __init__(self, eta: float = NE_ETA) -> None:
        self.eta = eta
        self.state = torch.zeros(4, dtype=torch.float64)  # ce sum, count, positives, negatives

    def update(self, probabilities: torch.Tensor, labels: torch.Tensor) -> None:
        from torchrec.metrics.ne import get_ne_states

        predictions = probabilities.detach().flatten().cpu().double().view(1, -1)
        targets = _binary_labels(labels).view(1, -1)
        states = get_ne_states(targets, predictions, torch.ones_like(predictions), self.eta)
        self.state += torch.cat([
            states["cross_entropy_sum"], states["weighted_num_samples"],
            states["pos_labels"], states["neg_labels"],
        ]).double()

    def compute(self) -> float:
        from torchrec.metrics.ne import compute_ne

        ce_sum, count, positives, negatives = self.state
        if float(positives) == 0.0 or float(negatives) == 0.0:
            return float("nan")
        return float(compute_ne(ce_sum, count, positives, negatives, self.eta))


class Calibration(_SummedState):
    """sum of predicted probabilities / number of positives (torchrec.metrics.calibration):
    1.0 when the model predicts as many positives as the eval set has, above 1 when it
    over-predicts. nan when there is no positive (TorchRec reports 0.0 there, which reads like
    a model that predicts nothing)."""

    _summed = ("state",)

    def __init__(self) -> None:
        self.state = torch.zeros(2, dtype=torch.float64)  # sum of predictions, positives

    def update(self, probabilities: torch.Tensor, labels: torch.Tensor) -> None:
        from torchrec.metrics.calibration import (
            CALIBRATION_DENOM,
            CALIBRATION_NUM,
            get_calibration_states,
        )

        predictions = probabilities.detach().flatten().cpu().double().view(1, -1)
        targets = _binary_labels(labels).view(1, -1)
        states = get_calibration_states(targets, predictions, torch.ones_like(predictions))
        self.state += torch.cat([states[CALIBRATION_NUM], states[CALIBRATION_DENOM]]).double()

    def compute(self) -> float:
        from torchrec.metrics.calibration import compute_calibration

        predicted, positives = self.state
        if float(positives) == 0.0:
            return float("nan")
        return float(compute_calibration(predicted, positives))


class CalibrationMetrics:
    """Metrics every task gets whatever its config lists (TaskMetrics has those): ne_<task>
    and calibration_<task> for classification tasks of one or two classes (on P(class 1),
    what ModelOutput.probs holds), mae_<task> for regression tasks that do not list
    mean_absolute_error already. Same interface as TaskMetrics."""

    def __init__(self, tasks) -> None:
        self.metrics: dict[str, tuple[object, str]] = {}
        for task in tasks:
            if task.is_regression:
                if not any(kind == "mean_absolute_error" for kind, _ in task.metrics):
                    self.metrics[f"mae_{task.name}"] = (MeanAbsoluteError(), task.name)
            elif task.num_class <= 2:
                self.metrics[f"ne_{task.name}"] = (NormalizedEntropy(), task.name)
                self.metrics[f"calibration_{task.name}"] = (Calibration(), task.name)

    def update(self, model, output, batch) -> None:
        labels = model.task_labels(batch)
        for metric, task in self.metrics.values():
            metric.update(output.probs[task], labels[task])

    def sync(self) -> None:
        for metric, _ in self.metrics.values():
            metric.sync()

    def compute(self) -> dict[str, float]:
        return {name: metric.compute() for name, (metric, _) in self.metrics.items()}
