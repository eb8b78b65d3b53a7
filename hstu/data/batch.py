"""JaggedBatch: what the data pipeline hands the model. Values plus lengths, never padding."""

from __future__ import annotations

import dataclasses

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


@dataclasses.dataclass
class JaggedBatch:
    """One batch of user-window samples (B rows).

    sparse: every id feature, keyed by feature name (FeatureSpec.name). Scalar features have
        one value per row; sequence sub-features have the sequence's length per row.
    raw: raw sequence features by feature name, flat values [sum of the sequence's lengths]
        (int64 for timestamps and action bitmasks, float32 otherwise).
    seq_lengths: per sequence name ("uih_seq", "cand_seq"), int64 [B]. cand_seq's lengths are
        the rows' num_targets.
    labels: label columns by name, flat [sum of cand_seq lengths], aligned with the candidates.
    sample_ids: int64 [B], a stable id per sample (for delivery accounting and regrouping
        predictions); None when the source has none.
    """

    sparse: KeyedJaggedTensor
    raw: dict[str, torch.Tensor]
    seq_lengths: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]
    batch_size: int
    sample_ids: torch.Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> JaggedBatch:
        return JaggedBatch(
            sparse=self.sparse.to(device=torch.device(device), non_blocking=non_blocking),
            raw={k: v.to(device, non_blocking=non_blocking) for k, v in self.raw.items()},
            seq_lengths={
                k: v.to(device, non_blocking=non_blocking) for k, v in self.seq_lengths.items()
            },
            labels={k: v.to(device, non_blocking=non_blocking) for k, v in self.labels.items()},
            batch_size=self.batch_size,
            sample_ids=None
            if self.sample_ids is None
            else self.sample_ids.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> JaggedBatch:
        return JaggedBatch(
            sparse=self.sparse.pin_memory(),
            raw={k: v.pin_memory() for k, v in self.raw.items()},
            seq_lengths={k: v.pin_memory() for k, v in self.seq_lengths.items()},
            labels={k: v.pin_memory() for k, v in self.labels.items()},
            batch_size=self.batch_size,
            sample_ids=None if self.sample_ids is None else self.sample_ids.pin_memory(),
        )

    def num_tokens(self, contextual_tokens: int = 0) -> int:
        """Tokens the encoder sees: contextual + history + candidates over all rows."""
        total = contextual_tokens * self.batch_size
        for lengths in self.seq_lengths.values():
            total += int(lengths.sum())
        return total
