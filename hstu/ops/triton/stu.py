"""The STU layer's input projection and output mix, fused, in Triton + cuBLAS.

stu_preprocess (spec: hstu/ops/stu.py):
  forward : Triton LayerNorm (keeps only the row mean and 1/std) -> one addmm (cuBLAS) for
            u|v|q|k -> Triton SiLU on the u columns. q, k, v are returned as strided views of
            the projection buffer (no copies); the attention kernels read them in place.
  backward: Triton SiLU' on u, the four column blocks gathered into one d(uvqk) buffer, two
            matmuls (d normed, d W), the bias sum, Triton LayerNorm backward.
  recompute_normed_x: the normalised x is not kept; the backward re-normalises x from the
            saved statistics (one Triton pass over x).
  recompute_uvqk: the pre-activation u is not kept; the backward recomputes it with a matmul
            over the u columns only. (Note: the attention keeps q, k, v, which are views of
            the same projection buffer, so in a full STU layer that buffer stays resident
            anyway and this flag saves no memory there; it does when u is used alone.)

stu_postprocess:
  forward : one Triton kernel per block of rows computes the group/layer norm of attn (float32,
            saving mean and 1/std per group), u * norm, the concat [u, attn, u * norm] and the
            dropout (a counter-based mask from a seed, so the backward can regenerate it), then
            one addmm (cuBLAS) with x as the residual.
  backward: d y = d out @ W_o^T (cuBLAS); one Triton kernel applies the dropout mask and splits
            d y into d u, d attn (through the norm's backward) and the norm's affine
            gradients; d W_o = y^T @ d out needs y: kept, or with recompute_y (the default)
            rebuilt by rerunning the forward kernel with the same seed.

The matmuls are cuBLAS (torch.mm): a Triton GEMM would not beat it on these shapes; what the
fusion saves is the elementwise passes and the intermediates PyTorch would keep.
Dropout streams differ from PyTorch's (spec: compare kernels with p = 0).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hstu.ops.stu import LayerSettings
from hstu.ops.triton._common import dropout_seed, interpreting, seed_arg, triton_dtype_ok
from hstu.ops.triton import attention as _attention
from hstu.ops.triton.layer_norm import (
    check_norm_inputs,
    layer_norm_backward,
    layer_norm_forward,
)

LOG2E = tl.constexpr(1.4426950408889634)


# ----------------------------------------------------------------------------- elementwise


@triton.jit
def _silu_rounded(u_pre):
    """SiLU in float32, rounded to the input's dtype: u as the separate SiLU pass stores it
    and as the output mix recomputes it from the pre-activation (the same bits either way)."""
    pre = u_pre.to(tl.float32)
    return (pre / (1.0 + tl.exp2(pre * -LOG2E))).to(u_pre.dtype)


@triton.jit
def _silu_grad(u_pre, grad):
    """grad * SiLU'(u_pre) in float32 (grad already rounded to its storage dtype)."""
    pre = u_pre.to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp2(pre * -LOG2E))
    return grad.to(tl.float32) * sig * (1.0 + pre * (1.0 - sig))


@triton.jit
def _silu_fwd(U, OUT, n_rows, n_cols, stride_u, stride_out, BLOCK_R: tl.constexpr,
              BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    rows64 = rows[:, None].to(tl.int64)
    u = tl.load(U + rows64 * stride_u + cols[None, :], mask=ok, other=0.0)
    tl.store(OUT + rows64 * stride_out + cols[None, :],
             _silu_rounded(u).to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _silu_bwd(U, DOUT, DU, n_rows, n_cols, stride_u, stride_dout, stride_du,
              BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    rows64 = rows[:, None].to(tl.int64)
    u = tl.load(U + rows64 * stride_u + cols[None, :], mask=ok, other=0.0)
    dout = tl.load(DOUT + rows64 * stride_dout + cols[None, :], mask=ok, other=0.0)
    du = _silu_grad(u, dout)
    tl.store(DU + rows64 * stride_du + cols[None, :], du.to(DU.dtype.element_ty), mask=ok)


def _elementwise_grid(n_rows, n_cols):
    block_c = min(256, max(16, triton.next_power_of_2(n_cols)))
    block_r = 64 if interpreting() else max(1, 4096 // block_c)
    return block_r, block_c, (triton.cdiv(n_rows, block_r), triton.cdiv(n_cols, block_c))


def _silu(u: torch.Tensor) -> torch.Tensor:
    out = torch.empty(u.shape, dtype=u.dtype, device=u.device)
    if u.numel():
        block_r, block_c, grid = _elementwise_grid(*u.shape)
        _silu_fwd[grid](u, out, u.shape[0], u.shape[1], u.stride(0), out.stride(0),
                        BLOCK_R=block_r, BLOCK_C=block_c)
    return out


def _silu_grad_into(u_pre: torch.Tensor, grad: torch.Tensor, out: torch.Tensor) -> None:
    """out <- grad * SiLU'(u_pre) (out may be a column slice of a bigger buffer)."""
    if u_pre.numel():
        block_r, block_c, grid = _elementwise_grid(*u_pre.shape)
        _silu_bwd[grid](u_pre, grad, out, u_pre.shape[0], u_pre.shape[1], u_pre.stride(0),
                        grad.stride(0), out.stride(0), BLOCK_R=block_r, BLOCK_C=block_c)


# ----------------------------------------------------------------------------- preprocess


class _StuPreprocess(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, uvqk_weight, uvqk_bias, eps, num_heads,
                attention_dim, hidden_dim, recompute_normed_x, recompute_uvqk):
        x = x if x.stride(-1) == 1 else x.contiguous()
        normed, mean, rstd = layer_norm_forward(x, norm_weight, norm_bias, eps)
        weight = uvqk_weight.to(x.dtype)
        uvqk = torch.addmm(uvqk_bias.to(x.dtype), normed, weight)
        u_width = num_heads * hidden_dim
        qk_width = num_heads * attention_dim
        u_pre = uvqk[:, :u_width]
        u = _silu(u_pre)
        length = x.shape[0]
        v = uvqk[:, u_width:2 * u_width].view(length, num_heads, hidden_dim)
        q = uvqk[:, 2 * u_width:2 * u_width + qk_width].view(length, num_heads, attention_dim)
        k = uvqk[:, 2 * u_width + qk_width:].view(length, num_heads, attention_dim)
        ctx.save_for_backward(
            x, norm_weight, norm_bias, uvqk_weight, uvqk_bias, mean, rstd,
            None if recompute_normed_x else normed,
            None if recompute_uvqk else u_pre,
        )
        ctx.config = (eps, num_heads, attention_dim, hidden_dim)
        return u, q, k, v

    @staticmethod
    def backward(ctx, du, dq, dk, dv):
        (x, norm_weight, norm_bias, uvqk_weight, uvqk_bias, mean, rstd, normed,
         u_pre) = ctx.saved_tensors
        eps, num_heads, attention_dim, hidden_dim = ctx.config
        weight = uvqk_weight.to(x.dtype)
        if normed is None:
            normed, _, _ = layer_norm_forward(x, norm_weight, norm_bias, eps)
        u_width = num_heads * hidden_dim
        qk_width = num_heads * attention_dim
        if u_pre is None:
            u_pre = torch.addmm(uvqk_bias[:u_width].to(x.dtype), normed, weight[:, :u_width])
        length = x.shape[0]
        # Copied together here; the fused layer (_StuLayer) has the attention write them in
        # place instead.
        d_uvqk = torch.empty((length, 2 * (u_width + qk_width)), dtype=x.dtype, device=x.device)
        blocks = (
            (d_uvqk[:, u_width:2 * u_width], dv),
            (d_uvqk[:, 2 * u_width:2 * u_width + qk_width], dq),
            (d_uvqk[:, 2 * u_width + qk_width:], dk),
        )
        for target, grad in blocks:
            if grad is None:
                target.zero_()
            else:
                target.copy_(grad.reshape(length, -1))
        if du is None:
            d_uvqk[:, :u_width].zero_()
        else:
            _silu_grad_into(u_pre, du if du.stride(-1) == 1 else du.contiguous(),
                            d_uvqk[:, :u_width])
        d_normed = d_uvqk @ weight.t()
        d_weight = (normed.t() @ d_uvqk).to(uvqk_weight.dtype)
        d_bias = d_uvqk.sum(0, dtype=torch.float32).to(uvqk_bias.dtype)
        dx, d_norm_weight, d_norm_bias = layer_norm_backward(d_normed, x, norm_weight,
                                                             norm_bias, mean, rstd)
        return (dx, d_norm_weight, d_norm_bias, d_weight, d_bias, None, None, None, None, None,
                None)


def _check_projection(x, norm_weight, norm_bias, uvqk_weight, uvqk_bias, num_heads,
                      attention_dim, hidden_dim, name):
    check_norm_inputs(x, norm_weight, norm_bias, name)
    width = 2 * num_heads * (hidden_dim + attention_dim)
    if uvqk_weight.shape != (x.shape[1], width):
        raise ValueError(
            f"{name}: uvqk_weight has shape {tuple(uvqk_weight.shape)}; expected "
            f"({x.shape[1]}, {width}) = (D, 2 * num_heads * (hidden_dim + attention_dim))"
        )
    if uvqk_bias.shape != (width,):
        raise ValueError(f"{name}: uvqk_bias has shape {tuple(uvqk_bias.shape)}; "
                         f"expected ({width},)")


def stu_preprocess(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    norm_eps: float,
    uvqk_weight: torch.Tensor,
    uvqk_bias: torch.Tensor,
    *,
    num_heads: int,
    attention_dim: int,
    hidden_dim: int,
    recompute_normed_x: bool = True,
    recompute_uvqk: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_projection(x, norm_weight, norm_bias, uvqk_weight, uvqk_bias, num_heads,
                      attention_dim, hidden_dim, "stu_preprocess")
    return _StuPreprocess.apply(x, norm_weight, norm_bias, uvqk_weight, uvqk_bias,
                                float(norm_eps), num_heads, attention_dim, hidden_dim,
                                recompute_normed_x, recompute_uvqk)


# ----------------------------------------------------------------------------- postprocess


@triton.jit
def _mix_fwd(ATTN, U, Y, W, B, MEAN, RSTD, n_rows, stride_attn, stride_u, stride_y, eps,
             dropout_ratio, SEED, GROUPS: tl.constexpr, GROUP_SIZE: tl.constexpr,
             BLOCK_G: tl.constexpr, BLOCK_E: tl.constexpr, PER_COLUMN_AFFINE: tl.constexpr,
             DROPOUT: tl.constexpr, WRITE_STATS: tl.constexpr, BLOCK_R: tl.constexpr,
             SILU_U: tl.constexpr):
    """y = dropout([u, attn, u * norm(attn)]) for BLOCK_R rows, attn seen as [GROUPS, GROUP_SIZE]
    per row (group norm: one group per head; layer norm: one group). SILU_U: U holds u's
    pre-activation, and u = SiLU(U) (rounded to U's dtype, as _silu_fwd stores it)."""
    width: tl.constexpr = GROUPS * GROUP_SIZE
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    groups = tl.arange(0, BLOCK_G)
    elems = tl.arange(0, BLOCK_E)
    cols = groups[None, :, None] * GROUP_SIZE + elems[None, None, :]  # [1, G, E]
    ok = ((rows < n_rows)[:, None, None] & (groups < GROUPS)[None, :, None]
          & (elems < GROUP_SIZE)[None, None, :])
    rows64 = rows[:, None, None].to(tl.int64)
    attn = tl.load(ATTN + rows64 * stride_attn + cols, mask=ok, other=0.0)
    u = tl.load(U + rows64 * stride_u + cols, mask=ok, other=0.0)
    if SILU_U:
        u = _silu_rounded(u)
    a = attn.to(tl.float32)
    mean = tl.sum(a, axis=2) / GROUP_SIZE  # [R, G]
    centered = tl.where(ok, a - mean[:, :, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=2) / GROUP_SIZE + eps)
    if PER_COLUMN_AFFINE:
        w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=ok, other=0.0).to(tl.float32)
    else:
        g_ok = (groups < GROUPS)[None, :, None]
        w = tl.load(W + groups[None, :, None], mask=g_ok, other=0.0).to(tl.float32)
        b = tl.load(B + groups[None, :, None], mask=g_ok, other=0.0).to(tl.float32)
    normed = (centered * rstd[:, :, None] * w + b).to(attn.dtype)
    un = (u.to(tl.float32) * normed.to(tl.float32)).to(Y.dtype.element_ty)
    parts_u = u.to(Y.dtype.element_ty)
    parts_a = attn.to(Y.dtype.element_ty)
    if DROPOUT:
        # One Philox draw per (row, column) gives the three parts' masks.
        keep_scale = 1.0 / (1.0 - dropout_ratio)
        r_u, r_a, r_un, _ = tl.rand4x(tl.load(SEED), rows64 * width + cols)
        parts_u = tl.where(r_u >= dropout_ratio, parts_u * keep_scale, 0.0)
        parts_a = tl.where(r_a >= dropout_ratio, parts_a * keep_scale, 0.0)
        un = tl.where(r_un >= dropout_ratio, un * keep_scale, 0.0)
    y_row = Y + rows64 * stride_y + cols
    tl.store(y_row, parts_u.to(Y.dtype.element_ty), mask=ok)
    tl.store(y_row + width, parts_a.to(Y.dtype.element_ty), mask=ok)
    tl.store(y_row + 2 * width, un.to(Y.dtype.element_ty), mask=ok)
    if WRITE_STATS:
        stat_ok = (rows < n_rows)[:, None] & (groups < GROUPS)[None, :]
        stat_at = rows[:, None] * GROUPS + groups[None, :]
        tl.store(MEAN + stat_at, mean, mask=stat_ok)
        tl.store(RSTD + stat_at, rstd, mask=stat_ok)


@triton.jit
def _mix_bwd(ATTN, U, DY, DATTN, DU, W, B, MEAN, RSTD, DW_PART, DB_PART, n_rows, stride_attn,
             stride_u, stride_dy, stride_dattn, stride_du, dropout_ratio, SEED,
             GROUPS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_G: tl.constexpr,
             BLOCK_E: tl.constexpr, PER_COLUMN_AFFINE: tl.constexpr, DROPOUT: tl.constexpr,
             BLOCK_R: tl.constexpr, SILU_U: tl.constexpr):
    """d attn and d u from d y (SILU_U: U is u's pre-activation, and DU gets the gradient
    of that, through SiLU, as _silu_bwd computes it from the rounded d u)."""
    width: tl.constexpr = GROUPS * GROUP_SIZE
    groups = tl.arange(0, BLOCK_G)
    elems = tl.arange(0, BLOCK_E)
    cols = groups[None, :, None] * GROUP_SIZE + elems[None, None, :]
    col_ok = (groups < GROUPS)[None, :, None] & (elems < GROUP_SIZE)[None, None, :]
    if PER_COLUMN_AFFINE:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
        dw = tl.zeros([1, BLOCK_G, BLOCK_E], dtype=tl.float32)
        db = tl.zeros([1, BLOCK_G, BLOCK_E], dtype=tl.float32)
    else:
        g_ok = (groups < GROUPS)[None, :, None]
        w = tl.load(W + groups[None, :, None], mask=g_ok, other=0.0).to(tl.float32)
        b = tl.load(B + groups[None, :, None], mask=g_ok, other=0.0).to(tl.float32)
        dw = tl.zeros([1, BLOCK_G, 1], dtype=tl.float32)
        db = tl.zeros([1, BLOCK_G, 1], dtype=tl.float32)
    for start in range(tl.program_id(0) * BLOCK_R, n_rows, tl.num_programs(0) * BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        ok = (rows < n_rows)[:, None, None] & col_ok
        rows64 = rows[:, None, None].to(tl.int64)
        attn = tl.load(ATTN + rows64 * stride_attn + cols, mask=ok, other=0.0)
        u_in = tl.load(U + rows64 * stride_u + cols, mask=ok, other=0.0)
        if SILU_U:
            u = _silu_rounded(u_in).to(tl.float32)
        else:
            u = u_in.to(tl.float32)
        dy_row = DY + rows64 * stride_dy + cols
        dy_u = tl.load(dy_row, mask=ok, other=0.0).to(tl.float32)
        dy_a = tl.load(dy_row + width, mask=ok, other=0.0).to(tl.float32)
        dy_un = tl.load(dy_row + 2 * width, mask=ok, other=0.0).to(tl.float32)
        if DROPOUT:
            keep_scale = 1.0 / (1.0 - dropout_ratio)
            r_u, r_a, r_un, _ = tl.rand4x(tl.load(SEED), rows64 * width + cols)
            dy_u = tl.where(r_u >= dropout_ratio, dy_u * keep_scale, 0.0)
            dy_a = tl.where(r_a >= dropout_ratio, dy_a * keep_scale, 0.0)
            dy_un = tl.where(r_un >= dropout_ratio, dy_un * keep_scale, 0.0)
        stat_ok = (rows < n_rows)[:, None] & (groups < GROUPS)[None, :]
        stat_at = rows[:, None] * GROUPS + groups[None, :]
        mean = tl.load(MEAN + stat_at, mask=stat_ok, other=0.0)
        rstd = tl.load(RSTD + stat_at, mask=stat_ok, other=0.0)
        xhat = tl.where(ok, (attn.to(tl.float32) - mean[:, :, None]) * rstd[:, :, None], 0.0)
        normed = (xhat * w + b).to(attn.dtype).to(tl.float32)
        du = dy_u + dy_un * normed
        dn = dy_un * u
        if PER_COLUMN_AFFINE:
            dw += tl.sum(dn * xhat, axis=0)[None, :, :]
            db += tl.sum(dn, axis=0)[None, :, :]
        else:
            dw += tl.sum(tl.sum(dn * xhat, axis=2), axis=0)[None, :, None]
            db += tl.sum(tl.sum(dn, axis=2), axis=0)[None, :, None]
        g = dn * w
        mean_g = tl.sum(g, axis=2) / GROUP_SIZE
        mean_gx = tl.sum(g * xhat, axis=2) / GROUP_SIZE
        da = rstd[:, :, None] * (g - mean_g[:, :, None] - xhat * mean_gx[:, :, None]) + dy_a
        tl.store(DATTN + rows64 * stride_dattn + cols, da.to(DATTN.dtype.element_ty), mask=ok)
        if SILU_U:
            du = _silu_grad(u_in, du.to(DU.dtype.element_ty))
        tl.store(DU + rows64 * stride_du + cols, du.to(DU.dtype.element_ty), mask=ok)
    pid = tl.program_id(0)
    if PER_COLUMN_AFFINE:
        tl.store(DW_PART + pid * width + cols, dw, mask=col_ok)
        tl.store(DB_PART + pid * width + cols, db, mask=col_ok)
    else:
        g_ok = (groups < GROUPS)[None, :, None]
        tl.store(DW_PART + pid * GROUPS + groups[None, :, None], dw, mask=g_ok)
        tl.store(DB_PART + pid * GROUPS + groups[None, :, None], db, mask=g_ok)


class _MixShape:
    def __init__(self, attn, num_heads, group_norm):
        self.rows, self.width = attn.shape
        self.groups = num_heads if group_norm else 1
        self.group_size = self.width // self.groups
        self.block_g = triton.next_power_of_2(self.groups)
        self.block_e = max(16, triton.next_power_of_2(self.group_size))
        per_block = self.block_g * self.block_e
        self.block_r = max(1, min(32, 4096 // per_block))
        if interpreting():
            self.block_r = max(self.block_r, 16)
        self.num_warps = 8 if per_block * self.block_r >= 8192 else 4
        self.constants = dict(GROUPS=self.groups, GROUP_SIZE=self.group_size,
                              BLOCK_G=self.block_g, BLOCK_E=self.block_e,
                              PER_COLUMN_AFFINE=not group_norm, BLOCK_R=self.block_r)


def _mix_forward(attn, u, norm_weight, norm_bias, eps, shape: _MixShape, dropout_ratio, seed,
                 out_dtype, mean=None, rstd=None, silu_u=False):
    """y [L, 3 * width]; fills mean/rstd [L, groups] when given (first pass). silu_u: u is
    the pre-activation (SiLU applied on the way in)."""
    y = torch.empty((shape.rows, 3 * shape.width), dtype=out_dtype, device=attn.device)
    if shape.rows == 0:
        return y
    write_stats = mean is not None
    grid = (triton.cdiv(shape.rows, shape.block_r),)
    _mix_fwd[grid](
        attn, u, y, norm_weight, norm_bias, mean if write_stats else y, rstd if write_stats else y,
        shape.rows, attn.stride(0), u.stride(0), y.stride(0), float(eps), float(dropout_ratio),
        seed_arg(seed, y), DROPOUT=dropout_ratio > 0, WRITE_STATS=write_stats,
        SILU_U=silu_u,
        **shape.constants, num_warps=shape.num_warps,
    )
    return y


def _mix_backward(attn, u, dy, dattn, du, norm_weight, norm_bias, mean, rstd, shape: _MixShape,
                  dropout_ratio, seed, silu_u=False):
    """Fills dattn and du (either may be a column slice of a wider tensor); returns the output
    norm's (d weight, d bias)."""
    if shape.rows == 0:
        return torch.zeros_like(norm_weight), torch.zeros_like(norm_bias)
    if interpreting():
        programs = min(4, triton.cdiv(shape.rows, shape.block_r))
    else:
        sms = torch.cuda.get_device_properties(attn.device).multi_processor_count
        programs = min(4 * sms, triton.cdiv(shape.rows, shape.block_r))
    affine = shape.width if shape.constants["PER_COLUMN_AFFINE"] else shape.groups
    dw_part = torch.empty((programs, affine), dtype=torch.float32, device=attn.device)
    db_part = torch.empty_like(dw_part)
    _mix_bwd[(programs,)](
        attn, u, dy, dattn, du, norm_weight, norm_bias, mean, rstd, dw_part, db_part,
        shape.rows, attn.stride(0), u.stride(0), dy.stride(0), dattn.stride(0),
        du.stride(0), float(dropout_ratio), seed_arg(seed, dattn), DROPOUT=dropout_ratio > 0,
        SILU_U=silu_u, **shape.constants, num_warps=shape.num_warps,
    )
    return dw_part.sum(0).to(norm_weight.dtype), db_part.sum(0).to(norm_bias.dtype)


class _StuPostprocess(torch.autograd.Function):
    @staticmethod
    def forward(ctx, attn, u, x, norm_weight, norm_bias, output_weight, eps, num_heads,
                dropout_ratio, group_norm, recompute_y):
        attn = attn if attn.stride(-1) == 1 else attn.contiguous()
        u = u if u.stride(-1) == 1 else u.contiguous()
        shape = _MixShape(attn, num_heads, group_norm)
        mean = torch.empty((shape.rows, shape.groups), dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        seed = dropout_seed(dropout_ratio, x.device)
        y = _mix_forward(attn, u, norm_weight, norm_bias, eps, shape, dropout_ratio, seed,
                         x.dtype, mean, rstd)
        out = torch.addmm(x, y, output_weight.to(x.dtype))
        ctx.save_for_backward(attn, u, norm_weight, norm_bias, output_weight, mean, rstd,
                              None if recompute_y else y)
        ctx.config = (eps, dropout_ratio, seed, shape, x.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        attn, u, norm_weight, norm_bias, output_weight, mean, rstd, y = ctx.saved_tensors
        eps, dropout_ratio, seed, shape, x_dtype = ctx.config
        dout = dout if dout.stride(-1) == 1 else dout.contiguous()
        weight = output_weight.to(x_dtype)
        if y is None:
            y = _mix_forward(attn, u, norm_weight, norm_bias, eps, shape, dropout_ratio, seed,
                             x_dtype)
        d_weight = (y.t() @ dout).to(output_weight.dtype)
        del y
        dy = dout @ weight.t()
        dattn = torch.empty_like(attn)
        du = torch.empty_like(u)
        d_norm_weight, d_norm_bias = _mix_backward(attn, u, dy, dattn, du, norm_weight,
                                                   norm_bias, mean, rstd, shape, dropout_ratio,
                                                   seed)
        return (dattn, du, dout, d_norm_weight, d_norm_bias, d_weight, None, None, None, None,
                None)


def _check_output_mix(width, x, num_heads, norm_weight, norm_bias, output_weight, group_norm,
                      dropout_ratio, name):
    if width % num_heads:
        raise ValueError(f"{name}: attn width {width} is not a multiple of num_heads {num_heads}")
    expected_norm = num_heads if group_norm else width
    if norm_weight.numel() != expected_norm or norm_bias.numel() != expected_norm:
        raise ValueError(
            f"{name}: output norm affine has {norm_weight.numel()}/{norm_bias.numel()} "
            f"values; expected {expected_norm} ({'one per head' if group_norm else 'H * d_v'})"
        )
    if output_weight.shape != (3 * width, x.shape[1]):
        raise ValueError(
            f"{name}: output_weight has shape {tuple(output_weight.shape)}; expected "
            f"({3 * width}, {x.shape[1]}) = (3 * H * d_v, D)"
        )
    if not 0.0 <= dropout_ratio < 1.0:
        raise ValueError(f"{name}: dropout_ratio must be in [0, 1); got {dropout_ratio}")
    if x.device.type != "cuda" and not interpreting():
        raise RuntimeError(f"{name} (TRITON) needs CUDA tensors, or TRITON_INTERPRET=1")


def stu_postprocess(
    attn: torch.Tensor,
    u: torch.Tensor,
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    norm_eps: float,
    output_weight: torch.Tensor,
    *,
    num_heads: int,
    dropout_ratio: float,
    training: bool,
    group_norm: bool,
    recompute_y: bool = True,
) -> torch.Tensor:
    for name, tensor in (("attn", attn), ("u", u), ("x", x)):
        triton_dtype_ok(tensor, f"stu_postprocess: {name}")
        if tensor.dim() != 2:
            raise ValueError(f"stu_postprocess: {name} must be 2-D; got {tuple(tensor.shape)}")
    width = attn.shape[1]
    if u.shape != attn.shape or x.shape[0] != attn.shape[0]:
        raise ValueError(
            f"stu_postprocess: attn {tuple(attn.shape)}, u {tuple(u.shape)} and x "
            f"{tuple(x.shape)} must share L, and u must match attn"
        )
    _check_output_mix(width, x, num_heads, norm_weight, norm_bias, output_weight, group_norm,
                      dropout_ratio, "stu_postprocess")
    return _StuPostprocess.apply(
        attn, u, x, norm_weight.reshape(-1), norm_bias.reshape(-1), output_weight,
        float(norm_eps), num_heads, float(dropout_ratio) if training else 0.0, group_norm,
        recompute_y,
    )


# ----------------------------------------------------------------------------- whole layer


class _StuLayer(torch.autograd.Function):
    """stu_preprocess -> hstu_mha -> stu_postprocess in one autograd node, so that the backward
    can lay out its work: the attention writes dq, dk, dv straight into the projection's
    gradient, the output mix writes d u there too (SiLU's derivative applied in the same pass;
    u itself is never stored), and the input norm's backward adds the residual's gradient.
    Against the three separate ops: per layer and token, one [H*d_v] SiLU pass forward, one
    SiLU-gradient pass and one residual add backward fewer, and no u kept for the backward."""

    @staticmethod
    def forward(ctx, x, input_norm_weight, input_norm_bias, uvqk_weight, uvqk_bias,
                output_norm_weight, output_norm_bias, output_weight, seq_offsets, num_targets,
                settings: LayerSettings):
        x = x if x.stride(-1) == 1 else x.contiguous()
        normed, mean, rstd = layer_norm_forward(x, input_norm_weight, input_norm_bias,
                                                settings.norm_eps)
        uvqk = torch.addmm(uvqk_bias.to(x.dtype), normed, uvqk_weight.to(x.dtype))
        u_pre, v, q, k = settings.split(uvqk)
        problem = _attention.attention_problem(
            q, k, v, seq_offsets, max_seq_len=settings.max_seq_len, num_targets=num_targets,
            contextual_seq_len=settings.contextual_seq_len, max_attn_len=settings.max_attn_len,
            alpha=settings.alpha, scaling_seqlen=settings.scaling_seqlen,
            sort_by_length=settings.sort_by_length)
        attn = _attention.attention_forward(problem, q, k, v).view(
            x.shape[0], settings.num_heads * settings.hidden_dim)
        shape = _MixShape(attn, settings.num_heads, settings.group_norm)
        mix_mean = torch.empty((shape.rows, shape.groups), dtype=torch.float32, device=x.device)
        mix_rstd = torch.empty_like(mix_mean)
        seed = dropout_seed(settings.dropout_ratio, x.device)
        y = _mix_forward(attn, u_pre, output_norm_weight, output_norm_bias, settings.norm_eps,
                         shape, settings.dropout_ratio, seed, x.dtype, mix_mean, mix_rstd,
                         silu_u=True)
        out = torch.addmm(x, y, output_weight.to(x.dtype))
        ctx.save_for_backward(
            x, input_norm_weight, input_norm_bias, uvqk_weight, uvqk_bias, output_norm_weight,
            output_norm_bias, output_weight, mean, rstd,
            None if settings.recompute_normed_x else normed, uvqk, attn, mix_mean, mix_rstd,
            None if settings.recompute_y else y,
        )
        # The row offsets, candidate counts and launch order, kept with the launch settings.
        ctx.problem, ctx.shape, ctx.seed, ctx.settings = problem, shape, seed, settings
        return out

    @staticmethod
    def backward(ctx, dout):
        (x, input_norm_weight, input_norm_bias, uvqk_weight, uvqk_bias, output_norm_weight,
         output_norm_bias, output_weight, mean, rstd, normed, uvqk, attn, mix_mean, mix_rstd,
         y) = ctx.saved_tensors
        settings, shape = ctx.settings, ctx.shape
        dout = dout if dout.stride(-1) == 1 else dout.contiguous()
        u_pre, v, q, k = settings.split(uvqk)
        if y is None:
            y = _mix_forward(attn, u_pre, output_norm_weight, output_norm_bias,
                             settings.norm_eps, shape, settings.dropout_ratio, ctx.seed,
                             x.dtype, silu_u=True)
        d_output_weight = (y.t() @ dout).to(output_weight.dtype)
        del y
        dy = dout @ output_weight.to(x.dtype).t()
        d_uvqk = torch.empty_like(uvqk)
        d_u_pre, d_v, d_q, d_k = settings.split(d_uvqk)
        d_attn = torch.empty_like(attn)
        d_output_norm_weight, d_output_norm_bias = _mix_backward(
            attn, u_pre, dy, d_attn, d_u_pre, output_norm_weight, output_norm_bias, mix_mean,
            mix_rstd, shape, settings.dropout_ratio, ctx.seed, silu_u=True)
        del dy
        _attention.attention_backward(ctx.problem, q, k, v, d_attn.view(v.shape),
                                      into=(d_q, d_k, d_v))
        del d_attn
        if normed is None:
            normed, _, _ = layer_norm_forward(x, input_norm_weight, input_norm_bias,
                                              settings.norm_eps)
        d_uvqk_weight = (normed.t() @ d_uvqk).to(uvqk_weight.dtype)
        d_uvqk_bias = d_uvqk.sum(0, dtype=torch.float32).to(uvqk_bias.dtype)
        d_normed = d_uvqk @ uvqk_weight.to(x.dtype).t()
        del d_uvqk
        dx, d_input_norm_weight, d_input_norm_bias = layer_norm_backward(
            d_normed, x, input_norm_weight, input_norm_bias, mean, rstd, residual_grad=dout)
        return (dx, d_input_norm_weight, d_input_norm_bias, d_uvqk_weight, d_uvqk_bias,
                d_output_norm_weight, d_output_norm_bias, d_output_weight, None, None, None)


def stu_layer(
    x: torch.Tensor,
    seq_offsets: torch.Tensor,
    num_targets: torch.Tensor | None,
    input_norm_weight: torch.Tensor,
    input_norm_bias: torch.Tensor,
    uvqk_weight: torch.Tensor,
    uvqk_bias: torch.Tensor,
    output_norm_weight: torch.Tensor,
    output_norm_bias: torch.Tensor,
    output_weight: torch.Tensor,
    settings: LayerSettings,
) -> torch.Tensor:
    """The fused TRITON STU layer (spec: hstu.ops.stu.stu_layer)."""
    _check_projection(x, input_norm_weight, input_norm_bias, uvqk_weight, uvqk_bias,
                      settings.num_heads, settings.attention_dim, settings.hidden_dim,
                      "stu_layer")
    _check_output_mix(settings.num_heads * settings.hidden_dim, x, settings.num_heads,
                      output_norm_weight, output_norm_bias, output_weight, settings.group_norm,
                      settings.dropout_ratio, "stu_layer")
    return _StuLayer.apply(x, input_norm_weight, input_norm_bias, uvqk_weight, uvqk_bias,
                           output_norm_weight.reshape(-1), output_norm_bias.reshape(-1),
                           output_weight, seq_offsets, num_targets, settings)
