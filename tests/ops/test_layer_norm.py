"""layer_norm / swish_layer_norm against the formula written out."""

import pytest
import torch

from hstu.ops import layer_norm, swish_layer_norm


def manual_layer_norm(x, weight, bias, eps):
    x = x.double()
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight.double() + bias.double()


def test_layer_norm_formula_and_dtype():
    torch.manual_seed(0)
    x, w, b = torch.randn(5, 8), torch.randn(8), torch.randn(8)
    out = layer_norm(x, w, b, 1e-6)
    torch.testing.assert_close(out.double(), manual_layer_norm(x, w, b, 1e-6), rtol=1e-5, atol=1e-5)
    half = layer_norm(x.bfloat16(), w, b, 1e-6)
    assert half.dtype == torch.bfloat16
    # float32 inside: the bf16 result is the float32 result rounded once.
    torch.testing.assert_close(half, layer_norm(x.bfloat16().float(), w, b, 1e-6).bfloat16())


def test_swish_layer_norm_is_x_times_sigmoid_of_ln():
    torch.manual_seed(1)
    x, w, b = torch.randn(4, 6), torch.randn(6), torch.randn(6)
    expected = x.double() * torch.sigmoid(manual_layer_norm(x, w, b, 1e-5))
    torch.testing.assert_close(swish_layer_norm(x, w, b).double(), expected, rtol=1e-5, atol=1e-6)


def test_unknown_kernel_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown kernel"):
        layer_norm(torch.zeros(1, 2), torch.ones(2), torch.zeros(2), kernel="CUDA")
