"""Jagged <-> padded conversion with plain index arithmetic (no per-row Python loops)."""

from __future__ import annotations

import torch


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
    total = int(offsets[-1].item()) if offsets.numel() else 0
    rows, cols = jagged_row_and_col(offsets, total)
    return padded[rows, cols]
