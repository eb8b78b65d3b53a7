"""Keeping the ranks in step.

TorchRec's sharded embeddings run collectives (all_to_all) in every forward: if one rank has a
batch and another has none, the first waits forever. Equal Ray Data splits make batch counts
equal in the common case, but not always (token-budget batching, skipped bad rows, an
abandoned pass). So before each step every rank says whether it has a batch:

- `lockstep` (training) ends the pass on all ranks as soon as one has run out; the batches the
  others still held are counted, not silently dropped.
- `lockstep_padded` (evaluation, where every row must be scored) keeps going while any rank has
  a batch; a rank that has run out repeats its last batch (or borrows one, if it never had
  any) as a filler, flagged so that its results are not counted.

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
    # lockstep(): whether the step just yielded is the pass's last (the next was already asked).
    is_last: bool = False


def lockstep(batches: Iterable, stats: LockstepStats, tokens_of) -> Iterator:
    """Yield this rank's batches for as long as every rank has one.

    It looks one step ahead (the collective for step k+1 runs before step k is yielded), so
    `stats.is_last` tells the caller that the step it is about to run ends the pass, e.g. to
    write an end-of-epoch checkpoint at the last step rather than after it. `tokens_of(batch)`
    counts a batch's tokens; the global row and token totals of each step are gathered in the
    same collective and added to `stats` (rank 0 uses them for throughput).
    """
    world = world_size()
    iterator = iter(batches)

    def ask():
        batch = next(iterator, None)
        has = batch is not None
        rows = batch.batch_size if has else 0
        tokens = tokens_of(batch) if has else 0
        have, total_rows, total_tokens = all_reduce_sum([float(has), rows, tokens])
        return batch, int(have), int(total_rows), int(total_tokens)

    try:
        batch, have, rows, tokens = ask()
        while have == world:
            following = ask()
            stats.steps += 1
            stats.last_rows, stats.last_tokens = rows, tokens
            stats.rows += rows
            stats.tokens += tokens
            stats.is_last = following[1] < world
            yield batch
            batch, have, rows, tokens = following
        stats.unused_batches += have
    finally:
        # Stop the pipeline's prefetch thread now rather than at garbage collection.
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


def _rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def lockstep_padded(batches: Iterable, stats: LockstepStats, tokens_of) -> Iterator:
    """Yield (batch, is_real) until no rank has a batch left. A rank that has run out repeats
    its last batch with is_real False; a rank that never had one (an unequal split can leave a
    small eval set entirely to the other ranks) borrows the batch of the first rank that has
    one, once."""
    world, rank = world_size(), _rank()
    iterator = iter(batches)
    filler = None
    try:
        while True:
            batch = next(iterator, None)
            has = batch is not None
            if has:
                filler = batch
            # One collective: which ranks have a batch, which could stand in, and the totals.
            flags = [0.0] * (2 * world)
            flags[rank] = float(has)
            flags[world + rank] = float(filler is not None)
            rows = batch.batch_size if has else 0
            tokens = tokens_of(batch) if has else 0
            summed = all_reduce_sum(flags + [rows, tokens])
            having = [int(v) for v in summed[:world]]
            standing = [int(v) for v in summed[world : 2 * world]]
            if not any(having):
                return
            if not all(standing):
                lender = having.index(1)
                borrowed = [batch if rank == lender else None]
                dist.broadcast_object_list(borrowed, src=lender)
                if filler is None:
                    filler = borrowed[0]
            stats.steps += 1
            stats.last_rows, stats.last_tokens = int(summed[-2]), int(summed[-1])
            stats.rows += stats.last_rows
            stats.tokens += stats.last_tokens
            yield (batch if has else filler), has
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
