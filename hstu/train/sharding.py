"""Sharding the embedding tables: TorchRec planner + DistributedModelParallel.

The model only declares its tables (DlrmHSTU.embedding_collection, built on the meta device:
one TorchRec EmbeddingCollection per embedding width, hstu/modules/embeddings.py); this module
decides where each table lives. The planner finds every collection inside the model and plans
each table by its name (names are unique across widths), so constraints, --sharding and the
plan summary are per table whatever collection holds it. The planner sees the world size and
the compute device and picks a sharding type and kernel per table; `--sharding TABLE=TYPE` pins
a table to one or more types (e.g. force a table row-wise to exercise that path on two CPU
workers).

What runs on CPU (measured, ../shared/docs/environment.md): table_wise, row_wise and column_wise
with the fused kernel; data_parallel sharding of an EmbeddingCollection fails there, so it is
rejected on CPU with a clear error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence

import torch
from torch import nn

SHARDING_TYPES = (
    "table_wise",
    "row_wise",
    "column_wise",
    "table_row_wise",
    "table_column_wise",
    "data_parallel",
)
_CPU_UNSUPPORTED_SHARDING = {
    "data_parallel": "data_parallel sharding of an EmbeddingCollection fails on CPU",
}


class ShardingError(ValueError):
    pass


def parse_sharding_overrides(specs: Sequence[str]) -> dict[str, list[str]]:
    """`TABLE=TYPE[,TYPE...]` strings (launch.py --sharding) -> {table: [types]}."""
    overrides: dict[str, list[str]] = {}
    for spec in specs:
        table, sep, types = spec.partition("=")
        table, types = table.strip(), [t.strip() for t in types.split(",") if t.strip()]
        if not sep or not table or not types:
            raise ShardingError(
                f"--sharding {spec!r}: expected TABLE=TYPE[,TYPE...], e.g. video_id_emb=row_wise"
            )
        unknown = [t for t in types if t not in SHARDING_TYPES]
        if unknown:
            raise ShardingError(
                f"--sharding {spec!r}: unknown sharding type {unknown[0]!r}; expected one of "
                f"{', '.join(SHARDING_TYPES)}"
            )
        if table in overrides:
            raise ShardingError(f"--sharding: table {table!r} is given twice")
        overrides[table] = types
    return overrides


def table_names(model: nn.Module) -> list[str]:
    """Every table of the model, all widths."""
    return [table.name for table in model.embedding_collection.embedding_configs()]


def sharding_constraints(
    tables: Sequence[str], overrides: Mapping[str, Sequence[str]], device: torch.device
) -> dict:
    """ParameterConstraints per table: the pinned sharding types, and on CPU the fused kernel
    (the only one whose optimizer runs inside backward there)."""
    from torchrec.distributed.embedding_types import EmbeddingComputeKernel
    from torchrec.distributed.planner.types import ParameterConstraints

    unknown = sorted(set(overrides) - set(tables))
    if unknown:
        raise ShardingError(
            f"--sharding: no embedding table named {unknown[0]!r}; the model's tables are "
            f"{', '.join(tables)}"
        )
    constraints = {}
    for table in tables:
        types = list(overrides.get(table, ()))
        if device.type == "cpu":
            for sharding_type in types:
                if sharding_type in _CPU_UNSUPPORTED_SHARDING:
                    raise ShardingError(
                        f"--sharding {table}={sharding_type}: "
                        f"{_CPU_UNSUPPORTED_SHARDING[sharding_type]}"
                    )
            if not types:
                types = [t for t in SHARDING_TYPES if t not in _CPU_UNSUPPORTED_SHARDING]
        kernels = [EmbeddingComputeKernel.FUSED.value] if device.type == "cpu" else None
        constraints[table] = ParameterConstraints(
            sharding_types=types or None, compute_kernels=kernels
        )
    return constraints


def make_topology(world_size: int, local_world_size: int, device: torch.device):
    from torchrec.distributed.planner.types import (
        HardwareConfig,
        KernelConfig,
        TopologyFactory,
        TrainerConfig,
    )

    hardware = None
    if device.type == "cuda":
        hardware = HardwareConfig(
            hbm_cap_bytes=torch.cuda.get_device_properties(device).total_memory
        )
    return TopologyFactory.create_topology(
        trainer_config=TrainerConfig(world_size=world_size, local_world_size=local_world_size),
        hardware_config=hardware,
        kernel_config=KernelConfig(compute_device=device.type),
    )


@dataclasses.dataclass
class ShardedModel:
    model: nn.Module  # the DistributedModelParallel wrapper
    plan: object  # torchrec ShardingPlan
    tables: dict[str, dict]  # table -> {"sharding_type", "compute_kernel", "ranks"}

    def plan_text(self) -> str:
        lines = [f"{'table':<28} {'sharding':<18} {'kernel':<18} ranks"]
        for name, info in self.tables.items():
            ranks = ",".join(str(r) for r in info["ranks"])
            lines.append(
                f"{name:<28} {info['sharding_type']:<18} {info['compute_kernel']:<18} {ranks}"
            )
        return "\n".join(lines)

    def plan_json(self) -> str:
        return json.dumps(self.tables, indent=2, sort_keys=True)


def shard_model(
    model: nn.Module,
    device: torch.device,
    *,
    world_size: int,
    local_world_size: int,
    batch_size: int,
    overrides: Mapping[str, Sequence[str]] = {},
) -> ShardedModel:
    """Plan (collectively: every rank must call this) and wrap the model in
    DistributedModelParallel. The embedding parameters must already carry their fused
    optimizer (apply_optimizer_in_backward), and the tables must be on the meta device."""
    import torch.distributed as dist
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner
    from torchrec.distributed.planner.storage_reservations import (
        FixedPercentageStorageReservation,
    )

    register_model_output()
    constraints = sharding_constraints(table_names(model), overrides, device)
    planner = EmbeddingShardingPlanner(
        topology=make_topology(world_size, local_world_size, device),
        batch_size=batch_size,
        constraints=constraints,
        # Keep 15% of each device's memory free for dense weights, activations and inputs.
        # (TorchRec's default heuristic is deprecated and over-estimates on meta tensors.)
        storage_reservation=FixedPercentageStorageReservation(0.15),
        debug=False,
    )
    sharders = [EmbeddingCollectionSharder()]
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    sharded = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders)
    return ShardedModel(sharded, plan, describe_plan(plan))


def register_model_output() -> None:
    """Let DistributedDataParallel see the tensors inside DlrmHSTU's ModelOutput.

    DMP wraps the dense part in DDP with static_graph=True, whose gradient all-reduce hangs on
    the tensors it finds in the forward output. ModelOutput is a dataclass, which DDP cannot
    look into unless it is a registered pytree node; without this, the dense gradients were
    never averaged and the ranks' dense weights drifted apart (found by comparing a 2-worker
    run's eval with a reload of its checkpoint; tests/train/test_trainer.py checks it).
    """
    import torch.utils._pytree as pytree

    from hstu.model import ModelOutput

    if ModelOutput not in pytree.SUPPORTED_NODES:
        pytree.register_dataclass(ModelOutput)


def describe_plan(plan) -> dict[str, dict]:
    tables = {}
    for module_plan in plan.plan.values():
        for name, parameter_sharding in module_plan.items():
            ranks = parameter_sharding.ranks or []
            tables[name] = {
                "sharding_type": parameter_sharding.sharding_type,
                "compute_kernel": parameter_sharding.compute_kernel,
                "ranks": sorted(set(ranks)),
            }
    return dict(sorted(tables.items()))


# Rows per block of the plan-independent table initialisation: each block of a table gets its
# own generator, so a shard only draws the blocks it overlaps.
INIT_BLOCK_ROWS = 65536


def initialize_tables(model: nn.Module, seed: int) -> None:
    """Refill every embedding table, on whichever ranks hold it, with the same numbers whatever
    the sharding plan and world size: uniform in the table's init range (the EmbeddingConfig's
    weight_init_min/max; DlrmHSTU sets neither, so TorchRec's default +-sqrt(1 / rows)), drawn
    per block of INIT_BLOCK_ROWS rows from a generator seeded by (seed, table name, block) on
    the table's device.

    TorchRec initialises each shard from its rank's random state, so one seed gave another model
    on 1 GPU than on 8, or with another plan; with this, runs on different worker counts start
    from the same weights (the dense weights are rank 0's in any case: DDP broadcasts them), and
    their losses can be compared step by step (tests/train/test_equivalence.py). Collective-free:
    each rank fills only its own shards. The same seed gives the same numbers on the same device
    type (CPU and CUDA generators draw different streams)."""
    configs = {table.name: table for table in model.module.embedding_collection.embedding_configs()}
    written = {}
    with torch.no_grad():
        for key, table, shards in _table_shards(model, configs):
            for shard_index, (offsets, values) in enumerate(shards):
                _fill_shard(values, offsets, table, seed)
                written[key, shard_index] = values[:1].clone()
        # The shards are expected to be views of the kernels' own weights; if a kernel handed
        # out copies, the refill would silently change nothing.
        for key, _, shards in _table_shards(model, configs):
            for shard_index, (_, values) in enumerate(shards):
                if not torch.equal(values[:1], written[key, shard_index]):
                    raise RuntimeError(
                        f"initialize_tables: {key} did not take the new values (its "
                        "state_dict shards are not views of the embedding kernel's weights)"
                    )


def _table_shards(model: nn.Module, configs: dict):
    """(state_dict key, table config, [(global offsets, local values)]) per embedding table."""
    for key, tensor in model.state_dict().items():
        parts = key.split(".")
        if len(parts) < 3 or parts[-1] != "weight" or parts[-3] != "embeddings":
            continue
        table = configs.get(parts[-2])
        if table is None:
            continue
        shards = (
            [(s.metadata.shard_offsets, s.tensor) for s in tensor.local_shards()]
            if hasattr(tensor, "local_shards")
            else [([0, 0], tensor)]
        )
        yield key, table, shards


def block_seed(seed: int, table_name: str, block: int) -> int:
    """A 63-bit generator seed for one block of one table: any int seed (negative, or larger
    than a generator takes), independent of the table's place in the config."""
    digest = hashlib.blake2b(f"{seed}/{table_name}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _fill_shard(values: torch.Tensor, offsets, table, seed: int) -> None:
    """values: the [rows, cols] part of `table` that starts at global (row, col) `offsets`
    (rows past the table's end, if a shard were padded, are left alone)."""
    row0, col0 = int(offsets[0]), int(offsets[1])
    rows, cols = values.shape
    low, high = table.get_weight_init_min(), table.get_weight_init_max()
    end = min(row0 + rows, table.num_embeddings)
    if end <= row0:
        return
    for block in range(row0 // INIT_BLOCK_ROWS, (end - 1) // INIT_BLOCK_ROWS + 1):
        start = block * INIT_BLOCK_ROWS
        height = min(INIT_BLOCK_ROWS, table.num_embeddings - start)
        generator = torch.Generator(device=values.device)
        generator.manual_seed(block_seed(seed, table.name, block))
        drawn = torch.empty((height, table.embedding_dim), device=values.device)
        drawn.uniform_(low, high, generator=generator)
        lo, hi = max(start, row0), min(start + height, end)
        values[lo - row0: hi - row0].copy_(drawn[lo - start: hi - start, col0: col0 + cols])
