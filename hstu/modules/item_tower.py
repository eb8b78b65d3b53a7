"""Item tower (reference 2.3): the candidate's own embedding, multiplied with the encoder's
output in the fusion tower."""

from __future__ import annotations

import torch
from torch import nn

from hstu.modules.init import xavier_linear
from hstu.modules.norms import LayerNorm, SwishLayerNorm
from hstu.ops import Kernel


class ItemTower(nn.Module):
    """LN_D(Linear(h -> D)(SwishLN_h(Linear(d_cand -> h)(candidates))))."""

    def __init__(
        self,
        candidate_dim: int,
        embedding_dim: int,
        hidden_dim: int = 512,
        kernel: Kernel = Kernel.PYTORCH,
    ) -> None:
        super().__init__()
        self.input_linear = xavier_linear(candidate_dim, hidden_dim)
        self.hidden_norm = SwishLayerNorm(hidden_dim, kernel=kernel)
        self.output_linear = xavier_linear(hidden_dim, embedding_dim)
        self.output_norm = LayerNorm(embedding_dim, kernel=kernel)

    def forward(self, candidates: torch.Tensor) -> torch.Tensor:
        hidden = self.hidden_norm(self.input_linear(candidates))
        return self.output_norm(self.output_linear(hidden))
