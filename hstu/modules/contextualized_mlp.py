"""The MLPs that lift content / action embeddings to the model width D (reference 2.4 b).

Both take (seq_embeddings [sum_len, d_in], seq_offsets [B+1], max_seq_len, contextual [B, C])
and return [sum_len, D]; the simple one ignores the contextual input.
"""

from __future__ import annotations

import torch
from torch import nn

from hstu.modules.init import xavier_linear
from hstu.modules.norms import LayerNorm, SwishLayerNorm
from hstu.ops import Kernel, jagged_dense_bmm_broadcast_add


class SimpleContextualizedMLP(nn.Module):
    """LN_D(Linear(h -> D)(SwishLN_h(Linear(d_in -> h)(x)))), token by token."""

    def __init__(
        self, in_dim: int, out_dim: int, hidden_dim: int, kernel: Kernel = Kernel.PYTORCH
    ) -> None:
        super().__init__()
        self.input_linear = xavier_linear(in_dim, hidden_dim)
        self.hidden_norm = SwishLayerNorm(hidden_dim, kernel=kernel)
        self.output_linear = xavier_linear(hidden_dim, out_dim)
        self.output_norm = LayerNorm(out_dim, kernel=kernel)

    def forward(
        self,
        seq_embeddings: torch.Tensor,
        seq_offsets: torch.Tensor,
        max_seq_len: int,
        contextual: torch.Tensor | None,
    ) -> torch.Tensor:
        hidden = self.hidden_norm(self.input_linear(seq_embeddings))
        return self.output_norm(self.output_linear(hidden))


class ParameterizedContextualizedMLP(nn.Module):
    """A per-sample linear map generated from the contextual features.

    s   = Linear(C -> h)(Dropout(contextual))                       [B, h]
    W_b = LayerNorm_{[d_in, D]}(Linear(h -> d_in * D)(s).view(B, d_in, D))
    r_b = Linear(h -> D)(SwishLN_h(Linear(h -> h)(s)))               [B, D]
    out[i of row b] = x_i @ W_b + r_b                                (float32 inside)
    """

    def __init__(
        self,
        contextual_dim: int,
        in_dim: int,
        out_dim: int,
        hidden_dim: int,
        contextual_dropout_ratio: float = 0.3,
        kernel: Kernel = Kernel.PYTORCH,
    ) -> None:
        super().__init__()
        if contextual_dim <= 0:
            raise ValueError("parameterized_mlp needs contextual features (the contextual group)")
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.kernel = kernel
        self.contextual_dropout = nn.Dropout(contextual_dropout_ratio)
        self.contextual_linear = xavier_linear(contextual_dim, hidden_dim)
        self.weight_linear = xavier_linear(hidden_dim, in_dim * out_dim)
        self.weight_norm = nn.LayerNorm([in_dim, out_dim])
        self.bias_hidden = xavier_linear(hidden_dim, hidden_dim)
        self.bias_norm = SwishLayerNorm(hidden_dim, kernel=kernel)
        self.bias_linear = xavier_linear(hidden_dim, out_dim)

    def forward(
        self,
        seq_embeddings: torch.Tensor,
        seq_offsets: torch.Tensor,
        max_seq_len: int,
        contextual: torch.Tensor | None,
    ) -> torch.Tensor:
        if contextual is None:
            raise ValueError("parameterized_mlp needs the contextual embeddings")
        shared = self.contextual_linear(self.contextual_dropout(contextual))
        weights = self.weight_linear(shared).view(-1, self.in_dim, self.out_dim)
        weights = self.weight_norm(weights.float())
        bias = self.bias_linear(self.bias_norm(self.bias_hidden(shared)))
        return jagged_dense_bmm_broadcast_add(
            seq_offsets,
            seq_embeddings,
            weights,
            bias,
            max_seq_len=max_seq_len,
            kernel=self.kernel,
        )
