"""Output postprocessors, applied to the candidate rows only (reference 2.9).

Each takes (embeddings [sum t, D], timestamps int64 [sum t] = the candidates' query times)
and returns [sum t, D].
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from hstu.modules.init import xavier_linear
from hstu.modules.norms import LayerNorm
from hstu.ops import Kernel

# TorchEasyRec writes the angle with the literal 3.14, not pi; kept so that a model trained
# there and one trained here compute the same features.
TWO_PI_AS_IN_REFERENCE = 2 * 3.14


class L2NormPostprocessor(nn.Module):
    def forward(self, embeddings: torch.Tensor, timestamps: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(embeddings.float(), dim=-1, keepdim=True)
        return (embeddings.float() / norm.clamp(min=1e-6)).to(embeddings.dtype)


class LayerNormPostprocessor(nn.Module):
    def __init__(self, embedding_dim: int, kernel: Kernel = Kernel.PYTORCH) -> None:
        super().__init__()
        self.norm = LayerNorm(embedding_dim, eps=1e-5, kernel=kernel)

    def forward(self, embeddings: torch.Tensor, timestamps: torch.Tensor) -> torch.Tensor:
        return self.norm(embeddings)


class TimestampLayerNormPostprocessor(nn.Module):
    """LN(Linear([emb, cos φ_1, sin φ_1, cos φ_2, sin φ_2, ...])) with
    φ_k = ((floor(ts / period_k) mod units_k) / units_k) * 2 * 3.14 (e.g. hour of day, weekday).
    """

    def __init__(
        self,
        embedding_dim: int,
        time_duration_period_units: Sequence[int],
        time_duration_units_per_period: Sequence[int],
        kernel: Kernel = Kernel.PYTORCH,
    ) -> None:
        super().__init__()
        if len(time_duration_period_units) != len(time_duration_units_per_period):
            raise ValueError(
                "timestamp_layernorm_postprocessor: time_duration_period_units and "
                "time_duration_units_per_period must have the same length; got "
                f"{len(time_duration_period_units)} and {len(time_duration_units_per_period)}"
            )
        if any(int(p) <= 0 for p in time_duration_period_units) or any(
            int(m) <= 0 for m in time_duration_units_per_period
        ):
            raise ValueError("timestamp_layernorm_postprocessor: periods and units must be > 0")
        self.register_buffer(
            "period_units",
            torch.tensor([int(p) for p in time_duration_period_units], dtype=torch.int64),
            persistent=False,
        )
        self.register_buffer(
            "units_per_period",
            torch.tensor([int(m) for m in time_duration_units_per_period], dtype=torch.int64),
            persistent=False,
        )
        num_features = 2 * len(time_duration_period_units)
        self.linear = xavier_linear(embedding_dim + num_features, embedding_dim)
        self.norm = LayerNorm(embedding_dim, eps=1e-5, kernel=kernel)

    def time_features(self, timestamps: torch.Tensor) -> torch.Tensor:
        """[sum t, 2K] float32: cos/sin per period, interleaved."""
        # Integer floor-division and modulo: exact for int64 epoch seconds.
        units = torch.div(timestamps.unsqueeze(1), self.period_units, rounding_mode="floor")
        units = torch.remainder(units, self.units_per_period)
        angle = units.float() / self.units_per_period.float() * TWO_PI_AS_IN_REFERENCE
        return torch.stack([torch.cos(angle), torch.sin(angle)], dim=2).flatten(1)

    def forward(self, embeddings: torch.Tensor, timestamps: torch.Tensor) -> torch.Tensor:
        features = self.time_features(timestamps).to(embeddings.dtype)
        return self.norm(self.linear(torch.cat([embeddings, features], dim=1)))
