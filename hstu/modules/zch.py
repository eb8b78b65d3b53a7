"""Zero-collision hashing (TorchEasyRec's `zch` on id features): ids of any int64 value get rows
of a table of `zch_size` rows, chosen by TorchRec's managed-collision module.

One ZeroCollisionRemap per zch table holds a TorchRec MCHManagedCollisionModule: the sorted
admitted raw ids, the row each one owns, and the eviction policy's per-row metadata (LFU
counts, LRU last access step, or both for distance-LFU). Every training step it records the
batch's ids; every `eviction_interval` steps TorchRec's policy admits the most valuable new
ids, into free rows first and then into the rows of the least valuable admitted ids (an
eviction). The last row (zch_size - 1) is shared by every id not admitted (yet): a lookup
that lands there is a collision.

How this differs from TorchRec's ManagedCollisionEmbeddingCollection (which TorchEasyRec
uses): the remapping runs here, in front of the (sharded) EmbeddingCollection, replicated on
every worker, instead of inside TorchRec's sharded managed-collision collection. TorchRec's
sharded version needs fbgemm's reset_weight_momentum after an eviction, which has no CPU
kernel, so it does not train on CPU. To keep the replicas equal, each training step admits from
the ids of every worker's batch (an all_gather), and evaluation never changes the state.
Rows are not reset when their id is evicted: the new id starts from the row (and the sparse
optimizer's state) the evicted id left, where TorchRec re-initialises it.

Counters (cumulative, per table; `stats()`): lookups, collisions (lookups that landed in the
shared row), admissions (ids that got a row) and evictions (admitted ids that lost theirs),
and the rows in use.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torchrec.modules.mc_modules import (
    DistanceLFU_EvictionPolicy,
    LFU_EvictionPolicy,
    LRU_EvictionPolicy,
    MCHManagedCollisionModule,
)
from torchrec.sparse.jagged_tensor import JaggedTensor

from hstu.config.features import ZchSpec

_EMPTY = torch.iinfo(torch.int64).max  # TorchRec's marker of a free row in the sorted ids


def eviction_policy(spec: ZchSpec):
    if spec.policy == "lfu":
        return LFU_EvictionPolicy()
    if spec.policy == "lru":
        return LRU_EvictionPolicy(decay_exponent=spec.decay_exponent)
    if spec.policy == "distance_lfu":
        return DistanceLFU_EvictionPolicy(decay_exponent=spec.decay_exponent)
    raise ValueError(f"unknown zch eviction policy {spec.policy!r}")


def _all_ranks(values: torch.Tensor) -> torch.Tensor:
    """Every worker's `values`, concatenated in rank order (values itself with one worker)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    world = dist.get_world_size()
    size = torch.tensor([values.numel()], dtype=torch.int64, device=values.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s) for s in sizes]  # a host read: zch needs the ids on every worker anyway
    padded = torch.zeros(max(counts), dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([part[:count] for part, count in zip(gathered, counts)])


class ZeroCollisionRemap(nn.Module):
    """Raw ids -> rows of one zch table (see the module docstring)."""

    def __init__(self, table: str, spec: ZchSpec, device: torch.device | None = None) -> None:
        super().__init__()
        self.table = table
        self.spec = spec
        # The admission state lives with the dense part of the model (never on the meta
        # device: the trainer materialises only the sharded tables).
        if device is None or device.type == "meta":
            device = torch.device("cpu")
        self.mch = MCHManagedCollisionModule(
            zch_size=spec.zch_size,
            device=device,
            eviction_policy=eviction_policy(spec),
            eviction_interval=spec.eviction_interval,
        )
        for name in ("lookups", "collisions", "admissions", "evictions"):
            self.register_buffer(name, torch.zeros((), dtype=torch.int64, device=device))

    def remap(self, values: torch.Tensor) -> torch.Tensor:
        """Rows of `values` under the current state: an admitted id's row, else the shared
        last row. Element-wise (searchsorted + where), so it exports."""
        sorted_ids = self.mch._mch_sorted_raw_ids
        # TorchRec searches all but the last entry (always the free-row marker, the shared
        # row's), so every position indexes the buffers.
        position = torch.searchsorted(sorted_ids[:-1], values)
        admitted = sorted_ids[position] == values
        shared_row = torch.full_like(values, self.spec.zch_size - 1)
        return torch.where(admitted, self.mch._mch_remapped_ids_mapping[position], shared_row)

    def _eviction_due(self) -> bool:
        """Whether the next profile() call runs an admission/eviction round (TorchRec's
        counters, read on the host: they are Python ints there)."""
        current, last = self.mch._current_iter, self.mch._last_eviction_iter
        if current == -1:  # the first call starts counting from the saved step
            return self.spec.eviction_interval == 1
        return current + 1 - last == self.spec.eviction_interval

    @torch.no_grad()
    def _make_history_room(self, incoming: int, device: torch.device) -> None:
        """Room in TorchRec's history buffer for `incoming` more ids, keeping what it holds.

        TorchRec sizes that buffer once, from the first batch (ids x eviction_interval x
        1.25), and silently drops the ids of a later, larger batch that do not fit, so those
        ids are never counted nor admitted (batches vary in size here: histories are jagged,
        and batches by cost pack rows). This grows it instead: same counts as an unbounded
        buffer, no id left out."""
        mch = self.mch
        size, used = mch._input_history_buffer_size, mch._current_history_buffer_offset
        if size != -1 and used + incoming <= size:
            return
        wanted = int(incoming * self.spec.eviction_interval * 1.25) + 1
        new_size = max(wanted, used + incoming, 2 * size if size != -1 else 0)
        kept = {}
        if size != -1:
            kept["accumulator"] = mch._history_accumulator[:used].clone()
            for name, buffer in mch._history_metadata.items():
                kept[name] = buffer[:used].clone()
        mch._input_history_buffer_size = new_size
        mch._history_accumulator = torch.empty(new_size, dtype=torch.int64, device=device)
        for info in mch._eviction_policy.metadata_info:
            if info.is_history_metadata:
                buffer = torch.zeros(new_size, dtype=torch.int64, device=device)
                mch.register_buffer(f"_history_{info.metadata_name}", buffer, persistent=False)
                mch._history_metadata[info.metadata_name] = buffer
        if kept:
            mch._history_accumulator[:used] = kept.pop("accumulator")
            for name, values in kept.items():
                mch._history_metadata[name][:used] = values

    @torch.no_grad()
    def _profile(self, values: torch.Tensor) -> None:
        """Record one training step's ids (every worker's) and run TorchRec's admission and
        eviction when it is due; count what changed."""
        # TorchRec creates its history buffers on the device it was built for; the model may
        # have moved since (to the GPU with the dense part).
        self.mch._device = values.device
        due = self._eviction_due()
        before = self.mch._mch_sorted_raw_ids.clone() if due else None
        everyone = _all_ranks(values)
        self._make_history_room(everyone.numel(), values.device)
        lengths = everyone.new_tensor([everyone.numel()])
        self.mch.profile({self.table: JaggedTensor(values=everyone, lengths=lengths)})
        if before is not None:
            after = self.mch._mch_sorted_raw_ids
            old, new = before[before != _EMPTY], after[after != _EMPTY]
            self.admissions += (~torch.isin(new, old)).sum()
            self.evictions += (~torch.isin(old, new)).sum()
            self.mch.evict()  # clears TorchRec's list of rows to reset (rows are kept here)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        """Rows for `values` (all features of this table, concatenated); in training the ids
        are recorded first, so an id admitted this step is already looked up in its row."""
        if self.training:
            self._profile(values)
        rows = self.remap(values)
        if self.training:
            self.lookups += values.numel()
            self.collisions += (rows == self.spec.zch_size - 1).sum()
        return rows

    def stats(self) -> dict[str, int]:
        """Cumulative counters and the rows in use (host reads: for logging, not per step)."""
        occupied = int((self.mch._mch_sorted_raw_ids != _EMPTY).sum())
        return {
            "lookups": int(self.lookups),
            "collisions": int(self.collisions),
            "admissions": int(self.admissions),
            "evictions": int(self.evictions),
            "rows_used": occupied,
        }


def zch_metrics(model: nn.Module) -> dict[str, float]:
    """MLflow metrics of a DlrmHSTU's zch tables: zch/<table>/<counter> (ZeroCollisionRemap
    stats, as this worker counted them; the admission state is the same on every worker).
    {} for a model without zch."""
    collection = getattr(model, "embedding_collection", None)
    stats = collection.zch_stats() if hasattr(collection, "zch_stats") else {}
    return {
        f"zch/{table}/{name}": float(value)
        for table, counters in stats.items()
        for name, value in counters.items()
    }
