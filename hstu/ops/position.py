"""The positional + time embedding add in front of the STU stack (reference section 2.5)."""

from __future__ import annotations

import torch

from hstu.ops.kernel import Kernel, implementation


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
    kernel: Kernel | str = Kernel.PYTORCH,
) -> torch.Tensor:
    """x_i * alpha + P[pos_i] (+ T[bucket_i]) for every token i of every row.

    Shapes: seq_embeddings [L, D] (any float dtype); seq_offsets [B+1] int64; timestamps [L]
    int64 seconds (contextual tokens carry 0); num_targets [B] int64 or None (= no targets);
    position_table [P, D]; time_table [num_time_buckets + 1, D] (ignored unless
    use_time_encoding). Returns [L, D] in seq_embeddings.dtype; all arithmetic in float32.

    For row b with length n, t = num_targets[b] targets, c = contextual_seq_len, token index
    i in [0, n), hi = n - t (index of the first target):
      use_time_encoding:
        pos_i = i                     if i < c       (contextual tokens: 0 .. c-1)
                c + hi - min(i, hi)   otherwise      (targets: c; newest history: c+1; ...)
        query = timestamps[last token of the row]    (int64)
        dt_i  = float32(query - timestamps[i])        (difference taken in int64, THEN
                                                        converted to float32)
        dt_i  = max(dt_i, 1e-6) / time_bucket_increments
        u_i   = sqrt(dt_i) if time_bucket_fn == "sqrt" else log(dt_i)   ("log")
        bucket_i = int64(trunc(clamp(u_i / num_time_buckets, 0, 1) * num_time_buckets))
        out_i = x_i * alpha + P[min(pos_i, P-1)] + T[bucket_i]
      else:
        pos_i = min(i, hi);  out_i = x_i * alpha + P[min(pos_i, P-1)]
    dropout_ratio p > 0: then out = Dropout(out, p) (each value zeroed with probability p,
    the rest scaled by 1/(1-p); the encoder's input dropout, which TRITON applies in the same
    pass; the random stream is implementation-specific: compare kernels with p = 0).
    Differentiable in seq_embeddings, position_table and time_table (table gradients are
    scatter-adds over the tokens that used each row).
    """
    impl = implementation("position", "add_timestamp_positional_embeddings", kernel)
    return impl(
        seq_embeddings,
        seq_offsets,
        timestamps,
        num_targets,
        position_table,
        time_table,
        alpha=alpha,
        contextual_seq_len=contextual_seq_len,
        time_bucket_fn=time_bucket_fn,
        time_bucket_increments=time_bucket_increments,
        num_time_buckets=num_time_buckets,
        use_time_encoding=use_time_encoding,
        dropout_ratio=dropout_ratio,
    )


def add_position_time_at(
    seq_embeddings: torch.Tensor,
    columns: torch.Tensor,
    first_target: torch.Tensor,
    seconds_before_query: torch.Tensor | None,
    position_table: torch.Tensor,
    time_table: torch.Tensor | None,
    *,
    alpha: float,
    contextual_seq_len: int,
    time_bucket_fn: str = "sqrt",
    time_bucket_increments: float = 60.0,
    num_time_buckets: int = 0,
    kernel: Kernel | str = Kernel.PYTORCH,
) -> torch.Tensor:
    """add_timestamp_positional_embeddings for tokens given one by one rather than as whole
    rows: what cached scoring runs on the new tokens of rows whose other tokens are cached
    (hstu/modules/kv_cache.py works out, on the host, where each one sits in its whole row).

    Shapes: seq_embeddings [L, D]; columns [L] int64, each token's index i in its whole row;
    first_target [L] int64, its row's hi (the index of the row's first target);
    seconds_before_query [L] int64, query - timestamp (the difference taken in int64), or None
    without time encoding (then time_table is not read). Per token, with pos_i as in
    add_timestamp_positional_embeddings (use_time_encoding = seconds_before_query is not
    None) and bucket_i from dt_i = float32(seconds_before_query[i]):
      out_i = x_i * alpha + P[min(pos_i, P-1)] (+ T[bucket_i])
    in float32, returned in seq_embeddings.dtype. Inference only: no gradients, no dropout.
    """
    tables = [position_table] + ([time_table] if time_table is not None else [])
    if torch.is_grad_enabled() and any(t.requires_grad for t in [seq_embeddings, *tables]):
        raise RuntimeError("add_position_time_at is for inference (cached scoring): run it "
                           "under torch.no_grad()")
    total = seq_embeddings.shape[0]
    for name, value in (("columns", columns), ("first_target", first_target),
                        ("seconds_before_query", seconds_before_query)):
        if value is not None and (value.dtype != torch.int64 or value.shape != (total,)):
            raise ValueError(f"add_position_time_at: {name} must be int64 [{total}]; got "
                             f"{value.dtype} {tuple(value.shape)}")
    if seconds_before_query is not None and (
            time_table is None or time_table.shape != (num_time_buckets + 1,
                                                       seq_embeddings.shape[1])):
        raise ValueError(f"add_position_time_at: time_table must be [num_time_buckets + 1, D] "
                         f"= [{num_time_buckets + 1}, {seq_embeddings.shape[1]}]")
    impl = implementation("position", "add_position_time_at", kernel)
    return impl(seq_embeddings, columns, first_target, seconds_before_query, position_table,
                time_table, alpha=alpha, contextual_seq_len=contextual_seq_len,
                time_bucket_fn=time_bucket_fn, time_bucket_increments=time_bucket_increments,
                num_time_buckets=num_time_buckets)
