"""Jagged concat / split / per-row bmm on hand-made rows."""

import pytest
import torch

from hstu.ops import concat_2d_jagged, jagged_dense_bmm_broadcast_add, split_2d_jagged


def test_concat_then_split_on_a_hand_example():
    left = torch.tensor([[1.0], [2.0], [3.0]])  # rows: [1], [], [2, 3]
    left_offsets = torch.tensor([0, 1, 1, 3])
    right = torch.tensor([[10.0], [20.0], [30.0]])  # rows: [10, 20], [30], []
    right_offsets = torch.tensor([0, 2, 3, 3])
    values, offsets = concat_2d_jagged(left, left_offsets, right, right_offsets)
    assert values.flatten().tolist() == [1, 10, 20, 30, 2, 3]
    assert offsets.tolist() == [0, 3, 4, 6]
    back_left, back_right = split_2d_jagged(
        values, offsets, torch.tensor([1, 0, 2]), torch.tensor([2, 1, 0])
    )
    assert torch.equal(back_left, left) and torch.equal(back_right, right)


def test_concat_gradients_route_back():
    left = torch.randn(3, 2, requires_grad=True)
    right = torch.randn(2, 2, requires_grad=True)
    values, _ = concat_2d_jagged(left, torch.tensor([0, 2, 3]), right, torch.tensor([0, 1, 2]))
    weights = torch.arange(10.0).view(5, 2)
    (values * weights).sum().backward()
    # Output rows: [l0, l1, r0, l2, r1].
    assert torch.equal(left.grad, weights[[0, 1, 3]])
    assert torch.equal(right.grad, weights[[2, 4]])


def test_split_rejects_lengths_that_do_not_add_up():
    with pytest.raises(ValueError, match="must equal the row lengths"):
        split_2d_jagged(
            torch.zeros(3, 1), torch.tensor([0, 3]), torch.tensor([1]), torch.tensor([1])
        )


def test_jagged_dense_bmm_broadcast_add_per_row():
    torch.manual_seed(0)
    offsets = torch.tensor([0, 2, 2, 5])
    jagged = torch.randn(5, 3)
    dense = torch.randn(3, 3, 4)
    bias = torch.randn(3, 4)
    out = jagged_dense_bmm_broadcast_add(offsets, jagged, dense, bias, max_seq_len=3)
    rows = [0, 0, 2, 2, 2]
    expected = torch.stack([jagged[i] @ dense[b] + bias[b] for i, b in enumerate(rows)])
    torch.testing.assert_close(out, expected)
