"""Jagged <-> padded conversion with plain index arithmetic (no per-row Python loops)."""

from __future__ import annotations

import torch

from hstu.ops.pytorch.dtypes import upcast


def lengths_from_offsets(offsets: torch.Tensor) -> torch.Tensor:
    return offsets[1:] - offsets[:-1]


def offsets_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=lengths.device)
    torch.cumsum(lengths.to(torch.int64), dim=0, out=offsets[1:])
    return offsets


def jagged_row_and_col(offsets: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every jagged element: the row it belongs to and its index inside that row."""
    lengths = lengths_from_offsets(offsets)
    rows = torch.repeat_interleave(
        torch.arange(lengths.numel(), device=offsets.device), lengths, output_size=total
    )
    cols = torch.arange(total, device=offsets.device) - offsets[rows]
    return rows, cols


def jagged_to_padded(
    values: torch.Tensor, offsets: torch.Tensor, max_len: int, pad_value: float = 0.0
) -> torch.Tensor:
    """[sum_len, *rest] -> [B, max_len, *rest]; rows longer than max_len are an error."""
    batch = offsets.numel() - 1
    padded = values.new_full((batch, max_len, *values.shape[1:]), pad_value)
    if values.shape[0] == 0:
        return padded
    rows, cols = jagged_row_and_col(offsets, values.shape[0])
    padded[rows, cols] = values
    return padded


def padded_to_jagged(padded: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """[B, max_len, *rest] -> [sum_len, *rest] keeping the first len_b entries of each row."""
    # .item(), not int(): torch.export can trace .item() (hstu/export).
    total = offsets[-1].item() if offsets.numel() else 0
    rows, cols = jagged_row_and_col(offsets, total)
    return padded[rows, cols]


def _check_offsets(offsets: torch.Tensor, values: torch.Tensor, name: str) -> None:
    if offsets.dim() != 1 or offsets.numel() == 0:
        raise ValueError(f"{name} must be a 1-D tensor [B+1]; got shape {tuple(offsets.shape)}")
    # Data-dependent checks run on CPU tensors only: on a GPU each would make the host wait for
    # the device (the GPU path is the TRITON one, whose wrappers skip them too), and torch.export
    # (hstu/export) cannot branch on tensor values.
    if (
        offsets.shape[0] > 1
        and values.device.type == "cpu"
        and not torch.compiler.is_exporting()
        and int(offsets[-1]) != values.shape[0]
    ):
        raise ValueError(
            f"{name}[-1] = {int(offsets[-1])} but the values have {values.shape[0]} rows"
        )


def concat_2d_jagged(
    left: torch.Tensor,
    left_offsets: torch.Tensor,
    right: torch.Tensor,
    right_offsets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_offsets(left_offsets, left, "left_offsets")
    _check_offsets(right_offsets, right, "right_offsets")
    if left_offsets.shape != right_offsets.shape:
        raise ValueError(
            f"left has {left_offsets.numel() - 1} rows but right has {right_offsets.numel() - 1}"
        )
    offsets = left_offsets + right_offsets
    # Where each element of cat([left, right]) lands in the output: left row b starts at
    # offsets[b], right row b right after it.
    left_rows, left_cols = jagged_row_and_col(left_offsets, left.shape[0])
    right_rows, right_cols = jagged_row_and_col(right_offsets, right.shape[0])
    left_lengths = lengths_from_offsets(left_offsets)
    destination = torch.cat(
        [
            offsets[left_rows] + left_cols,
            offsets[right_rows] + left_lengths[right_rows] + right_cols,
        ]
    )
    source_of = torch.empty_like(destination)
    source_of[destination] = torch.arange(destination.numel(), device=destination.device)
    return torch.cat([left, right])[source_of], offsets


def split_2d_jagged(
    values: torch.Tensor,
    offsets: torch.Tensor,
    left_lengths: torch.Tensor,
    right_lengths: torch.Tensor,
    right_total: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_offsets(offsets, values, "offsets")
    lengths = lengths_from_offsets(offsets)
    checked = values.device.type == "cpu" or right_total is None
    if checked and not torch.compiler.is_exporting() and not torch.equal(
        left_lengths.to(lengths.dtype) + right_lengths.to(lengths.dtype), lengths
    ):
        raise ValueError(
            "split_2d_jagged: left_lengths + right_lengths must equal the row lengths; got "
            f"{left_lengths.tolist()} + {right_lengths.tolist()} vs {lengths.tolist()}"
        )
    left_offsets = offsets_from_lengths(left_lengths)
    right_offsets = offsets_from_lengths(right_lengths)
    if right_total is None:
        left_total, right_total = left_offsets[-1].item(), right_offsets[-1].item()
    else:
        left_total = values.shape[0] - right_total
    left_rows, left_cols = jagged_row_and_col(left_offsets, left_total)
    right_rows, right_cols = jagged_row_and_col(right_offsets, right_total)
    left = values[offsets[left_rows] + left_cols]
    right = values[offsets[right_rows] + left_lengths[right_rows] + right_cols]
    return left, right


def jagged_tails(
    values: torch.Tensor,
    offsets: torch.Tensor,
    tail_lengths: torch.Tensor,
    tail_total: int,
) -> torch.Tensor:
    _check_offsets(offsets, values, "offsets")
    lengths = lengths_from_offsets(offsets)
    tail_lengths = tail_lengths.to(lengths.dtype)
    if values.device.type == "cpu" and not torch.compiler.is_exporting() and (
        bool((tail_lengths > lengths).any()) or int(tail_lengths.sum()) != tail_total
    ):
        raise ValueError(
            f"jagged_tails: tail_lengths {tail_lengths.tolist()} must be at most the row "
            f"lengths {lengths.tolist()} and sum to tail_total {tail_total}"
        )
    rows, cols = jagged_row_and_col(offsets_from_lengths(tail_lengths), tail_total)
    return values[offsets[rows + 1] - tail_lengths[rows] + cols]


def jagged_dense_bmm_broadcast_add(
    seq_offsets: torch.Tensor,
    jagged: torch.Tensor,
    dense: torch.Tensor,
    bias: torch.Tensor,
    *,
    max_seq_len: int,
) -> torch.Tensor:
    _check_offsets(seq_offsets, jagged, "seq_offsets")
    batch = seq_offsets.numel() - 1
    if dense.shape[0] != batch or bias.shape != (batch, dense.shape[2]):
        raise ValueError(
            f"dense {tuple(dense.shape)} and bias {tuple(bias.shape)} must be [B, K, N] and "
            f"[B, N] with B = {batch}"
        )
    padded = jagged_to_padded(upcast(jagged), seq_offsets, max_seq_len)  # [B, M, K]
    out = torch.baddbmm(upcast(bias).unsqueeze(1), padded, upcast(dense))
    return padded_to_jagged(out, seq_offsets).to(jagged.dtype)
