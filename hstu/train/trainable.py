"""The model as training holds it: DlrmHSTU with its tables sharded by TorchRec, the sparse
optimizer fused into the lookups' backward, and the dense optimizer over every other parameter.

The Ray Train loop (loop.py), benchmarks/train_bench.py and the tests build it here, so that
what is benchmarked and tested is what trains. Seeding is the caller's (each rank initialises
its own table shards).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.optimizers import in_backward_optimizer_filter

from hstu.model import DlrmHSTU
from hstu.train.optimizers import (
    SparseOptimizerSpec,
    build_dense_optimizer,
    sparse_optimizer_spec,
)
from hstu.train.sharding import ShardedModel, initialize_tables, shard_model


@dataclasses.dataclass
class Trainable:
    sharded: ShardedModel
    dense_optimizer: torch.optim.Optimizer
    sparse_spec: SparseOptimizerSpec

    @property
    def model(self) -> torch.nn.Module:
        """The DistributedModelParallel wrapper (what a step calls)."""
        return self.sharded.model

    @property
    def module(self) -> DlrmHSTU:
        """The DlrmHSTU inside it (losses, tasks, groups)."""
        return self.sharded.model.module


def build_trainable(
    cfg,
    features,
    labels,
    device: torch.device,
    *,
    world_size: int,
    local_world_size: int,
    batch_size: int,
    sharding: Mapping[str, Sequence[str]] | None = None,
    table_seed: int | None = None,
) -> Trainable:
    """DlrmHSTU from `cfg` with its tables on the meta device, the config's sparse optimizer
    fused into them, sharded over `world_size` ranks by the planner (with `sharding`'s
    per-table restrictions), and the config's dense optimizer. table_seed: refill the tables
    from this seed with numbers that do not depend on the plan or the world size
    (sharding.initialize_tables); None keeps TorchRec's initialisation from each rank's random
    state."""
    model = DlrmHSTU(cfg, features, labels, embedding_device=torch.device("meta"))
    spec = sparse_optimizer_spec(cfg.train_config.sparse_optimizer, device)
    apply_optimizer_in_backward(
        spec.optimizer_class, model.embedding_collection.parameters(), dict(spec.kwargs)
    )
    sharded = shard_model(
        model,
        device,
        world_size=world_size,
        local_world_size=local_world_size,
        batch_size=batch_size,
        overrides=sharding or {},
    )
    if table_seed is not None:
        initialize_tables(sharded.model, table_seed)
    dense = build_dense_optimizer(
        cfg.train_config.dense_optimizer,
        in_backward_optimizer_filter(sharded.model.named_parameters()),
    )
    return Trainable(sharded=sharded, dense_optimizer=dense, sparse_spec=spec)
