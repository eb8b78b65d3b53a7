"""Batches by cost (data_config.batch_cost_size / sample_cost_field): every row whole in exactly
one batch, the budget and batch_size respected, the cost column checked, eval unchanged."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hstu.config import feature_specs, label_specs, load_config
from hstu.data.batch_cost import (
    batch_cost_options,
    check_cost_column_in_files,
    contextual_token_count,
    read_cost_column,
)
from hstu.data.pipeline import iter_jagged_batches, read_samples
from hstu.data.synthetic import SyntheticOptions, generate
from hstu.data.validate import DataError

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "recipes" / "smoke.config"


class FakeShard:
    """Stands in for a Ray DataIterator: hands out consecutive Arrow slices."""

    def __init__(self, table: pa.Table):
        self.table = table

    def iter_batches(self, *, batch_size, batch_format, drop_last, prefetch_batches,
                     local_shuffle_buffer_size, local_shuffle_seed):
        for start in range(0, self.table.num_rows, batch_size):
            yield self.table.slice(start, batch_size)


def rows_with_lengths(uih_lengths, cand_lengths, **extra) -> pa.Table:
    """Rows for small_specs(): row i has sample_id i, uih_lengths[i] history items (whose ids
    count 0, 1, ...) and cand_lengths[i] candidates; `extra` adds columns."""
    ints, floats = pa.list_(pa.int64()), pa.list_(pa.float32())
    rows = len(uih_lengths)
    uih = [[j % 100 for j in range(n)] for n in uih_lengths]
    return pa.table(
        {
            "sample_id": pa.array(range(rows), pa.int64()),
            "user_id": pa.array([1] * rows, pa.int64()),
            "uih_seq__video_id": pa.array(uih, ints),
            "uih_seq__action_timestamp": pa.array([list(range(n)) for n in uih_lengths], ints),
            "uih_seq__watch_time": pa.array([[0.5] * n for n in uih_lengths], floats),
            "cand_seq__video_id": pa.array([[7] * n for n in cand_lengths], ints),
            "cand_seq__query_time": pa.array(
                [[n] * c for n, c in zip(uih_lengths, cand_lengths)], ints
            ),
            "cand_seq__action_weight": pa.array([[1] * n for n in cand_lengths], ints),
            "cand_seq__watch_time": pa.array([[2.0] * n for n in cand_lengths], floats),
            **extra,
        }
    )


def long_tailed(rows: int, seed: int = 0) -> tuple[list[int], list[int]]:
    rng = np.random.default_rng(seed)
    uih = np.minimum(rng.lognormal(3.0, 1.2, rows).astype(int), 400).tolist()
    cand = rng.integers(1, 6, rows).tolist()
    return uih, cand


def delivered(batches) -> list[list[int]]:
    return [batch.sample_ids.tolist() for batch in batches]


def test_every_row_whole_in_exactly_one_batch_within_budget_and_batch_size(make_specs):
    features, labels = make_specs()
    uih, cand = long_tailed(300)
    table = rows_with_lengths(uih, cand)
    budget, batch_size, contextual = 120, 6, 2
    batches = iter_jagged_batches(
        FakeShard(table), features, labels, batch_size=batch_size, drop_last=False,
        token_budget=budget, contextual_tokens=contextual, read_rows=16,
    )
    seen: list[int] = []
    for batch in batches:
        ids = batch.sample_ids.tolist()
        seen += ids
        # Each row arrives whole: its sequences as long as in the source table.
        assert batch.seq_lengths["uih_seq"].tolist() == [uih[i] for i in ids]
        assert batch.seq_lengths["cand_seq"].tolist() == [cand[i] for i in ids]
        assert len(batch.labels["cand_seq__action_weight"]) == sum(cand[i] for i in ids)
        costs = [contextual + uih[i] + cand[i] for i in ids]
        assert len(ids) <= batch_size
        assert sum(costs) <= budget or len(ids) == 1  # only a row alone may exceed it
    assert seen == list(range(300))  # nothing lost, nothing repeated, order kept
    assert batches.stats.rows == batches.stats.rows_read == 300
    assert batches.stats.dropped_rows == 0


def test_greedy_batches_close_before_the_budget_would_be_passed(make_specs):
    features, labels = make_specs()
    # Costs with 3 contextual tokens: 10, 10, 10, 40, 8, 100, 5, 5, 5, 5, 5.
    uih = [5, 5, 5, 35, 3, 95, 0, 0, 0, 0, 0]
    table = rows_with_lengths(uih, [2] * len(uih))
    batches = iter_jagged_batches(
        FakeShard(table), features, labels, batch_size=4, drop_last=False, token_budget=30,
        contextual_tokens=3, read_rows=3,
    )
    # 10+10+10 = 30 fits exactly; 40 alone (over the budget); 8 then 100 would pass it;
    # 100 alone; four rows of 5 hit batch_size; the last 5 is the tail.
    assert delivered(batches) == [[0, 1, 2], [3], [4], [5], [6, 7, 8, 9], [10]]


def test_contextual_tokens_count_in_the_cost(make_specs):
    features, labels = make_specs()
    table = rows_with_lengths([8] * 6, [2] * 6)  # 10 sequence tokens a row
    packs = {}
    for contextual in (0, 5):
        batches = iter_jagged_batches(
            FakeShard(table), features, labels, batch_size=10, drop_last=False,
            token_budget=30, contextual_tokens=contextual,
        )
        packs[contextual] = [len(ids) for ids in delivered(batches)]
    assert packs == {0: [3, 3], 5: [2, 2, 2]}


def test_a_row_over_the_budget_gets_a_batch_of_its_own(make_specs):
    features, labels = make_specs()
    table = rows_with_lengths([1, 1, 500, 1, 1, 600], [1] * 6)
    batches = iter_jagged_batches(
        FakeShard(table), features, labels, batch_size=8, drop_last=False, token_budget=50,
    )
    assert delivered(batches) == [[0, 1], [2], [3, 4], [5]]


def test_batch_size_still_caps_the_rows(make_specs):
    features, labels = make_specs()
    table = rows_with_lengths([1] * 23, [1] * 23)
    batches = iter_jagged_batches(
        FakeShard(table), features, labels, batch_size=5, drop_last=False,
        token_budget=10_000, read_rows=7,
    )
    assert [len(ids) for ids in delivered(batches)] == [5, 5, 5, 5, 3]


def test_drop_last_drops_only_the_tail_and_counts_it(make_specs):
    features, labels = make_specs()
    uih, cand = long_tailed(97, seed=1)
    table = rows_with_lengths(uih, cand)
    batches = iter_jagged_batches(
        FakeShard(table), features, labels, batch_size=8, drop_last=True, token_budget=150,
    )
    seen = [i for ids in delivered(batches) for i in ids]
    dropped = batches.stats.dropped_rows
    assert seen == list(range(97 - dropped))  # only the last rows are dropped
    assert 0 < dropped < 8 and batches.stats.rows + dropped == 97


def test_sample_cost_field_decides_instead_of_tokens(make_specs):
    features, labels = make_specs()
    costs = [3.0, 4.0, 0.0, 2.5, 9.0, 1.0, 1.0, 0.5]
    table = rows_with_lengths([50] * 8, [1] * 8, batch_cost=pa.array(costs))  # 51 tokens each
    batches = iter_jagged_batches(
        FakeShard(table), features, labels, batch_size=8, drop_last=False, token_budget=7,
        sample_cost_field="batch_cost", contextual_tokens=6, read_rows=3,
    )
    # 3+4+0 = 7; 2.5 (+9 would pass); 9 over the budget alone; 1+1+0.5.
    assert delivered(batches) == [[0, 1, 2], [3], [4], [5, 6, 7]]
    integer = rows_with_lengths([1] * 4, [1] * 4, cost=pa.array([2, 2, 2, 2], pa.int32()))
    batches = iter_jagged_batches(
        FakeShard(integer), features, labels, batch_size=8, drop_last=False, token_budget=4,
        sample_cost_field="cost",
    )
    assert delivered(batches) == [[0, 1], [2, 3]]


@pytest.mark.parametrize(
    "column, message",
    [
        (None, "missing column"),
        (pa.array([[1], [2], [3]], pa.list_(pa.int64())), "expected a number per row"),
        (pa.array(["1", "2", "3"]), "expected a number per row"),
    ],
)
def test_a_missing_or_mistyped_cost_column_names_file_and_column(make_specs, column, message):
    features, labels = make_specs()
    extra = {"path": pa.array(["d/a.parquet"] * 3)}
    if column is not None:
        extra["cost"] = column
    table = rows_with_lengths([1, 1, 1], [1, 1, 1], **extra)
    batches = iter_jagged_batches(
        FakeShard(table), features, labels, batch_size=2, drop_last=False, token_budget=5,
        sample_cost_field="cost",
    )
    with pytest.raises(DataError) as error:
        list(batches)
    assert error.value.column == "cost" and error.value.path == "d/a.parquet"
    assert message in str(error.value) and "sample_cost_field" in str(error.value)


@pytest.mark.parametrize(
    "values, problem",
    [
        ([1.0, None, 1.0, 1.0], "no cost (null)"),
        ([1.0, 1.0, float("nan"), 1.0], "not a finite number"),
        ([1.0, -2.0, 1.0, float("inf")], "negative cost"),
    ],
)
def test_a_bad_cost_stops_with_the_row_or_is_skipped_and_counted(make_specs, values, problem):
    features, labels = make_specs()
    table = rows_with_lengths([1] * 4, [1] * 4, cost=pa.array(values, pa.float64()))
    bad_rows = [i for i, v in enumerate(values) if v is None or not np.isfinite(v) or v < 0]
    batches = iter_jagged_batches(
        FakeShard(table), features, labels, batch_size=4, drop_last=False, token_budget=10,
        sample_cost_field="cost",
    )
    with pytest.raises(DataError) as error:
        list(batches)
    assert error.value.column == "cost" and error.value.row == min(bad_rows)
    assert problem in str(error.value) and "on_bad_rows" in str(error.value)

    batches = iter_jagged_batches(
        FakeShard(table), features, labels, batch_size=4, drop_last=False, token_budget=10,
        sample_cost_field="cost", on_bad_rows="skip",
    )
    assert [i for ids in delivered(batches) for i in ids] == [
        i for i in range(4) if i not in bad_rows
    ]
    assert batches.stats.skipped.rows == len(bad_rows)
    assert any(problem in reason for reason in batches.stats.skipped.by_reason)


def test_a_bad_cost_in_a_ray_batch_names_its_file_and_row_in_it(tmp_path):
    """Rows of two files in one batch: the error names the second file and the row there,
    found by sample_id, or by re-reading the cost column when there is none."""
    for with_ids in (True, False):
        first = {"cost": pa.array([1.0, 2.0])}
        second = {"cost": pa.array([1.0, 1.0, -1.0])}
        if with_ids:
            first["sample_id"] = pa.array([10, 11], pa.int64())
            second["sample_id"] = pa.array([20, 21, 22], pa.int64())
        pq.write_table(pa.table(first), tmp_path / "a.parquet")
        pq.write_table(pa.table(second), tmp_path / "b.parquet")
        paths = [str(tmp_path / "a.parquet")] * 2 + [str(tmp_path / "b.parquet")] * 3
        table = pa.concat_tables(
            [pq.read_table(tmp_path / "a.parquet"), pq.read_table(tmp_path / "b.parquet")]
        ).append_column("path", pa.array(paths))
        with pytest.raises(DataError) as error:
            read_cost_column(table, "cost")
        assert error.value.path == str(tmp_path / "b.parquet")
        assert error.value.row == 2 and error.value.column == "cost"
        assert ("breaking this rule" in str(error.value)) is not with_ids


def test_cost_column_checked_in_the_files_before_a_run(tmp_path):
    pq.write_table(pa.table({"cost": pa.array([1, 2])}), tmp_path / "part-0.parquet")
    pq.write_table(pa.table({"other": pa.array([1, 2])}), tmp_path / "part-1.parquet")
    check_cost_column_in_files([str(tmp_path / "part-0.parquet")], "cost")
    with pytest.raises(DataError) as error:
        check_cost_column_in_files([str(tmp_path)], "cost")
    assert error.value.path == str(tmp_path / "part-1.parquet") and error.value.column == "cost"
    pq.write_table(pa.table({"cost": pa.array(["1"])}), tmp_path / "part-1.parquet")
    with pytest.raises(DataError, match="expected a number per row"):
        check_cost_column_in_files([str(tmp_path)], "cost")


def test_options_from_the_config_count_contextual_tokens_and_follow_the_alias():
    cfg = load_config(SMOKE)
    assert contextual_token_count(cfg) == 6
    assert batch_cost_options(cfg) == {
        "token_budget": None, "sample_cost_field": None, "contextual_tokens": 6
    }
    for override in ("batch_cost_size=900", "token_budget=900"):
        cfg = load_config(SMOKE, [f"data_config.{override}"])
        assert batch_cost_options(cfg)["token_budget"] == 900
    cfg = load_config(
        SMOKE, ["data_config.batch_cost_size=900", "data_config.sample_cost_field=cost",
                "model_config.dlrm_hstu.concat_contextual_features=true"]
    )
    assert batch_cost_options(cfg) == {
        "token_budget": 900, "sample_cost_field": "cost", "contextual_tokens": 1
    }


@pytest.fixture(scope="module")
def smoke_samples(tmp_path_factory):
    """Synthetic rows that fit recipes/smoke.config, with long-tailed history lengths."""
    out = tmp_path_factory.mktemp("smoke_samples")
    generate(
        SyntheticOptions(users=48, items=900, max_history=120, median_history=25,
                         max_candidates=12, eval_fraction=1.0, users_per_shard=48),
        out,
    )
    return out


def test_eval_results_are_the_same_with_and_without_a_budget(smoke_samples):
    """Evaluation packs too (as in TorchEasyRec), never drops a row and keeps the order, so
    the metrics over the eval set are those of fixed-size batches."""
    import torch

    from hstu.model import DlrmHSTU
    from hstu.train.evaluation import evaluate

    cfg = load_config(SMOKE)
    features, labels = feature_specs(cfg), label_specs(cfg)
    torch.manual_seed(0)
    model = DlrmHSTU(cfg, features, labels)
    table = pq.read_table(smoke_samples / "eval")
    results, orders = {}, {}
    for budget in (None, 300):
        batches = iter_jagged_batches(
            FakeShard(table), features, labels, batch_size=8, drop_last=False,
            **({"token_budget": budget, "contextual_tokens": 6} if budget else {}),
        )
        listed = list(batches)
        orders[budget] = [i for batch in listed for i in batch.sample_ids.tolist()]
        if budget:
            assert len({len(batch.sample_ids) for batch in listed}) > 1  # really packed
        results[budget] = evaluate(model, model, listed, device=torch.device("cpu"))
    assert orders[None] == orders[300] == table.column("sample_id").to_pylist()
    assert results[300]["eval/rows"] == results[None]["eval/rows"] == table.num_rows
    assert not np.isnan(results[None]["eval/auc/is_click"])  # a metric with something to say
    for key, value in results[None].items():
        if key != "eval/steps":
            assert results[300][key] == pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True), key


@pytest.mark.slow
def test_ray_two_shards_packed_lose_and_repeat_nothing(ray_local, smoke_samples):
    cfg = load_config(SMOKE)
    features, labels = feature_specs(cfg), label_specs(cfg)
    expected = pq.read_table(smoke_samples / "train", columns=["sample_id"])
    shards = read_samples(smoke_samples / "train", shuffle_files=True, seed=1).streaming_split(
        2, equal=True
    )
    seen: dict[int, list[int]] = {}

    def consume(rank: int) -> None:
        batches = iter_jagged_batches(
            shards[rank], features, labels, batch_size=8, drop_last=False, shuffle_buffer=16,
            seed=rank, token_budget=400, contextual_tokens=6,
        )
        seen[rank] = [i for batch in batches for i in batch.sample_ids.tolist()]

    threads = [threading.Thread(target=consume, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    everything = seen[0] + seen[1]
    assert len(everything) == len(set(everything)) == expected.num_rows
    assert set(everything) == set(expected.column("sample_id").to_pylist())
