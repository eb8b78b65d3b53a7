"""Positions and time buckets on hand-computed rows (reference 2.5)."""

import pytest
import torch

from hstu.ops import add_timestamp_positional_embeddings
from hstu.ops.pytorch.position import position_indices, time_bucket_indices

# Row 0: 1 contextual token, 3 history, 2 candidates. Row 1: 1 contextual, 1 history, 1 candidate.
OFFSETS = torch.tensor([0, 6, 9])
NUM_TARGETS = torch.tensor([2, 1])
TIMESTAMPS = torch.tensor([0, 1000, 4600, 7000, 7200, 7260, 0, 100, 3700])


def test_worked_example_positions():
    positions = position_indices(
        torch.tensor([0, 7]), torch.tensor([2]), 7,
        contextual_seq_len=2, num_position_buckets=100, use_time_encoding=True,
    )
    assert positions.tolist() == [0, 1, 5, 4, 3, 2, 2]


def test_positions_hand_computed_with_clamp_and_without_time():
    positions = position_indices(
        OFFSETS, NUM_TARGETS, 9, contextual_seq_len=1, num_position_buckets=4,
        use_time_encoding=True,
    )
    # Row 0: [0, 1+4-1, 1+4-2, 1+4-3, 1, 1] = [0, 4, 3, 2, 1, 1], 4 clamped to 3.
    assert positions.tolist() == [0, 3, 3, 2, 1, 1, 0, 2, 1]
    forward_only = position_indices(
        OFFSETS, NUM_TARGETS, 9, contextual_seq_len=1, num_position_buckets=100,
        use_time_encoding=False,
    )
    assert forward_only.tolist() == [0, 1, 2, 3, 4, 4, 0, 1, 2]


def test_sqrt_and_log_time_buckets_hand_computed():
    sqrt_buckets = time_bucket_indices(
        OFFSETS, TIMESTAMPS, time_bucket_fn="sqrt", time_bucket_increments=60.0,
        num_time_buckets=10,
    )
    # Row 0, query 7260: gaps 7260, 6260, 2660, 260, 60, 0 s -> sqrt(minutes) 11, 10.2,
    # 6.66, 2.08, 1, ~0 -> capped at 10.
    # Row 1, query 3700: gaps 3700, 3600, 0 -> sqrt 7.85, 7.75, ~0.
    assert sqrt_buckets.tolist() == [10, 10, 6, 2, 1, 0, 7, 7, 0]
    log_buckets = time_bucket_indices(
        OFFSETS, TIMESTAMPS, time_bucket_fn="log", time_bucket_increments=60.0,
        num_time_buckets=10,
    )
    # log(121)=4.8, log(104.3)=4.65, log(44.3)=3.79, log(4.33)=1.47, log(1)=0, log(tiny)<0 -> 0
    assert log_buckets.tolist() == [4, 4, 3, 1, 0, 0, 4, 4, 0]


def test_int64_seconds_are_not_rounded_through_float32():
    base = 1_700_000_000  # float32 spacing here is 128 s: both stamps would round together
    timestamps = torch.tensor([base + 1, base + 61])
    buckets = time_bucket_indices(
        torch.tensor([0, 2]), timestamps, time_bucket_fn="sqrt", time_bucket_increments=60.0,
        num_time_buckets=10,
    )
    assert buckets.tolist() == [1, 0]


def test_embedding_add_uses_those_indices_and_tables_get_gradients():
    x = torch.arange(9.0).view(9, 1)
    position_table = torch.arange(4.0).view(4, 1).requires_grad_(True)
    time_table = (100 * torch.arange(11.0)).view(11, 1).requires_grad_(True)
    out = add_timestamp_positional_embeddings(
        x, OFFSETS, TIMESTAMPS, NUM_TARGETS, position_table, time_table,
        alpha=2.0, contextual_seq_len=1, num_time_buckets=10, use_time_encoding=True,
    )
    positions = [0, 3, 3, 2, 1, 1, 0, 2, 1]
    buckets = [10, 10, 6, 2, 1, 0, 7, 7, 0]
    expected = [2 * i + p + 100 * t for i, (p, t) in enumerate(zip(positions, buckets))]
    assert out.flatten().tolist() == expected
    out.sum().backward()
    assert position_table.grad.flatten().tolist() == [2, 3, 2, 2]
    assert time_table.grad[10].item() == 2 and time_table.grad[7].item() == 2


@pytest.mark.parametrize("use_time", [True, False])
def test_add_position_time_at_equals_the_whole_row_op(use_time):
    """Tokens given one by one (column in the row, the row's first target, seconds before its
    query) get what the whole-row op gives them."""
    from hstu.ops.position import add_position_time_at, add_timestamp_positional_embeddings

    g = torch.Generator().manual_seed(5)
    lengths, targets, c = [9, 1, 30], [2, 1, 4], 3
    total = sum(lengths)
    x = torch.randn(total, 8, generator=g)
    positions, times = torch.randn(25, 8, generator=g), torch.randn(2049, 8, generator=g)
    timestamps = torch.randint(1_600_000_000, 1_700_000_000, (total,), generator=g)
    offsets = torch.tensor([0, 9, 10, 40])
    options = dict(alpha=2.8, contextual_seq_len=c, time_bucket_fn="sqrt",
                   time_bucket_increments=60.0, num_time_buckets=2048)
    whole = add_timestamp_positional_embeddings(
        x, offsets, timestamps, torch.tensor(targets), positions, times,
        use_time_encoding=use_time, **options)
    rows = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))
    columns = torch.arange(total) - offsets[rows]
    first_target = (torch.tensor(lengths) - torch.tensor(targets))[rows]
    seconds = timestamps[offsets[1:][rows] - 1] - timestamps
    with torch.no_grad():
        at = add_position_time_at(x, columns, first_target, seconds if use_time else None,
                                  positions, times if use_time else None, **options)
    torch.testing.assert_close(at, whole)


def test_add_position_time_at_is_for_inference():
    from hstu.ops.position import add_position_time_at

    table = torch.randn(4, 2, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference"):
        add_position_time_at(torch.randn(1, 2), torch.zeros(1, dtype=torch.int64),
                             torch.zeros(1, dtype=torch.int64), None, table, None, alpha=1.0,
                             contextual_seq_len=0)
