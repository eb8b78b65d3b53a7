"""Candidate extraction (reference 2.8): the last num_targets rows of every encoded row."""

from __future__ import annotations

import torch

from hstu.ops import Kernel, jagged_tails


def extract_candidates(
    embeddings: torch.Tensor,
    seq_offsets: torch.Tensor,
    num_targets: torch.Tensor,
    num_candidates: int,
    kernel: Kernel = Kernel.PYTORCH,
) -> torch.Tensor:
    """embeddings [sum L, D] -> [sum t, D], row order kept. num_candidates = sum t (the
    candidates' count, known on the host from their input tensor's shape)."""
    return jagged_tails(embeddings, seq_offsets, num_targets, tail_total=num_candidates,
                        kernel=kernel)
