"""LayerNorm and SwishLayerNorm modules over the dispatched ops (float32 inside)."""

from __future__ import annotations

import torch
from torch import nn

from hstu.ops import Kernel, layer_norm, swish_layer_norm


class LayerNorm(nn.Module):
    """Affine LayerNorm over the last dim, float32 math whatever the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5, kernel: Kernel = Kernel.PYTORCH) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps, kernel=self.kernel)


class SwishLayerNorm(LayerNorm):
    """x * sigmoid(LayerNorm(x))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swish_layer_norm(x, self.weight, self.bias, self.eps, kernel=self.kernel)
