"""predict: output layout, batching, bad rows; the DataFrame path of the pyfunc model."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hstu.data.validate import DataError


def test_output_rows_are_aligned_with_the_candidates(smoke_predictor, samples, tmp_path):
    from hstu.export.predict import predict_files

    summary = predict_files(
        smoke_predictor, samples["eval"], tmp_path / "p.parquet", batch_size=4, progress=False
    )
    out = pq.read_table(tmp_path / "p.parquet")
    source = pa.concat_tables(pq.read_table(p) for p in sorted(samples["eval"].glob("*.parquet")))
    assert out.column_names[:3] == ["sample_id", "user_id", "cand_seq__video_id"]
    assert len(out.column_names) == 3 + 8  # eight tasks in the smoke recipe
    assert out.column("sample_id").to_pylist() == source.column("sample_id").to_pylist()
    assert (
        out.column("cand_seq__video_id").to_pylist()
        == source.column("cand_seq__video_id").to_pylist()
    )
    for row_ids, row_scores in zip(
        out.column("cand_seq__video_id").to_pylist(), out.column("probs_is_click").to_pylist()
    ):
        assert len(row_scores) == len(row_ids)
        assert all(0.0 < s < 1.0 for s in row_scores)
    assert summary.rows_in == summary.rows_out == source.num_rows
    assert summary.candidates == sum(
        len(r) for r in source.column("cand_seq__video_id").to_pylist()
    )


def test_batch_size_does_not_change_scores(smoke_predictor, samples):
    table = pq.read_table(min(samples["eval"].glob("*.parquet"))).slice(0, 4)
    whole = smoke_predictor.predict_table(table)
    parts = pa.concat_tables(
        [
            smoke_predictor.predict_table(table.slice(0, 1)),
            smoke_predictor.predict_table(table.slice(1, 3)),
        ]
    )
    for task in ("probs_is_click", "probs_long_view"):
        np.testing.assert_allclose(
            np.concatenate(whole.column(task).to_pylist()),
            np.concatenate(parts.column(task).to_pylist()),
            rtol=1e-5,
            atol=1e-6,
        )


def _with_bad_id(table: pa.Table, row: int) -> pa.Table:
    ids = table.column("cand_seq__video_id").to_pylist()
    ids[row] = [5000] + ids[row][1:]  # the smoke recipe's video table has 1000 rows
    index = table.column_names.index("cand_seq__video_id")
    return table.set_column(index, "cand_seq__video_id", pa.array(ids, pa.list_(pa.int64())))


def test_a_bad_row_names_file_row_and_column(smoke_predictor, samples, tmp_path):
    from hstu.export.predict import predict_files

    table = _with_bad_id(pq.read_table(min(samples["eval"].glob("*.parquet"))), 2)
    pq.write_table(table, tmp_path / "bad.parquet")
    with pytest.raises(DataError) as raised:
        predict_files(
            smoke_predictor,
            tmp_path / "bad.parquet",
            tmp_path / "o.parquet",
            batch_size=2,
            progress=False,
        )
    message = str(raised.value)
    assert f"file {tmp_path / 'bad.parquet'}, row 2" in message
    assert "column 'cand_seq__video_id': id >= num_buckets 1000" in message
    assert not (tmp_path / "o.parquet").exists()

    summary = predict_files(
        smoke_predictor,
        tmp_path / "bad.parquet",
        tmp_path / "o.parquet",
        batch_size=2,
        on_bad_rows="skip",
        progress=False,
    )
    assert summary.rows_out == table.num_rows - 1 and summary.bad_rows.rows == 1
    kept = pq.read_table(tmp_path / "o.parquet").column("sample_id").to_pylist()
    assert table.column("sample_id")[2].as_py() not in kept


def test_a_missing_column_is_named(smoke_predictor, samples):
    table = pq.read_table(min(samples["eval"].glob("*.parquet")))
    with pytest.raises(DataError, match="column 'uih_seq__action_timestamp': missing column"):
        smoke_predictor.predict_table(
            table.drop_columns(["uih_seq__action_timestamp"]), source="x.parquet"
        )


def test_dataframe_rows_score_like_the_parquet_rows(smoke_predictor, samples):
    from hstu.export.predict import dataframe_to_table

    table = pq.read_table(min(samples["eval"].glob("*.parquet")))
    frame = table.to_pandas()  # list cells become numpy arrays
    frame["uih_seq__watch_time"] = [list(map(float, v)) for v in frame["uih_seq__watch_time"]]
    from_frame = smoke_predictor.predict_table(dataframe_to_table(frame, smoke_predictor))
    direct = smoke_predictor.predict_table(table)
    assert (
        from_frame.column("probs_is_like").to_pylist() == direct.column("probs_is_like").to_pylist()
    )
    with pytest.raises(DataError, match="column 'user_id': cannot be read as int64"):
        frame["user_id"] = "someone"
        dataframe_to_table(frame, smoke_predictor)


def test_data_paths_take_commas_and_globs_like_training(tmp_path):
    from hstu.export.predict import parquet_files

    for name in ("a/x-0.parquet", "a/x-1.parquet", "b/y.parquet"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    a0, a1, b = (tmp_path / "a/x-0.parquet", tmp_path / "a/x-1.parquet", tmp_path / "b/y.parquet")
    assert parquet_files(f"{tmp_path / 'a' / 'x-*.parquet'},{tmp_path / 'b'}") == [a0, a1, b]
    assert parquet_files([str(a0), str(tmp_path / "a")]) == [a0, a1]  # a0 once
    with pytest.raises(FileNotFoundError, match=r"none-\*\.parquet \(no match\)"):
        parquet_files(str(tmp_path / "none-*.parquet"))
