"""Window planning, range gathering and cross-feature counts, checked by hand."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from hstu.data.windows import (
    MAX_LIST_VALUES,
    counts_before,
    histogram_labels,
    length_histogram,
    list_column,
    log2_bucket,
    plan_windows,
    ranges_to_indices,
)


def test_ranges_to_indices():
    indices, offsets = ranges_to_indices(np.array([2, 0, 5]), np.array([4, 0, 8]))
    assert indices.tolist() == [2, 3, 5, 6, 7]
    assert offsets.tolist() == [0, 2, 2, 5]


def test_plan_windows_periods_cap_and_min_history():
    # User 0 owns tokens 0..9 (eval from 8), user 1 owns 10..12 (no eval).
    windows, history_only = plan_windows(
        np.array([0, 10]),
        np.array([10, 13]),
        np.array([8, 13]),
        max_candidates=3,
        max_history=4,
        min_history=1,
    )
    assert windows.cand_start.tolist() == [1, 4, 7, 8, 11]
    assert windows.cand_end.tolist() == [4, 7, 8, 10, 13]
    assert windows.uih_start.tolist() == [0, 0, 3, 4, 10]  # the latest <= 4 earlier tokens
    assert windows.is_eval.tolist() == [False, False, False, True, False]
    assert windows.user_row.tolist() == [0, 0, 0, 0, 1]
    assert windows.window_index.tolist() == [0, 1, 2, 3, 0]
    assert history_only.tolist() == [1, 1]


def test_plan_windows_user_with_only_history():
    windows, history_only = plan_windows(
        np.array([0]),
        np.array([2]),
        np.array([2]),
        max_candidates=5,
        max_history=10,
        min_history=3,
    )
    assert len(windows) == 0 and history_only.tolist() == [2]


def test_counts_before():
    users = np.array([0, 0, 0, 0, 1, 1, 1])
    keys = np.array([5, 5, 0, 5, 5, 7, 5])
    # Count same-user same-key tokens before each token's own index.
    counts = counts_before(users, keys, np.arange(7), np.arange(7))
    assert counts.tolist() == [0, 1, 0, 2, 0, 0, 1]
    # Before other indices: token 6 (user 1, key 5) before index 5 sees token 4; token 3
    # (user 0, key 5) before index 1 sees token 0.
    assert counts_before(users, keys, np.array([6, 3]), np.array([5, 1])).tolist() == [1, 1]


def test_log2_bucket_and_histogram():
    assert log2_bucket(np.array([0, 1, 2, 3, 4, 7, 8, 10**9])).tolist() == [1, 2, 3, 3, 4, 4, 5, 15]
    assert log2_bucket(np.array([8191, 8192])).tolist() == [14, 15]
    assert histogram_labels()[:5] == ["0", "1", "2-3", "4-7", "8-15"]
    assert histogram_labels()[-1] == "16384+"
    assert length_histogram(np.array([0, 1, 3, 3, 100000]))[:3] == [1, 1, 2]


def test_list_column_refuses_more_values_than_int32_offsets_hold():
    column = list_column(np.arange(3), np.array([0, 1, 3]), pa.int64())
    assert column.to_pylist() == [[0], [1, 2]]
    # Checked before any value is touched: 2**31 offsets would wrap to negative int32.
    with pytest.raises(ValueError, match="int32 offsets"):
        list_column(np.zeros(1, np.int64), np.array([0, MAX_LIST_VALUES + 1]), pa.int64())
