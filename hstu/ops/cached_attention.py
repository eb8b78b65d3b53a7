"""hstu_mha_cached: HSTU attention for the last rows of each row against cached keys and values.

Serving scores a user's candidates (and encodes a few new history tokens) against the keys and
values of the history computed earlier (hstu/modules/kv_cache.py). The mask is the full op's
(docs/dlrm_hstu_reference.md section 2.7), so the delta rows get exactly the outputs that
`hstu_mha` would give them over the whole row, as long as the cached keys and values are the
ones the whole row would have computed (hstu/modules/kv_cache.py says when that holds).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from hstu.ops.attention import check_qkv_shapes
from hstu.ops.kernel import Kernel, implementation


# When a cached row's H * d elements fill whole multiples of this many bytes, every buffer of
# a CacheRows starts at such a multiple (checked by host_addresses; a tensor from the allocator
# and any whole-row slice of one does), and the TRITON kernel reads it in vectors this wide.
ROW_ALIGNMENT = 16


@dataclasses.dataclass(frozen=True)
class CacheRows:
    """One layer's cached keys (or values) kept as one tensor per row, read where they lie:
    row b is the first lengths[b] rows of buffers[b] ([capacity_b, H, d], contiguous).

    Serving keeps each user's cache in that user's own buffer (hstu/modules/kv_cache.py).
    Gathering B users' caches into one jagged tensor would copy every cached row on every
    call: keys and values of 3 layers for 128 users of 4K history on the 27K recipe are
    3.2 GB in bf16. The TRITON kernel reads each row through its address instead; the
    PYTORCH kernel concatenates (`cat`), being the reference rather than the fast path.

    addresses: [B] int64 on the buffers' device, buffers[b].data_ptr(). `CacheRows.of` makes
    it; a caller that moves other small tensors to the device anyway passes it in, made by
    `host_addresses` (hstu/modules/kv_cache.py packs them into one copy)."""

    buffers: tuple[torch.Tensor, ...]
    lengths: tuple[int, ...]
    addresses: torch.Tensor
    # Every buffer starts on a ROW_ALIGNMENT-byte boundary and its rows are whole multiples
    # of it: the TRITON kernel may then load rows in vectors. Set by `of` (which checks it) or
    # by a caller that has checked the addresses (kv_cache.plan_cached_encode does, on its
    # host copy); False reads element by element, whatever the buffers.
    aligned: bool = False

    @staticmethod
    def host_addresses(buffers: Sequence[torch.Tensor], *, check: bool = True) -> torch.Tensor:
        """[B] int64 on the CPU: each buffer's address. check: that the buffers can be read
        alike (one dtype, device, [H, d]; contiguous); a caller whose buffers are so by
        construction may skip it (it costs about a microsecond per buffer)."""
        if not buffers:
            raise ValueError("CacheRows needs at least one row")
        if check:
            first = buffers[0]
            for index, row in enumerate(buffers):
                if (row.dim() != 3 or row.shape[1:] != first.shape[1:]
                        or row.dtype != first.dtype or row.device != first.device):
                    raise ValueError(
                        f"CacheRows: row {index} is {row.dtype} {tuple(row.shape)} on "
                        f"{row.device}, row 0 {first.dtype} {tuple(first.shape)} on "
                        f"{first.device}: every row must be [P_b, H, d] with one H, d, dtype "
                        "and device")
                if not row.is_contiguous():
                    raise ValueError(f"CacheRows: row {index} is not contiguous (strides "
                                     f"{row.stride()}); the kernel reads rows of H * d "
                                     "elements")
            row_bytes = first.shape[1] * first.shape[2] * first.element_size()
            if row_bytes % ROW_ALIGNMENT == 0:
                for index, row in enumerate(buffers):
                    if row.data_ptr() % ROW_ALIGNMENT:
                        raise ValueError(
                            f"CacheRows: row {index} starts at an address that is not a "
                            f"multiple of {ROW_ALIGNMENT} bytes while its rows are "
                            f"{row_bytes} bytes; the TRITON kernel then reads whole "
                            f"{ROW_ALIGNMENT}-byte vectors (a tensor of its own, or whole "
                            "rows of one, always starts so)")
        return torch.tensor([row.data_ptr() for row in buffers], dtype=torch.int64)

    @classmethod
    def of(cls, rows: Sequence[torch.Tensor]) -> CacheRows:
        """Each tensor of `rows` a whole row."""
        rows = tuple(rows)
        addresses = cls.host_addresses(rows)  # checks the alignment (below) when it applies
        first = rows[0]
        return cls(rows, tuple(int(row.shape[0]) for row in rows),
                   addresses.to(rows[0].device),
                   aligned=first.shape[1] * first.shape[2] * first.element_size()
                   % ROW_ALIGNMENT == 0)

    @property
    def rows(self) -> list[torch.Tensor]:
        return [buffer[:length] for buffer, length in zip(self.buffers, self.lengths)]

    @property
    def shape(self) -> torch.Size:
        """[sum P, H, d], as the concatenated tensor would have."""
        return torch.Size((sum(self.lengths), *self.buffers[0].shape[1:]))

    @property
    def dtype(self) -> torch.dtype:
        return self.buffers[0].dtype

    @property
    def device(self) -> torch.device:
        return self.buffers[0].device

    def dim(self) -> int:
        return 3

    def cat(self) -> torch.Tensor:
        """The rows as one jagged tensor (a view when at most one row is not empty)."""
        filled = [b for b, length in enumerate(self.lengths) if length > 0]
        if len(filled) <= 1:
            b = filled[0] if filled else 0
            return self.buffers[b][: self.lengths[b]]
        return torch.cat(self.rows)


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
    kernel: Kernel | str = Kernel.PYTORCH,
) -> torch.Tensor:
    """Jagged HSTU attention of delta rows against [cached rows; delta rows].

    q, k: [sum Q, H, d_qk], v: [sum Q, H, d_v]: the delta rows (the last Q_b rows of row b);
    seq_offsets [B+1] int64 over them; max_seq_len >= every Q_b.
    k_cache [sum P, H, d_qk], v_cache [sum P, H, d_v]: the first P_b rows of row b, computed
    earlier; cache_offsets [B+1] int64 (P_b may be 0); max_cache_len >= every P_b.
    num_targets [B]: candidates at the end of row b (all inside the delta: t_b <= Q_b).
    contextual_seq_len, max_attn_len, alpha: as hstu_mha. scaling_seqlen: the constant divisor
    S (required: there is no "whole batch" length to default to here).
    Returns [sum Q, H, d_v] in v's dtype: row r of the delta of row b gets the output that
    hstu_mha gives position P_b + r of the whole row of P_b + Q_b tokens.

    Inference only: no gradient is defined (the TRITON kernel has no backward).
    """
    _check_inputs(q, k, v, seq_offsets, k_cache, v_cache, cache_offsets, max_seq_len,
                  max_cache_len, num_targets, scaling_seqlen)
    if (isinstance(k_cache, CacheRows) or isinstance(v_cache, CacheRows)) and (
            Kernel.parse(kernel).non_attention() is Kernel.PYTORCH):
        k_cache, v_cache = (t.cat() if isinstance(t, CacheRows) else t for t in (k_cache, v_cache))
    impl = implementation("cached_attention", "hstu_mha_cached", kernel)
    return impl(
        q,
        k,
        v,
        seq_offsets,
        k_cache,
        v_cache,
        cache_offsets,
        max_seq_len=max_seq_len,
        max_cache_len=max_cache_len,
        num_targets=num_targets,
        contextual_seq_len=contextual_seq_len,
        max_attn_len=max_attn_len,
        alpha=alpha,
        scaling_seqlen=scaling_seqlen,
    )


def _check_inputs(q, k, v, seq_offsets, k_cache, v_cache, cache_offsets, max_seq_len,
                  max_cache_len, num_targets, scaling_seqlen) -> None:
    """Errors that name the argument. Values (offsets, lengths) are checked on CPU tensors
    only: on a GPU each check would make the host wait for the device."""
    check_qkv_shapes("hstu_mha_cached", q, k, v, k_cache=k_cache, v_cache=v_cache)
    if k_cache.shape[1:] != k.shape[1:] or v_cache.shape[1:] != v.shape[1:]:
        raise ValueError(
            f"hstu_mha_cached: the cache's heads and head sizes must be the delta's: k_cache "
            f"{tuple(k_cache.shape)} vs k {tuple(k.shape)}, v_cache {tuple(v_cache.shape)} "
            f"vs v {tuple(v.shape)}")
    if isinstance(k_cache, CacheRows) != isinstance(v_cache, CacheRows):
        raise ValueError("hstu_mha_cached: k_cache and v_cache must both be tensors or both "
                         "CacheRows")
    if isinstance(k_cache, CacheRows) and (
            len(k_cache.lengths) != len(v_cache.lengths)
            or len(k_cache.lengths) != seq_offsets.numel() - 1):
        raise ValueError(f"hstu_mha_cached: CacheRows of {len(k_cache.lengths)} key and "
                         f"{len(v_cache.lengths)} value rows for {seq_offsets.numel() - 1} rows")
    if k_cache.shape[0] != v_cache.shape[0]:
        raise ValueError(f"hstu_mha_cached: k_cache has {k_cache.shape[0]} rows but v_cache "
                         f"{v_cache.shape[0]}")
    for name, offsets in (("seq_offsets", seq_offsets), ("cache_offsets", cache_offsets)):
        if offsets.dim() != 1 or offsets.numel() < 1 or offsets.dtype != torch.int64:
            raise ValueError(f"hstu_mha_cached: {name} must be a 1-D int64 tensor [B+1], got "
                             f"{offsets.dtype} of shape {tuple(offsets.shape)}")
    if seq_offsets.shape != cache_offsets.shape:
        raise ValueError(f"hstu_mha_cached: seq_offsets has {seq_offsets.numel() - 1} rows but "
                         f"cache_offsets {cache_offsets.numel() - 1}")
    batch = seq_offsets.numel() - 1
    if num_targets is not None and tuple(num_targets.shape) != (batch,):
        raise ValueError(f"hstu_mha_cached: num_targets must be [B] = [{batch}], got shape "
                         f"{tuple(num_targets.shape)}")
    if scaling_seqlen is None or scaling_seqlen <= 0:
        raise ValueError(f"hstu_mha_cached: scaling_seqlen must be > 0, got {scaling_seqlen}")
    if seq_offsets.device.type != "cpu" or batch == 0:
        return
    for name, offsets, values, longest_allowed in (
        ("seq_offsets", seq_offsets, q, max_seq_len),
        ("cache_offsets", cache_offsets, k_cache, max_cache_len),
    ):
        if int(offsets[0]) != 0 or int(offsets[-1]) != values.shape[0]:
            raise ValueError(f"hstu_mha_cached: {name} must run from 0 to {values.shape[0]}, "
                             f"got {int(offsets[0])} .. {int(offsets[-1])}")
        lengths = offsets[1:] - offsets[:-1]
        if int(lengths.min()) < 0:
            raise ValueError(f"hstu_mha_cached: {name} must not decrease")
        if int(lengths.max()) > longest_allowed:
            raise ValueError(f"hstu_mha_cached: a row of {name} has {int(lengths.max())} "
                             f"tokens, more than the bound {longest_allowed}")
    if num_targets is not None:
        q_lengths = seq_offsets[1:] - seq_offsets[:-1]
        if bool((num_targets.to(torch.int64) > q_lengths).any()):
            raise ValueError("hstu_mha_cached: every candidate must be a delta row "
                             "(num_targets[b] <= the delta length of row b)")
