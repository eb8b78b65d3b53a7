"""LayerNorm and SwishLayerNorm in Triton, float32 inside (hstu/ops/layer_norm.py is the spec).

One program owns a block of rows at a time and walks the rows with a grid stride, so the
backward's weight and bias gradients are summed in registers over many rows and written once
per program ([programs, D] partial sums, added up by torch).

The kernels are also the first stage of the fused STU input (hstu/ops/triton/stu.py), which
needs the row statistics (mean, 1/std) to re-normalise x in its backward instead of keeping
the normalised copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hstu.ops.triton._common import interpreting, triton_dtype_ok

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp2(x * -LOG2E))


@triton.jit
def _ln_fwd(X, W, B, Y, MEAN, RSTD, n_rows, stride_x, stride_y, eps, D: tl.constexpr,
            BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, SWISH: tl.constexpr):
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    for start in range(tl.program_id(0) * BLOCK_R, n_rows, tl.num_programs(0) * BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        ok = (rows < n_rows)[:, None] & col_ok[None, :]
        x = tl.load(X + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=ok,
                    other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / D
        centered = tl.where(ok, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / D + eps)
        y = centered * rstd[:, None] * w[None, :] + b[None, :]
        if SWISH:
            y = x * _sigmoid(y)
        tl.store(Y + rows[:, None].to(tl.int64) * stride_y + cols[None, :],
                 y.to(Y.dtype.element_ty), mask=ok)
        tl.store(MEAN + rows, mean, mask=rows < n_rows)
        tl.store(RSTD + rows, rstd, mask=rows < n_rows)


@triton.jit
def _ln_bwd(X, W, B, DY, DX, MEAN, RSTD, DW_PART, DB_PART, RES, n_rows, stride_x, stride_dy,
            stride_dx, stride_res, D: tl.constexpr, BLOCK_D: tl.constexpr,
            BLOCK_R: tl.constexpr, SWISH: tl.constexpr, ADD_RES: tl.constexpr):
    """dy is the gradient of the LayerNorm output (of x * sigmoid(LN(x)) when SWISH). ADD_RES:
    dx += RES, the gradient x also gets from elsewhere (a residual connection), added to the
    rounded dx as autograd's separate add would."""
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    db = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(tl.program_id(0) * BLOCK_R, n_rows, tl.num_programs(0) * BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        ok = (rows < n_rows)[:, None] & col_ok[None, :]
        x = tl.load(X + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=ok,
                    other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None].to(tl.int64) * stride_dy + cols[None, :], mask=ok,
                     other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=rows < n_rows, other=0.0)
        rstd = tl.load(RSTD + rows, mask=rows < n_rows, other=0.0)
        xhat = tl.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
        if SWISH:
            # out = x * s(y), y = LN(x): the direct term, then dy becomes d(out)/dy.
            s = _sigmoid(xhat * w[None, :] + b[None, :])
            dx_direct = dy * s
            dy = dy * x * s * (1.0 - s)
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
        g = dy * w[None, :]
        dx = rstd[:, None] * (g - (tl.sum(g, axis=1) / D)[:, None]
                              - xhat * (tl.sum(g * xhat, axis=1) / D)[:, None])
        if SWISH:
            dx += dx_direct
        if ADD_RES:
            res = tl.load(RES + rows[:, None].to(tl.int64) * stride_res + cols[None, :],
                          mask=ok, other=0.0).to(tl.float32)
            dx = dx.to(DX.dtype.element_ty).to(tl.float32) + res
        tl.store(DX + rows[:, None].to(tl.int64) * stride_dx + cols[None, :],
                 dx.to(DX.dtype.element_ty), mask=ok)
    tl.store(DW_PART + tl.program_id(0) * D + cols, dw, mask=col_ok)
    tl.store(DB_PART + tl.program_id(0) * D + cols, db, mask=col_ok)


def _launch_shape(n_rows: int, dim: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_R, programs): about 4096 values per block; a few programs per SM."""
    block_d = max(16, triton.next_power_of_2(dim))
    block_r = max(1, min(64, 4096 // block_d))
    if interpreting():
        block_r = max(block_r, 16)
        programs = min(4, triton.cdiv(max(n_rows, 1), block_r))
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        programs = min(8 * sms, triton.cdiv(max(n_rows, 1), block_r))
    return block_d, block_r, max(programs, 1)


def _warps(block_d: int, block_r: int) -> int:
    return 8 if block_d * block_r >= 8192 else 4


def layer_norm_forward(x, weight, bias, eps, swish=False, out_dtype=None):
    """(y, mean, rstd): y = LN(x) (or x * sigmoid(LN(x))) in out_dtype (default x.dtype)."""
    n_rows, dim = x.shape
    y = torch.empty((n_rows, dim), dtype=out_dtype or x.dtype, device=x.device)
    mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return y, mean, rstd
    block_d, block_r, programs = _launch_shape(n_rows, dim, x.device)
    _ln_fwd[(programs,)](x, weight, bias, y, mean, rstd, n_rows, x.stride(0), y.stride(0),
                         float(eps), D=dim, BLOCK_D=block_d, BLOCK_R=block_r, SWISH=swish,
                         num_warps=_warps(block_d, block_r))
    return y, mean, rstd


def layer_norm_backward(dy, x, weight, bias, mean, rstd, swish=False, residual_grad=None):
    """(dx, dweight, dbias) for layer_norm_forward; weight grads in the weights' dtype.
    residual_grad [N, D]: a gradient x also receives from elsewhere, added into dx (one pass
    instead of autograd's separate add)."""
    n_rows, dim = x.shape
    dx = torch.empty_like(x)
    if n_rows == 0:
        return dx, torch.zeros_like(weight), torch.zeros_like(bias)
    if residual_grad is not None and (residual_grad.shape != x.shape
                                      or residual_grad.stride(-1) != 1):
        raise ValueError(f"layer_norm_backward: residual_grad {tuple(residual_grad.shape)} must "
                         f"be x's shape {tuple(x.shape)} with contiguous rows")
    block_d, block_r, programs = _launch_shape(n_rows, dim, x.device)
    dw_part = torch.empty((programs, dim), dtype=torch.float32, device=x.device)
    db_part = torch.empty((programs, dim), dtype=torch.float32, device=x.device)
    res = residual_grad if residual_grad is not None else dy
    _ln_bwd[(programs,)](x, weight, bias, dy, dx, mean, rstd, dw_part, db_part, res, n_rows,
                         x.stride(0), dy.stride(0), dx.stride(0), res.stride(0), D=dim,
                         BLOCK_D=block_d, BLOCK_R=block_r, SWISH=swish,
                         ADD_RES=residual_grad is not None, num_warps=_warps(block_d, block_r))
    return dx, dw_part.sum(0).to(weight.dtype), db_part.sum(0).to(bias.dtype)


def _rows_last_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def check_norm_inputs(x, weight, bias, name):
    triton_dtype_ok(x, f"{name}: x")
    if x.dim() != 2:
        raise ValueError(f"{name}: x must be [N, D]; got {tuple(x.shape)}")
    if weight.shape != (x.shape[1],) or bias.shape != (x.shape[1],):
        raise ValueError(
            f"{name}: weight {tuple(weight.shape)} and bias {tuple(bias.shape)} must be "
            f"[D] = [{x.shape[1]}]"
        )
    if x.device.type != "cuda" and not interpreting():
        raise RuntimeError(f"{name} (TRITON) needs CUDA tensors, or TRITON_INTERPRET=1")


class _LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, swish):
        x = _rows_last_contiguous(x)
        y, mean, rstd = layer_norm_forward(x, weight, bias, eps, swish)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.swish = swish
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dw, db = layer_norm_backward(_rows_last_contiguous(dy), x, weight, bias, mean,
                                         rstd, ctx.swish)
        return dx, dw, db, None, None


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
               eps: float = 1e-5) -> torch.Tensor:
    check_norm_inputs(x, weight, bias, "layer_norm")
    return _LayerNormFunction.apply(x, weight, bias, float(eps), False)


def swish_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     eps: float = 1e-5) -> torch.Tensor:
    check_norm_inputs(x, weight, bias, "swish_layer_norm")
    return _LayerNormFunction.apply(x, weight, bias, float(eps), True)
