"""arrow_to_batch on hand-built tables (exact values), batching, and the Ray sharding."""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hstu.data.pipeline import arrow_to_batch, iter_jagged_batches, read_samples, row_tokens
from hstu.data.validate import DataError
from hstu.data.schema import sample_specs
from hstu.data.synthetic import SyntheticOptions, generate


def test_arrow_to_batch_exact_values_and_lengths(make_specs, make_table):
    features, labels = make_specs()
    batch = arrow_to_batch(make_table(), features, labels)

    assert batch.batch_size == 3
    assert batch.sample_ids.tolist() == [10, 11, 12]
    kjt = batch.sparse
    assert kjt.keys() == ["user_id", "uih_seq__video_id", "cand_seq__video_id"]
    # KJT values: every key's values back to back; lengths per key per row.
    assert kjt.values().tolist() == [1, 2, 3, 5, 6, 7, 8, 9, 11, 12, 13, 14]
    assert kjt.lengths().tolist() == [1, 1, 1, 2, 0, 3, 1, 2, 1]
    assert kjt.values().dtype == torch.int64
    # The per-key counts are known on the host and travel with the KJT (pinning and moving
    # keep them), so a lookup on a GPU can size its inputs without reading lengths back.
    for moved in (kjt, batch.pin_memory().sparse if torch.cuda.is_available() else kjt.to("cpu")):
        assert moved._length_per_key == [3, 5, 4]
        assert moved._offset_per_key == [0, 3, 8, 12]
    per_key = kjt.to_dict()
    assert per_key["uih_seq__video_id"].offsets().tolist() == [0, 2, 2, 5]
    assert per_key["cand_seq__video_id"].values().tolist() == [11, 12, 13, 14]

    assert batch.seq_lengths["uih_seq"].tolist() == [2, 0, 3]
    assert batch.seq_lengths["cand_seq"].tolist() == [1, 2, 1]
    assert batch.seq_lengths["uih_seq"].dtype == torch.int64
    timestamps = batch.raw["uih_seq__action_timestamp"]
    assert timestamps.dtype == torch.int64  # int64 seconds, never float32
    assert timestamps.tolist() == [100, 101, 200, 200, 205]
    assert batch.raw["uih_seq__watch_time"].dtype == torch.float32
    assert batch.raw["uih_seq__watch_time"].tolist() == [1.5, 2.0, 0.0, 3.0, 4.5]
    assert batch.raw["cand_seq__query_time"].tolist() == [102, 50, 60, 206]
    assert batch.labels["cand_seq__action_weight"].tolist() == [3, 0, 64, 1]
    assert batch.labels["cand_seq__watch_time"].tolist() == [9.0, 0.5, 7.25, 1.0]
    assert batch.num_tokens() == 5 + 4
    assert batch.num_tokens(contextual_tokens=6) == 9 + 18


def test_arrow_to_batch_keeps_large_timestamps_exact(make_specs, make_table):
    # 1.65e9 s: float32 would round these to multiples of 128 s.
    features, labels = make_specs()
    table = make_table(
        uih_seq__action_timestamp=[[1_650_000_001, 1_650_000_003], [], [1_650_000_005] * 3],
        cand_seq__query_time=[[1_650_000_007], [1_650_000_011, 1_650_000_013], [1_650_000_017]],
    )
    batch = arrow_to_batch(table, features, labels)
    assert batch.raw["uih_seq__action_timestamp"][:2].tolist() == [1_650_000_001, 1_650_000_003]
    assert batch.raw["cand_seq__query_time"].tolist()[-1] == 1_650_000_017


def test_arrow_to_batch_sliced_and_chunked_input(make_specs, make_table):
    features, labels = make_specs()
    table = make_table()
    # A slice starts mid-buffer; two chunks exercise the per-chunk path.
    sliced = table.slice(1, 2)
    batch = arrow_to_batch(sliced, features, labels)
    assert batch.raw["uih_seq__action_timestamp"].tolist() == [200, 200, 205]
    assert batch.seq_lengths["uih_seq"].tolist() == [0, 3]
    chunked = pa.concat_tables([table.slice(0, 1), table.slice(1, 2)])
    assert chunked.column("uih_seq__video_id").num_chunks == 2
    batch = arrow_to_batch(chunked, features, labels)
    assert batch.sparse.values().tolist() == [1, 2, 3, 5, 6, 7, 8, 9, 11, 12, 13, 14]


def test_arrow_to_batch_pipe_delimited_strings(make_specs, make_table):
    features, labels = make_specs()
    table = make_table(
        uih_seq__video_id=pa.array(["5|6", "", " 7| 8 |9"]),
        uih_seq__action_timestamp=pa.array(["100|101", "", "200|200|205"]),
        uih_seq__watch_time=pa.array(["1.5|2", "", "0|3e0|4.5"]),
        cand_seq__query_time=pa.array(["102", "50|60", "206"]),
    )
    batch = arrow_to_batch(table, features, labels)
    expected = arrow_to_batch(make_table(), features, labels)
    assert batch.sparse.values().tolist() == expected.sparse.values().tolist()
    assert batch.sparse.lengths().tolist() == expected.sparse.lengths().tolist()
    for name in expected.raw:
        assert batch.raw[name].dtype == expected.raw[name].dtype
        assert batch.raw[name].tolist() == expected.raw[name].tolist()


def test_arrow_to_batch_accepts_narrower_integer_and_float_types(make_specs, make_table):
    features, labels = make_specs()
    table = make_table(
        user_id=pa.array([1, 2, 3], pa.int32()),
        uih_seq__video_id=pa.array([[5, 6], [], [7, 8, 9]], pa.list_(pa.int32())),
        uih_seq__watch_time=pa.array([[1.5, 2.0], [], [0.0, 3.0, 4.5]], pa.list_(pa.float64())),
    )
    batch = arrow_to_batch(table, features, labels)
    assert batch.sparse.values().dtype == torch.int64
    assert batch.raw["uih_seq__watch_time"].dtype == torch.float32


class FakeShard:
    """Stands in for a Ray DataIterator: hands out consecutive Arrow slices."""

    def __init__(self, table: pa.Table):
        self.table = table

    def iter_batches(
        self,
        *,
        batch_size,
        batch_format,
        drop_last,
        prefetch_batches,
        local_shuffle_buffer_size,
        local_shuffle_seed,
    ):
        assert batch_format == "pyarrow" and not drop_last
        for start in range(0, self.table.num_rows, batch_size):
            yield self.table.slice(start, batch_size)


def _rows_with_lengths(uih_lengths, cand_lengths) -> pa.Table:
    rows = len(uih_lengths)
    ints = pa.list_(pa.int64())
    floats = pa.list_(pa.float32())
    uih = [list(range(n)) for n in uih_lengths]
    cand = [[1] * n for n in cand_lengths]
    return pa.table(
        {
            "sample_id": pa.array(range(rows), pa.int64()),
            "user_id": pa.array([1] * rows, pa.int64()),
            "uih_seq__video_id": pa.array(uih, ints),
            "uih_seq__action_timestamp": pa.array(uih, ints),
            "uih_seq__watch_time": pa.array([[0.0] * n for n in uih_lengths], floats),
            "cand_seq__video_id": pa.array(cand, ints),
            "cand_seq__query_time": pa.array(
                [[n] * c for n, c in zip(uih_lengths, cand_lengths)], ints
            ),
            "cand_seq__action_weight": pa.array([[0] * n for n in cand_lengths], ints),
            "cand_seq__watch_time": pa.array([[0.0] * n for n in cand_lengths], floats),
        }
    )


def test_fixed_batches_drop_last_is_counted(make_specs):
    features, labels = make_specs()
    table = _rows_with_lengths([3] * 10, [1] * 10)
    batches = iter_jagged_batches(FakeShard(table), features, labels, batch_size=4, drop_last=True)
    sizes = [b.batch_size for b in batches]
    assert sizes == [4, 4]
    assert batches.stats.dropped_rows == 2
    assert batches.stats.rows_read == 10
    assert batches.stats.tokens == 8 * 4
    # Without drop_last the short batch comes through.
    batches = iter_jagged_batches(FakeShard(table), features, labels, batch_size=4, drop_last=False)
    assert [b.batch_size for b in batches] == [4, 4, 2]
    assert batches.stats.dropped_rows == 0


def test_token_budget_packs_rows_greedily(make_specs):
    features, labels = make_specs(num_buckets=10_000)
    uih = [10, 10, 10, 50, 5, 5, 5, 200, 1, 1]
    cand = [2] * 10
    table = _rows_with_lengths(uih, cand)
    length_columns = {"uih_seq__video_id": "|", "cand_seq__video_id": "|"}
    assert row_tokens(table, length_columns).tolist() == [u + c for u, c in zip(uih, cand)]
    batches = iter_jagged_batches(
        FakeShard(table),
        features,
        labels,
        batch_size=3,
        drop_last=False,
        token_budget=40,
        read_rows=4,
    )
    groups = [b.sample_ids.tolist() for b in batches]
    # 12+12+12=36 fits; 52 alone exceeds (goes alone); 7*3=21 hits batch_size; 202 alone; 3+3.
    assert groups == [[0, 1, 2], [3], [4, 5, 6], [7], [8, 9]]
    assert batches.stats.rows == 10 and batches.stats.batches == 5
    capped = iter_jagged_batches(
        FakeShard(table),
        features,
        labels,
        batch_size=3,
        drop_last=False,
        token_budget=40,
        max_batches=2,
    )
    assert len(list(capped)) == 2 and capped.stats.stopped_at_max_batches


def test_producer_error_reaches_consumer(make_specs, make_table):
    features, labels = make_specs()
    table = make_table(cand_seq__query_time=[[102], [50], [206]])  # row 1: 2 vs 1 candidates
    batches = iter_jagged_batches(FakeShard(table), features, labels, batch_size=2, drop_last=False)
    with pytest.raises(Exception, match="cand_seq__query_time"):
        list(batches)


def test_a_batch_of_only_bad_rows_is_not_handed_on(make_specs):
    """Under skip, a batch whose every row is bad would reach the model with 0 rows (and fail
    inside TorchRec); it is left out, its rows counted."""
    features, labels = make_specs()
    table = _rows_with_lengths([3] * 6, [1] * 6)
    video_ids = [[0, 1, 2]] * 6
    video_ids[0] = video_ids[1] = [0, 1, 500]  # the whole first batch: id >= num_buckets 100
    table = table.set_column(2, "uih_seq__video_id", pa.array(video_ids, pa.list_(pa.int64())))
    for token_budget in (None, 100):
        batches = iter_jagged_batches(
            FakeShard(table),
            features,
            labels,
            batch_size=2,
            drop_last=False,
            token_budget=token_budget,
            read_rows=2,
            on_bad_rows="skip",
        )
        delivered = [b.sample_ids.tolist() for b in batches]
        assert delivered == [[2, 3], [4, 5]], token_budget
        assert batches.stats.batches == 2 and batches.stats.rows == 4
        assert batches.stats.skipped.rows == 2


def test_string_encoded_tokens_count_at_the_configured_separator():
    table = pa.table(
        {
            "a": pa.array(["1;2;3", "", None, "7"]),
            "b": pa.array([[1], [], [2, 3], [4, 5]], pa.list_(pa.int64())),
        }
    )
    assert row_tokens(table, {"a": ";", "b": "|"}).tolist() == [4, 0, 2, 3]
    assert row_tokens(table, {"a": "|"}).tolist() == [1, 0, 0, 1]


def test_token_count_of_a_missing_column_names_the_files():
    table = pa.table({"path": pa.array(["d/p1.parquet", "d/p0.parquet"]), "b": [1, 2]})
    with pytest.raises(DataError) as error:
        row_tokens(table, {"cand_seq__video_id": "|"})
    assert error.value.path == "d/p0.parquet, d/p1.parquet"
    assert error.value.column == "cand_seq__video_id"


def test_skip_warning_names_the_rows_files(make_specs, make_table, caplog):
    features, labels = make_specs()
    table = make_table(
        user_id=[1, 200, 3], path=pa.array(["a.parquet", "b.parquet", "c.parquet"])
    )
    with caplog.at_level("WARNING", logger="hstu.data.pipeline"):
        arrow_to_batch(table, features, labels, on_bad_rows="skip")
    assert "skipped 1 row(s) of b.parquet: user_id: id >= num_buckets 100" in caplog.text


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    generate(
        SyntheticOptions(
            users=60,
            median_history=20,
            max_history=64,
            max_candidates=8,
            items=5000,
            clusters=20,
            users_per_shard=10,
        ),
        out,
    )
    return out


@pytest.mark.slow
def test_ray_two_equal_shards_lose_and_duplicate_nothing(ray_local, synthetic_dir):
    features, labels = sample_specs(id_buckets=10_000)
    total = pq.read_table(synthetic_dir / "train", columns=["sample_id"]).num_rows
    assert total == 60
    dataset = read_samples(synthetic_dir / "train", shuffle_files=True, seed=3)
    assert "path" in dataset.columns()  # each row names its file, for data errors
    shards = dataset.streaming_split(2, equal=True)
    delivered: dict[int, list[int]] = {}
    stats = {}

    def consume(rank: int) -> None:
        batches = iter_jagged_batches(
            shards[rank],
            features,
            labels,
            batch_size=7,
            drop_last=False,
            shuffle_buffer=16,
            seed=rank,
        )
        delivered[rank] = [i for b in batches for i in b.sample_ids.tolist()]
        stats[rank] = batches.stats

    threads = [threading.Thread(target=consume, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(delivered[0]) == len(delivered[1]) == 30  # equal shards
    everything = delivered[0] + delivered[1]
    assert len(set(everything)) == 60  # no duplicates, nothing lost
    expected = set(
        pq.read_table(synthetic_dir / "train", columns=["sample_id"])
        .column("sample_id")
        .to_pylist()
    )
    assert set(everything) == expected
    assert stats[0].batches == stats[1].batches == 5  # 30 rows / 7: same step count
    assert stats[0].rows_read == 30 and stats[0].dropped_rows == 0


def _sample_file(path, rows: int, bad_rows=(), *, first_id: int | None = None) -> None:
    """`rows` valid rows for small_specs() (num_buckets 100), written to `path`; the rows in
    `bad_rows` hold history video id 500 (>= num_buckets). With `first_id`, a sample_id column
    numbers the rows from it."""
    ints, floats = pa.list_(pa.int64()), pa.list_(pa.float32())
    videos = [[500, 6] if i in bad_rows else [5, 6] for i in range(rows)]
    columns = {
        "user_id": pa.array(range(rows), pa.int64()),
        "uih_seq__video_id": pa.array(videos, ints),
        "uih_seq__action_timestamp": pa.array([[100, 101]] * rows, ints),
        "uih_seq__watch_time": pa.array([[1.5, 2.0]] * rows, floats),
        "cand_seq__video_id": pa.array([[11]] * rows, ints),
        "cand_seq__query_time": pa.array([[102]] * rows, ints),
        "cand_seq__action_weight": pa.array([[3]] * rows, ints),
        "cand_seq__watch_time": pa.array([[9.0]] * rows, floats),
    }
    if first_id is not None:
        columns = {"sample_id": pa.array(range(first_id, first_id + rows), pa.int64()), **columns}
    pq.write_table(pa.table(columns), path)


@pytest.mark.slow
def test_ray_batch_error_names_the_bad_rows_file_and_its_row_in_it(ray_local, tmp_path, make_specs):
    """A batch of rows from two files, no sample_id column: the error names the second file
    and the bad row's row in that file (7), not its row in the batch (4 + 7)."""
    features, labels = make_specs()
    _sample_file(tmp_path / "part-0.parquet", 4)
    _sample_file(tmp_path / "part-1.parquet", 9, bad_rows=(7,))
    dataset = read_samples(tmp_path)
    batches = iter_jagged_batches(dataset, features, labels, batch_size=32, drop_last=False)
    with pytest.raises(DataError) as error:
        list(batches)
    assert error.value.path == str(tmp_path / "part-1.parquet")
    assert error.value.row == 7 and error.value.column == "uih_seq__video_id"
    assert f"file {tmp_path / 'part-1.parquet'}, row 7 (0-based)" in str(error.value)
    assert "of the batch" not in str(error.value)
    assert "the file's first row breaking this rule" in str(error.value)  # how it was found


@pytest.mark.slow
def test_ray_batch_error_finds_the_row_by_its_sample_id(ray_local, tmp_path, make_specs):
    """With sample_ids, the row is the one holding the reported sample_id, even when rows are
    shuffled and the file has two rows breaking the same rule."""
    features, labels = make_specs()
    _sample_file(tmp_path / "part-0.parquet", 4, first_id=0)
    _sample_file(tmp_path / "part-1.parquet", 9, bad_rows=(5, 8), first_id=1000)
    dataset = read_samples(tmp_path)
    batches = iter_jagged_batches(
        dataset, features, labels, batch_size=32, drop_last=False, shuffle_buffer=13, seed=1
    )
    with pytest.raises(DataError) as error:
        list(batches)
    assert error.value.path == str(tmp_path / "part-1.parquet")
    assert error.value.sample_id in (1005, 1008)
    assert error.value.row == error.value.sample_id - 1000


def test_batch_error_falls_back_to_the_batch_row_when_the_file_is_unreadable(
    tmp_path, make_specs, make_table
):
    features, labels = make_specs()
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    paths = [str(tmp_path / "gone.parquet"), str(tmp_path / "broken.parquet")] * 2
    for bad in (1, 2):  # row 1: the broken file; row 2: a file that does not exist
        ids = [1, 2, 3]
        ids[bad] = 500
        table = make_table(user_id=ids, path=pa.array(paths[:3]))
        with pytest.raises(DataError) as error:
            arrow_to_batch(table, features, labels)
        assert error.value.path == paths[bad] and error.value.row is None
        assert f"row {bad} of the batch, 0-based; its row in the file is not known" in str(
            error.value
        )
        assert ("reading" if bad == 1 else "not a local file") in str(error.value)


def test_locating_by_sample_id_finds_that_row_not_the_first_bad_one(tmp_path, make_specs):
    """Two rows (5 and 8) break the same rule: the sample_id decides which one is reported.
    (The rule scan alone would say 5; the Ray test above cannot tell the two apart.)"""
    from hstu.data.validate import Finding, locate_row_in_file

    features, labels = make_specs()
    path = tmp_path / "part-1.parquet"
    _sample_file(path, 9, bad_rows=(5, 8), first_id=1000)
    finding = Finding("uih_seq__video_id", "unused by the sample_id lookup", np.zeros(1, bool))
    assert locate_row_in_file(str(path), finding, features, labels, sample_id=1008) == (8, None)
    assert locate_row_in_file(str(path), finding, features, labels, sample_id=1005) == (5, None)


def test_input_paths_are_expanded_as_torcheasyrec_reads_input_path(tmp_path, monkeypatch):
    from hstu.data.pipeline import expand_input_paths

    for name in ("a/p-0.parquet", "a/p-1.parquet", "run[1]/q.parquet"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    monkeypatch.chdir(tmp_path)  # relative names come back absolute
    found, missing = expand_input_paths(
        ["a/p-*.parquet, run[1]", "a/p-0.parquet,s3://bucket/train", "gone,none-*.parquet"])
    assert found == [str(tmp_path / "a/p-0.parquet"), str(tmp_path / "a/p-1.parquet"),
                     str(tmp_path / "run[1]"), "s3://bucket/train"]
    assert missing == ["gone", "none-*.parquet (no match)"]


def test_pack_slices_closes_batches_by_budget_and_rows():
    import numpy as np

    from hstu.data.pipeline import pack_slices

    costs = np.array([4, 3, 9, 12, 1, 1, 1, 1, 2], dtype=np.float64)
    # budget 10, at most 3 rows: [4, 3] (9 would pass 10), [9], [12] alone (over the budget),
    # [1, 1, 1] (row cap); [1, 2] fits and is not full: it waits for more rows.
    slices, start = pack_slices(costs, 10, 3)
    assert slices == [(0, 2), (2, 1), (3, 1), (4, 3)]
    assert start == 7
    assert pack_slices(np.zeros(0), 10, 3) == ([], 0)


def test_read_samples_asks_for_one_block_per_file_and_more_for_big_files(tmp_path, monkeypatch):
    from hstu.data import pipeline

    for index, rows in enumerate([10, 20, 5]):
        pq.write_table(pa.table({"sample_id": np.arange(rows)}), tmp_path / f"part-{index}.parquet")
    (tmp_path / "notes.txt").write_text("not a sample file")
    assert pipeline._default_num_blocks([str(tmp_path)]) == 3
    assert pipeline._default_num_blocks([str(tmp_path / "part-1.parquet")]) == 1
    assert pipeline._default_num_blocks(["s3://bucket/train"]) is None  # Ray decides
    # A file over BLOCK_FILE_BYTES gets one block per BLOCK_FILE_BYTES started.
    size = (tmp_path / "part-0.parquet").stat().st_size
    monkeypatch.setattr(pipeline, "BLOCK_FILE_BYTES", max(1, size // 3))
    assert pipeline._default_num_blocks([str(tmp_path / "part-0.parquet")]) >= 3


@pytest.mark.slow
def test_read_samples_reads_each_file_as_one_block(ray_local, synthetic_dir):
    files = list((synthetic_dir / "train").glob("*.parquet"))
    assert len(files) > 2
    dataset = read_samples(synthetic_dir / "train").materialize()
    assert dataset.num_blocks() == len(files)
