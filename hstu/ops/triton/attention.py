"""Jagged HSTU attention in Triton: forward, and a backward whose dQ does not serialize.

Math (docs/dlrm_hstu_reference.md section 2.7; the mask is
hstu.ops.pytorch.attention.attention_mask):

    out_i = sum_j SiLU(alpha <q_i, k_j>) / S * M_ij * v_j

There is no softmax, so a query block needs no running maximum and no rescaling: every key
tile simply adds p @ v into a float32 accumulator.

How the mask turns into work. Per row of length L with t candidates ("targets") and c
contextual tokens, let hist = L - t (contextual + history tokens). Candidate keys (position
>= hist) are seen by no query except themselves, so the key loops stop at hist and each
candidate's own term is added separately as a row-wise dot product: a candidate never loads
another candidate's K/V tile. The remaining tiles are split into three loops: one over the
contextual keys (only with a window), one over tiles that the mask keeps whole (no mask
arithmetic: the bulk of a long row), and one over tiles that cross the diagonal, the history
end or the window edge (mask computed from the position ids exactly as the reference does).
Contextual query blocks see every non-candidate key and scan the whole history.

Backward. One kernel per key block accumulates dK and dV over the query blocks that can see
it. dQ comes either from a second kernel per query block that loops over key blocks like the
forward ("separate": deterministic, recomputes q k^T and dO v^T), or from float32 atomic adds
issued by the dK/dV kernel ("atomic": no recomputation, summation order not deterministic).
Neither uses a lock. `DQ_MODE` picks one; docs/kernels.md has the measurements behind the
default.

Scheduling: the grid is 1-D and holds one program per (row, head, block) that contains part
of the row, in the order of a launch table built on the device once per step
(`_program_table`): a grid of max_seq_len / block programs for every row would, in a
long-tailed batch (median ~1,000 tokens, longest ~8,000), be mostly programs that start only to
exit. The blocks of one (row, head) are consecutive programs, so the programs running at the
same time read the same K/V (backward: Q/dO) tiles and find them in L2 (`LAUNCH_ORDER`). Within
a (row, head), query blocks are launched last block first (they do the most work under a
causal mask) and key blocks first block first, so that row's longest programs start earliest.
With `sort_by_length` (the STU config field of that name) the rows themselves are launched
longest first: a row's work grows with its length squared, so in a long-tailed batch a few
rows carry most of it, and launched last they would leave the kernel finishing on a few SMs.
The order is sorted on the device once per seq_offsets tensor (the layers of a step share it)
and kept for the backward.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import triton
import triton.language as tl

from hstu.ops.triton._common import (
    Tile,
    choose_tile,
    dot,
    fp32_dot_precision,
    interpreting,
    seq_len_bucket,
    tanh_approx,
    triton_dtype_ok,
)

LOG2E = tl.constexpr(1.4426950408889634)

# Launch configs. Each ran on an H200 (torch 2.11, CUDA 13, Triton 3.6) in
# benchmarks/gpu_ab_attention.py within the error bound of hstu.ops.triton.testing (bf16, plain
# and contextual + window) and in the GPU tests' tuning. Register spills in a Triton 3.6 sm_90
# build: none, except 48 bytes of stack in the dQ kernel's 128x64 tiles (plain bf16), which are
# still the fastest. Fastest first at B=32, N=8192; docs/kernels.md has the timings.
FORWARD_TILES = [
    Tile(128, 64, 8, 3),
    Tile(128, 64, 8, 4),
    Tile(64, 64, 4, 3),
]
BACKWARD_DKDV_TILES = [
    Tile(32, 128, 8, 3),
    Tile(32, 128, 8, 4),
]
BACKWARD_DQ_TILES = [
    Tile(128, 64, 8, 3),
    Tile(128, 64, 8, 4),
    Tile(128, 64, 8, 2),
    Tile(128, 32, 8, 3),
]
# Under the interpreter the cost is per program per loop step: big tiles, few programs.
INTERPRET_TILE = Tile(32, 32, 4, 1)

# Where the forward adds the candidates' own terms: before the key loops (fewer live registers)
# or after them. Same numbers either way; docs/kernels.md has the timing of both.
FORWARD_OWN_TERM_FIRST = True

DQ_MODES = ("atomic", "separate")
DQ_MODE = "separate"

# Launch order of the (row, head, block) programs: "blocks_first" (the blocks of one row and
# head are consecutive, so programs running together share K/V tiles in L2) or "heads_first"
# (consecutive programs belong to different rows and heads; the order before session 4).
# docs/kernels.md, step 11, has the measurement.
LAUNCH_ORDERS = ("blocks_first", "heads_first")
LAUNCH_ORDER = "blocks_first"



@contextlib.contextmanager
def dq_mode(mode: str) -> Iterator[None]:
    """Run the backward with dQ from "atomic" adds or a "separate" kernel."""
    global DQ_MODE
    if mode not in DQ_MODES:
        raise ValueError(f"dq mode {mode!r}; expected one of {DQ_MODES}")
    previous, DQ_MODE = DQ_MODE, mode
    try:
        yield
    finally:
        DQ_MODE = previous


# ----------------------------------------------------------------------------- jit helpers


@triton.jit
def _this_program(programs, H):
    """(row * H + head, row, head, block index) of this program, from the launch table
    (_program_table): one (row * H + head, block) int32 pair per program, row * H + head = -1
    for the few programs past the last real one (the caller returns on it)."""
    pid = tl.program_id(0)
    code = tl.load(programs + 2 * pid)
    block = tl.load(programs + 2 * pid + 1)
    return code, code // H, code % H, block


@triton.jit
def _id_bounds(length, num_targets, b, contextual_seq_len, HAS_TARGETS: tl.constexpr,
               HAS_CONTEXT: tl.constexpr):
    """For row b of `length` tokens: hist = length - targets, the id shift cs and the first
    target id mx, as in the reference: id(p) = min(max(p - cs, 0), mx). (The cached kernel,
    hstu/ops/triton/cached_attention.py, uses it for its whole rows too.)"""
    if HAS_TARGETS:
        hist = length - tl.load(num_targets + b).to(tl.int32)
    else:
        hist = length
    if HAS_CONTEXT:
        cs = contextual_seq_len - 1
    else:
        cs = 0
    return hist, cs, hist - cs


@triton.jit
def _row_info(seq_offsets, num_targets, b, contextual_seq_len, HAS_TARGETS: tl.constexpr,
              HAS_CONTEXT: tl.constexpr):
    """Row start (int64), length L, and _id_bounds' hist, cs and mx."""
    start = tl.load(seq_offsets + b)
    length = (tl.load(seq_offsets + b + 1) - start).to(tl.int32)
    hist, cs, mx = _id_bounds(length, num_targets, b, contextual_seq_len, HAS_TARGETS,
                              HAS_CONTEXT)
    return start, length, hist, cs, mx


@triton.jit
def _valid(qi, kj, hist, mx, cs, max_attn_len, HAS_CONTEXT: tl.constexpr,
           HAS_TARGETS: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """The reference mask for query positions qi and key positions kj (broadcast against each
    other), restricted to keys before the candidates (their own term is added separately)."""
    if not HAS_CONTEXT and not HAS_WINDOW:
        # Plain causal (with or without candidates): the reference mask reduces to kj <= qi for
        # keys before hist, and keys at or past hist never count because every masked loop
        # loads their K and V rows as zeros (SiLU(0) = 0 and a zero V row adds nothing).
        return kj <= qi
    if HAS_CONTEXT:
        id_q = tl.maximum(qi - cs, 0)
        id_k = tl.maximum(kj - cs, 0)
    else:
        id_q = qi
        id_k = kj
    if HAS_TARGETS:
        id_q = tl.minimum(id_q, mx)
        id_k = tl.minimum(id_k, mx)
    dist = id_q - id_k
    ok = (dist > 0) | (qi == kj)
    if HAS_WINDOW:
        ok = ok & (dist <= max_attn_len)
    if HAS_CONTEXT:
        ok = ok | ((id_q == 0) & (id_k < mx))
    return ok & (kj < hist)


@triton.jit
def _silu(qk, alpha, FAST: tl.constexpr):
    """SiLU(x) for x = alpha qk. The 1/S scale is applied to the accumulator at the end, not
    here (one multiply per tile instead of one per score). 16-bit inputs: with y = x / 2,
    SiLU(x) = y (1 + tanh(y)) = one multiply, one MUFU.TANH and one FMA per score."""
    if FAST:
        y = qk * (0.5 * alpha)
        return y * tanh_approx(y) + y
    else:
        x = qk * alpha
        return x / (1.0 + tl.exp2(x * -LOG2E))


@triton.jit
def _silu_and_grad2(qk, alpha, FAST: tl.constexpr):
    """(SiLU(x), 2 SiLU'(x)) for x = alpha qk, without the 1/S scale. With y = x / 2 and
    t = tanh(y): SiLU(x) = y (1 + t) and 2 SiLU'(x) = (1 + t) (1 + y (1 - t)). The factor 2
    and alpha / S are applied once to the accumulated gradients."""
    y = qk * (0.5 * alpha)
    if FAST:
        t = tanh_approx(y)
        a = 1.0 + t
        b = 1.0 - t
    else:
        # a = 1 + tanh(y) = 2 sigmoid(x), computed without cancellation for negative x.
        a = 2.0 / (1.0 + tl.exp2(y * (-2.0 * LOG2E)))
        b = 2.0 - a
    return y * a, a * (1.0 + y * b)


@triton.jit
def _load_rows(base, rows, stride, limit, D: tl.constexpr, BLOCK_D: tl.constexpr,
               CHECK_ROWS: tl.constexpr):
    """Rows `rows` of a [*, D] slab (zeros for rows >= limit when CHECK_ROWS)."""
    if CHECK_ROWS:
        return _load_rows_where(base, rows, stride, rows < limit, D, BLOCK_D)
    cols = tl.arange(0, BLOCK_D)
    ptrs = base + rows[:, None] * stride + cols[None, :]
    if BLOCK_D == D:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=cols[None, :] < D, other=0.0)


@triton.jit
def _load_rows_where(base, rows, stride, row_ok, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows `rows` of a [*, D] slab, zeros where row_ok is false."""
    cols = tl.arange(0, BLOCK_D)
    ptrs = base + rows[:, None] * stride + cols[None, :]
    if BLOCK_D == D:
        return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    return tl.load(ptrs, mask=row_ok[:, None] & (cols[None, :] < D), other=0.0)


@triton.jit
def _store_rows(base, rows, stride, limit, value, D: tl.constexpr, BLOCK_D: tl.constexpr):
    cols = tl.arange(0, BLOCK_D)
    ptrs = base + rows[:, None] * stride + cols[None, :]
    if BLOCK_D == D:
        tl.store(ptrs, value, mask=rows[:, None] < limit)
    else:
        tl.store(ptrs, value, mask=(rows[:, None] < limit) & (cols[None, :] < D))


@triton.jit
def _query_block_ranges(start_m, length, hist, mx, cs, contextual_seq_len, max_attn_len,
                        HAS_CONTEXT: tl.constexpr, HAS_TARGETS: tl.constexpr,
                        HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    """Key ranges for query block [start_m, start_m + BLOCK_M), as three loops:
    masked [0, ctx_end), unmasked [lo, full_end), masked [full_end, hi)."""
    hi = tl.minimum(start_m + BLOCK_M, hist)
    ctx_end = hi * 0
    lo = hi * 0
    full_end = hi * 0
    if HAS_CONTEXT:
        # A block holding contextual queries: they see every non-candidate key.
        whole_row = start_m < contextual_seq_len
    else:
        whole_row = False
    if whole_row:
        ctx_end = hist
        lo = hist
        full_end = hist
        hi = hist
    else:
        if HAS_WINDOW:
            # Keys within max_attn_len ids of the block's first query (ids only grow).
            if HAS_CONTEXT:
                first_id = tl.maximum(start_m - cs, 0)
            else:
                first_id = start_m
            if HAS_TARGETS:
                first_id = tl.minimum(first_id, mx)
            lo = tl.maximum(first_id - max_attn_len + cs, 0)
            if HAS_CONTEXT:
                # ...plus the contextual keys (id 0), which lie before that window.
                ctx_keys = tl.minimum(contextual_seq_len, lo)
                ctx_end = tl.cdiv(ctx_keys, BLOCK_N) * BLOCK_N
                lo = tl.maximum(lo, ctx_end)
            full_end = lo
        else:
            # Every key tile wholly before the block and before the candidates is unmasked,
            # provided contextual keys (id 0) sit below every history id, i.e. hist >= c.
            full_end = (tl.minimum(start_m, hist) // BLOCK_N) * BLOCK_N
            if HAS_CONTEXT:
                full_end = tl.where(hist >= contextual_seq_len, full_end, 0)
    return ctx_end, lo, full_end, hi


@triton.jit
def _key_block_ranges(start_n, length, hist, mx, cs, contextual_seq_len, max_attn_len,
                      HAS_CONTEXT: tl.constexpr, HAS_WINDOW: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query ranges that see key block [start_n, start_n + BLOCK_N) (for start_n < hist), as
    three loops: masked [0, ctx_end), masked [lo, mask_end), unmasked [mask_end, hi)."""
    hi = length
    if HAS_WINDOW:
        last_key = tl.minimum(start_n + BLOCK_N, hist) - 1
        if HAS_CONTEXT:
            last_id = tl.maximum(last_key - cs, 0)
        else:
            last_id = last_key
        # History queries up to max_attn_len ids later; candidates (id mx) only if in reach.
        hi = tl.where(mx <= last_id + max_attn_len, length,
                      tl.minimum(length, last_id + max_attn_len + cs + 1))
    lo = start_n
    ctx_end = start_n * 0
    if HAS_CONTEXT:
        # Contextual queries before the block see it too.
        ctx_end = tl.cdiv(tl.minimum(contextual_seq_len, start_n), BLOCK_M) * BLOCK_M
        lo = tl.maximum(lo, ctx_end)
        boundary = tl.maximum(start_n + BLOCK_N, contextual_seq_len)
    else:
        boundary = start_n + BLOCK_N
    if HAS_WINDOW:
        mask_end = hi
    else:
        # Query tiles after the whole key block (and past the contextual tokens) see all of it
        # when the block holds no candidate key and contextual ids sit below history ids.
        mask_end = lo + tl.cdiv(tl.maximum(boundary - lo, 0), BLOCK_M) * BLOCK_M
        whole = start_n + BLOCK_N <= hist
        if HAS_CONTEXT:
            whole = whole & (hist >= contextual_seq_len)
        mask_end = tl.where(whole, tl.minimum(mask_end, hi), hi)
    return ctx_end, lo, mask_end, hi


# ----------------------------------------------------------------------------- forward


@triton.jit
def _fwd_tiles(acc, q, K_row, V_row, stride_km, stride_vm, offs_m, lo, hi, hist, mx, cs,
               max_attn_len, alpha, HAS_CONTEXT: tl.constexpr, HAS_TARGETS: tl.constexpr,
               HAS_WINDOW: tl.constexpr, FAST: tl.constexpr, PRECISION: tl.constexpr,
               UPCAST: tl.constexpr, D_QK: tl.constexpr, D_V: tl.constexpr,
               BLOCK_D_QK: tl.constexpr, BLOCK_D_V: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tiles [lo, hi) with the mask applied (edge tiles; rows >= hist load as zeros)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K_row, offs_n, stride_km, hist, D_QK, BLOCK_D_QK, True)
        qk = dot(q, tl.trans(k), None, PRECISION, UPCAST)
        p = _silu(qk, alpha, FAST)
        ok = _valid(offs_m[:, None], offs_n[None, :], hist, mx, cs, max_attn_len,
                    HAS_CONTEXT, HAS_TARGETS, HAS_WINDOW)
        p = tl.where(ok, p, 0.0)
        v = _load_rows(V_row, offs_n, stride_vm, hist, D_V, BLOCK_D_V, True)
        acc = dot(p.to(v.dtype), v, acc, PRECISION, UPCAST)
    return acc


@triton.jit
def _fwd_full_tiles(acc, q, K_row, V_row, stride_km, stride_vm, lo, hi, alpha,
                    FAST: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                    D_QK: tl.constexpr, D_V: tl.constexpr, BLOCK_D_QK: tl.constexpr,
                    BLOCK_D_V: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tiles [lo, hi) that the mask keeps whole (the bulk of a long row).

    q k^T of the next tile is issued before the SiLU of this one: the wgmma runs on the
    tensor cores while the SFU and FMA units compute the scores (FlashAttention-3's
    intra-warpgroup overlap). Measured on the H200: 2-3.5% faster than the plain loop before
    the masked loop got cheaper, about 0.6% after (docs/kernels.md, steps 6-9)."""
    if hi > lo:
        k = _load_rows(K_row, lo + tl.arange(0, BLOCK_N), stride_km, hi, D_QK, BLOCK_D_QK, False)
        qk = dot(q, tl.trans(k), None, PRECISION, UPCAST)
        for start_n in range(lo, hi - BLOCK_N, BLOCK_N):
            offs_next = start_n + BLOCK_N + tl.arange(0, BLOCK_N)
            k_next = _load_rows(K_row, offs_next, stride_km, hi, D_QK, BLOCK_D_QK, False)
            qk_next = dot(q, tl.trans(k_next), None, PRECISION, UPCAST)
            p = _silu(qk, alpha, FAST)
            v = _load_rows(V_row, start_n + tl.arange(0, BLOCK_N), stride_vm, hi, D_V,
                           BLOCK_D_V, False)
            acc = dot(p.to(v.dtype), v, acc, PRECISION, UPCAST)
            qk = qk_next
        p = _silu(qk, alpha, FAST)
        v = _load_rows(V_row, hi - BLOCK_N + tl.arange(0, BLOCK_N), stride_vm, hi, D_V,
                       BLOCK_D_V, False)
        acc = dot(p.to(v.dtype), v, acc, PRECISION, UPCAST)
    return acc


@triton.jit
def _fwd_own_term(acc, q, K_row, V_row, stride_km, stride_vm, offs_m, length, hist, alpha,
                  FAST: tl.constexpr, D_QK: tl.constexpr, D_V: tl.constexpr,
                  BLOCK_D_QK: tl.constexpr, BLOCK_D_V: tl.constexpr):
    """acc + each candidate's own term: a row-wise dot that reads no other candidate's K/V."""
    own = (offs_m >= hist) & (offs_m < length)
    k_own = _load_rows_where(K_row, offs_m, stride_km, own, D_QK, BLOCK_D_QK)
    qk_own = tl.sum(q.to(tl.float32) * k_own.to(tl.float32), axis=1)
    p_own = _silu(qk_own, alpha, FAST)
    v_own = _load_rows_where(V_row, offs_m, stride_vm, own, D_V, BLOCK_D_V)
    p_own = tl.where(own, p_own, 0.0).to(v_own.dtype).to(tl.float32)
    return acc + p_own[:, None] * v_own.to(tl.float32)


@triton.jit
def _attn_fwd(Q, K, V, O, seq_offsets, num_targets,
              stride_qm, stride_qh, stride_km, stride_kh, stride_vm, stride_vh,
              stride_om, stride_oh,
              H, alpha, scale, contextual_seq_len, max_attn_len,
              HAS_TARGETS: tl.constexpr, HAS_CONTEXT: tl.constexpr, HAS_WINDOW: tl.constexpr,
              FAST: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
              D_QK: tl.constexpr, D_V: tl.constexpr, BLOCK_D_QK: tl.constexpr,
              BLOCK_D_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              OWN_TERM_FIRST: tl.constexpr, programs):
    code, b, h, pid_m = _this_program(programs, H)
    if code < 0:  # past the last real program
        return
    start, length, hist, cs, mx = _row_info(seq_offsets, num_targets, b, contextual_seq_len,
                                            HAS_TARGETS, HAS_CONTEXT)
    start_m = pid_m * BLOCK_M
    if start_m >= length:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    Q_row = Q + start * stride_qm + h * stride_qh
    K_row = K + start * stride_km + h * stride_kh
    V_row = V + start * stride_vm + h * stride_vh
    q = _load_rows(Q_row, offs_m, stride_qm, length, D_QK, BLOCK_D_QK, True)
    acc = tl.zeros([BLOCK_M, BLOCK_D_V], dtype=tl.float32)
    if HAS_TARGETS and OWN_TERM_FIRST:
        if start_m + BLOCK_M > hist:
            acc = _fwd_own_term(acc, q, K_row, V_row, stride_km, stride_vm, offs_m, length,
                                hist, alpha, FAST, D_QK, D_V, BLOCK_D_QK, BLOCK_D_V)
    ctx_end, lo, full_end, hi = _query_block_ranges(
        start_m, length, hist, mx, cs, contextual_seq_len, max_attn_len,
        HAS_CONTEXT, HAS_TARGETS, HAS_WINDOW, BLOCK_M, BLOCK_N)
    if HAS_CONTEXT or HAS_WINDOW:
        acc = _fwd_tiles(acc, q, K_row, V_row, stride_km, stride_vm, offs_m, 0, ctx_end,
                         hist, mx, cs, max_attn_len, alpha, HAS_CONTEXT, HAS_TARGETS,
                         HAS_WINDOW, FAST, PRECISION, UPCAST, D_QK, D_V, BLOCK_D_QK, BLOCK_D_V,
                         BLOCK_N)
    acc = _fwd_full_tiles(acc, q, K_row, V_row, stride_km, stride_vm, lo, full_end, alpha,
                          FAST, PRECISION, UPCAST, D_QK, D_V, BLOCK_D_QK, BLOCK_D_V, BLOCK_N)
    acc = _fwd_tiles(acc, q, K_row, V_row, stride_km, stride_vm, offs_m, full_end, hi,
                     hist, mx, cs, max_attn_len, alpha, HAS_CONTEXT, HAS_TARGETS, HAS_WINDOW,
                     FAST, PRECISION, UPCAST, D_QK, D_V, BLOCK_D_QK, BLOCK_D_V, BLOCK_N)
    if HAS_TARGETS and not OWN_TERM_FIRST:
        if start_m + BLOCK_M > hist:
            acc = _fwd_own_term(acc, q, K_row, V_row, stride_km, stride_vm, offs_m, length,
                                hist, alpha, FAST, D_QK, D_V, BLOCK_D_QK, BLOCK_D_V)
    O_row = O + start * stride_om + h * stride_oh
    _store_rows(O_row, offs_m, stride_om, length, (acc * scale).to(O.dtype.element_ty), D_V,
                BLOCK_D_V)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _bwd_dkdv_tiles(dk, dv, k, v, Q_row, DO_row, DQ_row, stride_qm, stride_dom, stride_dqm,
                    offs_n, lo, hi, length, hist, mx, cs, max_attn_len, alpha, scale,
                    MASKED: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                    HAS_CONTEXT: tl.constexpr, HAS_TARGETS: tl.constexpr,
                    HAS_WINDOW: tl.constexpr, FAST: tl.constexpr, PRECISION: tl.constexpr,
                    UPCAST: tl.constexpr, D_QK: tl.constexpr, D_V: tl.constexpr,
                    BLOCK_D_QK: tl.constexpr, BLOCK_D_V: tl.constexpr, BLOCK_M: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        # Queries past the row end load as zeros, so they add exactly nothing.
        q = _load_rows(Q_row, offs_m, stride_qm, length, D_QK, BLOCK_D_QK, True)
        do = _load_rows(DO_row, offs_m, stride_dom, length, D_V, BLOCK_D_V, True)
        qk_t = dot(k, tl.trans(q), None, PRECISION, UPCAST)  # [BLOCK_N, BLOCK_M]
        # Issued before the SiLU, so that the tensor cores run it while the SiLU is computed.
        dp_t = dot(v, tl.trans(do), None, PRECISION, UPCAST)
        p_t, grad2_t = _silu_and_grad2(qk_t, alpha, FAST)
        if MASKED:
            ok = _valid(offs_m[None, :], offs_n[:, None], hist, mx, cs, max_attn_len,
                        HAS_CONTEXT, HAS_TARGETS, HAS_WINDOW)
            p_t = tl.where(ok, p_t, 0.0)
        dv = dot(p_t.to(do.dtype), do, dv, PRECISION, UPCAST)
        # 2 d(score) without the constant alpha / (2 S), applied once at the end (keeps 16-bit
        # values away from the subnormal range).
        ds_t = dp_t * grad2_t
        if MASKED:
            ds_t = tl.where(ok, ds_t, 0.0)
        ds_t = ds_t.to(q.dtype)
        dk = dot(ds_t, q, dk, PRECISION, UPCAST)
        if ATOMIC_DQ:
            dq = dot(tl.trans(ds_t), k, None, PRECISION, UPCAST) * (0.5 * alpha * scale)
            cols = tl.arange(0, BLOCK_D_QK)
            tl.atomic_add(DQ_row + offs_m[:, None] * stride_dqm + cols[None, :], dq,
                          mask=(offs_m[:, None] < length) & (cols[None, :] < D_QK),
                          sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, GRAD_V, DQ, seq_offsets, num_targets,
                   stride_qm, stride_qh, stride_km, stride_kh, stride_vm, stride_vh,
                   stride_dom, stride_doh, stride_dkm, stride_dkh, stride_dvm, stride_dvh,
                   stride_dqm, stride_dqh,
                   H, alpha, scale, contextual_seq_len, max_attn_len,
                   ATOMIC_DQ: tl.constexpr, HAS_TARGETS: tl.constexpr,
                   HAS_CONTEXT: tl.constexpr, HAS_WINDOW: tl.constexpr, FAST: tl.constexpr,
                   PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                   D_QK: tl.constexpr, D_V: tl.constexpr, BLOCK_D_QK: tl.constexpr,
                   BLOCK_D_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   programs):
    code, b, h, pid_n = _this_program(programs, H)
    if code < 0:  # past the last real program
        return
    # The loops accumulate SiLU (no 1/S) into dv and 2 SiLU' (no alpha / 2S) into dk and dq.
    dkq_factor = 0.5 * alpha * scale
    start, length, hist, cs, mx = _row_info(seq_offsets, num_targets, b, contextual_seq_len,
                                            HAS_TARGETS, HAS_CONTEXT)
    start_n = pid_n * BLOCK_N
    if start_n >= length:
        return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    Q_row = Q + start * stride_qm + h * stride_qh
    K_row = K + start * stride_km + h * stride_kh
    V_row = V + start * stride_vm + h * stride_vh
    DO_row = DO + start * stride_dom + h * stride_doh
    DQ_row = DQ + start * stride_dqm + h * stride_dqh
    dk = tl.zeros([BLOCK_N, BLOCK_D_QK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D_V], dtype=tl.float32)
    if HAS_TARGETS:
        if start_n + BLOCK_N > hist:
            # Candidate keys: only the candidate itself attends to them. Done before the
            # loops, while dk and dv hold nothing yet (register pressure).
            own = (offs_n >= hist) & (offs_n < length)
            q_own = _load_rows_where(Q_row, offs_n, stride_qm, own, D_QK, BLOCK_D_QK)
            do_own = _load_rows_where(DO_row, offs_n, stride_dom, own, D_V, BLOCK_D_V)
            k_own = _load_rows_where(K_row, offs_n, stride_km, own, D_QK, BLOCK_D_QK)
            v_own = _load_rows_where(V_row, offs_n, stride_vm, own, D_V, BLOCK_D_V)
            qk_own = tl.sum(q_own.to(tl.float32) * k_own.to(tl.float32), axis=1)
            p_own, grad2_own = _silu_and_grad2(qk_own, alpha, FAST)
            p_own = tl.where(own, p_own, 0.0).to(do_own.dtype).to(tl.float32)
            dv = p_own[:, None] * do_own.to(tl.float32)
            dp_own = tl.sum(do_own.to(tl.float32) * v_own.to(tl.float32), axis=1)
            ds_own = tl.where(own, dp_own * grad2_own, 0.0)
            dk = ds_own[:, None] * q_own.to(tl.float32)
            if ATOMIC_DQ:
                cols = tl.arange(0, BLOCK_D_QK)
                dq_own = ds_own[:, None] * k_own.to(tl.float32) * dkq_factor
                tl.atomic_add(DQ_row + offs_n[:, None] * stride_dqm + cols[None, :], dq_own,
                              mask=own[:, None] & (cols[None, :] < D_QK), sem="relaxed")
    if start_n < hist:
        # Candidate keys (>= hist) load as zeros here: the loops never touch them.
        k = _load_rows(K_row, offs_n, stride_km, hist, D_QK, BLOCK_D_QK, True)
        v = _load_rows(V_row, offs_n, stride_vm, hist, D_V, BLOCK_D_V, True)
        ctx_end, lo, mask_end, hi = _key_block_ranges(
            start_n, length, hist, mx, cs, contextual_seq_len, max_attn_len,
            HAS_CONTEXT, HAS_WINDOW, BLOCK_M, BLOCK_N)
        if HAS_CONTEXT:
            dk, dv = _bwd_dkdv_tiles(
                dk, dv, k, v, Q_row, DO_row, DQ_row, stride_qm, stride_dom, stride_dqm,
                offs_n, 0, ctx_end, length, hist, mx, cs, max_attn_len, alpha, scale, True,
                ATOMIC_DQ, HAS_CONTEXT, HAS_TARGETS, HAS_WINDOW, FAST, PRECISION, UPCAST,
                D_QK, D_V, BLOCK_D_QK, BLOCK_D_V, BLOCK_M)
        dk, dv = _bwd_dkdv_tiles(
            dk, dv, k, v, Q_row, DO_row, DQ_row, stride_qm, stride_dom, stride_dqm,
            offs_n, lo, mask_end, length, hist, mx, cs, max_attn_len, alpha, scale, True,
            ATOMIC_DQ, HAS_CONTEXT, HAS_TARGETS, HAS_WINDOW, FAST, PRECISION, UPCAST,
            D_QK, D_V, BLOCK_D_QK, BLOCK_D_V, BLOCK_M)
        dk, dv = _bwd_dkdv_tiles(
            dk, dv, k, v, Q_row, DO_row, DQ_row, stride_qm, stride_dom, stride_dqm,
            offs_n, mask_end, hi, length, hist, mx, cs, max_attn_len, alpha, scale, False,
            ATOMIC_DQ, HAS_CONTEXT, HAS_TARGETS, HAS_WINDOW, FAST, PRECISION, UPCAST,
            D_QK, D_V, BLOCK_D_QK, BLOCK_D_V, BLOCK_M)
    DK_row = DK + start * stride_dkm + h * stride_dkh
    DV_row = GRAD_V + start * stride_dvm + h * stride_dvh
    _store_rows(DK_row, offs_n, stride_dkm, length, (dk * dkq_factor).to(DK.dtype.element_ty),
                D_QK, BLOCK_D_QK)
    _store_rows(DV_row, offs_n, stride_dvm, length, (dv * scale).to(GRAD_V.dtype.element_ty),
                D_V, BLOCK_D_V)


@triton.jit
def _bwd_dq_tiles(dq, q, do, K_row, V_row, stride_km, stride_vm, offs_m, lo, hi, length, hist,
                  mx, cs, max_attn_len, alpha, scale, MASKED: tl.constexpr,
                  HAS_CONTEXT: tl.constexpr, HAS_TARGETS: tl.constexpr,
                  HAS_WINDOW: tl.constexpr, FAST: tl.constexpr, PRECISION: tl.constexpr,
                  UPCAST: tl.constexpr, D_QK: tl.constexpr, D_V: tl.constexpr,
                  BLOCK_D_QK: tl.constexpr, BLOCK_D_V: tl.constexpr, BLOCK_N: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K_row, offs_n, stride_km, hist, D_QK, BLOCK_D_QK, MASKED)
        v = _load_rows(V_row, offs_n, stride_vm, hist, D_V, BLOCK_D_V, MASKED)
        qk = dot(q, tl.trans(k), None, PRECISION, UPCAST)
        # Issued before the SiLU, so that the tensor cores run it while the SiLU is computed.
        dp = dot(do, tl.trans(v), None, PRECISION, UPCAST)
        _, grad2 = _silu_and_grad2(qk, alpha, FAST)
        ds = dp * grad2
        if MASKED:
            ok = _valid(offs_m[:, None], offs_n[None, :], hist, mx, cs, max_attn_len,
                        HAS_CONTEXT, HAS_TARGETS, HAS_WINDOW)
            ds = tl.where(ok, ds, 0.0)
        dq = dot(ds.to(k.dtype), k, dq, PRECISION, UPCAST)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, seq_offsets, num_targets,
                 stride_qm, stride_qh, stride_km, stride_kh, stride_vm, stride_vh,
                 stride_dom, stride_doh, stride_dqm, stride_dqh,
                 H, alpha, scale, contextual_seq_len, max_attn_len,
                 HAS_TARGETS: tl.constexpr, HAS_CONTEXT: tl.constexpr,
                 HAS_WINDOW: tl.constexpr, FAST: tl.constexpr, PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr, D_QK: tl.constexpr, D_V: tl.constexpr,
                 BLOCK_D_QK: tl.constexpr, BLOCK_D_V: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, programs):
    code, b, h, pid_m = _this_program(programs, H)
    if code < 0:  # past the last real program
        return
    start, length, hist, cs, mx = _row_info(seq_offsets, num_targets, b, contextual_seq_len,
                                            HAS_TARGETS, HAS_CONTEXT)
    start_m = pid_m * BLOCK_M
    if start_m >= length:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    Q_row = Q + start * stride_qm + h * stride_qh
    K_row = K + start * stride_km + h * stride_kh
    V_row = V + start * stride_vm + h * stride_vh
    DO_row = DO + start * stride_dom + h * stride_doh
    q = _load_rows(Q_row, offs_m, stride_qm, length, D_QK, BLOCK_D_QK, True)
    do = _load_rows(DO_row, offs_m, stride_dom, length, D_V, BLOCK_D_V, True)
    dq = tl.zeros([BLOCK_M, BLOCK_D_QK], dtype=tl.float32)
    ctx_end, lo, full_end, hi = _query_block_ranges(
        start_m, length, hist, mx, cs, contextual_seq_len, max_attn_len,
        HAS_CONTEXT, HAS_TARGETS, HAS_WINDOW, BLOCK_M, BLOCK_N)
    if HAS_CONTEXT or HAS_WINDOW:
        dq = _bwd_dq_tiles(dq, q, do, K_row, V_row, stride_km, stride_vm, offs_m, 0, ctx_end,
                           length, hist, mx, cs, max_attn_len, alpha, scale, True,
                           HAS_CONTEXT, HAS_TARGETS, HAS_WINDOW, FAST, PRECISION, UPCAST,
                           D_QK, D_V, BLOCK_D_QK, BLOCK_D_V, BLOCK_N)
    dq = _bwd_dq_tiles(dq, q, do, K_row, V_row, stride_km, stride_vm, offs_m, lo, full_end,
                       length, hist, mx, cs, max_attn_len, alpha, scale, False,
                       HAS_CONTEXT, HAS_TARGETS, HAS_WINDOW, FAST, PRECISION, UPCAST,
                       D_QK, D_V, BLOCK_D_QK, BLOCK_D_V, BLOCK_N)
    dq = _bwd_dq_tiles(dq, q, do, K_row, V_row, stride_km, stride_vm, offs_m, full_end, hi,
                       length, hist, mx, cs, max_attn_len, alpha, scale, True,
                       HAS_CONTEXT, HAS_TARGETS, HAS_WINDOW, FAST, PRECISION, UPCAST,
                       D_QK, D_V, BLOCK_D_QK, BLOCK_D_V, BLOCK_N)
    if HAS_TARGETS:
        if start_m + BLOCK_M > hist:
            own = (offs_m >= hist) & (offs_m < length)
            k_own = _load_rows_where(K_row, offs_m, stride_km, own, D_QK, BLOCK_D_QK)
            v_own = _load_rows_where(V_row, offs_m, stride_vm, own, D_V, BLOCK_D_V)
            qk_own = tl.sum(q.to(tl.float32) * k_own.to(tl.float32), axis=1)
            _, grad2_own = _silu_and_grad2(qk_own, alpha, FAST)
            dp_own = tl.sum(do.to(tl.float32) * v_own.to(tl.float32), axis=1)
            ds_own = tl.where(own, dp_own * grad2_own, 0.0)
            dq += ds_own[:, None] * k_own.to(tl.float32)
    DQ_row = DQ + start * stride_dqm + h * stride_dqh
    _store_rows(DQ_row, offs_m, stride_dqm, length,
                (dq * (0.5 * alpha * scale)).to(DQ.dtype.element_ty),
                D_QK, BLOCK_D_QK)


# ----------------------------------------------------------------------------- host side


def kernel_constants(q, v, num_targets, contextual_seq_len: int, max_attn_len: int) -> dict:
    """The compile-time switches and sizes the attention kernels share (this module's and the
    cached one's): which mask terms exist, the score path for the dtype, the head sizes."""
    d_qk, d_v = q.shape[2], v.shape[2]
    return dict(
        HAS_TARGETS=num_targets is not None,
        HAS_CONTEXT=contextual_seq_len > 0,
        HAS_WINDOW=max_attn_len > 0,
        FAST=q.dtype != torch.float32 and not interpreting(),
        PRECISION=fp32_dot_precision() if q.dtype == torch.float32 else "tf32",
        UPCAST=interpreting(),
        D_QK=d_qk,
        D_V=d_v,
        BLOCK_D_QK=max(16, triton.next_power_of_2(d_qk)),
        BLOCK_D_V=max(16, triton.next_power_of_2(d_v)),
    )


class _Problem:
    """Everything about one call that the kernels and the tuning key need. row_order: the
    rows in launch order (int64 [B]), or None for the batch's own order."""

    def __init__(self, q, k, v, seq_offsets, num_targets, max_seq_len, contextual_seq_len,
                 max_attn_len, alpha, scale, row_order=None):
        self.total, self.heads, self.dqk = q.shape
        self.dv = v.shape[2]
        self.batch = seq_offsets.numel() - 1
        self.seq_offsets = seq_offsets
        self.num_targets = num_targets
        self.max_seq_len = max_seq_len
        self.contextual_seq_len = contextual_seq_len
        self.max_attn_len = max_attn_len
        self.alpha = alpha
        self.scale = scale
        self.dtype = q.dtype
        self.row_order = row_order
        self.constants = kernel_constants(q, v, num_targets, contextual_seq_len, max_attn_len)

    def key(self) -> tuple:
        flags = tuple(self.constants[name] for name in ("HAS_TARGETS", "HAS_CONTEXT", "HAS_WINDOW"))
        return (str(self.dtype), self.dqk, self.dv, flags, seq_len_bucket(self.max_seq_len))

    def scalars(self) -> tuple:
        return (self.heads, self.alpha, self.scale, self.contextual_seq_len, self.max_attn_len)

    def launch(self, kernel, tile: Tile, block_rows: int, *args, last_first: bool,
               **kwargs) -> None:
        """`kernel`(*args, the scalars, the constants, **kwargs) with `tile`, one program per
        (row, head, block of `block_rows` positions) that holds any of the row, in the order
        of the launch table (_program_table). 1-D: the first grid dimension takes 2^31 - 1
        programs, the others stop at 65535."""
        table = _program_tables(
            self.seq_offsets, (None if self.row_order is None else id(self.row_order),
                               block_rows, self.heads, self.total, last_first, LAUNCH_ORDER),
            lambda offsets: _program_table(offsets, self.row_order, block_rows, self.heads,
                                           self.total, last_first))
        kernel[(table.shape[0],)](
            *args, *self.scalars(), **self.constants, **kwargs,
            BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, programs=table,
            num_warps=tile.num_warps, num_stages=tile.num_stages,
        )

    def targets_arg(self) -> torch.Tensor:
        # Any int tensor will do when HAS_TARGETS is off: the kernel never reads it.
        return self.num_targets if self.num_targets is not None else self.seq_offsets


class _PerOffsets:
    """The results of `compute(seq_offsets)` for the last seq_offsets tensor seen, one per
    extra key: the layers of a step share one seq_offsets tensor, so per-step work on it
    (sorting the rows, checking their lengths, the launch tables) runs once, not per layer.
    Holding the tensor keeps
    its address from being reused; its version counter catches in-place writes. Tensors made
    under torch.inference_mode have no version counter: for them nothing is kept. A write
    the version counter does not see (a CUDA graph replay refilling a static offsets buffer)
    would leave a stale launch table that skips blocks: such callers must pass a new
    seq_offsets tensor, or bump its version, whenever its contents change."""

    def __init__(self) -> None:
        self._tensor: torch.Tensor | None = None
        self._version = -1
        self._results: dict = {}

    def __call__(self, seq_offsets: torch.Tensor, extra, compute):
        if seq_offsets.is_inference():
            return compute(seq_offsets)
        if self._tensor is not seq_offsets or self._version != seq_offsets._version:
            self._tensor, self._version, self._results = seq_offsets, seq_offsets._version, {}
        if extra not in self._results:
            self._results[extra] = compute(seq_offsets)
        return self._results[extra]


_row_orders = _PerOffsets()
_length_checks = _PerOffsets()
_program_tables = _PerOffsets()


def longest_first(seq_offsets: torch.Tensor) -> torch.Tensor | None:
    """The rows longest first (int64 [B]; None for fewer than two rows)."""
    if seq_offsets.numel() <= 2:
        return None
    return _row_orders(seq_offsets, None, _sort_longest_first)


def _sort_longest_first(seq_offsets: torch.Tensor) -> torch.Tensor:
    lengths = seq_offsets[1:] - seq_offsets[:-1]
    # Stable, so that equal lengths keep their order and the launch order is reproducible.
    return torch.sort(lengths, descending=True, stable=True).indices


def _program_table(seq_offsets: torch.Tensor, row_order: torch.Tensor | None, block_rows: int,
                   heads: int, total: int, last_first: bool) -> torch.Tensor:
    """int32 [programs, 2]: (row * H + head, block index) of each program in launch order,
    computed on the device (no host sync). Only blocks that hold part of a row get a program:
    a grid of max_seq_len / block_rows blocks for every row would, in a long-tailed batch
    (median row ~1,000 tokens, the longest ~8,000), be mostly programs that exit at once.

    The program count must be known on the host, so the table is sized for the most a batch
    of `total` tokens in B rows can need, sum ceil(L_b / R) <= total // R + B per head, and
    the unused tail is marked -1. Order: rows as in row_order (or the batch's); with
    "blocks_first" the blocks of one (row, head) are consecutive (programs running together
    share K/V tiles in L2), with "heads_first" consecutive programs are different (row,
    head) pairs. last_first: a row's last block first (the query blocks that do the most
    work under a causal mask)."""
    if LAUNCH_ORDER not in LAUNCH_ORDERS:
        raise ValueError(f"launch order {LAUNCH_ORDER!r}; expected one of {LAUNCH_ORDERS}")
    batch = seq_offsets.numel() - 1
    device = seq_offsets.device
    rows = row_order if row_order is not None else torch.arange(batch, device=device)
    lengths = (seq_offsets[1:] - seq_offsets[:-1])[rows]
    blocks = (lengths + block_rows - 1) // block_rows
    per_row = blocks * heads
    ends = torch.cumsum(per_row, 0)
    program = torch.arange(heads * (total // block_rows + batch), device=device)
    slot = torch.searchsorted(ends, program, right=True)
    real = slot < batch
    slot = slot.clamp(max=batch - 1)
    within = program - (ends[slot] - per_row[slot])
    count = blocks[slot].clamp(min=1)
    block = within % count
    if last_first:
        block = count - 1 - block
    code = torch.where(real, rows[slot] * heads + within // count, -1)
    if LAUNCH_ORDER == "heads_first":
        # Block index major (descending when last_first), then (row, head); unused last.
        key = block if not last_first else count - 1 - block
        order = torch.argsort(torch.where(real, key, torch.iinfo(key.dtype).max),
                              stable=True)
        code, block = code[order], block[order]
    return torch.stack([code, block], dim=1).to(torch.int32).contiguous()


def _strides(*tensors: torch.Tensor) -> list[int]:
    out = []
    for tensor in tensors:
        out += [tensor.stride(0), tensor.stride(1)]
    return out


def attention_forward(problem: _Problem, q, k, v) -> torch.Tensor:
    out = torch.empty((problem.total, problem.heads, problem.dv), dtype=v.dtype, device=v.device)
    if problem.total == 0 or problem.batch == 0:
        return out

    def launch(tile: Tile) -> None:
        problem.launch(_attn_fwd, tile, tile.block_m, q, k, v, out, problem.seq_offsets,
                       problem.targets_arg(), *_strides(q, k, v, out), last_first=True,
                       OWN_TERM_FIRST=FORWARD_OWN_TERM_FIRST)

    tile = choose_tile("attn_fwd", problem.key(), FORWARD_TILES, INTERPRET_TILE, launch)
    launch(tile)
    return out


def attention_backward(problem: _Problem, q, k, v, grad_out, into=None):
    """(dq, dk, dv). into: three tensors shaped like q, k, v to write them to (the fused STU
    layer passes column blocks of its projection's gradient, hstu/ops/triton/stu.py)."""
    if into is None:
        into = (torch.empty(q.shape, dtype=q.dtype, device=q.device),
                torch.empty(k.shape, dtype=k.dtype, device=k.device),
                torch.empty(v.shape, dtype=v.dtype, device=v.device))
    dq, dk, dv = into
    if problem.total == 0 or problem.batch == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    atomic = DQ_MODE == "atomic"
    dq_acc = torch.zeros(dq.shape, dtype=torch.float32, device=dq.device) if atomic else dq

    def launch_dkdv(tile: Tile) -> None:
        if atomic:
            dq_acc.zero_()
        problem.launch(_attn_bwd_dkdv, tile, tile.block_n, q, k, v, grad_out, dk, dv, dq_acc,
                       problem.seq_offsets, problem.targets_arg(),
                       *_strides(q, k, v, grad_out, dk, dv, dq_acc), last_first=False,
                       ATOMIC_DQ=atomic)

    def launch_dq(tile: Tile) -> None:
        problem.launch(_attn_bwd_dq, tile, tile.block_m, q, k, v, grad_out, dq,
                       problem.seq_offsets, problem.targets_arg(), *_strides(q, k, v, grad_out, dq),
                       last_first=True)

    name = "attn_bwd_dkdv_atomic" if atomic else "attn_bwd_dkdv"
    tile = choose_tile(name, problem.key(), BACKWARD_DKDV_TILES, INTERPRET_TILE, launch_dkdv)
    launch_dkdv(tile)
    if atomic:
        dq.copy_(dq_acc)
    else:
        tile = choose_tile("attn_bwd_dq", problem.key(), BACKWARD_DQ_TILES, INTERPRET_TILE,
                           launch_dq)
        launch_dq(tile)
    return dq, dk, dv


def _last_dim_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


class HstuAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, problem: _Problem):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        out = attention_forward(problem, q, k, v)
        ctx.save_for_backward(q, k, v)
        # The row offsets, candidate counts and launch order, kept with the launch settings.
        ctx.problem = problem
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        dq, dk, dv = attention_backward(ctx.problem, q, k, v, _last_dim_contiguous(grad_out))
        return dq, dk, dv, None


def _check_inputs(q, k, v, seq_offsets, num_targets, max_seq_len, contextual_seq_len,
                  max_attn_len):
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if tensor.dim() != 3:
            raise ValueError(f"hstu_mha: {name} must be [L, H, d]; got {tuple(tensor.shape)}")
        triton_dtype_ok(tensor, f"hstu_mha: {name}")
    if k.shape != q.shape:
        raise ValueError(f"hstu_mha: k {tuple(k.shape)} must have q's shape {tuple(q.shape)}")
    if v.shape[:2] != q.shape[:2]:
        raise ValueError(f"hstu_mha: v {tuple(v.shape)} must be [L, H, d_v] with q's L, H")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"hstu_mha: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if seq_offsets.dim() != 1 or seq_offsets.numel() == 0:
        raise ValueError(f"hstu_mha: seq_offsets must be [B+1]; got {tuple(seq_offsets.shape)}")
    if seq_offsets.dtype != torch.int64:
        raise TypeError(f"hstu_mha: seq_offsets must be int64; got {seq_offsets.dtype}")
    batch = seq_offsets.numel() - 1
    if num_targets is not None:
        if num_targets.shape != (batch,):
            raise ValueError(
                f"hstu_mha: num_targets must be [B] = [{batch}]; got {tuple(num_targets.shape)}"
            )
        if num_targets.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"hstu_mha: num_targets must be int32/int64; got {num_targets.dtype}")
    for name, tensor in (("k", k), ("v", v), ("seq_offsets", seq_offsets),
                         ("num_targets", num_targets)):
        if tensor is not None and tensor.device != q.device:
            raise ValueError(f"hstu_mha: {name} is on {tensor.device}, q on {q.device}")
    if q.device.type != "cuda" and not interpreting():
        raise RuntimeError(
            "hstu_mha (TRITON) needs CUDA tensors, or TRITON_INTERPRET=1 to run on the CPU"
        )
    if max_seq_len <= 0:
        raise ValueError(f"hstu_mha: max_seq_len must be > 0; got {max_seq_len}")
    if contextual_seq_len < 0 or max_attn_len < 0:
        raise ValueError(
            f"hstu_mha: contextual_seq_len ({contextual_seq_len}) and max_attn_len "
            f"({max_attn_len}) must be >= 0"
        )
    if batch > 0:
        if seq_offsets.device.type == "cuda":
            # No host sync: a row longer than max_seq_len (whose tail the grid would not
            # cover) stops the program with a device-side assert instead of being cut. Once
            # per seq_offsets tensor and max_seq_len: the layers of a step share both.
            def check(offsets):
                longest = (offsets[1:] - offsets[:-1]).max()
                torch._assert_async(longest <= max_seq_len, "hstu_mha: a row exceeds max_seq_len")
                return True

            _length_checks(seq_offsets, max_seq_len, check)
            return
        longest = (seq_offsets[1:] - seq_offsets[:-1]).max()
        if int(longest) > max_seq_len:
            raise ValueError(
                f"hstu_mha: a row has {int(longest)} tokens > max_seq_len {max_seq_len}")
        if int(seq_offsets[-1]) != q.shape[0]:
            raise ValueError(
                f"hstu_mha: seq_offsets[-1] = {int(seq_offsets[-1])} but q has {q.shape[0]} rows"
            )


def attention_problem(q, k, v, seq_offsets, *, max_seq_len, num_targets, contextual_seq_len,
                      max_attn_len, alpha, scaling_seqlen, sort_by_length) -> _Problem:
    """hstu_mha's checks and launch settings (alpha, the 1/S scale, the row order): what
    hstu_mha's autograd function runs with, and what callers that run the forward and
    backward themselves (the fused STU layer) pass to `attention_forward(problem, q, k, v)`
    and `attention_backward(...)`."""
    _check_inputs(q, k, v, seq_offsets, num_targets, max_seq_len, contextual_seq_len,
                  max_attn_len)
    if alpha is None:
        alpha = q.shape[-1] ** -0.5
    divisor = scaling_seqlen if scaling_seqlen is not None else max_seq_len
    row_order = longest_first(seq_offsets) if sort_by_length else None
    return _Problem(q, k, v, seq_offsets, num_targets, int(max_seq_len), int(contextual_seq_len),
                    int(max_attn_len), float(alpha), 1.0 / float(divisor), row_order)


def hstu_mha(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    *,
    max_seq_len: int,
    num_targets: torch.Tensor | None = None,
    contextual_seq_len: int = 0,
    max_attn_len: int = 0,
    alpha: float | None = None,
    scaling_seqlen: int | None = None,
    sort_by_length: bool = False,
) -> torch.Tensor:
    """Triton version of hstu.ops.attention.hstu_mha (same arguments, minus `kernel`).

    q, k may be strided views (the last dimension must be contiguous, else it is copied).
    Returns a new contiguous [L, H, d_v] tensor in v's dtype. Differentiable in q, k, v.
    sort_by_length: launch the longest rows' programs first (same numbers, bit for bit).
    """
    problem = attention_problem(
        q, k, v, seq_offsets, max_seq_len=max_seq_len, num_targets=num_targets,
        contextual_seq_len=contextual_seq_len, max_attn_len=max_attn_len, alpha=alpha,
        scaling_seqlen=scaling_seqlen, sort_by_length=sort_by_length)
    return HstuAttentionFunction.apply(q, k, v, problem)
