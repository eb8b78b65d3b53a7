"""LayerNorm and SwishLayerNorm in plain PyTorch, float32 inside."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    normed = F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps)
    return normed.to(x.dtype)


def swish_layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    x32 = x.float()
    normed = F.layer_norm(x32, (x.shape[-1],), weight.float(), bias.float(), eps)
    return (x32 * torch.sigmoid(normed)).to(x.dtype)
