"""Checkpoints with torch.distributed.checkpoint (DCP), reported through Ray Train.

Layout of one checkpoint directory (Ray merges what every rank reports into it):

    .metadata            DCP's index (written by rank 0)
    __<rank>_0.distcp    each rank's own shards: its embedding rows / tables, its part of the
                         fused sparse-optimizer state, and (rank 0) the dense weights and the
                         dense optimizer state
    train_state.json     where training stands (epoch, step, samples, world size, sharding)

Any world size can resume any checkpoint: DCP stores every sharded tensor (the tables' rows,
the fused optimizer's per-row state) with its global offsets and reads into whatever shards the
new sharding plan gives each rank, and the dense weights and dense optimizer state are whole
on every rank. train_state.json records the world size that wrote it, for the log. Loading the
weights alone also works in one process without torch.distributed (`load_model_weights`),
which is how the exporter reads a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

TRAIN_STATE_FILE = "train_state.json"


class CheckpointError(RuntimeError):
    pass


@dataclasses.dataclass
class TrainState:
    """Progress, saved beside the weights. `epoch` is the epoch in progress (or the next one
    when `epoch_done`); a restart replays that epoch from its first batch."""

    epoch: int = 0
    global_step: int = 0
    samples: int = 0
    tokens: int = 0
    epoch_done: bool = False
    world_size: int = 1
    # Number of restores so far (a worker failure or --resume); tells attempts apart in logs.
    restarts: int = 0
    # Rows the data pipeline left out in the completed epochs, summed over workers: bad rows
    # skipped (on_bad_rows SKIP) and rows drop_last dropped. Saved so that a restart or a
    # resume goes on counting instead of starting from 0.
    skipped_rows: int = 0
    dropped_rows: int = 0

    def resume_epoch(self) -> int:
        return self.epoch + 1 if self.epoch_done else self.epoch


def _training_state_dict(model: nn.Module, dense_optimizer) -> dict:
    return {
        "model": model.state_dict(),
        "dense_optimizer": dense_optimizer.state_dict(),
        "sparse_optimizer": model.fused_optimizer.state_dict(),
    }


def save(
    directory: str | os.PathLike,
    model: nn.Module,
    dense_optimizer,
    state: TrainState,
    *,
    rank: int,
    extra: dict | None = None,
) -> None:
    """Every rank writes its shards into its own `directory` (Ray merges them on report)."""
    import torch.distributed.checkpoint as dcp

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dcp.save(_training_state_dict(model, dense_optimizer), checkpoint_id=str(directory))
    if rank == 0:
        payload = dataclasses.asdict(state)
        payload.update(extra or {})
        (directory / TRAIN_STATE_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True))


def read_state(directory: str | os.PathLike) -> TrainState:
    path = Path(directory) / TRAIN_STATE_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{directory}: not a training checkpoint of this project (no {TRAIN_STATE_FILE})"
        )
    payload = json.loads(path.read_text())
    fields = {f.name for f in dataclasses.fields(TrainState)}
    return TrainState(**{k: v for k, v in payload.items() if k in fields})


def restore(
    directory: str | os.PathLike, model: nn.Module, dense_optimizer, *, world_size: int
) -> TrainState:
    """Load weights and both optimizers' state into the sharded model (every rank calls it),
    whatever world size wrote the checkpoint (the module docstring says how). Returns the saved
    TrainState; its world_size is the writer's."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    state = read_state(directory)
    # Optimizers create their state lazily; make it exist so DCP has tensors to load into.
    dense_optimizer.init_state()
    target = _training_state_dict(model, dense_optimizer)
    try:
        dcp.load(target, checkpoint_id=str(directory))
    except CheckpointException as error:
        # A tensor whose global shape differs between the two layouts (e.g. an optimizer state
        # kept per column shard) cannot be resharded: say which, and what still works.
        cause = next(iter(error.failures.values()))[0] if error.failures else error
        raise CheckpointError(
            f"{directory}: written by {state.world_size} worker(s), cannot be restored by "
            f"{world_size} with this sharding plan: {type(cause).__name__}: {cause}. Resume "
            f"with --workers {state.world_size}, or pin the tables' sharding types (--sharding) "
            "to those in its train_state.json"
        ) from None
    model.load_state_dict(target["model"])
    dense_optimizer.load_state_dict(target["dense_optimizer"])
    model.fused_optimizer.load_state_dict(target["sparse_optimizer"])
    return state


def load_model_weights(model: nn.Module, directory: str | os.PathLike) -> None:
    """Load only the model weights, into a sharded model (any world size) or a plain one."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    if "://" in str(directory):
        raise CheckpointError(f"{directory}: remote checkpoints cannot be read directly; copy "
                              "the directory to local disk first")
    if not (Path(directory) / ".metadata").is_file():
        raise CheckpointError(f"{directory}: no DCP checkpoint here (no .metadata file)")
    target = {"model": model.state_dict()}
    single_process = not (dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings():
        # One process reading a sharded checkpoint is intended here; DCP warns about it anyway.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(target, checkpoint_id=str(directory), no_dist=single_process)
    model.load_state_dict(target["model"])


def load_for_inference(cfg, directory: str | os.PathLike, device: torch.device | str = "cpu"):
    """A DlrmHSTU with real (unsharded) tables and the checkpoint's weights, in eval mode.

    For single-process use (export, predict, notebooks): needs memory for every table."""
    from hstu.config.features import feature_specs, label_specs
    from hstu.model import DlrmHSTU

    model = DlrmHSTU(
        cfg, feature_specs(cfg), label_specs(cfg), embedding_device=torch.device(device)
    ).to(device)
    load_model_weights(model, directory)
    return model.eval()
