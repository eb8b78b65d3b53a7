"""layer_norm and swish_layer_norm: the public ops, dispatching on the kernel."""

from __future__ import annotations

import torch

from hstu.ops.kernel import Kernel, implementation


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-5,
    *,
    kernel: Kernel | str = Kernel.PYTORCH,
) -> torch.Tensor:
    """LayerNorm over the last dimension with an affine map.

    x: [N, D] (any float dtype); weight, bias: [D]. Mean, variance, normalisation and the affine
    map are computed in float32 (biased variance, 1/sqrt(var + eps)); the result is cast back to
    x's dtype. Returns [N, D]. Differentiable in x, weight and bias.
    """
    return implementation("layer_norm", "layer_norm", kernel)(x, weight, bias, eps)


def swish_layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-5,
    *,
    kernel: Kernel | str = Kernel.PYTORCH,
) -> torch.Tensor:
    """x * sigmoid(LayerNorm(x)) over the last dimension (TorchEasyRec's SwishLayerNorm).

    x: [N, D]; weight, bias: [D]. Everything in float32 (x itself is upcast before the product),
    cast back to x's dtype at the end. Returns [N, D]. Differentiable in x, weight and bias.
    """
    return implementation("layer_norm", "swish_layer_norm", kernel)(x, weight, bias, eps)
