"""TRITON concat_2d_jagged / split_2d_jagged / jagged_dense_bmm_broadcast_add vs PyTorch."""

from __future__ import annotations

import pytest
import torch

from hstu.ops.pytorch import jagged as torch_ops
from hstu.ops.triton import jagged as triton_ops
from hstu.ops.triton.testing import assert_within_bound, compare_op

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _offsets(lengths):
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return offsets.to(DEVICE)


def _rand(generator, *shape):
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(DEVICE).requires_grad_()


LEFT, RIGHT = [3, 0, 7, 2, 0], [1, 4, 0, 5, 0]  # empty rows on either side and both


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_concat_is_exact(dtype):
    g = torch.Generator().manual_seed(0)
    left_offsets, right_offsets = _offsets(LEFT), _offsets(RIGHT)
    inputs = dict(left=_rand(g, sum(LEFT), 20), right=_rand(g, sum(RIGHT), 20))
    args = {name: t.detach().to(dtype).requires_grad_() for name, t in inputs.items()}
    out, offsets = triton_ops.concat_2d_jagged(args["left"], left_offsets, args["right"],
                                               right_offsets)
    ref, ref_offsets = torch_ops.concat_2d_jagged(args["left"].detach(), left_offsets,
                                                  args["right"].detach(), right_offsets)
    assert torch.equal(out, ref) and torch.equal(offsets, ref_offsets)
    grad = torch.randn(out.shape, generator=g).to(DEVICE, dtype)
    out.backward(grad)
    # The gradient of a concat is the split of the gradient: pure data movement, exact.
    d_left, d_right = torch_ops.split_2d_jagged(grad, offsets, _lengths(LEFT), _lengths(RIGHT))
    assert torch.equal(args["left"].grad, d_left) and torch.equal(args["right"].grad, d_right)


def _lengths(lengths):
    return torch.tensor(lengths, dtype=torch.int64, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_matches_pytorch(dtype):
    g = torch.Generator().manual_seed(1)
    offsets = _offsets([a + b for a, b in zip(LEFT, RIGHT)])
    weights = torch.arange(1.0, sum(LEFT) + sum(RIGHT) + 1, device=DEVICE)[:, None]

    def run(module):
        def split(values):
            left, right = module.split_2d_jagged(values, offsets, _lengths(LEFT), _lengths(RIGHT))
            # Distinct weights per output row, so a misplaced gradient row shows.
            return torch.cat([left, right]) * weights.to(values.dtype)

        return split

    results = compare_op(run(triton_ops), run(torch_ops),
                         dict(values=_rand(g, sum(LEFT) + sum(RIGHT), 20)), dtype=dtype)
    assert_within_bound(results)


@pytest.mark.parametrize("module", [triton_ops, torch_ops], ids=["triton", "pytorch"])
def test_tails_are_the_right_part_of_a_split(module):
    # jagged_tails = split_2d_jagged's right part, exactly; its gradient is d tails in the
    # tail rows and zero everywhere else.
    g = torch.Generator().manual_seed(5)
    offsets = _offsets([a + b for a, b in zip(LEFT, RIGHT)])
    values = _rand(g, sum(LEFT) + sum(RIGHT), 20)
    tails = module.jagged_tails(values, offsets, _lengths(RIGHT), sum(RIGHT))
    _, right = torch_ops.split_2d_jagged(values.detach(), offsets, _lengths(LEFT),
                                         _lengths(RIGHT))
    assert torch.equal(tails, right)
    grad = torch.randn(tails.shape, generator=g, dtype=torch.float64).to(DEVICE)
    tails.backward(grad)
    expected = torch.autograd.grad(
        torch_ops.split_2d_jagged(values, offsets, _lengths(LEFT), _lengths(RIGHT))[1], values,
        grad)[0]
    assert torch.equal(values.grad, expected)
    assert (values.grad.abs().sum(1) == 0).sum() >= sum(LEFT)
    with pytest.raises(ValueError, match="tail_total"):
        module.jagged_tails(values.detach().cpu(), offsets.cpu(), _lengths(RIGHT).cpu(), 3)


def test_split_rejects_lengths_that_do_not_add_up():
    with pytest.raises(ValueError, match="must equal the row lengths"):
        triton_ops.split_2d_jagged(torch.zeros(5, 4, device=DEVICE), _offsets([2, 3]),
                                   _lengths([1, 1]), _lengths([1, 1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bmm_matches_pytorch(dtype):
    g = torch.Generator().manual_seed(2)
    lengths = [5, 0, 70, 33]  # 70 spans two 64-row tiles; row 1 is empty
    offsets = _offsets(lengths)
    inputs = dict(jagged=_rand(g, sum(lengths), 24), dense=_rand(g, 4, 24, 40),
                  bias=_rand(g, 4, 40))

    def run(module):
        return lambda jagged, dense, bias: module.jagged_dense_bmm_broadcast_add(
            offsets, jagged, dense, bias, max_seq_len=70)

    assert_within_bound(compare_op(run(triton_ops), run(torch_ops), inputs, dtype=dtype))


def test_bmm_rejects_rows_longer_than_max_seq_len():
    if DEVICE == "cuda":
        pytest.skip("on the GPU this is a device-side assert (no host sync)")
    with pytest.raises(ValueError, match="a row has 6 elements > max_seq_len 4"):
        triton_ops.jagged_dense_bmm_broadcast_add(
            _offsets([6]), torch.zeros(6, 3), torch.zeros(1, 3, 2), torch.zeros(1, 2),
            max_seq_len=4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_full_size_on_gpu(dtype):
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(0, 1000, (32,), generator=g).tolist()
    offsets = _offsets(lengths)
    inputs = dict(jagged=_rand(g, sum(lengths), 256), dense=_rand(g, 32, 256, 512),
                  bias=_rand(g, 32, 512))

    def run(module):
        return lambda jagged, dense, bias: module.jagged_dense_bmm_broadcast_add(
            offsets, jagged, dense, bias, max_seq_len=1000)

    results = compare_op(run(triton_ops), run(torch_ops), inputs, dtype=dtype)
    right = torch.randint(0, 100, (32,), generator=g).tolist()
    concat_inputs = dict(left=_rand(g, sum(lengths), 512), right=_rand(g, sum(right), 512))

    def concat(module):
        return lambda left, right_values: module.concat_2d_jagged(
            left, offsets, right_values, _offsets(right))[0]

    results += compare_op(lambda left, right: concat(triton_ops)(left, right),
                          lambda left, right: concat(torch_ops)(left, right),
                          concat_inputs, dtype=dtype)
    assert_within_bound(results)


def test_int64_timestamps_concat_and_split_exactly():
    # The preprocessor concatenates int64 timestamps (seconds, ~1.7e9, and larger values here
    # to catch any float round trip) with the same kernel as the activations.
    g = torch.Generator().manual_seed(5)
    left_lengths, right_lengths = [3, 0, 5], [2, 1, 0]
    left = torch.randint(0, 2**62, (sum(left_lengths), 1), generator=g).to(DEVICE)
    right = torch.randint(0, 2**62, (sum(right_lengths), 1), generator=g).to(DEVICE)
    left_offsets, right_offsets = _offsets(left_lengths), _offsets(right_lengths)
    got, offsets = triton_ops.concat_2d_jagged(left, left_offsets, right, right_offsets)
    want, _ = torch_ops.concat_2d_jagged(left.cpu(), left_offsets.cpu(), right.cpu(),
                                         right_offsets.cpu())
    assert got.dtype == torch.int64 and torch.equal(got.cpu(), want)
    back_left, back_right = triton_ops.split_2d_jagged(
        got, offsets, torch.tensor(left_lengths, device=DEVICE),
        torch.tensor(right_lengths, device=DEVICE), right_total=sum(right_lengths))
    assert torch.equal(back_left, left) and torch.equal(back_right, right)
