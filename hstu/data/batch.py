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
    host_seq_lengths: seq_lengths as they were on the host before `to()` moved the batch to a
        GPU (the same tensors, not copies). The model reads sizes from them (totals, the
        longest row) instead of asking the GPU, which would stall the host every step.
    """

    sparse: KeyedJaggedTensor
    raw: dict[str, torch.Tensor]
    seq_lengths: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]
    batch_size: int
    sample_ids: torch.Tensor | None = None
    host_seq_lengths: dict[str, torch.Tensor] | None = None

    def lengths_on_host(self) -> dict[str, torch.Tensor] | None:
        """seq_lengths on the CPU without a device read: the host copy, or seq_lengths
        themselves when they are on the CPU; None when only the GPU has them."""
        if self.host_seq_lengths is not None:
            return self.host_seq_lengths
        if all(v.device.type == "cpu" for v in self.seq_lengths.values()):
            return self.seq_lengths
        return None

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
            host_seq_lengths=self.lengths_on_host(),
        )

    def pin_memory(self) -> JaggedBatch:
        return JaggedBatch(
            sparse=self.sparse.pin_memory(),
            raw={k: v.pin_memory() for k, v in self.raw.items()},
            seq_lengths={k: v.pin_memory() for k, v in self.seq_lengths.items()},
            labels={k: v.pin_memory() for k, v in self.labels.items()},
            batch_size=self.batch_size,
            sample_ids=None if self.sample_ids is None else self.sample_ids.pin_memory(),
            host_seq_lengths=self.lengths_on_host(),
        )

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        """Mark every device tensor as used on `stream` (for batches copied on another one)."""
        self.sparse.record_stream(stream)
        for group in (self.raw, self.seq_lengths, self.labels):
            for tensor in group.values():
                tensor.record_stream(stream)
        if self.sample_ids is not None:
            self.sample_ids.record_stream(stream)

    def num_tokens(self, contextual_tokens: int = 0) -> int:
        """Tokens the encoder sees: contextual + history + candidates over all rows."""
        total = contextual_tokens * self.batch_size
        for lengths in (self.lengths_on_host() or self.seq_lengths).values():
            total += int(lengths.sum())
        return total
