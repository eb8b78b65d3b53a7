"""Positional + time embedding add in Triton (spec: hstu/ops/position.py, reference 2.5).

Forward: one program per block of consecutive tokens finds each token's row (a binary search
over the offsets), computes its position-table row and time bucket in-kernel (int64 time
difference, then float32, with correctly rounded division and square root so buckets match
PyTorch's exactly) and writes x * alpha + P[pos] + T[bucket]. The two index vectors are kept
for the backward.
With dropout_ratio > 0 the encoder's input dropout is applied in the same pass (a Philox mask
from a per-call seed, regenerated in the backward; nothing is stored for it).
Backward: one kernel reads each d out row once and writes d x = d out * alpha and adds the row
to both tables' float32 gradients at its two indices (atomic adds, as torch.index_add_ does on
a GPU; three launches in all instead of ~9 for the torch ops).
Cached scoring (`add_position_time_at`): the same forward arithmetic for tokens whose column,
row's first target and seconds before the query come from the host, in one launch; no
backward.
The "log" bucket function uses Triton's log (about 1 ulp off libm): a time difference whose
log lies within ~1e-6 of an integer could land one bucket away from PyTorch's choice.
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from hstu.ops.pytorch.position import TIME_BUCKET_FNS
from hstu.ops.triton._common import dropout_seed, interpreting, seed_arg, triton_dtype_ok


@triton.jit
def _dropped(value, rows64, cols, dropout_ratio, SEED, D: tl.constexpr):
    """value [R, C] with the dropout mask of (row, column) applied: one Philox draw per
    element from (seed, row * D + column), so the backward regenerates the same mask. SEED
    points at the seed (a device tensor, so that CUDA graph replays can draw new ones)."""
    keep = tl.rand(tl.load(SEED), rows64 * D + cols[None, :]) >= dropout_ratio
    return tl.where(keep, value * (1.0 / (1.0 - dropout_ratio)), 0.0)


@triton.jit
def _position_row(i, first_target, contextual_seq_len, num_positions, USE_TIME: tl.constexpr):
    """The position-table row of a token at index i of its row, whose first target is at
    first_target (the spec's pos_i, clamped to the table)."""
    if USE_TIME:
        pos = contextual_seq_len + first_target - tl.minimum(i, first_target)
        pos = tl.where(i < contextual_seq_len, i, pos)
    else:
        pos = tl.minimum(i, first_target)
    return tl.minimum(pos, num_positions - 1)


@triton.jit
def _time_bucket(seconds, time_bucket_increments, num_time_buckets, LOG: tl.constexpr):
    """The time-table row of a token `seconds` (int64, subtracted before any float) before
    its row's query, with correctly rounded division and square root so that buckets match
    PyTorch's."""
    delta = tl.math.div_rn(tl.maximum(seconds.to(tl.float32), 1e-6), time_bucket_increments)
    if LOG:
        scaled = tl.log(delta)
    else:
        scaled = tl.math.sqrt_rn(delta)
    unit = tl.minimum(tl.maximum(tl.math.div_rn(scaled, num_time_buckets), 0.0), 1.0)
    return (unit * num_time_buckets).to(tl.int32)


@triton.jit
def _add_position_time(X, TS, P, T, OUT, POS, BUCKET, seq_offsets, num_targets, total, batch,
                       search_steps, stride_x, stride_p, stride_t, stride_out, alpha,
                       contextual_seq_len, num_positions, time_bucket_increments,
                       num_time_buckets, dropout_ratio, SEED, D: tl.constexpr,
                       HAS_TARGETS: tl.constexpr, USE_TIME: tl.constexpr, LOG: tl.constexpr,
                       DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per BLOCK_R consecutive tokens, whatever rows they belong to: every program
    # does the same work (with one program per row share, the longest row's few programs
    # carried most of the tokens, and of the dropout's random numbers).
    token = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = token < total
    # Each token's row: the last b with seq_offsets[b] <= token (binary search; empty rows
    # share their offset with the next row and are skipped by "last").
    low = tl.zeros([BLOCK_R], dtype=tl.int32)
    high = tl.full([BLOCK_R], batch - 1, dtype=tl.int32)
    for _ in range(search_steps):
        middle = (low + high + 1) // 2
        right = tl.load(seq_offsets + middle) <= token
        low = tl.where(right, middle, low)
        high = tl.where(right, high, middle - 1)
    start = tl.load(seq_offsets + low)
    end = tl.load(seq_offsets + low + 1)
    length = (end - start).to(tl.int32)
    i = (token - start).to(tl.int32)
    if HAS_TARGETS:
        first_target = length - tl.load(num_targets + low).to(tl.int32)
    else:
        first_target = length
    pos = _position_row(i, first_target, contextual_seq_len, num_positions, USE_TIME)
    cols = tl.arange(0, BLOCK_D)
    rows = token[:, None]
    mask = ok[:, None] & (cols < D)[None, :]
    value = tl.load(X + rows * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    value = value * alpha + tl.load(P + pos[:, None] * stride_p + cols[None, :], mask=mask,
                                    other=0.0).to(tl.float32)
    tl.store(POS + token, pos, mask=ok)
    if USE_TIME:
        # The row's query time: its last token's timestamp.
        query_time = tl.load(TS + end - 1, mask=ok, other=0)
        ts = tl.load(TS + token, mask=ok, other=0)
        bucket = _time_bucket(query_time - ts, time_bucket_increments, num_time_buckets, LOG)
        value += tl.load(T + bucket[:, None] * stride_t + cols[None, :], mask=mask,
                         other=0.0).to(tl.float32)
        tl.store(BUCKET + token, bucket, mask=ok)
    if DROPOUT:
        value = _dropped(value, rows, cols, dropout_ratio, SEED, D)
    tl.store(OUT + rows * stride_out + cols[None, :], value.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _add_position_time_bwd(D_OUT, POS, BUCKET, D_X, D_P, D_T, total, stride_dout, stride_dx,
                           alpha, dropout_ratio, SEED, D: tl.constexpr, USE_TIME: tl.constexpr,
                           DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr,
                           BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    ok = rows < total
    col_ok = cols < D
    grad = _input_gradient(D_OUT, D_X, rows, cols, ok, col_ok, stride_dout, stride_dx, alpha,
                           dropout_ratio, SEED, D, DROPOUT)
    last = tl.minimum(tl.program_id(0) * BLOCK_R + BLOCK_R, total) - 1
    _add_merging_last(D_P, POS, rows, last, ok, grad, cols, col_ok, D)
    if USE_TIME:
        _add_merging_last(D_T, BUCKET, rows, last, ok, grad, cols, col_ok, D)


@triton.jit
def _input_gradient(D_OUT, D_X, rows, cols, ok, col_ok, stride_dout, stride_dx, alpha,
                    dropout_ratio, SEED, D: tl.constexpr, DROPOUT: tl.constexpr):
    """d out of `rows` with the forward's dropout mask applied (float32: what the tables
    get); stores d x = alpha * that."""
    mask = ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    grad = tl.load(D_OUT + rows64 * stride_dout + cols[None, :], mask=mask, other=0.0)
    grad = grad.to(tl.float32)
    if DROPOUT:
        grad = _dropped(grad, rows64, cols, dropout_ratio, SEED, D)
    tl.store(D_X + rows64 * stride_dx + cols[None, :], (grad * alpha).to(D_X.dtype.element_ty),
             mask=mask)
    return grad


@triton.jit
def _add_merging_last(TABLE_GRAD, INDEX, rows, last, ok, grad, cols, col_ok, D: tl.constexpr):
    """grad's rows added to TABLE_GRAD at their INDEX rows with float atomics, those sharing
    the block's last token's index summed first and added with one atomic. A few table rows
    take most tokens: every candidate uses position c and the query's own time bucket, so a
    block of one row's candidates makes one atomic per column instead of BLOCK_R (on one
    H100, 1.3x faster on the 1k step's indices and 1.2x on the 27K shape's than one atomic
    per token: docs/BENCHMARKS.md, session 11)."""
    index = tl.load(INDEX + rows, mask=ok, other=-1).to(tl.int64)
    index_last = tl.load(INDEX + last).to(tl.int64)
    same = ok & (index == index_last)
    merged = tl.sum(tl.where(same[:, None], grad, 0.0), axis=0)
    tl.atomic_add(TABLE_GRAD + index_last * D + cols, merged, mask=col_ok, sem="relaxed")
    tl.atomic_add(TABLE_GRAD + index[:, None] * D + cols[None, :], grad,
                  mask=(ok & ~same)[:, None] & col_ok[None, :], sem="relaxed")


class _AddPositionTime(torch.autograd.Function):
    @staticmethod
    def forward(ctx, seq_embeddings, seq_offsets, timestamps, num_targets, position_table,
                time_table, alpha, contextual_seq_len, time_bucket_fn, time_bucket_increments,
                num_time_buckets, use_time_encoding, dropout_ratio):
        x = seq_embeddings if seq_embeddings.stride(-1) == 1 else seq_embeddings.contiguous()
        total, dim = x.shape
        out = torch.empty_like(x)
        positions = torch.empty(total, dtype=torch.int32, device=x.device)
        buckets = torch.empty(total if use_time_encoding else 0, dtype=torch.int32,
                              device=x.device)
        batch = seq_offsets.numel() - 1
        seed = dropout_seed(dropout_ratio, x.device)
        if total and batch:
            block_d = max(16, triton.next_power_of_2(dim))
            block_r = max(1, min(64, 8192 // block_d))
            _add_position_time[(triton.cdiv(total, block_r),)](
                x, timestamps if use_time_encoding else seq_offsets, position_table,
                time_table if use_time_encoding else position_table, out, positions,
                buckets if use_time_encoding else positions, seq_offsets,
                num_targets if num_targets is not None else seq_offsets, total, batch,
                max(1, batch.bit_length()), x.stride(0), position_table.stride(0),
                time_table.stride(0) if use_time_encoding else 0, out.stride(0), float(alpha),
                int(contextual_seq_len), position_table.shape[0], float(time_bucket_increments),
                float(num_time_buckets), float(dropout_ratio), seed_arg(seed, out), D=dim,
                HAS_TARGETS=num_targets is not None, USE_TIME=use_time_encoding,
                LOG=time_bucket_fn == "log", DROPOUT=dropout_ratio > 0, BLOCK_R=block_r,
                BLOCK_D=block_d,
            )
        ctx.save_for_backward(positions, buckets)
        ctx.config = (alpha, position_table.shape, position_table.dtype, time_table.shape,
                      time_table.dtype, use_time_encoding, dropout_ratio, seed)
        return out

    @staticmethod
    def backward(ctx, d_out):
        positions, buckets = ctx.saved_tensors
        alpha, p_shape, p_dtype, t_shape, t_dtype, use_time, dropout_ratio, seed = ctx.config
        d_out = d_out if d_out.stride(-1) == 1 else d_out.contiguous()
        total, dim = d_out.shape
        d_x = torch.empty_like(d_out)
        d_position = torch.zeros(p_shape, dtype=torch.float32, device=d_out.device)
        d_time = torch.zeros(t_shape, dtype=torch.float32, device=d_out.device)
        if total:
            if torch.are_deterministic_algorithms_enabled():
                # Float atomics add in no fixed order: say so, as torch's own index_add_ does.
                message = ("add_timestamp_positional_embeddings backward (TRITON) adds the "
                           "table gradients with float atomics: not deterministic, but "
                           "torch.use_deterministic_algorithms(True) is set")
                if not torch.is_deterministic_algorithms_warn_only_enabled():
                    raise RuntimeError(message)
                warnings.warn(message, stacklevel=2)
            block_d = max(16, triton.next_power_of_2(dim))
            block_r = max(1, min(64, 8192 // block_d))
            _add_position_time_bwd[(triton.cdiv(total, block_r),)](
                d_out, positions, buckets if use_time else positions, d_x, d_position, d_time,
                total, d_out.stride(0), d_x.stride(0), float(alpha), float(dropout_ratio),
                seed_arg(seed, d_x),
                D=dim, USE_TIME=use_time, DROPOUT=dropout_ratio > 0, BLOCK_R=block_r,
                BLOCK_D=block_d,
            )
        return (d_x, None, None, None, d_position.to(p_dtype), d_time.to(t_dtype), None, None,
                None, None, None, None, None)


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
    op = "add_timestamp_positional_embeddings"
    triton_dtype_ok(seq_embeddings, f"{op}: seq_embeddings")
    if seq_embeddings.device.type != "cuda" and not interpreting():
        raise RuntimeError(f"{op} (TRITON) needs CUDA tensors, or TRITON_INTERPRET=1")
    total = seq_embeddings.shape[0]
    if seq_offsets.dim() != 1 or seq_offsets.dtype != torch.int64 or seq_offsets.numel() == 0:
        raise ValueError(f"{op}: seq_offsets must be a 1-D int64 tensor [B+1]")
    if position_table.dim() != 2 or position_table.shape[1] != seq_embeddings.shape[1]:
        raise ValueError(f"{op}: position_table {tuple(position_table.shape)} must be [P, D] "
                         f"with D = {seq_embeddings.shape[1]}")
    if num_targets is not None and num_targets.shape != (seq_offsets.numel() - 1,):
        raise ValueError(f"{op}: num_targets must be [B]; got {tuple(num_targets.shape)}")
    if use_time_encoding:
        if time_bucket_fn not in TIME_BUCKET_FNS:
            raise ValueError(f"{op}: time_bucket_fn {time_bucket_fn!r}; expected one of "
                             f"{TIME_BUCKET_FNS}")
        if timestamps.dtype != torch.int64:
            raise TypeError(f"{op}: timestamps must be int64 seconds; got {timestamps.dtype}")
        if timestamps.shape != (total,):
            raise ValueError(f"{op}: timestamps has shape {tuple(timestamps.shape)}; expected "
                             f"({total},), one per token")
        if time_table.shape != (num_time_buckets + 1, seq_embeddings.shape[1]):
            raise ValueError(f"{op}: time_table has shape {tuple(time_table.shape)}; expected "
                             f"({num_time_buckets + 1}, {seq_embeddings.shape[1]}) = "
                             "(num_time_buckets + 1, D)")
    if not 0.0 <= dropout_ratio < 1.0:
        raise ValueError(f"{op}: dropout_ratio must be in [0, 1); got {dropout_ratio}")
    return _AddPositionTime.apply(
        seq_embeddings, seq_offsets, timestamps, num_targets, position_table, time_table,
        float(alpha), int(contextual_seq_len), time_bucket_fn, float(time_bucket_increments),
        int(num_time_buckets), bool(use_time_encoding), float(dropout_ratio),
    )


@triton.jit
def _add_position_time_at(X, COLS, FIRST_TARGET, SECONDS, P, T, OUT, total, stride_x, stride_p,
                          stride_t, stride_out, alpha, contextual_seq_len, num_positions,
                          time_bucket_increments, num_time_buckets, D: tl.constexpr,
                          USE_TIME: tl.constexpr, LOG: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    # _add_position_time's arithmetic for tokens whose place in their row is given (cached
    # scoring's new tokens): no row search, no dropout, no indices kept for a backward.
    token = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = token < total
    i = tl.load(COLS + token, mask=ok, other=0)
    first_target = tl.load(FIRST_TARGET + token, mask=ok, other=0)
    pos = _position_row(i, first_target, contextual_seq_len, num_positions, USE_TIME)
    cols = tl.arange(0, BLOCK_D)
    mask = ok[:, None] & (cols < D)[None, :]
    value = tl.load(X + token[:, None] * stride_x + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
    value = value * alpha + tl.load(P + pos[:, None] * stride_p + cols[None, :], mask=mask,
                                    other=0.0).to(tl.float32)
    if USE_TIME:
        seconds = tl.load(SECONDS + token, mask=ok, other=0)
        bucket = _time_bucket(seconds, time_bucket_increments, num_time_buckets, LOG)
        value += tl.load(T + bucket[:, None] * stride_t + cols[None, :], mask=mask,
                         other=0.0).to(tl.float32)
    tl.store(OUT + token[:, None] * stride_out + cols[None, :], value.to(OUT.dtype.element_ty),
             mask=mask)


def add_position_time_at(seq_embeddings, columns, first_target, seconds_before_query,
                         position_table, time_table, *, alpha, contextual_seq_len,
                         time_bucket_fn, time_bucket_increments, num_time_buckets):
    """hstu.ops.position.add_position_time_at in one Triton launch (where the PyTorch ops
    take ~20 small kernels: a cached call of one user is bound by its kernel count)."""
    op = "add_position_time_at"
    triton_dtype_ok(seq_embeddings, f"{op}: seq_embeddings")
    if seq_embeddings.device.type != "cuda" and not interpreting():
        raise RuntimeError(f"{op} (TRITON) needs CUDA tensors, or TRITON_INTERPRET=1")
    use_time = seconds_before_query is not None
    if use_time and time_bucket_fn not in TIME_BUCKET_FNS:
        raise ValueError(f"{op}: time_bucket_fn {time_bucket_fn!r}; expected one of "
                         f"{TIME_BUCKET_FNS}")
    x = seq_embeddings if seq_embeddings.stride(-1) == 1 else seq_embeddings.contiguous()
    total, dim = x.shape
    out = torch.empty_like(x)
    if total:
        block_d = max(16, triton.next_power_of_2(dim))
        block_r = max(1, min(64, 8192 // block_d))
        table = time_table if use_time else position_table
        _add_position_time_at[(triton.cdiv(total, block_r),)](
            x, columns, first_target, seconds_before_query if use_time else columns,
            position_table, table, out, total, x.stride(0), position_table.stride(0),
            table.stride(0), out.stride(0), float(alpha), int(contextual_seq_len),
            position_table.shape[0], float(time_bucket_increments), float(num_time_buckets),
            D=dim, USE_TIME=use_time, LOG=time_bucket_fn == "log", BLOCK_R=block_r,
            BLOCK_D=block_d,
        )
    return out
