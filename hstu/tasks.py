"""The multi-task heads' contract (reference 2.10-2.13): what each task is, its labels and its
losses. DlrmHSTU (hstu/model.py) parses the tasks from the config and calls task_losses on its
outputs; evaluation (hstu/train/evaluation.py) reads task_labels for the metrics.

Losses, as TorchEasyRec's task towers compute them (each a mean over the local candidates):

- binary_cross_entropy: BCE with logits; label_smoothing s turns a 0/1 target y into
  y (1 - s) + s / 2.
- binary_focal_loss (gamma, alpha): BCE with logits weighted per candidate by
  alpha y (1 - p)^gamma + (1 - alpha)(1 - y) p^gamma, p = sigmoid(logit); the weight is a
  constant (no gradient flows through it), as in TorchEasyRec's BinaryFocalLoss.
- softmax_cross_entropy: cross entropy over num_class logits, with label smoothing.
- jrc_loss (session_name, alpha; num_class 2): alpha CE + (1 - alpha) GE. GE, per candidate:
  a positive competes on the class-1 logit against the negatives of its session, a negative on
  the class-0 logit against the positives of its session, each a softmax with the candidate as
  target: softplus(logsumexp(competitors) - own logit), 0 with no competitor; GE is the mean
  over candidates. A candidate's session is the value of the session_name feature (a scalar id
  feature, e.g. user_id) of its row: candidates of rows with equal values share a session.
- l2_loss: mean squared error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from hstu.config.errors import ModelConfigError

CLASSIFICATION_LOSSES = (
    "binary_cross_entropy",
    "softmax_cross_entropy",
    "jrc_loss",
    "binary_focal_loss",
)
SUPPORTED_LOSSES = CLASSIFICATION_LOSSES + ("l2_loss",)
SUPPORTED_METRICS = (
    "auc",
    "grouped_auc",
    "mean_absolute_error",
    "mean_squared_error",
    "accuracy",
    "multiclass_auc",
    "xauc",
    "grouped_xauc",
)

# Logit given to candidates that do not compete in a session's log-sum-exp: exp of it minus
# the session maximum underflows to exactly 0 in float32.
_NOT_COMPETING = -1e9


@dataclasses.dataclass(frozen=True)
class FocalParams:
    gamma: float
    alpha: float


@dataclasses.dataclass(frozen=True)
class JrcParams:
    # The scalar feature whose value groups candidates into sessions (TorchEasyRec's
    # session_name; the 1K KuaiRand config uses user_id).
    session: str
    alpha: float


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One entry of fusion_mtl_tower.task_configs, resolved."""

    name: str
    label_name: str
    bitmask: int | None  # labels become ((label & bitmask) != 0) when set
    num_class: int
    weight: float
    # (loss kind, its parameters): ("binary_cross_entropy" | "softmax_cross_entropy",
    # label smoothing), ("binary_focal_loss", FocalParams), ("jrc_loss", JrcParams),
    # ("l2_loss", 0.0)
    losses: tuple[tuple[str, object], ...]
    # ("auc", thresholds) | ("grouped_auc", grouping_key) | ("mean_absolute_error", None) |
    # ("mean_squared_error", None) | ("accuracy", (threshold, top_k)) |
    # ("multiclass_auc", (thresholds, average)) | ("xauc", (sample_ratio, max_pairs, in_batch))
    # | ("grouped_xauc", (grouping_key, max_pairs_per_group))
    metrics: tuple[tuple[str, object], ...]

    @property
    def is_regression(self) -> bool:
        return all(kind == "l2_loss" for kind, _ in self.losses)


def _loss_params(kind: str, loss) -> object:
    options = getattr(loss, kind)
    if kind in ("binary_cross_entropy", "softmax_cross_entropy"):
        return float(options.label_smoothing)
    if kind == "binary_focal_loss":
        return FocalParams(gamma=float(options.gamma), alpha=float(options.alpha))
    if kind == "jrc_loss":
        return JrcParams(session=options.session_name, alpha=float(options.alpha))
    return 0.0


def _metric_params(kind: str, metric) -> object:
    options = getattr(metric, kind)
    if kind == "auc":
        return int(options.thresholds)
    if kind == "grouped_auc":
        return options.grouping_key
    if kind == "accuracy":
        return (float(options.threshold), int(options.top_k))
    if kind == "multiclass_auc":
        return (int(options.thresholds), options.average)
    if kind == "xauc":
        max_pairs = int(options.max_pairs) if options.HasField("max_pairs") else None
        return (float(options.sample_ratio), max_pairs, bool(options.in_batch))
    if kind == "grouped_xauc":
        return (options.grouping_key, int(options.max_pairs_per_group))
    return None


def _supported_kind(entry, oneof: str, supported, where: str) -> str:
    """Which field of `entry`'s oneof is set; a ModelConfigError at `where` if not supported."""
    kind = entry.WhichOneof(oneof)
    if kind not in supported:
        raise ModelConfigError(
            where, f"{kind} is not implemented; supported: {', '.join(supported)}"
        )
    return kind


def parse_tasks(tower_cfg) -> list[TaskSpec]:
    """fusion_mtl_tower.task_configs -> TaskSpecs; unsupported losses and metrics are named."""
    tasks = []
    for index, task in enumerate(tower_cfg.task_configs):
        path = f"dlrm_hstu.fusion_mtl_tower.task_configs[{index}]"
        losses = []
        for loss_index, loss in enumerate(task.losses):
            kind = _supported_kind(loss, "loss", SUPPORTED_LOSSES, f"{path}.losses[{loss_index}]")
            if kind in ("binary_cross_entropy", "binary_focal_loss", "l2_loss"):
                if task.num_class != 1:
                    raise ModelConfigError(path, f"{kind} needs num_class 1")
            if kind == "softmax_cross_entropy" and task.num_class < 2:
                raise ModelConfigError(path, "softmax_cross_entropy needs num_class >= 2")
            if kind == "jrc_loss" and task.num_class != 2:
                raise ModelConfigError(path, "jrc_loss needs num_class 2")
            losses.append((kind, _loss_params(kind, loss)))
        if not losses:
            raise ModelConfigError(path, f"task {task.task_name!r} has no losses")
        if {kind for kind, _ in losses} & {"l2_loss"} and len(
            {kind for kind, _ in losses}
        ) > 1:
            raise ModelConfigError(path, "l2_loss cannot be mixed with classification losses")
        metrics = []
        for metric_index, metric in enumerate(task.metrics):
            kind = _supported_kind(
                metric, "metric", SUPPORTED_METRICS, f"{path}.metrics[{metric_index}]"
            )
            metrics.append((kind, _metric_params(kind, metric)))
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
    tasks: Sequence[TaskSpec],
    logits: dict[str, torch.Tensor],
    batch,
    scale,
    num_targets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total, {task: weighted loss}). Each loss is a mean over the local candidates; with
    enable_global_average_loss and torch.distributed initialised it is rescaled by
    local count / mean count over ranks, so that averaging gradients over ranks gives the
    mean over all candidates of all ranks. total = plain sum over tasks.

    logits: per task, as ModelOutput.logits; scale: 1.0, or the global-average factor
    (hstu.metrics.global_average_scale) the caller computed; num_targets: candidates per row
    [B] (ModelOutput.num_targets), needed by jrc_loss to find each candidate's session."""
    losses = _bitmask_bce_losses(tasks, logits, batch, scale)
    rest = [task for task in tasks if task.name not in losses]
    labels = task_labels(rest, batch) if rest else {}
    for task in rest:
        task_logits, label = logits[task.name], labels[task.name]
        task_loss = task_logits.new_zeros((), dtype=torch.float32)
        for kind, params in task.losses:
            if kind == "binary_cross_entropy":
                target = label.float()
                if params:
                    target = target * (1.0 - params) + 0.5 * params
                task_loss = task_loss + F.binary_cross_entropy_with_logits(task_logits, target)
            elif kind == "binary_focal_loss":
                task_loss = task_loss + binary_focal_loss(
                    task_logits, label, params.gamma, params.alpha
                )
            elif kind == "softmax_cross_entropy":
                task_loss = task_loss + F.cross_entropy(
                    task_logits, label.long(), label_smoothing=params
                )
            elif kind == "jrc_loss":
                if num_targets is None:
                    raise ValueError(
                        f"task {task.name}: jrc_loss needs num_targets (candidates per row) "
                        "to group candidates into sessions"
                    )
                session = session_index(
                    row_feature_values(batch, params.session),
                    num_targets,
                    total=task_logits.shape[0],
                )
                task_loss = task_loss + jrc_loss(
                    task_logits, label, session, params.alpha, num_sessions=num_targets.shape[0]
                )
            else:
                task_loss = task_loss + F.mse_loss(task_logits, label.float())
        losses[task.name] = task_loss * task.weight * scale
    losses = {task.name: losses[task.name] for task in tasks}  # config order
    total = torch.stack(list(losses.values())).sum()
    return total, losses


def binary_focal_loss(
    logits: torch.Tensor, label: torch.Tensor, gamma: float, alpha: float
) -> torch.Tensor:
    """Mean over candidates of w * BCE(logit, y), w = alpha y (1-p)^gamma + (1-alpha)(1-y)
    p^gamma with p = sigmoid(logit), w held constant (TorchEasyRec's BinaryFocalLoss)."""
    logits = logits.float()
    target = label.float()
    probability = torch.sigmoid(logits)
    weight = alpha * target * (1.0 - probability) ** gamma + (1.0 - alpha) * (
        1.0 - target
    ) * probability**gamma
    return F.binary_cross_entropy_with_logits(logits, target, weight=weight.detach())


def row_feature_values(batch, name: str) -> torch.Tensor:
    """The value of scalar id feature `name` for each of the batch's B rows, [B].

    Read by position from the KeyedJaggedTensor (a scalar feature has one value per row, which
    the config rules and the data checks guarantee), so that nothing is read back to the host:
    indexing a KJT by key would compute its per-key lengths on the host, a device sync on GPU.
    """
    sparse = batch.sparse
    keys = list(sparse.keys())
    if name not in keys:
        raise KeyError(f"session feature {name!r} is not an id feature of the batch")
    rows = batch.batch_size
    lengths = sparse.lengths()
    start = lengths[: keys.index(name) * rows].sum()
    positions = start + torch.arange(rows, device=lengths.device)
    return sparse.values().index_select(0, positions)


def session_index(
    row_values: torch.Tensor, num_targets: torch.Tensor, total: int
) -> torch.Tensor:
    """Per candidate, its session as a row index in [0, B): the first row whose value equals
    the candidate's row's value. Rows with equal values (e.g. two windows of one user in a
    batch) share one session. Tensor ops only (a [B, B] comparison), no host read."""
    rows = row_values.shape[0]
    same = row_values.unsqueeze(0) == row_values.unsqueeze(1)
    first_equal = same.to(torch.int32).argmax(dim=1)  # argmax gives the first maximum
    row_of_candidate = torch.repeat_interleave(
        torch.arange(rows, device=num_targets.device), num_targets, output_size=total
    )
    return first_equal[row_of_candidate]


def _segment_logsumexp(values: torch.Tensor, index: torch.Tensor, segments: int) -> torch.Tensor:
    """logsumexp of `values` [N] per segment (`index` [N] in [0, segments)), [segments]."""
    peak = torch.full((segments,), float("-inf"), dtype=values.dtype, device=values.device)
    peak = peak.scatter_reduce(0, index, values.detach(), reduce="amax", include_self=True)
    # Any shift gives the same value; the detached maximum keeps exp from overflowing.
    summed = torch.zeros_like(peak).index_add(0, index, torch.exp(values - peak[index]))
    return peak + torch.log(summed)


def jrc_loss(
    logits: torch.Tensor,
    label: torch.Tensor,
    session: torch.Tensor,
    alpha: float,
    num_sessions: int | None = None,
) -> torch.Tensor:
    """alpha * CE + (1 - alpha) * GE over [N, 2] logits; `session` [N] in [0, num_sessions)
    (default N) is each candidate's session (see the module docstring for GE)."""
    logits = logits.float()
    label = label.long()
    cross_entropy = F.cross_entropy(logits, label)
    negative_logit, positive_logit = logits[:, 0], logits[:, 1]
    positive = label == 1
    not_competing = torch.full_like(positive_logit, _NOT_COMPETING)
    # A positive's competitors: its session's negatives, on the class-1 logit; a negative's:
    # its session's positives, on the class-0 logit.
    against_positives = torch.where(positive, not_competing, positive_logit)
    against_negatives = torch.where(positive, negative_logit, not_competing)
    segments = session.shape[0] if num_sessions is None else num_sessions
    negatives_lse = _segment_logsumexp(against_positives, session, segments)
    positives_lse = _segment_logsumexp(against_negatives, session, segments)
    session_loss = torch.where(
        positive,
        F.softplus(negatives_lse[session] - positive_logit),
        F.softplus(positives_lse[session] - negative_logit),
    ).mean()
    return alpha * cross_entropy + (1.0 - alpha) * session_loss


def _bitmask_bce_losses(
    tasks: Sequence[TaskSpec], logits: dict[str, torch.Tensor], batch, scale
) -> dict[str, torch.Tensor]:
    """The weighted losses of the tasks that are one binary cross-entropy on a bit of an
    integer label column (all eight KuaiRand tasks), computed together: one label
    expansion and one loss over a [candidates, tasks] block instead of a handful of small
    kernels per task (each a launch, forward and backward). Same values as the per-task
    formula: the mean over the candidates of each task's column. Tasks with any other loss,
    or with more than one loss, take the per-task path."""
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
        bits = _constant([t.bitmask for t in group], label.dtype, label.device)
        target = ((label.unsqueeze(1) & bits) != 0).float()
        smoothing = [t.losses[0][1] for t in group]
        if any(smoothing):
            amount = _constant(smoothing, torch.float32, label.device)
            target = target * (1.0 - amount) + 0.5 * amount
        stacked = torch.stack([logits[t.name] for t in group], dim=1)
        per_task = F.binary_cross_entropy_with_logits(
            stacked, target, reduction="none"
        ).mean(dim=0)
        weights = _constant([t.weight for t in group], per_task.dtype, per_task.device)
        weighted = per_task * weights * scale
        for index, task in enumerate(group):
            losses[task.name] = weighted[index]  # a view: no kernel per task
    return losses


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def _constant(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant tensor, made once per (values, dtype, device). torch.tensor(list,
    device="cuda") copies from pageable host memory, which makes the host wait for the GPU:
    once per step per call site, had these been built in the step."""
    key = (tuple(values), dtype, torch.device(device))
    tensor = _CONSTANTS.get(key)
    if tensor is None:
        tensor = _CONSTANTS[key] = torch.tensor(list(values), dtype=dtype, device=device)
    return tensor
