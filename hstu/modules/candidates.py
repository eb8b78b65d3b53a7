"""Candidate extraction (reference 2.8): the last num_targets rows of every encoded row."""

from __future__ import annotations

import torch

from hstu.ops import Kernel, split_2d_jagged
from hstu.ops.pytorch.jagged import lengths_from_offsets


def extract_candidates(
    embeddings: torch.Tensor,
    timestamps: torch.Tensor,
    seq_offsets: torch.Tensor,
    num_targets: torch.Tensor,
    kernel: Kernel = Kernel.PYTORCH,
) -> tuple[torch.Tensor, torch.Tensor]:
    """embeddings [sum L, D], timestamps int64 [sum L] -> ([sum t, D], [sum t]), row order kept."""
    prefix_lengths = lengths_from_offsets(seq_offsets) - num_targets
    _, candidate_embeddings = split_2d_jagged(
        embeddings, seq_offsets, prefix_lengths, num_targets, kernel=kernel
    )
    # int64 data movement without gradient: the PyTorch split handles any dtype.
    _, candidate_timestamps = split_2d_jagged(
        timestamps.unsqueeze(1), seq_offsets, prefix_lengths, num_targets, kernel=Kernel.PYTORCH
    )
    return candidate_embeddings, candidate_timestamps.squeeze(1)
