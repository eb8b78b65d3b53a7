"""Action embeddings from the history's action bitmask (reference 2.4 c)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from hstu.ops import Kernel, concat_2d_jagged


class SimpleActionEncoder(nn.Module):
    """One d_a-wide slot per action type, concatenated (not summed).

    History row i: slot k holds E_act[k] if (action_i & weight_k) != 0, else zeros. Optional
    watch-time thresholds add action types: bit weight ω_j is set when watch_time >= θ_j.
    Every candidate row gets one learned vector E_tgt: labels are never fed in.
    """

    def __init__(
        self,
        action_embedding_dim: int,
        action_weights: Sequence[int],
        watchtime_to_action_thresholds: Sequence[float] = (),
        watchtime_to_action_weights: Sequence[int] = (),
        kernel: Kernel = Kernel.PYTORCH,
    ) -> None:
        super().__init__()
        if action_embedding_dim <= 0:
            raise ValueError("simple_action_encoder.action_embedding_dim must be set and > 0")
        if not action_weights:
            raise ValueError("simple_action_encoder.action_weights is empty")
        if len(watchtime_to_action_thresholds) != len(watchtime_to_action_weights):
            raise ValueError(
                "simple_action_encoder: watchtime_to_action_thresholds has "
                f"{len(watchtime_to_action_thresholds)} values but watchtime_to_action_weights "
                f"has {len(watchtime_to_action_weights)}; they must pair up"
            )
        weights = [int(w) for w in action_weights] + [int(w) for w in watchtime_to_action_weights]
        self.register_buffer("bit_weights", torch.tensor(weights, dtype=torch.int64), persistent=False)
        self.register_buffer(
            "watchtime_thresholds",
            torch.tensor([float(t) for t in watchtime_to_action_thresholds], dtype=torch.float32),
            persistent=False,
        )
        self.register_buffer(
            "watchtime_weights",
            torch.tensor([int(w) for w in watchtime_to_action_weights], dtype=torch.int64),
            persistent=False,
        )
        self.num_action_types = len(weights)
        self.action_embedding_dim = action_embedding_dim
        self.output_dim = self.num_action_types * action_embedding_dim
        # The proto's embedding_init_std is ignored, as in TorchEasyRec: std 0.1 is fixed.
        self.action_table = nn.Parameter(
            torch.empty(self.num_action_types, action_embedding_dim).normal_(0.0, 0.1)
        )
        self.target_embedding = nn.Parameter(torch.empty(1, self.output_dim).normal_(0.0, 0.1))
        self.kernel = kernel

    def action_bits(
        self, actions: torch.Tensor, watch_times: torch.Tensor | None
    ) -> torch.Tensor:
        """bool [sum_n, A'] : which action types each history row has."""
        actions = actions.to(torch.int64)
        if self.watchtime_thresholds.numel():
            if watch_times is None:
                raise ValueError(
                    "simple_action_encoder has watchtime_to_action_thresholds but the batch has "
                    "no watch times (feature group uih_watchtime)"
                )
            passed = watch_times.float().unsqueeze(1) >= self.watchtime_thresholds.unsqueeze(0)
            extra = (passed.to(torch.int64) * self.watchtime_weights.unsqueeze(0)).sum(dim=1)
            actions = actions | extra
        return (actions.unsqueeze(1) & self.bit_weights.unsqueeze(0)) > 0

    def forward(
        self,
        actions: torch.Tensor,
        watch_times: torch.Tensor | None,
        uih_offsets: torch.Tensor,
        candidate_offsets: torch.Tensor,
        dtype: torch.dtype = torch.float32,
        num_candidates: int | None = None,
    ) -> torch.Tensor:
        """actions int64 [sum_n]; watch_times [sum_n] or None. Returns [sum(n + t), A' * d_a].
        num_candidates: sum t when the caller knows it (saves reading it from the GPU)."""
        bits = self.action_bits(actions, watch_times)
        uih = (bits.unsqueeze(2).to(self.action_table.dtype) * self.action_table.unsqueeze(0))
        uih = uih.reshape(actions.shape[0], self.output_dim)
        if num_candidates is None:
            num_candidates = candidate_offsets[-1].item()  # .item(): traceable by torch.export
        candidates = self.target_embedding.expand(num_candidates, -1)
        merged, _ = concat_2d_jagged(
            uih.to(dtype), uih_offsets, candidates.to(dtype), candidate_offsets, kernel=self.kernel
        )
        return merged
