"""Keeping the ranks in step.

TorchRec's sharded embeddings run collectives (all_to_all) in every forward: if one rank has a
batch and another has none, the first waits forever. Equal Ray Data splits make batch counts
equal in the common case, but not always (token-budget batching, skipped bad rows, an
abandoned pass). `lockstep` therefore asks every rank, before each step, whether it has a batch,
and ends the pass on all ranks as soon as one has run out; the batches the others still held
are counted, not silently dropped.

The small tensors here are CPU tensors: on GPU the trainer runs the "cpu:gloo,cuda:nccl"
process group, which sends them over gloo.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few numbers over ranks (float64, one collective)."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


@dataclasses.dataclass
class LockstepStats:
    steps: int = 0
    # Global totals over the steps taken (summed over ranks).
    rows: int = 0
    tokens: int = 0
    # Batches left unused because another rank ran out first (summed over ranks).
    unused_batches: int = 0
    # The step just yielded, summed over ranks.
    last_rows: int = 0
    last_tokens: int = 0


def lockstep(batches: Iterable, stats: LockstepStats, tokens_of) -> Iterator:
    """Yield this rank's batches for as long as every rank has one.

    `tokens_of(batch)` counts a batch's tokens; the global row and token totals of each step are
    gathered in the same collective and added to `stats` (rank 0 uses them for throughput).
    """
    world = world_size()
    iterator = iter(batches)
    try:
        while True:
            batch = next(iterator, None)
            has = batch is not None
            rows = batch.batch_size if has else 0
            tokens = tokens_of(batch) if has else 0
            have, total_rows, total_tokens = all_reduce_sum([float(has), rows, tokens])
            if int(have) < world:
                stats.unused_batches += int(have)
                return
            stats.steps += 1
            stats.last_rows, stats.last_tokens = int(total_rows), int(total_tokens)
            stats.rows += stats.last_rows
            stats.tokens += stats.last_tokens
            yield batch
    finally:
        # Stop the pipeline's prefetch thread now rather than at garbage collection.
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
