"""LayerNorm and SwishLayerNorm in plain PyTorch, float32 inside."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hstu.ops.pytorch.dtypes import upcast


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    normed = F.layer_norm(upcast(x), (x.shape[-1],), upcast(weight), upcast(bias), eps)
    return normed.to(x.dtype)


def swish_layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    x32 = upcast(x)
    normed = F.layer_norm(x32, (x.shape[-1],), upcast(weight), upcast(bias), eps)
    return (x32 * torch.sigmoid(normed)).to(x.dtype)
