"""TRITON layer_norm / swish_layer_norm against the PyTorch reference (forward, dx, dw, db)."""

from __future__ import annotations

import pytest
import torch

from hstu.ops.pytorch import layer_norm as torch_ops
from hstu.ops.triton import layer_norm as triton_ops
from hstu.ops.triton.testing import assert_within_bound, compare_op

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter truncates float32 -> bfloat16 (the GPU rounds to nearest), so bf16 is checked
# by the full-size GPU test only.
CPU_DTYPES = [torch.float32, torch.float16]


def _inputs(rows, dim, seed):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0):
        value = torch.randn(*shape, generator=generator, dtype=torch.float64) * scale + shift
        return value.to(DEVICE).requires_grad_()

    return dict(x=rand(rows, dim, scale=2.0, shift=0.5), weight=rand(dim, scale=0.2, shift=1.0),
                bias=rand(dim, scale=0.2))


@pytest.mark.parametrize("name", ["layer_norm", "swish_layer_norm"])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_matches_pytorch(name, dtype):
    # 37 rows: not a multiple of the row block; 24 columns: not a power of two.
    results = compare_op(
        lambda x, weight, bias: getattr(triton_ops, name)(x, weight, bias, 1e-5),
        lambda x, weight, bias: getattr(torch_ops, name)(x, weight, bias, 1e-5),
        _inputs(37, 24, seed=1), dtype=dtype,
    )
    assert_within_bound(results)


def test_empty_input():
    x = torch.zeros(0, 8, device=DEVICE, requires_grad=True)
    weight = torch.ones(8, device=DEVICE, requires_grad=True)
    out = triton_ops.layer_norm(x, weight, torch.zeros(8, device=DEVICE), 1e-5)
    out.sum().backward()
    assert out.shape == (0, 8) and torch.equal(weight.grad, torch.zeros(8, device=DEVICE))


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_residual_gradient(dtype):
    # residual_grad: dx equals the plain backward's dx plus that gradient, rounded as
    # autograd's add rounds; the weight gradients do not change.
    inputs = {name: t.detach().to(dtype) for name, t in _inputs(37, 24, seed=2).items()}
    x, weight, bias = inputs["x"], inputs["weight"], inputs["bias"]
    _, mean, rstd = triton_ops.layer_norm_forward(x, weight, bias, 1e-5)
    dy = torch.randn(37, 24, generator=torch.Generator().manual_seed(3)).to(dtype).to(DEVICE)
    residual = torch.randn(37, 24, generator=torch.Generator().manual_seed(4)).to(dtype)
    dx, dw, db = triton_ops.layer_norm_backward(dy, x, weight, bias, mean, rstd)
    dx_res, dw_res, db_res = triton_ops.layer_norm_backward(dy, x, weight, bias, mean, rstd,
                                                            residual_grad=residual.to(DEVICE))
    assert torch.equal(dx_res, dx + residual.to(DEVICE))
    assert torch.equal(dw_res, dw) and torch.equal(db_res, db)
    with pytest.raises(ValueError, match="residual_grad"):
        triton_ops.layer_norm_backward(dy, x, weight, bias, mean, rstd,
                                       residual_grad=residual[:5].to(DEVICE))


def test_bad_affine_shape_is_named():
    with pytest.raises(ValueError, match=r"weight \(7,\) and bias \(8,\) must be \[D\] = \[8\]"):
        triton_ops.layer_norm(torch.zeros(3, 8, device=DEVICE), torch.ones(7, device=DEVICE),
                              torch.zeros(8, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["layer_norm", "swish_layer_norm"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_full_size_on_gpu(name, dtype):
    results = compare_op(
        lambda x, weight, bias: getattr(triton_ops, name)(x, weight, bias, 1e-5),
        lambda x, weight, bias: getattr(torch_ops, name)(x, weight, bias, 1e-5),
        _inputs(20000, 512, seed=2), dtype=dtype,
    )
    assert_within_bound(results)
