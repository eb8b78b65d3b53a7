"""Optimizers from train_config: the sparse one fused into TorchRec's embedding kernels, the dense
one a plain torch optimizer over every other parameter, and both learning-rate schedules.

Sparse (train_config.sparse_optimizer) -> a TorchRec placeholder optimizer class plus the
keyword arguments FBGEMM's fused kernels take; `apply_optimizer_in_backward` attaches them to
the embedding parameters before sharding, and the sharded tables update themselves inside
backward (no separate step, no gradient tensor for the tables).

Dense (train_config.dense_optimizer) -> torch.optim.SGD / Adagrad / Adam / AdamW, wrapped in a
TorchRec KeyedOptimizerWrapper so that its state dict is keyed by parameter name (what
torch.distributed.checkpoint needs).

Schedules (constant_learning_rate, exponential_decay_learning_rate, manual_step_learning_rate)
follow TorchEasyRec's formulas; `learning_rate_at` is a pure function of the step (or epoch), so
a resumed run continues the schedule exactly where its checkpoint left it.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

# Combinations that cannot run, found on these machines (docs/training.md lists them):
# FBGEMM's CPU kernels have no fused Adam ("Optimizer adam is not supported in CPU mode").
_CPU_UNSUPPORTED_SPARSE = {"adam_optimizer": "FBGEMM's CPU embedding kernels have no fused Adam"}


class OptimizerConfigError(ValueError):
    """An optimizer setting that cannot run; the message starts with the config field path."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")


@dataclasses.dataclass(frozen=True)
class SparseOptimizerSpec:
    """What apply_optimizer_in_backward needs: a TorchRec optimizer class and FBGEMM kwargs."""

    kind: str  # the oneof field name, e.g. "rowwise_adagrad_optimizer"
    optimizer_class: type
    kwargs: dict[str, Any]

    @property
    def lr(self) -> float:
        return float(self.kwargs["lr"])


def sparse_optimizer_spec(sparse_cfg, device: torch.device) -> SparseOptimizerSpec:
    """The fused optimizer for the embedding tables; raises for combinations that cannot run."""
    import torchrec.optim as trec_optim
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import WeightDecayMode

    path = "train_config.sparse_optimizer"
    kind = sparse_cfg.WhichOneof("optimizer")
    if kind is None:
        raise OptimizerConfigError(
            path, "set one of sgd_optimizer, adagrad_optimizer, adam_optimizer, "
            "rowwise_adagrad_optimizer"
        )
    if device.type == "cpu" and kind in _CPU_UNSUPPORTED_SPARSE:
        raise OptimizerConfigError(
            f"{path}.{kind}",
            f"cannot run on CPU: {_CPU_UNSUPPORTED_SPARSE[kind]}. Train on GPU (--use-gpu), or "
            "use rowwise_adagrad_optimizer, adagrad_optimizer or sgd_optimizer on CPU",
        )
    settings = getattr(sparse_cfg, kind)
    if kind == "sgd_optimizer":
        return SparseOptimizerSpec(kind, trec_optim.SGD, {"lr": settings.lr})
    if kind == "adagrad_optimizer":
        return SparseOptimizerSpec(kind, trec_optim.Adagrad, {"lr": settings.lr})
    if kind == "adam_optimizer":
        return SparseOptimizerSpec(
            kind,
            trec_optim.Adam,
            {
                "lr": settings.lr,
                "beta1": settings.beta1,
                "beta2": settings.beta2,
                "weight_decay": settings.weight_decay,
            },
        )
    if kind == "rowwise_adagrad_optimizer":
        mode_field = settings.DESCRIPTOR.fields_by_name["weight_decay_mode"]
        mode_name = mode_field.enum_type.values_by_number[settings.weight_decay_mode].name
        return SparseOptimizerSpec(
            kind,
            trec_optim.RowWiseAdagrad,
            {
                "lr": settings.lr,
                "weight_decay": settings.weight_decay,
                "weight_decay_mode": WeightDecayMode[mode_name],
            },
        )
    raise OptimizerConfigError(
        f"{path}.{kind}",
        "not implemented here; use sgd_optimizer, adagrad_optimizer, adam_optimizer or "
        "rowwise_adagrad_optimizer",
    )


def dense_optimizer_factory(dense_cfg) -> tuple[Callable[[Any], torch.optim.Optimizer], float]:
    """(function params -> torch optimizer, base learning rate) for train_config.dense_optimizer."""
    path = "train_config.dense_optimizer"
    kind = dense_cfg.WhichOneof("optimizer")
    if kind is None:
        raise OptimizerConfigError(
            path, "set one of sgd_optimizer, adagrad_optimizer, adam_optimizer, adamw_optimizer"
        )
    settings = getattr(dense_cfg, kind)
    lr = float(settings.lr)
    if kind == "sgd_optimizer":
        return (
            lambda params: torch.optim.SGD(
                params, lr=lr, momentum=settings.momentum, weight_decay=settings.weight_decay
            ),
            lr,
        )
    if kind == "adagrad_optimizer":
        return (
            lambda params: torch.optim.Adagrad(params, lr=lr, weight_decay=settings.weight_decay),
            lr,
        )
    if kind in ("adam_optimizer", "adamw_optimizer"):
        optimizer_class = torch.optim.Adam if kind == "adam_optimizer" else torch.optim.AdamW
        betas = (float(settings.beta1), float(settings.beta2))
        return (
            lambda params: optimizer_class(
                params, lr=lr, betas=betas, weight_decay=settings.weight_decay,
                **_fused_on_gpu(params),
            ),
            lr,
        )
    raise OptimizerConfigError(f"{path}.{kind}", "not implemented here")


def _fused_on_gpu(params) -> dict:
    """fused=True when every parameter is on a CUDA device: one kernel for the whole update
    instead of torch's multi-tensor (foreach) path. The same arithmetic; CPU keeps foreach."""
    params = list(params)
    if params and all(p.is_cuda for p in params):
        return {"fused": True}
    return {}


def build_dense_optimizer(dense_cfg, named_parameters):
    """A KeyedOptimizerWrapper over `named_parameters` (the model's non-embedding parameters)."""
    from torchrec.optim.keyed import KeyedOptimizerWrapper

    factory, _ = dense_optimizer_factory(dense_cfg)
    params = dict(named_parameters)
    if not params:
        raise OptimizerConfigError(
            "train_config.dense_optimizer", "the model has no dense parameters to optimise"
        )
    return KeyedOptimizerWrapper(params, factory)


# ---- learning-rate schedules -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A learning-rate schedule read from an optimizer config's `learning_rate` oneof."""

    kind: str  # "constant_learning_rate" | "exponential_decay_learning_rate" | "manual_step..."
    by_epoch: bool
    settings: Any  # the schedule's config message (None for constant)

    def learning_rate_at(self, base_lr: float, step: int, epoch: int) -> float:
        """The rate for the step after `step` completed steps (or in epoch `epoch`)."""
        t = epoch if self.by_epoch else step
        if self.kind == "exponential_decay_learning_rate":
            return _exponential_decay(self.settings, base_lr, t)
        if self.kind == "manual_step_learning_rate":
            return _manual_step(self.settings, base_lr, t)
        return base_lr


def schedule_from_config(optimizer_cfg, path: str) -> Schedule:
    kind = optimizer_cfg.WhichOneof("learning_rate") or "constant_learning_rate"
    if kind == "constant_learning_rate":
        return Schedule(kind, False, None)
    settings = getattr(optimizer_cfg, kind)
    if kind == "exponential_decay_learning_rate":
        if settings.decay_size <= 0:
            raise OptimizerConfigError(f"{path}.{kind}.decay_size", "must be > 0")
    elif kind == "manual_step_learning_rate":
        sizes, rates = list(settings.schedule_sizes), list(settings.learning_rates)
        if len(sizes) != len(rates) or not sizes:
            raise OptimizerConfigError(
                f"{path}.{kind}",
                f"schedule_sizes ({len(sizes)}) and learning_rates ({len(rates)}) must be "
                "non-empty and of equal length",
            )
        if sizes != sorted(sizes):
            raise OptimizerConfigError(f"{path}.{kind}.schedule_sizes", "must be increasing")
        if settings.warmup and sizes[0] == 0:
            raise OptimizerConfigError(
                f"{path}.{kind}.schedule_sizes", "warmup needs schedule_sizes[0] > 0"
            )
    return Schedule(kind, bool(settings.by_epoch), settings)


def _exponential_decay(settings, base_lr: float, t: int) -> float:
    if t < settings.warmup_size:
        start = settings.warmup_learning_rate
        return start + (base_lr - start) * t / settings.warmup_size
    power = (t - settings.warmup_size) / settings.decay_size
    if settings.staircase:
        power = math.floor(power)
    return max(base_lr * settings.decay_factor**power, settings.min_learning_rate)


def _manual_step(settings, base_lr: float, t: int) -> float:
    sizes, rates = list(settings.schedule_sizes), list(settings.learning_rates)
    index = bisect.bisect_left(sizes, t)
    if index > 0:
        return rates[index - 1]
    if settings.warmup:
        return base_lr + (rates[0] - base_lr) * t / sizes[0]
    return base_lr


def set_learning_rate(optimizer, lr: float) -> None:
    """Set every param group's rate. For TorchRec's fused optimizer, `step()` afterwards pushes
    it into the embedding kernels (its step does nothing else)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
