"""Sharding choices: --sharding parsing and the planner constraints built from it."""

from __future__ import annotations

import pytest
import torch

from hstu.train.sharding import (
    ShardingError,
    parse_sharding_overrides,
    sharding_constraints,
)

TABLES = ["video_id_emb", "user_id_emb"]


def test_overrides_parse_into_types_per_table():
    parsed = parse_sharding_overrides(["video_id_emb=row_wise", "user_id_emb=table_wise,column_wise"])
    assert parsed == {"video_id_emb": ["row_wise"], "user_id_emb": ["table_wise", "column_wise"]}


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("video_id_emb", "expected TABLE=TYPE"),
        ("video_id_emb=rowwise", "unknown sharding type 'rowwise'"),
        ("=row_wise", "expected TABLE=TYPE"),
    ],
)
def test_bad_overrides_say_what_is_expected(spec, expected):
    with pytest.raises(ShardingError, match=expected):
        parse_sharding_overrides([spec])


def test_a_table_given_twice_is_refused():
    with pytest.raises(ShardingError, match="given twice"):
        parse_sharding_overrides(["video_id_emb=row_wise", "video_id_emb=table_wise"])


def test_unknown_table_lists_the_model_tables():
    with pytest.raises(ShardingError, match="no embedding table named 'item_emb'.*video_id_emb"):
        sharding_constraints(TABLES, {"item_emb": ["row_wise"]}, torch.device("cpu"))


def test_cpu_pins_the_fused_kernel_and_refuses_data_parallel():
    constraints = sharding_constraints(TABLES, {"video_id_emb": ["row_wise"]}, torch.device("cpu"))
    assert constraints["video_id_emb"].sharding_types == ["row_wise"]
    assert "data_parallel" not in constraints["user_id_emb"].sharding_types
    assert "table_wise" in constraints["user_id_emb"].sharding_types
    assert all(c.compute_kernels == ["fused"] for c in constraints.values())
    with pytest.raises(ShardingError, match="data_parallel.*fails on CPU"):
        sharding_constraints(TABLES, {"user_id_emb": ["data_parallel"]}, torch.device("cpu"))


def test_gpu_leaves_unpinned_tables_to_the_planner():
    constraints = sharding_constraints(TABLES, {"video_id_emb": ["row_wise"]}, torch.device("cuda"))
    assert constraints["video_id_emb"].sharding_types == ["row_wise"]
    assert constraints["user_id_emb"].sharding_types is None
    assert constraints["user_id_emb"].compute_kernels is None
