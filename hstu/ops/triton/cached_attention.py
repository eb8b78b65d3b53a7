"""Cached HSTU attention in Triton (forward only): delta queries against cached + delta keys.

Same math and mask as hstu.ops.pytorch.cached_attention (which is tested against the full
hstu_mha): row b is [P_b cached rows; Q_b delta rows]; a program takes one block of delta
queries of one (row, head) and sums SiLU(alpha q k^T) / S * M over two key ranges, the cached
keys [0, P_b) and the delta keys [P_b, P_b + Q_b), with the reference mask computed from the
positions in the whole row (ids: contextual tokens 0, history k+1, every candidate the first
target id).

Work per program: every cached key tile (a candidate sees the whole history; under a window
the tiles before the window are skipped), and the delta key tiles up to the block's last query
(all of them when the block holds contextual queries, which see the whole history). Without a
window, the whole cached tiles of history are summed without computing the mask (it is all
true there): the serving case, where the cost is reading the cached keys once per query
block. Paged rows (CacheRows, one buffer per user) are read in 16-byte vectors when their
CacheRows say they are aligned. When the grid has fewer programs than the GPU has
multiprocessors (one user: 4 heads x 2 query blocks), the cached tiles are dealt out over
several programs per block (`split_plan`) and their float32 parts added after.

Verified: against the PYTORCH version under the Triton CPU interpreter (tiny shapes, every
mask case, keys whole and split); the code compiled for sm_90 on a CPU
(tests/ops/triton/test_cached_attention_codegen.py: vector loads). On one H100 (session 15,
this kernel): the GPU tests at full size (`pytest tests/ops/triton/test_cached_attention.py
-m gpu`) and the cached path's (tests/export/test_cached.py), and the timing alone
(benchmarks/cached_attention_bench.py, docs/BENCHMARKS.md "Serving": 0.15 / 0.23 / 0.56 ms a
layer at 1 / 32 / 128 users of 4K cached tokens, 1.8-3.4x faster than before the split keys,
the vector loads and the batch in the tuning key).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from hstu.ops.cached_attention import ROW_ALIGNMENT, CacheRows
from hstu.ops.triton._common import (
    Tile,
    choose_tile,
    dot,
    interpreting,
    seq_len_bucket,
    triton_dtype_ok,
)

# The training kernel's SiLU, row bounds, row loads and switches, so that cached and full
# attention score with the same formula and mask.
from hstu.ops.triton.attention import (
    _id_bounds,
    _last_dim_contiguous,
    _load_rows,
    _silu,
    kernel_constants,
)

# The launch configs tuned among (by timing, on first use per key). On one H100 (session 14,
# before the vector loads and split keys) 128 x 64 with 8 warps was fastest at 32 and 128
# users and 64 x 64 with 3 stages at one user; 32 x 64 was the slowest at 128 users (2x).
FORWARD_TILES = [Tile(64, 64, 4, 2), Tile(32, 64, 4, 2), Tile(128, 64, 8, 2), Tile(64, 64, 4, 3),
                 Tile(128, 64, 8, 3), Tile(64, 128, 4, 2)]
INTERPRET_TILE = Tile(16, 16, 4, 1)


@triton.jit
def _mask(qi, kj, length, cs, mx, max_attn_len, HAS_CONTEXT: tl.constexpr,
          HAS_WINDOW: tl.constexpr):
    """The reference mask for query positions qi [M, 1] and key positions kj [1, N] of a row of
    `length` tokens (positions from the row's start, cached rows first)."""
    id_q = tl.minimum(tl.maximum(qi - cs, 0), mx)
    id_k = tl.minimum(tl.maximum(kj - cs, 0), mx)
    dist = id_q - id_k
    ok = (dist > 0) | (qi == kj)
    if HAS_WINDOW:
        ok = ok & (dist <= max_attn_len)
    if HAS_CONTEXT:
        ok = ok | ((id_q == 0) & (id_k < mx))
    return ok & (kj < length) & (qi < length)


@triton.jit
def _key_range(acc, q, K_base, V_base, stride_km, stride_vm, qi, key_offset, lo, hi, step,
               limit, length, cs, mx, max_attn_len, alpha, MASKED: tl.constexpr,
               HAS_CONTEXT: tl.constexpr, HAS_WINDOW: tl.constexpr, FAST: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr, D_QK: tl.constexpr,
               D_V: tl.constexpr, BLOCK_D_QK: tl.constexpr, BLOCK_D_V: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """acc + the key tiles starting at lo, lo + step, ... below hi of one key slab (step is
    BLOCK_N, or a multiple of it for a split's share); the slab's row r sits at position
    key_offset + r of the whole row. MASKED: rows >= limit load as zeros and the reference
    mask applies; without it the caller has checked that the tiles are whole and that every
    query of the block sees all of them (no mask computed per score)."""
    for start_n in range(lo, hi, step):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K_base, offs_n, stride_km, limit, D_QK, BLOCK_D_QK, MASKED)
        p = _silu(dot(q, tl.trans(k), None, PRECISION, UPCAST), alpha, FAST)
        if MASKED:
            kj = key_offset + offs_n
            ok = _mask(qi[:, None], kj[None, :], length, cs, mx, max_attn_len, HAS_CONTEXT,
                       HAS_WINDOW) & (offs_n < limit)[None, :]
            p = tl.where(ok, p, 0.0)
        v = _load_rows(V_base, offs_n, stride_vm, limit, D_V, BLOCK_D_V, MASKED)
        acc = dot(p.to(v.dtype), v, acc, PRECISION, UPCAST)
    return acc


@triton.jit
def _cached_attn_fwd(Q, K, V, KC, VC, O, seq_offsets, cache_offsets, num_targets,
                     KC_ADDRESSES, VC_ADDRESSES, kc_base, vc_base,
                     stride_qm, stride_qh, stride_km, stride_kh, stride_vm, stride_vh,
                     stride_kcm, stride_kch, stride_vcm, stride_vch, stride_om, stride_oh,
                     stride_os, H, alpha, scale, contextual_seq_len, max_attn_len, num_blocks,
                     batch, num_splits,
                     HAS_TARGETS: tl.constexpr, HAS_CONTEXT: tl.constexpr,
                     HAS_WINDOW: tl.constexpr, FAST: tl.constexpr, PRECISION: tl.constexpr,
                     UPCAST: tl.constexpr, D_QK: tl.constexpr, D_V: tl.constexpr,
                     BLOCK_D_QK: tl.constexpr, BLOCK_D_V: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGED: tl.constexpr,
                     ALIGN: tl.constexpr, ELEMENT_BYTES: tl.constexpr, SPLIT: tl.constexpr):
    """Program (split, row, head, query block). Without SPLIT: the block's whole output into
    O. With SPLIT: split s sums the cached key tiles s, s + S, s + 2S, ... (S = num_splits;
    split 0 also the delta keys) and writes its part (scaled by 1/S, float32) to O[s]: O is
    then [S, sum Q, H, d_v] float32, its parts stride_os apart, and the caller adds them. No
    softmax, so the parts simply add. The tiles are dealt out by stride rather than in
    ranges so that a split's share does not depend on max_cache_len, which a CUDA graph
    replay may see exceeded (graph keys keep only whether it is 0)."""
    pid = tl.program_id(0)
    block = pid % num_blocks
    pid_bh = (pid // num_blocks) % (batch * H)
    split = pid // (num_blocks * batch * H)
    b = pid_bh // H
    h = pid_bh % H
    q_start = tl.load(seq_offsets + b)
    q_len = (tl.load(seq_offsets + b + 1) - q_start).to(tl.int32)
    start_m = block * BLOCK_M
    if start_m >= q_len:
        return
    c_start = tl.load(cache_offsets + b)
    c_len = (tl.load(cache_offsets + b + 1) - c_start).to(tl.int32)
    length = c_len + q_len
    hist, cs, mx = _id_bounds(length, num_targets, b, contextual_seq_len, HAS_TARGETS,
                              HAS_CONTEXT)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    qi = c_len + offs_m  # positions in the whole row
    cols_qk = tl.arange(0, BLOCK_D_QK)
    Q_row = Q + q_start * stride_qm + h * stride_qh
    q = tl.load(Q_row + offs_m[:, None] * stride_qm + cols_qk[None, :],
                mask=(offs_m[:, None] < q_len) & (cols_qk[None, :] < D_QK), other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D_V], dtype=tl.float32)

    if PAGED:
        # Each row's cache is its own tensor (CacheRows), reached from the base tensors KC /
        # VC by its element offset. Said to be a multiple of ALIGN elements (a whole vector,
        # when CacheRows.aligned says the host checked it; else 1), so that the tiles load in
        # vectors: a pointer read from memory carries no alignment the compiler could see.
        kc_offset = (tl.load(KC_ADDRESSES + b) - kc_base) // ELEMENT_BYTES
        vc_offset = (tl.load(VC_ADDRESSES + b) - vc_base) // ELEMENT_BYTES
        KC_row = KC + tl.multiple_of(kc_offset, ALIGN) + h * stride_kch
        VC_row = VC + tl.multiple_of(vc_offset, ALIGN) + h * stride_vch
    else:
        KC_row = KC + c_start * stride_kcm + h * stride_kch
        VC_row = VC + c_start * stride_vcm + h * stride_vch
    # This program's cached key tiles: all of them (step BLOCK_N), or every num_splits-th
    # from its own (split 0 takes the first).
    step = BLOCK_N * num_splits
    if HAS_WINDOW:
        # (The host never splits under a window.) A query sees ids >= its id - max_attn_len,
        # and the contextual keys (id 0, at the front): the tiles between the contextual
        # tiles and the window of the block's first query (the smallest id in the block) are
        # skipped. Blocks holding contextual queries see everything.
        first_id = tl.minimum(tl.maximum(c_len + start_m - cs, 0), mx)
        window_lo = tl.maximum(first_id - max_attn_len + cs, 0)
        ctx_end = 0
        if HAS_CONTEXT:
            window_lo = tl.where(c_len + start_m < contextual_seq_len, 0, window_lo)
            ctx_end = tl.cdiv(tl.minimum(contextual_seq_len, c_len), BLOCK_N) * BLOCK_N
            acc = _key_range(acc, q, KC_row, VC_row, stride_kcm, stride_vcm, qi, 0, 0,
                             ctx_end, BLOCK_N, c_len, length, cs, mx, max_attn_len, alpha,
                             True, HAS_CONTEXT, HAS_WINDOW, FAST, PRECISION, UPCAST, D_QK, D_V,
                             BLOCK_D_QK, BLOCK_D_V, BLOCK_N)
        # Whole tiles only, and none the contextual loop already took.
        lo = tl.maximum((window_lo // BLOCK_N) * BLOCK_N, ctx_end)
    else:
        # Without a window every delta query sees every cached history key: a query comes
        # after the key, and their ids (never decreasing along a row) differ unless both are
        # 0 (positions up to the contextual ones), where the contextual term admits the pair
        # as long as the first target id mx is at least 1 (a row holding all its contextual
        # tokens); without contextual tokens ids tie only among candidates. So the whole
        # tiles below min(c_len, hist) need no mask when mx >= 1 (or no contextual tokens).
        # Serving never caches candidates or rows short of their contextual tokens, but
        # other inputs still get the masked loop for whatever is past that bound.
        unmasked_end = (tl.minimum(c_len, hist) // BLOCK_N) * BLOCK_N
        if HAS_CONTEXT:
            unmasked_end = tl.where(mx >= 1, unmasked_end, 0)
        acc = _key_range(acc, q, KC_row, VC_row, stride_kcm, stride_vcm, qi, 0,
                         split * BLOCK_N, unmasked_end, step, c_len, length, cs, mx,
                         max_attn_len, alpha, False, HAS_CONTEXT, HAS_WINDOW, FAST, PRECISION,
                         UPCAST, D_QK, D_V, BLOCK_D_QK, BLOCK_D_V, BLOCK_N)
        # The masked tiles from unmasked_end on continue the same dealing: tile t to split
        # t mod num_splits.
        first_tile = unmasked_end // BLOCK_N
        lo = (first_tile + (split - first_tile % num_splits + num_splits) % num_splits) * BLOCK_N
    acc = _key_range(acc, q, KC_row, VC_row, stride_kcm, stride_vcm, qi, 0, lo, c_len, step,
                     c_len, length, cs, mx, max_attn_len, alpha, True, HAS_CONTEXT, HAS_WINDOW,
                     FAST, PRECISION, UPCAST, D_QK, D_V, BLOCK_D_QK, BLOCK_D_V, BLOCK_N)

    if split == 0:
        # Delta keys: up to the block's last query, or all of them when the block holds
        # contextual queries (they see every history key after them).
        hi = tl.minimum(start_m + BLOCK_M, q_len)
        if HAS_CONTEXT:
            hi = tl.where(c_len + start_m < contextual_seq_len, q_len, hi)
        K_row = K + q_start * stride_km + h * stride_kh
        V_row = V + q_start * stride_vm + h * stride_vh
        acc = _key_range(acc, q, K_row, V_row, stride_km, stride_vm, qi, c_len, 0, hi, BLOCK_N,
                         q_len, length, cs, mx, max_attn_len, alpha, True, HAS_CONTEXT,
                         HAS_WINDOW, FAST, PRECISION, UPCAST, D_QK, D_V, BLOCK_D_QK, BLOCK_D_V,
                         BLOCK_N)

    cols_v = tl.arange(0, BLOCK_D_V)
    O_row = O + split * stride_os + q_start * stride_om + h * stride_oh
    tl.store(O_row + offs_m[:, None] * stride_om + cols_v[None, :],
             (acc * scale).to(O.dtype.element_ty),
             mask=(offs_m[:, None] < q_len) & (cols_v[None, :] < D_V))


# ----------------------------------------------------------------------------- host side


def _check_inputs(q, k, v, k_cache, v_cache, seq_offsets, cache_offsets, num_targets):
    for name, tensor in (("q", q), ("k", k), ("v", v), ("k_cache", k_cache),
                         ("v_cache", v_cache)):
        triton_dtype_ok(tensor, f"hstu_mha_cached: {name}")
        if tensor.dtype != q.dtype:
            raise TypeError(f"hstu_mha_cached: {name} is {tensor.dtype}, q is {q.dtype}")
        if tensor.device != q.device:
            raise ValueError(f"hstu_mha_cached: {name} is on {tensor.device}, q on {q.device}")
    addresses = ((("k_cache.addresses", k_cache.addresses), ("v_cache.addresses",
                                                            v_cache.addresses))
                 if isinstance(k_cache, CacheRows) else ())
    for name, tensor in (("seq_offsets", seq_offsets), ("cache_offsets", cache_offsets),
                         ("num_targets", num_targets), *addresses):
        if tensor is not None and tensor.device != q.device:
            raise ValueError(f"hstu_mha_cached: {name} is on {tensor.device}, q on {q.device}")
    if q.device.type != "cuda" and not interpreting():
        raise RuntimeError("hstu_mha_cached (TRITON) needs CUDA tensors, or TRITON_INTERPRET=1 "
                           "to run on the CPU")


def hstu_mha_cached(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    k_cache: torch.Tensor | CacheRows,
    v_cache: torch.Tensor | CacheRows,
    cache_offsets: torch.Tensor,
    *,
    max_seq_len: int,
    max_cache_len: int,
    num_targets: torch.Tensor | None = None,
    contextual_seq_len: int = 0,
    max_attn_len: int = 0,
    alpha: float | None = None,
    scaling_seqlen: int,
) -> torch.Tensor:
    """Triton version of hstu.ops.cached_attention.hstu_mha_cached (same arguments, minus
    `kernel`). Forward only. Returns a new [sum Q, H, d_v] tensor in v's dtype."""
    _check_inputs(q, k, v, k_cache, v_cache, seq_offsets, cache_offsets, num_targets)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    if alpha is None:
        alpha = q.shape[-1] ** -0.5
    total, heads, d_qk = q.shape
    d_v = v.shape[2]
    batch = seq_offsets.numel() - 1
    if total == 0 or batch == 0:
        return torch.empty((total, heads, d_v), dtype=v.dtype, device=v.device)
    paged = isinstance(k_cache, CacheRows)
    align = 1
    # Rows that read a cache: what the split is sized by. A graphed serving wave pads one
    # user's call to 16 rows, whose padding rows have none and finish at once; counting them
    # would split one user's 65 tiles 3 ways instead of 16. (Rows of one tensor: all of them.)
    rows_with_cache = len(k_cache.lengths) - k_cache.lengths.count(0) if paged else batch
    if paged:
        # Rows read through their addresses (contiguous, checked by CacheRows): the tensors
        # passed as KC / VC are the base the addresses are counted from (and give the element
        # type); the row strides are H * d and d.
        key_addresses, value_addresses = k_cache.addresses, v_cache.addresses
        align = paged_alignment(k, v) if k_cache.aligned and v_cache.aligned else 1
        k_cache, v_cache = k, v
        bases = (k.data_ptr(), v.data_ptr())
        cache_strides = (heads * d_qk, d_qk, heads * d_v, d_v)
    else:
        k_cache, v_cache = _last_dim_contiguous(k_cache), _last_dim_contiguous(v_cache)
        if k_cache.shape[0] == 0:
            # Zero-row tensors may have no storage to point at; any row of the delta will do
            # as a base pointer, since no cached row is ever loaded (every cached length is 0).
            k_cache, v_cache = k[:1], v[:1]
        key_addresses = value_addresses = cache_offsets  # unread when not paged
        bases = (0, 0)
        cache_strides = (k_cache.stride(0), k_cache.stride(1), v_cache.stride(0),
                         v_cache.stride(1))
    constants = kernel_constants(q, v, num_targets, contextual_seq_len, max_attn_len)
    targets = num_targets if num_targets is not None else seq_offsets  # unread without targets
    result: list[torch.Tensor] = []

    def launch(tile: Tile) -> None:
        num_blocks = triton.cdiv(int(max_seq_len), tile.block_m)
        programs = num_blocks * batch * heads
        splits = split_plan(num_blocks * max(rows_with_cache, 1) * heads, int(max_cache_len),
                            tile.block_n, q.device, windowed=max_attn_len > 0)
        if splits > 1:
            out = torch.empty((splits, total, heads, d_v), dtype=torch.float32, device=v.device)
        else:
            out = torch.empty((total, heads, d_v), dtype=v.dtype, device=v.device)
        _cached_attn_fwd[(programs * splits,)](
            q, k, v, k_cache, v_cache, out, seq_offsets, cache_offsets, targets,
            key_addresses, value_addresses, *bases,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            *cache_strides, out.stride(-3), out.stride(-2), out.stride(0) if splits > 1 else 0,
            heads, float(alpha), 1.0 / float(scaling_seqlen), int(contextual_seq_len),
            int(max_attn_len), num_blocks, batch, splits,
            **constants, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, PAGED=paged,
            ALIGN=align, ELEMENT_BYTES=k.element_size(), SPLIT=splits > 1,
            num_warps=tile.num_warps, num_stages=tile.num_stages,
        )
        result[:] = [out.sum(0).to(v.dtype) if splits > 1 else out]

    flags = (constants["HAS_TARGETS"], constants["HAS_CONTEXT"], constants["HAS_WINDOW"])
    # The batch is in the key: the grid (and so the best tile, and whether keys are split)
    # grows with it, and serving calls the kernel for one user and for hundreds.
    key = (str(q.dtype), d_qk, d_v, flags, seq_len_bucket(max_seq_len),
           seq_len_bucket(max(int(max_cache_len), 1)), triton.next_power_of_2(batch))
    tile = choose_tile("cached_attn_fwd", key, FORWARD_TILES, INTERPRET_TILE, launch)
    launch(tile)
    return result[0]


def paged_alignment(k: torch.Tensor, v: torch.Tensor) -> int:
    """The ALIGN the kernel may assume for paged rows (in elements) whose CacheRows say they
    are aligned: a whole 16-byte vector when the rows of the keys and values are whole
    vectors and the base tensors k, v (the offsets are counted from them) start on one; else
    1 (element by element)."""
    row_bytes = (k[0].numel() * k.element_size() if k.shape[0] else 0,
                 v[0].numel() * v.element_size() if v.shape[0] else 0)
    if all(size % ROW_ALIGNMENT == 0 for size in (*row_bytes, k.data_ptr(), v.data_ptr())):
        return ROW_ALIGNMENT // k.element_size()
    return 1


# Splitting the cached keys: a grid of fewer programs than the GPU has multiprocessors leaves
# most of it idle while each program walks the whole cache (one user of 4K history: 8
# programs of 64 tiles each). Aim for this many programs per multiprocessor, with at least
# MIN_SPLIT_TILES key tiles in a split.
SPLIT_PROGRAMS_PER_SM = 2
MIN_SPLIT_TILES = 4


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter: one program at a time anyway
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_plan(programs: int, max_cache_len: int, block_n: int, device: torch.device, *,
               windowed: bool) -> int:
    """How many programs share each query block's cached key tiles (dealt out by stride), for
    a grid of `programs` programs: 1 when the grid fills the GPU or a window is set (a window
    already skips most cached tiles). max_cache_len only sizes the choice: a longer cache
    (a CUDA graph replayed for bigger caches) is still read whole, in more tiles a split."""
    tiles = triton.cdiv(max_cache_len, block_n)
    wanted = triton.cdiv(SPLIT_PROGRAMS_PER_SM * _multiprocessors(device), max(programs, 1))
    splits = min(wanted, tiles // MIN_SPLIT_TILES)
    return 1 if windowed or splits <= 1 else splits


# ----------------------------------------------------------------------------- cache writes

COPY_BLOCK = 2048  # elements per program and step: a few rows of H * d
COPY_PROGRAMS_PER_ROW = 64  # most programs a row gets; a longer row loops
INTERPRET_COPY_BLOCK = 64


@triton.jit
def _copy_rows(TYPED, TABLE, source_offsets, batch, typed_base, BLOCK: tl.constexpr,
               ALIGN: tl.constexpr, ELEMENT_BYTES: tl.constexpr):
    """Tensor t's row b (its rows [source_offsets[b], source_offsets[b + 1]) of row_elements
    elements each, contiguous on both sides) to the address TABLE[t, b]. TABLE is int64
    [T, B + 2]: per tensor the B target addresses, then the source's address and its
    elements per row. Program (b, p, t) copies blocks p, p + P, ... of tensor t's row b, so
    that one long row (a user encoded from scratch beside short appends) does not size the
    grid for every row. Addresses are reached from TYPED (at typed_base) by element offsets,
    declared multiples of ALIGN elements (and so are the rows' sizes), so that the copy
    moves whole 16-byte vectors when the caller has checked they allow it (ALIGN 1
    otherwise: element by element)."""
    b = tl.program_id(0)
    t = tl.program_id(2)
    entries = TABLE + t * (batch + 2)
    row_elements = tl.load(entries + batch + 1)
    first = tl.load(source_offsets + b)
    count = tl.multiple_of((tl.load(source_offsets + b + 1) - first) * row_elements, ALIGN)
    target = TYPED + tl.multiple_of((tl.load(entries + b) - typed_base) // ELEMENT_BYTES, ALIGN)
    source = TYPED + tl.multiple_of((tl.load(entries + batch) - typed_base) // ELEMENT_BYTES
                                    + first * row_elements, ALIGN)
    for start in range(tl.program_id(1) * BLOCK, count, tl.num_programs(1) * BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        inside = offsets < count
        tl.store(target + offsets, tl.load(source + offsets, mask=inside), mask=inside)


def copy_rows_to_addresses(source: torch.Tensor, source_offsets: torch.Tensor,
                           addresses: torch.Tensor, max_rows: int) -> None:
    """Copy row b of the jagged `source` [N, H, d] (contiguous; source_offsets [B+1] int64 on
    its device) to the memory at addresses[b] ([B] int64 on its device), which the caller
    owns and has made room at (kv_cache.write_rows: the end of each user's cache buffer, of
    source's dtype, checked there). max_rows: the longest row, from the host."""
    if not source.is_contiguous():
        raise ValueError("copy_rows_to_addresses: the source must be contiguous")
    row_elements = source[0].numel() if source.shape[0] else 0
    extra = torch.tensor([source.data_ptr(), row_elements], dtype=torch.int64)
    table = torch.cat([addresses.to(torch.int64), extra.to(addresses.device)])
    copy_rows_by_table([source], source_offsets, table.view(1, -1), max_rows)  # element-wise


def copy_rows_by_table(sources: Sequence[torch.Tensor], source_offsets: torch.Tensor,
                       table: torch.Tensor, max_rows: int, *, aligned: bool = False) -> None:
    """copy_rows_to_addresses for several jagged sources of one dtype over the same offsets,
    in one launch: table int64 [T, B + 2] on their device, per source (in order) the B target
    addresses, then the source's address (data_ptr) and its elements per row (H * d). The
    sources must be contiguous and outlive the copy (it runs on the current stream).

    aligned: the caller has checked that every address in the table and every source's row
    size is a multiple of ROW_ALIGNMENT bytes (kv_cache.write_rows does, on the host copy of
    the table): the copy then moves 16-byte vectors instead of single elements."""
    if not sources:
        return
    if sources[0].device.type != "cuda" and not interpreting():
        raise RuntimeError("copy_rows_by_table needs CUDA tensors, or TRITON_INTERPRET=1")
    if any(source.dtype != sources[0].dtype for source in sources):
        raise ValueError("copy_rows_by_table: the sources must share one dtype")
    if any(not source.is_contiguous() for source in sources):
        raise ValueError("copy_rows_by_table: the sources must be contiguous")
    if (table.dtype != torch.int64 or table.dim() != 2 or not table.is_contiguous()
            or table.device != sources[0].device):
        raise ValueError(f"copy_rows_by_table: the table must be a contiguous int64 [T, B + 2] "
                         f"tensor on the sources' device, got {table.dtype} "
                         f"{tuple(table.shape)} on {table.device}")
    tensors, width = table.shape
    batch = width - 2
    if tensors != len(sources):
        raise ValueError(f"copy_rows_by_table: a table of {tensors} rows for "
                         f"{len(sources)} sources")
    row_elements = max(source[0].numel() if source.shape[0] else 0 for source in sources)
    if batch <= 0 or max_rows == 0 or row_elements == 0:
        return
    block = INTERPRET_COPY_BLOCK if interpreting() else COPY_BLOCK
    programs = min(triton.cdiv(max_rows * row_elements, block), COPY_PROGRAMS_PER_ROW)
    element = sources[0].element_size()
    base = sources[0].data_ptr()
    align = ROW_ALIGNMENT // element if aligned and base % ROW_ALIGNMENT == 0 else 1
    _copy_rows[(batch, programs, tensors)](sources[0], table, source_offsets, batch, base,
                                           BLOCK=block, ALIGN=align, ELEMENT_BYTES=element)
