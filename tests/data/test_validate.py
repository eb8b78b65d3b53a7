"""Every bad-input case: an error naming file, row and column by default; skipped and counted
under on_bad_rows='skip'."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from hstu.data.pipeline import arrow_to_batch
from hstu.data.validate import BadRowReport, DataError, validate_table

NAN = math.nan

# (case, column overrides, column named in the error, problem text, the bad row)
BAD_ROWS = [
    (
        "uih lengths differ",
        {"uih_seq__watch_time": [[1.5, 2.0], [], [0.0, 3.0]]},
        "uih_seq__watch_time",
        "length differs from 'uih_seq__video_id'",
        2,
    ),
    (
        "cand lengths differ",
        {"cand_seq__query_time": [[102], [50], [206]]},
        "cand_seq__query_time",
        "length differs from 'cand_seq__video_id'",
        1,
    ),
    (
        "label length differs",
        {"cand_seq__action_weight": [[3], [0, 64], [1, 1]]},
        "cand_seq__action_weight",
        "length differs",
        2,
    ),
    (
        "no candidates",
        {
            "cand_seq__video_id": [[11], [], [14]],
            "cand_seq__query_time": [[102], [], [206]],
            "cand_seq__action_weight": [[3], [], [1]],
            "cand_seq__watch_time": [[9.0], [], [1.0]],
        },
        "cand_seq__video_id",
        "no candidates",
        1,
    ),
    (
        "negative timestamp",
        {"uih_seq__action_timestamp": [[100, 101], [], [-5, 200, 205]]},
        "uih_seq__action_timestamp",
        "negative timestamp",
        2,
    ),
    (
        "decreasing timestamp",
        {"uih_seq__action_timestamp": [[101, 100], [], [200, 200, 205]]},
        "uih_seq__action_timestamp",
        "decreasing timestamp",
        0,
    ),
    (
        "decreasing query time",
        {"cand_seq__query_time": [[102], [60, 50], [206]]},
        "cand_seq__query_time",
        "decreasing timestamp",
        1,
    ),
    (
        "id beyond table",
        {"uih_seq__video_id": [[5, 6], [], [7, 100, 9]]},
        "uih_seq__video_id",
        "id >= num_buckets 100",
        2,
    ),
    ("scalar id beyond table", {"user_id": [1, 2, 100]}, "user_id", "id >= num_buckets", 2),
    (
        "negative id",
        {"cand_seq__video_id": [[11], [12, -13], [14]]},
        "cand_seq__video_id",
        "negative id",
        1,
    ),
    (
        "negative bitmask label",
        {"cand_seq__action_weight": [[3], [0, 64], [-1]]},
        "cand_seq__action_weight",
        "negative label",
        2,
    ),
    (
        "NaN watch time",
        {"uih_seq__watch_time": [[1.5, NAN], [], [0.0, 3.0, 4.5]]},
        "uih_seq__watch_time",
        "NaN or infinite",
        0,
    ),
    (
        "infinite label",
        {"cand_seq__watch_time": [[9.0], [0.5, 7.25], [math.inf]]},
        "cand_seq__watch_time",
        "NaN or infinite",
        2,
    ),
    (
        "null list",
        {"uih_seq__video_id": [[5, 6], None, [7, 8, 9]]},
        "uih_seq__video_id",
        "null list",
        1,
    ),
    (
        "null element",
        {"cand_seq__video_id": [[11], [12, None], [14]]},
        "cand_seq__video_id",
        "null element",
        1,
    ),
    ("null scalar", {"user_id": [1, None, 3]}, "user_id", "null value", 1),
    (
        "unparsable '|' element",
        {"uih_seq__video_id": pa.array(["5|6", "", "7|x|9"])},
        "uih_seq__video_id",
        "element not a whole number",
        2,
    ),
    (
        "empty '|' element",
        {"uih_seq__action_timestamp": pa.array(["100||101", "", "200|200|205"])},
        "uih_seq__action_timestamp",
        "element not a whole number",
        0,
    ),
]


@pytest.mark.parametrize(
    "overrides, column, problem, bad_row",
    [case[1:] for case in BAD_ROWS],
    ids=[case[0] for case in BAD_ROWS],
)
def test_bad_row_stops_with_file_row_and_column(
    overrides, column, problem, bad_row, make_specs, make_table
):
    features, labels = make_specs()
    table = make_table(**overrides)
    with pytest.raises(DataError) as error:
        arrow_to_batch(table, features, labels, source="part-7.parquet", row_offset=1000)
    assert error.value.path == "part-7.parquet"
    assert error.value.row == 1000 + bad_row
    assert error.value.column == column
    assert problem in error.value.problem
    message = str(error.value)
    assert f"file part-7.parquet, row {1000 + bad_row} (0-based)" in message
    assert f"sample_id {10 + bad_row}" in message and repr(column) in message


@pytest.mark.parametrize(
    "overrides, column, problem, bad_row",
    [case[1:] for case in BAD_ROWS],
    ids=[case[0] for case in BAD_ROWS],
)
def test_bad_row_skipped_and_counted(overrides, column, problem, bad_row, make_specs, make_table):
    features, labels = make_specs()
    report = BadRowReport()
    batch = arrow_to_batch(
        make_table(**overrides), features, labels, on_bad_rows="skip", bad_rows=report
    )
    kept = [10 + row for row in range(3) if row != bad_row]
    assert batch.sample_ids.tolist() == kept
    assert batch.batch_size == 2
    assert report.rows == 1
    # One row can break several rules ("100||101" also decreases): each reason counts it.
    assert set(report.by_reason.values()) == {1}
    assert any(
        reason.startswith(f"{column}: ") and problem in reason for reason in report.by_reason
    )
    # The kept rows are intact: lengths still add up to the values.
    for lengths in batch.seq_lengths.values():
        assert lengths.shape == (2,)
    assert int(batch.seq_lengths["cand_seq"].sum()) == len(batch.labels["cand_seq__action_weight"])
    assert batch.sparse.lengths().sum() == batch.sparse.values().numel()


def test_several_bad_rows_first_is_reported_all_are_counted(make_specs, make_table):
    features, labels = make_specs()
    table = make_table(
        user_id=[1, 200, 3],  # row 1
        uih_seq__watch_time=[[1.5, 2.0], [], [0.0, NAN, 4.5]],  # row 2
    )
    with pytest.raises(DataError) as error:
        arrow_to_batch(table, features, labels)
    assert error.value.row == 1 and error.value.column == "user_id"
    report = validate_table(table, features, labels, on_bad_rows="skip")
    assert report.rows == 2
    assert sum(report.by_reason.values()) == 2


def test_rows_from_several_files_name_each_rows_file(make_specs, make_table):
    features, labels = make_specs()
    table = make_table(
        cand_seq__video_id=[[11], [12, 13], [140]],
        path=pa.array(["a.parquet", "b.parquet", "c.parquet"]),
    )
    with pytest.raises(DataError) as error:
        arrow_to_batch(table, features, labels)
    assert error.value.path == "c.parquet" and error.value.sample_id == 12
    assert "row 2 of the batch, 0-based" in str(error.value)


@pytest.mark.parametrize("on_bad_rows", ["error", "skip"])
def test_missing_column_always_stops(on_bad_rows, make_specs, make_table):
    features, labels = make_specs()
    table = make_table().drop_columns(["cand_seq__query_time"])
    with pytest.raises(DataError) as error:
        arrow_to_batch(table, features, labels, source="x.parquet", on_bad_rows=on_bad_rows)
    assert error.value.column == "cand_seq__query_time" and error.value.path == "x.parquet"
    assert "missing column" in str(error.value)


MISTYPED = [
    (
        "float timestamps",
        "uih_seq__action_timestamp",
        pa.array([[100.0, 101.0], [], [200.0, 200.0, 205.0]], pa.list_(pa.float64())),
    ),
    ("string scalar id", "user_id", pa.array(["1", "2", "3"])),
    ("scalar where a list is expected", "cand_seq__video_id", pa.array([11, 12, 14])),
    ("list of strings", "uih_seq__video_id", pa.array([["5"], [], ["7"]])),
]


@pytest.mark.parametrize("column, array", [c[1:] for c in MISTYPED], ids=[c[0] for c in MISTYPED])
@pytest.mark.parametrize("on_bad_rows", ["error", "skip"])
def test_mistyped_column_always_stops(column, array, on_bad_rows, make_specs, make_table):
    features, labels = make_specs()
    table = make_table(**{column: array})
    with pytest.raises(DataError) as error:
        arrow_to_batch(table, features, labels, source="y.parquet", on_bad_rows=on_bad_rows)
    assert error.value.column == column and error.value.path == "y.parquet"
    assert "expected" in str(error.value)


def test_equal_timestamps_and_row_boundaries_are_fine(make_specs, make_table):
    # A later row may start earlier than the previous row ended: only within a row counts.
    features, labels = make_specs()
    table = make_table(uih_seq__action_timestamp=[[300, 300], [], [200, 200, 205]])
    assert arrow_to_batch(table, features, labels).batch_size == 3


def test_unknown_policy_is_rejected(make_specs, make_table):
    features, labels = make_specs()
    with pytest.raises(ValueError, match="on_bad_rows"):
        arrow_to_batch(make_table(user_id=[1, 2, 500]), features, labels, on_bad_rows="drop")


# ---- timestamp order follows sequence_timestamp_is_ascending --------------------------------

NEWEST_FIRST = {
    "uih_seq__action_timestamp": [[101, 100], [], [205, 200, 200]],
    "cand_seq__query_time": [[102], [60, 50], [206]],
}


def test_newest_first_rows_pass_when_timestamps_are_descending(make_specs, make_table):
    features, labels = make_specs(ascending=False)
    batch = arrow_to_batch(make_table(**NEWEST_FIRST), features, labels)
    assert batch.batch_size == 3
    assert batch.raw["uih_seq__action_timestamp"].tolist() == [101, 100, 205, 200, 200]


def test_oldest_first_row_is_out_of_order_when_timestamps_are_descending(make_specs, make_table):
    features, labels = make_specs(ascending=False)
    table = make_table(**dict(NEWEST_FIRST, cand_seq__query_time=[[102], [50, 60], [206]]))
    with pytest.raises(DataError) as error:
        arrow_to_batch(table, features, labels, source="new.parquet")
    assert (error.value.row, error.value.column) == (1, "cand_seq__query_time")
    assert "increasing timestamp" in error.value.problem
    assert "sequence_timestamp_is_ascending" in error.value.problem
    # The same rows are out of order for the default (oldest-first) specs.
    ascending_features, _ = make_specs()
    with pytest.raises(DataError, match="decreasing timestamp"):
        arrow_to_batch(make_table(**NEWEST_FIRST), ascending_features, labels)


def test_timestamp_checks_follow_the_spec_not_the_column_name(make_specs, make_table):
    import dataclasses

    features, labels = make_specs()
    # TorchEasyRec's seed doc names the candidates' times "cand_seq___query_time" (three
    # underscores): still a timestamp because its spec says so.
    renamed = [
        dataclasses.replace(f, name="cand_seq___query_time", column="cand_seq___query_time")
        if f.column == "cand_seq__query_time"
        else f
        for f in features
    ]
    table = make_table(cand_seq__query_time=[[102], [60, 50], [206]])
    table = table.rename_columns(
        ["cand_seq___query_time" if n == "cand_seq__query_time" else n for n in table.column_names]
    )
    with pytest.raises(DataError, match="decreasing timestamp") as error:
        arrow_to_batch(table, renamed, labels)
    assert error.value.column == "cand_seq___query_time"
    # A column named like a timestamp whose spec is not one is not checked as one.
    not_timestamps = [dataclasses.replace(f, is_timestamp=False) for f in features]
    table = make_table(uih_seq__action_timestamp=[[101, 100], [], [200, 200, 205]])
    assert arrow_to_batch(table, not_timestamps, labels).batch_size == 3


# ---- casts: float features take any number, and a failing cast names file and column ---------


def test_large_integer_float_feature_is_rounded_not_rejected(make_specs, make_table):
    # Watch time in ms as list<int64>: 20,000,000 ms (5.6 h) is above 2**24, where a safe cast
    # to float32 fails. It rounds to the nearest float32 instead (exact here).
    features, labels = make_specs()
    ints = pa.list_(pa.int64())
    table = make_table(
        uih_seq__watch_time=pa.array([[20_000_000, 16_777_217], [], [1, 2, 3]], ints),
        cand_seq__watch_time=pa.array([[30_000_000], [1, 2], [3]], ints),
    )
    for policy in ("error", "skip"):
        batch = arrow_to_batch(table, features, labels, on_bad_rows=policy)
        assert batch.raw["uih_seq__watch_time"][:2].tolist() == [20_000_000.0, 16_777_216.0]
        assert batch.labels["cand_seq__watch_time"][0].item() == 30_000_000.0


def test_double_beyond_float32_is_a_bad_row(make_specs, make_table):
    features, labels = make_specs()
    doubles = pa.list_(pa.float64())
    table = make_table(uih_seq__watch_time=pa.array([[1.0, 2.0], [], [1e300, 0.0, 1.0]], doubles))
    with pytest.raises(DataError) as error:
        arrow_to_batch(table, features, labels, source="w.parquet")
    assert (error.value.row, error.value.column) == (2, "uih_seq__watch_time")
    batch = arrow_to_batch(table, features, labels, on_bad_rows="skip")
    assert batch.sample_ids.tolist() == [10, 11]


@pytest.mark.parametrize("on_bad_rows", ["error", "skip"])
def test_unconvertible_values_name_file_and_column(on_bad_rows, make_specs, make_table):
    features, labels = make_specs()
    huge = pa.array([[5, 6], [], [7, 2**64 - 1, 9]], pa.list_(pa.uint64()))
    table = make_table(uih_seq__video_id=huge)
    with pytest.raises(DataError) as error:
        arrow_to_batch(table, features, labels, source="u.parquet", on_bad_rows=on_bad_rows)
    assert error.value.path == "u.parquet" and error.value.column == "uih_seq__video_id"
    assert "do not convert to int64" in str(error.value)


# ---- sequence_delim: string-encoded sequences split at the configured separator -------------


def test_semicolon_delimited_columns_follow_the_specs_separator(make_specs, make_table):
    features, labels = make_specs(delim=";")
    table = make_table(
        uih_seq__video_id=pa.array(["5;6", "", "7; 8;9"]),
        uih_seq__action_timestamp=pa.array(["100;101", "", "200;200;205"]),
        uih_seq__watch_time=pa.array(["1.5;2", "", "0;3;4.5"]),
        cand_seq__query_time=pa.array(["102", "50;60", "206"]),
        cand_seq__action_weight=pa.array(["3", "0;64", "1"]),
    )
    batch = arrow_to_batch(table, features, labels)
    expected = arrow_to_batch(make_table(), features, labels)
    assert batch.sparse.values().tolist() == expected.sparse.values().tolist()
    assert batch.sparse.lengths().tolist() == expected.sparse.lengths().tolist()
    for name in expected.raw:
        assert batch.raw[name].tolist() == expected.raw[name].tolist()
    assert batch.labels["cand_seq__action_weight"].tolist() == [3, 0, 64, 1]


def test_wrong_separator_names_the_one_used(make_specs, make_table):
    features, labels = make_specs(delim="|")
    table = make_table(uih_seq__video_id=pa.array(["5;6", "", "7;8;9"]))
    with pytest.raises(DataError) as error:
        arrow_to_batch(table, features, labels)
    assert error.value.row == 0
    assert "element not a whole number (split at '|')" in error.value.problem
