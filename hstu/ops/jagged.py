"""Jagged concat / split per row, and the per-row dense matmul of parameterized_mlp."""

from __future__ import annotations

import torch

from hstu.ops.kernel import Kernel, implementation


def concat_2d_jagged(
    left: torch.Tensor,
    left_offsets: torch.Tensor,
    right: torch.Tensor,
    right_offsets: torch.Tensor,
    *,
    kernel: Kernel | str = Kernel.PYTORCH,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row b of the result is [left row b; right row b].

    left [sum_b l_b, D], left_offsets [B+1] int64; right [sum_b r_b, D], right_offsets [B+1]
    int64; same dtype and D on both sides. Returns (values [sum_b (l_b + r_b), D],
    offsets [B+1] int64 = left_offsets + right_offsets). Pure data movement (exact in any
    dtype); differentiable in left and right.
    """
    impl = implementation("jagged", "concat_2d_jagged", kernel)
    return impl(left, left_offsets, right, right_offsets)


def split_2d_jagged(
    values: torch.Tensor,
    offsets: torch.Tensor,
    left_lengths: torch.Tensor,
    right_lengths: torch.Tensor,
    *,
    right_total: int | None = None,
    kernel: Kernel | str = Kernel.PYTORCH,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of concat_2d_jagged: row b of values is split into its first left_lengths[b]
    and its last right_lengths[b] elements.

    values [sum_b len_b, D]; offsets [B+1] int64; left_lengths, right_lengths [B] int64 with
    left_lengths + right_lengths == the row lengths (checked on CPU tensors, and on GPU
    tensors when right_total is not given). Returns (left [sum l_b, D], right [sum r_b, D]),
    rows packed in order. Differentiable in values.

    right_total: sum r_b when the caller knows it on the host. The output sizes must be known
    before the copy; without it they are read from the GPU, a host synchronisation.
    """
    impl = implementation("jagged", "split_2d_jagged", kernel)
    return impl(values, offsets, left_lengths, right_lengths, right_total=right_total)


def jagged_tails(
    values: torch.Tensor,
    offsets: torch.Tensor,
    tail_lengths: torch.Tensor,
    *,
    tail_total: int,
    kernel: Kernel | str = Kernel.PYTORCH,
) -> torch.Tensor:
    """The last tail_lengths[b] elements of every row b, packed in order: split_2d_jagged's
    right part, without producing the left one (nor, backward, a gradient for it to copy).

    values [sum_b len_b, D]; offsets [B+1] int64; tail_lengths [B] <= the row lengths;
    tail_total = sum_b tail_lengths[b], known on the host (no host sync; on CPU tensors the
    lengths are checked). Returns [tail_total, D]. Differentiable in values (zero gradient
    outside the tails).
    """
    impl = implementation("jagged", "jagged_tails", kernel)
    return impl(values, offsets, tail_lengths, tail_total)


def jagged_dense_bmm_broadcast_add(
    seq_offsets: torch.Tensor,
    jagged: torch.Tensor,
    dense: torch.Tensor,
    bias: torch.Tensor,
    *,
    max_seq_len: int,
    kernel: Kernel | str = Kernel.PYTORCH,
) -> torch.Tensor:
    """out[i] = jagged[i] @ dense[b] + bias[b] for every element i of row b.

    seq_offsets [B+1] int64; jagged [sum_b M_b, K]; dense [B, K, N]; bias [B, N];
    max_seq_len >= every M_b (for padding / tiling). Matmul accumulates in float32 and the
    bias is added in float32; the result is cast to jagged.dtype. Returns [sum_b M_b, N].
    Differentiable in jagged, dense and bias.
    """
    impl = implementation("jagged", "jagged_dense_bmm_broadcast_add", kernel)
    return impl(seq_offsets, jagged, dense, bias, max_seq_len=max_seq_len)
