"""evaluate() on one process: every delivered row scored, the skipped ones counted beside them."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hstu.train.evaluation import RowsLeftOut, rows_left_out


class FakeShard:
    """Stands in for a Ray DataIterator: consecutive Arrow slices of one table."""

    def __init__(self, table: pa.Table):
        self.table = table

    def iter_batches(self, *, batch_size, **_):
        for start in range(0, self.table.num_rows, batch_size):
            yield self.table.slice(start, batch_size)


@pytest.fixture(scope="module")
def specs(smoke_recipe):
    from hstu.config import feature_specs, label_specs, load_config

    cfg = load_config(smoke_recipe)
    return cfg, feature_specs(cfg), label_specs(cfg)


@pytest.fixture(scope="module")
def eval_table(smoke_data) -> pa.Table:
    files = sorted(Path(smoke_data["eval"]).glob("*.parquet"))
    return pa.concat_tables(pq.read_table(path) for path in files)


def with_bad_first_rows(table: pa.Table, features, bad: int) -> pa.Table:
    """The first `bad` rows get a user_id beyond its table (a bad row)."""
    buckets = next(spec.num_buckets for spec in features if spec.name == "user_id")
    user_ids = table.column("user_id").to_pylist()
    user_ids[:bad] = [buckets] * bad
    index = table.column_names.index("user_id")
    return table.set_column(index, "user_id", pa.array(user_ids, pa.int64()))


def test_rows_left_out_of_a_pass(specs, eval_table):
    from hstu.data.pipeline import iter_jagged_batches

    _, features, labels = specs
    assert rows_left_out([]) == RowsLeftOut(0, 0)  # a plain list has no pipeline stats
    table = with_bad_first_rows(eval_table, features, bad=1)
    batches = iter_jagged_batches(
        FakeShard(table), features, labels, batch_size=4, drop_last=True, on_bad_rows="skip"
    )
    delivered = sum(batch.batch_size for batch in batches)
    dropped = table.num_rows % 4
    assert dropped  # the smoke eval set does not fill its last batch of 4
    assert rows_left_out(batches) == RowsLeftOut(skipped=1, dropped=dropped)
    assert delivered == table.num_rows - 1 - dropped
    assert RowsLeftOut(1, 2).describe().startswith("1 bad row(s) skipped")
    assert "2 row(s) dropped (drop_last" in RowsLeftOut(1, 2).describe()
    assert RowsLeftOut().describe() == ""


def test_eval_counts_skipped_rows_and_survives_an_all_bad_batch(specs, eval_table):
    """The first batch holds only bad rows: it is not handed to the model (a 0-row batch fails
    inside TorchRec), and eval/skipped_rows says what eval/rows leaves out."""
    from hstu.data.pipeline import iter_jagged_batches
    from hstu.model import DlrmHSTU
    from hstu.train.evaluation import evaluate

    cfg, features, labels = specs
    table = with_bad_first_rows(eval_table, features, bad=4)
    batches = iter_jagged_batches(
        FakeShard(table), features, labels, batch_size=4, drop_last=False, on_bad_rows="skip"
    )
    torch.manual_seed(0)
    model = DlrmHSTU(cfg, features, labels)
    metrics = evaluate(model, model, batches, device=torch.device("cpu"))
    assert metrics["eval/skipped_rows"] == 4
    assert metrics["eval/rows"] == table.num_rows - 4
    assert "eval/dropped_rows" not in metrics  # nothing dropped: not reported
