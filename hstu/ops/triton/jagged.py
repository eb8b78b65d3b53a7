"""Jagged concat / split per row and the per-row dense matmul, in Triton (spec: hstu/ops/jagged.py).

concat and split are the same copy kernel run in two directions: a program owns one batch row
(and a share of it), walks that row's elements and moves [left_b; right_b] <-> out_b, so no
row-of-element lookup is needed and no maximum length has to be known. Each op's backward is
the other op.

jagged_dense_bmm_broadcast_add: out_b = jagged_b @ dense_b + bias_b, one program per
(row tile, column tile, batch row), float32 accumulation. Backward: d jagged_b = d out_b @
dense_b^T (the same kernel on the transposed view), d dense_b = jagged_b^T @ d out_b and
d bias_b = column sums of d out_b (one kernel looping over the row's elements).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hstu.ops.triton._common import dot, fp32_dot_precision, interpreting, triton_dtype_ok


def _programs_per_row(batch: int, device: torch.device) -> int:
    if interpreting():
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(16, (4 * sms) // max(batch, 1)))


@triton.jit
def _concat_split(LEFT, RIGHT, OUT, left_offsets, right_offsets, stride_left, stride_right,
                  stride_out, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                  SPLIT: tl.constexpr, RIGHT_ONLY: tl.constexpr):
    """concat (SPLIT=False): OUT row b <- [LEFT row b; RIGHT row b]; split: the reverse.
    RIGHT_ONLY: only the RIGHT part moves (LEFT is never touched; OUT's left part neither)."""
    b = tl.program_id(0)
    share = tl.program_id(1)
    shares = tl.num_programs(1)
    left_start = tl.load(left_offsets + b)
    left_len = (tl.load(left_offsets + b + 1) - left_start).to(tl.int32)
    right_start = tl.load(right_offsets + b)
    right_len = (tl.load(right_offsets + b + 1) - right_start).to(tl.int32)
    out_start = left_start + right_start
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    skip = left_len if RIGHT_ONLY else 0
    for first in range(skip + share * BLOCK_R, left_len + right_len, shares * BLOCK_R):
        i = first + tl.arange(0, BLOCK_R)  # index inside the output row
        from_left = i < left_len
        in_row = i < left_len + right_len
        left_rows = (left_start + i)[:, None]
        right_rows = (right_start + i - left_len)[:, None]
        out_ptrs = OUT + (out_start + i)[:, None] * stride_out + cols[None, :]
        left_ptrs = LEFT + left_rows * stride_left + cols[None, :]
        right_ptrs = RIGHT + right_rows * stride_right + cols[None, :]
        left_ok = (from_left & in_row)[:, None] & col_ok[None, :]
        right_ok = (~from_left & in_row)[:, None] & col_ok[None, :]
        if SPLIT:
            values = tl.load(out_ptrs, mask=in_row[:, None] & col_ok[None, :])
            tl.store(left_ptrs, values, mask=left_ok)
            tl.store(right_ptrs, values, mask=right_ok)
        else:
            values = tl.load(left_ptrs, mask=left_ok, other=0.0)
            values = tl.where(left_ok, values, tl.load(right_ptrs, mask=right_ok, other=0.0))
            tl.store(out_ptrs, values, mask=in_row[:, None] & col_ok[None, :])


def _copy_launch(left, right, out, left_offsets, right_offsets, split, right_only=False):
    batch = left_offsets.numel() - 1
    dim = out.shape[1]
    if batch == 0 or out.shape[0] == 0:
        return
    block_d = max(16, triton.next_power_of_2(dim))
    block_r = max(1, min(64, 8192 // block_d))
    grid = (batch, _programs_per_row(batch, out.device))
    _concat_split[grid](left, right, out, left_offsets, right_offsets, left.stride(0),
                        right.stride(0), out.stride(0), D=dim, BLOCK_R=block_r,
                        BLOCK_D=block_d, SPLIT=split, RIGHT_ONLY=right_only)


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class _Concat(torch.autograd.Function):
    @staticmethod
    def forward(ctx, left, left_offsets, right, right_offsets):
        left, right = _rows_contiguous(left), _rows_contiguous(right)
        out = torch.empty((left.shape[0] + right.shape[0], left.shape[1]), dtype=left.dtype,
                          device=left.device)
        _copy_launch(left, right, out, left_offsets, right_offsets, split=False)
        ctx.save_for_backward(left_offsets, right_offsets)
        ctx.sizes = (left.shape[0], right.shape[0])
        offsets = left_offsets + right_offsets
        ctx.mark_non_differentiable(offsets)
        return out, offsets

    @staticmethod
    def backward(ctx, grad, _):
        left_offsets, right_offsets = ctx.saved_tensors
        grad = _rows_contiguous(grad)
        d_left = grad.new_empty((ctx.sizes[0], grad.shape[1]))
        d_right = grad.new_empty((ctx.sizes[1], grad.shape[1]))
        _copy_launch(d_left, d_right, grad, left_offsets, right_offsets, split=True)
        return d_left, None, d_right, None


class _Split(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, left_offsets, right_offsets, left_total, right_total):
        values = _rows_contiguous(values)
        left = values.new_empty((left_total, values.shape[1]))
        right = values.new_empty((right_total, values.shape[1]))
        _copy_launch(left, right, values, left_offsets, right_offsets, split=True)
        ctx.save_for_backward(left_offsets, right_offsets)
        return left, right

    @staticmethod
    def backward(ctx, d_left, d_right):
        left_offsets, right_offsets = ctx.saved_tensors
        d_left = _rows_contiguous(d_left)
        d_right = _rows_contiguous(d_right)
        out = d_left.new_empty((d_left.shape[0] + d_right.shape[0], d_left.shape[1]))
        _copy_launch(d_left, d_right, out, left_offsets, right_offsets, split=False)
        return out, None, None, None, None


class _Tails(torch.autograd.Function):
    """The right parts of a split alone: the left rows are neither copied nor given a
    gradient buffer of their own (the backward writes zeros there with one memset)."""

    @staticmethod
    def forward(ctx, values, left_offsets, right_offsets, right_total):
        values = _rows_contiguous(values)
        tails = values.new_empty((right_total, values.shape[1]))
        # LEFT is never touched under right_only: any tensor will do.
        _copy_launch(tails, tails, values, left_offsets, right_offsets, split=True,
                     right_only=True)
        ctx.save_for_backward(left_offsets, right_offsets)
        ctx.rows = values.shape[0]
        return tails

    @staticmethod
    def backward(ctx, d_tails):
        left_offsets, right_offsets = ctx.saved_tensors
        d_tails = _rows_contiguous(d_tails)
        d_values = d_tails.new_zeros((ctx.rows, d_tails.shape[1]))
        _copy_launch(d_tails, d_tails, d_values, left_offsets, right_offsets, split=False,
                     right_only=True)
        return d_values, None, None, None


def _check_device(tensor: torch.Tensor, name: str) -> None:
    if tensor.device.type != "cuda" and not interpreting():
        raise RuntimeError(f"{name} (TRITON) needs CUDA tensors, or TRITON_INTERPRET=1")


def _check_offsets(offsets: torch.Tensor, values: torch.Tensor, name: str, op: str) -> None:
    if offsets.dim() != 1 or offsets.numel() == 0 or offsets.dtype != torch.int64:
        raise ValueError(f"{op}: {name} must be a 1-D int64 tensor [B+1]; got "
                         f"{offsets.dtype} {tuple(offsets.shape)}")
    if values.device.type != "cuda" and int(offsets[-1]) != values.shape[0]:
        raise ValueError(f"{op}: {name}[-1] = {int(offsets[-1])} but the values have "
                         f"{values.shape[0]} rows")


def concat_2d_jagged(
    left: torch.Tensor,
    left_offsets: torch.Tensor,
    right: torch.Tensor,
    right_offsets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_device(left, "concat_2d_jagged")
    _check_offsets(left_offsets, left, "left_offsets", "concat_2d_jagged")
    _check_offsets(right_offsets, right, "right_offsets", "concat_2d_jagged")
    if left_offsets.shape != right_offsets.shape:
        raise ValueError(f"concat_2d_jagged: left has {left_offsets.numel() - 1} rows but right "
                         f"has {right_offsets.numel() - 1}")
    if left.dim() != 2 or right.dim() != 2 or left.shape[1] != right.shape[1]:
        raise ValueError(f"concat_2d_jagged: left {tuple(left.shape)} and right "
                         f"{tuple(right.shape)} must be [*, D] with the same D")
    if left.dtype != right.dtype:
        raise TypeError(f"concat_2d_jagged: dtypes differ: {left.dtype} vs {right.dtype}")
    return _Concat.apply(left, left_offsets, right, right_offsets)


def split_2d_jagged(
    values: torch.Tensor,
    offsets: torch.Tensor,
    left_lengths: torch.Tensor,
    right_lengths: torch.Tensor,
    right_total: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_device(values, "split_2d_jagged")
    _check_offsets(offsets, values, "offsets", "split_2d_jagged")
    lengths = offsets[1:] - offsets[:-1]
    left_lengths = left_lengths.to(torch.int64)
    right_lengths = right_lengths.to(torch.int64)
    if left_lengths.shape != lengths.shape or right_lengths.shape != lengths.shape:
        raise ValueError(f"split_2d_jagged: left_lengths {tuple(left_lengths.shape)} and "
                         f"right_lengths {tuple(right_lengths.shape)} must be [B] = "
                         f"[{lengths.numel()}]")
    left_offsets = torch.nn.functional.pad(torch.cumsum(left_lengths, 0), (1, 0))
    right_offsets = torch.nn.functional.pad(torch.cumsum(right_lengths, 0), (1, 0))
    if right_total is not None and values.device.type == "cuda":
        # Sizes from the caller: no host sync, and so no check of the lengths either.
        return _Split.apply(values, left_offsets, right_offsets, values.shape[0] - right_total,
                            right_total)
    # The output sizes need one host sync (no totals given); the length check rides along in
    # the same transfer.
    mismatches, left_total, right_total = torch.stack([
        (left_lengths + right_lengths != lengths).sum(), left_offsets[-1], right_offsets[-1]
    ]).tolist()
    if mismatches:
        raise ValueError(
            "split_2d_jagged: left_lengths + right_lengths must equal the row lengths; got "
            f"{left_lengths.tolist()} + {right_lengths.tolist()} vs {lengths.tolist()}"
        )
    return _Split.apply(values, left_offsets, right_offsets, left_total, right_total)


def jagged_tails(
    values: torch.Tensor,
    offsets: torch.Tensor,
    tail_lengths: torch.Tensor,
    tail_total: int,
) -> torch.Tensor:
    _check_device(values, "jagged_tails")
    _check_offsets(offsets, values, "offsets", "jagged_tails")
    tail_lengths = tail_lengths.to(torch.int64)
    lengths = offsets[1:] - offsets[:-1]
    if tail_lengths.shape != lengths.shape:
        raise ValueError(f"jagged_tails: tail_lengths {tuple(tail_lengths.shape)} must be [B] = "
                         f"[{lengths.numel()}]")
    if values.device.type != "cuda" and (
            bool((tail_lengths > lengths).any()) or int(tail_lengths.sum()) != tail_total):
        raise ValueError(f"jagged_tails: tail_lengths {tail_lengths.tolist()} must be at most "
                         f"the row lengths {lengths.tolist()} and sum to tail_total {tail_total}")
    right_offsets = torch.nn.functional.pad(torch.cumsum(tail_lengths, 0), (1, 0))
    left_offsets = offsets - right_offsets
    return _Tails.apply(values, left_offsets, right_offsets, int(tail_total))


# ----------------------------------------------------------------------------- bmm


@triton.jit
def _bmm_fwd(J, DENSE, BIAS, OUT, seq_offsets, K, N, stride_j, stride_db, stride_dk,
             stride_dn, stride_bias, stride_out, HAS_BIAS: tl.constexpr,
             PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """OUT rows of batch row b = J rows of b @ DENSE[b] (+ BIAS[b]); DENSE[b] read through
    strides, so a transposed view works too."""
    b = tl.program_id(2)
    start = tl.load(seq_offsets + b)
    length = (tl.load(seq_offsets + b + 1) - start).to(tl.int32)
    start_m = tl.program_id(0) * BLOCK_M
    if start_m >= length:
        return
    rows = start_m + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(J + (start + rows[:, None]) * stride_j + ks[None, :],
                    mask=(rows[:, None] < length) & (ks[None, :] < K), other=0.0)
        w = tl.load(DENSE + b * stride_db + ks[:, None] * stride_dk + cols[None, :] * stride_dn,
                    mask=(ks[:, None] < K) & (cols[None, :] < N), other=0.0)
        acc = dot(a, w.to(a.dtype), acc, PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(BIAS + b * stride_bias + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + (start + rows[:, None]) * stride_out + cols[None, :],
             acc.to(OUT.dtype.element_ty), mask=(rows[:, None] < length) & (cols[None, :] < N))


@triton.jit
def _bmm_bwd_dense(J, DOUT, DDENSE, DBIAS, seq_offsets, K, N, stride_j, stride_dout,
                   stride_ddb, stride_ddk, stride_dbias, PRECISION: tl.constexpr,
                   UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """DDENSE[b] = J_b^T @ DOUT_b; DBIAS[b] = column sums of DOUT_b (by the k-tile-0 programs)."""
    b = tl.program_id(2)
    start = tl.load(seq_offsets + b)
    length = (tl.load(seq_offsets + b + 1) - start).to(tl.int32)
    ks = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    bias_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for m0 in range(0, length, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        a = tl.load(J + (start + rows[None, :]) * stride_j + ks[:, None],
                    mask=(rows[None, :] < length) & (ks[:, None] < K), other=0.0)
        g = tl.load(DOUT + (start + rows[:, None]) * stride_dout + cols[None, :],
                    mask=(rows[:, None] < length) & (cols[None, :] < N), other=0.0)
        acc = dot(a, g.to(a.dtype), acc, PRECISION, UPCAST)
        bias_acc += tl.sum(g.to(tl.float32), axis=0)
    tl.store(DDENSE + b * stride_ddb + ks[:, None] * stride_ddk + cols[None, :],
             acc.to(DDENSE.dtype.element_ty), mask=(ks[:, None] < K) & (cols[None, :] < N))
    if tl.program_id(0) == 0:
        tl.store(DBIAS + b * stride_dbias + cols, bias_acc.to(DBIAS.dtype.element_ty),
                 mask=cols < N)


def _bmm_tiles(k: int, n: int) -> tuple[int, int, int, int]:
    block_n = min(64, max(16, triton.next_power_of_2(n)))
    block_k = min(64, max(16, triton.next_power_of_2(k)))
    block_m = 64 if interpreting() else 128
    return block_m, block_n, block_k, 4


def _bmm_forward(seq_offsets, jagged, dense, bias, out_dtype, max_seq_len):
    """jagged [ΣM, K] @ per-row dense (any strides, [B, K, N] logical) (+ bias [B, N])."""
    batch, k, n = dense.shape
    out = torch.empty((jagged.shape[0], n), dtype=out_dtype, device=jagged.device)
    if batch == 0 or jagged.shape[0] == 0:
        return out
    block_m, block_n, block_k, warps = _bmm_tiles(k, n)
    grid = (triton.cdiv(max_seq_len, block_m), triton.cdiv(n, block_n), batch)
    _bmm_fwd[grid](
        jagged, dense, bias if bias is not None else out, out, seq_offsets, k, n,
        jagged.stride(0), dense.stride(0), dense.stride(1), dense.stride(2),
        bias.stride(0) if bias is not None else 0, out.stride(0), HAS_BIAS=bias is not None,
        PRECISION=fp32_dot_precision() if jagged.dtype == torch.float32 else "tf32",
        UPCAST=interpreting(), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=warps,
    )
    return out


class _JaggedDenseBmm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, seq_offsets, jagged, dense, bias, max_seq_len):
        jagged = _rows_contiguous(jagged)
        out = _bmm_forward(seq_offsets, jagged, dense, bias, jagged.dtype, max_seq_len)
        ctx.save_for_backward(seq_offsets, jagged, dense, bias)
        ctx.max_seq_len = max_seq_len
        return out

    @staticmethod
    def backward(ctx, d_out):
        seq_offsets, jagged, dense, bias = ctx.saved_tensors
        d_out = _rows_contiguous(d_out)
        batch, k, n = dense.shape
        d_jagged = _bmm_forward(seq_offsets, d_out, dense.transpose(1, 2), None, jagged.dtype,
                                ctx.max_seq_len)
        d_dense = torch.empty(dense.shape, dtype=dense.dtype, device=dense.device)
        d_bias = torch.empty(bias.shape, dtype=bias.dtype, device=bias.device)
        if batch:
            block_m, block_n, block_k, warps = _bmm_tiles(k, n)
            grid = (triton.cdiv(k, block_k), triton.cdiv(n, block_n), batch)
            _bmm_bwd_dense[grid](
                jagged, d_out, d_dense, d_bias, seq_offsets, k, n, jagged.stride(0),
                d_out.stride(0), d_dense.stride(0), d_dense.stride(1), d_bias.stride(0),
                PRECISION=fp32_dot_precision() if jagged.dtype == torch.float32 else "tf32",
                UPCAST=interpreting(), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                num_warps=warps,
            )
        return None, d_jagged, d_dense, d_bias, None


def jagged_dense_bmm_broadcast_add(
    seq_offsets: torch.Tensor,
    jagged: torch.Tensor,
    dense: torch.Tensor,
    bias: torch.Tensor,
    *,
    max_seq_len: int,
) -> torch.Tensor:
    _check_device(jagged, "jagged_dense_bmm_broadcast_add")
    _check_offsets(seq_offsets, jagged, "seq_offsets", "jagged_dense_bmm_broadcast_add")
    for name, tensor in (("jagged", jagged), ("dense", dense), ("bias", bias)):
        triton_dtype_ok(tensor, f"jagged_dense_bmm_broadcast_add: {name}")
    batch = seq_offsets.numel() - 1
    if (jagged.dim() != 2 or dense.dim() != 3 or dense.shape[0] != batch
            or dense.shape[1] != jagged.shape[1] or bias.shape != (batch, dense.shape[2])):
        raise ValueError(
            f"jagged_dense_bmm_broadcast_add: jagged {tuple(jagged.shape)}, dense "
            f"{tuple(dense.shape)}, bias {tuple(bias.shape)} must be [ΣM, K], [B, K, N], [B, N] "
            f"with B = {batch}"
        )
    if batch:
        longest = (seq_offsets[1:] - seq_offsets[:-1]).max()
        if jagged.device.type == "cuda":
            # No host sync: a row the grid would not cover stops the program instead.
            torch._assert_async(longest <= max_seq_len,
                                "jagged_dense_bmm_broadcast_add: a row exceeds max_seq_len")
        elif int(longest) > max_seq_len:
            raise ValueError(f"jagged_dense_bmm_broadcast_add: a row has {int(longest)} elements > "
                             f"max_seq_len {max_seq_len}")
    return _JaggedDenseBmm.apply(seq_offsets, jagged, dense, bias, int(max_seq_len))
