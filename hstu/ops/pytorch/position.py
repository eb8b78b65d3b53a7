"""Positional + time embedding add in plain PyTorch (index arithmetic, no per-row loops)."""

from __future__ import annotations

import torch

from hstu.ops.pytorch.dtypes import upcast
from hstu.ops.pytorch.jagged import jagged_row_and_col, lengths_from_offsets

TIME_BUCKET_FNS = ("sqrt", "log")


def position_indices(
    seq_offsets: torch.Tensor,
    num_targets: torch.Tensor | None,
    total: int,
    *,
    contextual_seq_len: int,
    num_position_buckets: int,
    use_time_encoding: bool,
) -> torch.Tensor:
    """The row of the position table each token uses: int64 [total]."""
    rows, cols = jagged_row_and_col(seq_offsets, total)
    lengths = lengths_from_offsets(seq_offsets)
    if num_targets is None:
        num_targets = torch.zeros_like(lengths)
    first_target = (lengths - num_targets.to(lengths.dtype))[rows]
    return positions_at(cols, first_target, contextual_seq_len=contextual_seq_len,
                        num_position_buckets=num_position_buckets,
                        use_time_encoding=use_time_encoding)


def positions_at(
    cols: torch.Tensor,
    first_target: torch.Tensor,
    *,
    contextual_seq_len: int,
    num_position_buckets: int,
    use_time_encoding: bool,
) -> torch.Tensor:
    """position_indices for tokens given by their column in their row and their row's first
    target column (so that any subset of a batch's tokens can be indexed alone)."""
    if use_time_encoding:
        c = contextual_seq_len
        # Distance to the target boundary: targets all get c, the newest history item c + 1.
        positions = c + first_target - torch.minimum(cols, first_target)
        positions = torch.where(cols < c, cols, positions)
    else:
        positions = torch.minimum(cols, first_target)
    return positions.clamp(max=num_position_buckets - 1)


def time_bucket_indices(
    seq_offsets: torch.Tensor,
    timestamps: torch.Tensor,
    *,
    time_bucket_fn: str,
    time_bucket_increments: float,
    num_time_buckets: int,
) -> torch.Tensor:
    """The row of the time table each token uses: int64 [total], in [0, num_time_buckets]."""
    if time_bucket_fn not in TIME_BUCKET_FNS:
        raise ValueError(f"time_bucket_fn {time_bucket_fn!r}; expected one of {TIME_BUCKET_FNS}")
    if timestamps.dtype != torch.int64:
        raise TypeError(f"timestamps must be int64 seconds; got {timestamps.dtype}")
    total = timestamps.shape[0]
    rows, _ = jagged_row_and_col(seq_offsets, total)
    last_token = (seq_offsets[1:] - 1).clamp(min=0)
    query_time = timestamps[last_token] if total else timestamps.new_zeros(last_token.shape)
    return time_buckets_at(query_time[rows] - timestamps, time_bucket_fn=time_bucket_fn,
                           time_bucket_increments=time_bucket_increments,
                           num_time_buckets=num_time_buckets)


def time_buckets_at(
    seconds_before_query: torch.Tensor,
    *,
    time_bucket_fn: str,
    time_bucket_increments: float,
    num_time_buckets: int,
) -> torch.Tensor:
    """time_bucket_indices for tokens given by their int64 distance in seconds to their row's
    query time (its last token's timestamp)."""
    if time_bucket_fn not in TIME_BUCKET_FNS:
        raise ValueError(f"time_bucket_fn {time_bucket_fn!r}; expected one of {TIME_BUCKET_FNS}")
    if seconds_before_query.dtype != torch.int64:
        raise TypeError(f"seconds before the query must be int64; got "
                        f"{seconds_before_query.dtype}")
    # Subtracted in int64 by the caller: epoch seconds do not survive a trip through float32
    # (ULP 128 s).
    delta = seconds_before_query.to(torch.float32)
    delta = delta.clamp(min=1e-6) / time_bucket_increments
    scaled = torch.sqrt(delta) if time_bucket_fn == "sqrt" else torch.log(delta)
    buckets = (scaled / num_time_buckets).clamp(0.0, 1.0) * num_time_buckets
    return buckets.to(torch.int64)


def add_timestamp_positional_embeddings(
    seq_embeddings: torch.Tensor,
    seq_offsets: torch.Tensor,
    timestamps: torch.Tensor,
    num_targets: torch.Tensor | None,
    position_table: torch.Tensor,
    time_table: torch.Tensor,
    *,
    alpha: float,
    contextual_seq_len: int,
    time_bucket_fn: str = "sqrt",
    time_bucket_increments: float = 60.0,
    num_time_buckets: int = 0,
    use_time_encoding: bool = True,
    dropout_ratio: float = 0.0,
) -> torch.Tensor:
    total = seq_embeddings.shape[0]
    if use_time_encoding and timestamps.shape != (total,):
        raise ValueError(
            f"timestamps has shape {tuple(timestamps.shape)}; expected ({total},), one per token"
        )
    positions = position_indices(
        seq_offsets,
        num_targets,
        total,
        contextual_seq_len=contextual_seq_len,
        num_position_buckets=position_table.shape[0],
        use_time_encoding=use_time_encoding,
    )
    out = upcast(seq_embeddings) * alpha + upcast(position_table[positions])
    if use_time_encoding:
        if time_table.shape[0] != num_time_buckets + 1:
            raise ValueError(
                f"time_table has {time_table.shape[0]} rows; expected num_time_buckets + 1 = "
                f"{num_time_buckets + 1}"
            )
        buckets = time_bucket_indices(
            seq_offsets,
            timestamps,
            time_bucket_fn=time_bucket_fn,
            time_bucket_increments=time_bucket_increments,
            num_time_buckets=num_time_buckets,
        )
        out = out + upcast(time_table[buckets])
    out = out.to(seq_embeddings.dtype)
    if dropout_ratio > 0:
        out = torch.nn.functional.dropout(out, dropout_ratio, training=True)
    return out


def add_position_time_at(seq_embeddings, columns, first_target, seconds_before_query,
                         position_table, time_table, *, alpha, contextual_seq_len,
                         time_bucket_fn, time_bucket_increments, num_time_buckets):
    """hstu.ops.position.add_position_time_at in PyTorch ops (the reference)."""
    use_time = seconds_before_query is not None
    positions = positions_at(columns, first_target, contextual_seq_len=contextual_seq_len,
                             num_position_buckets=position_table.shape[0],
                             use_time_encoding=use_time)
    out = upcast(seq_embeddings) * alpha + upcast(position_table[positions])
    if use_time:
        buckets = time_buckets_at(seconds_before_query, time_bucket_fn=time_bucket_fn,
                                  time_bucket_increments=time_bucket_increments,
                                  num_time_buckets=num_time_buckets)
        out = out + upcast(time_table[buckets])
    return out.to(seq_embeddings.dtype)
