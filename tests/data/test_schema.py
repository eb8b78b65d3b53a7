"""The sample schema and the specs that read it agree with the recipes."""

from __future__ import annotations

from pathlib import Path

import pytest

from hstu.data import schema

REPO = Path(__file__).resolve().parents[2]


def test_schema_columns():
    base = schema.sample_schema(False)
    assert base.names[:2] == ["sample_id", "user_id"]
    assert str(base.field("uih_seq__action_timestamp").type) == "list<item: int64>"
    assert str(base.field("cand_seq__watch_time").type) == "list<item: float>"
    mtgr = schema.sample_schema(True)
    assert set(mtgr.names) - set(base.names) == {
        "uih_seq__video_cate1",
        "uih_seq__video_cate2",
        "cand_seq__video_cate1",
        "cand_seq__video_cate2",
        "cand_seq__user_video_cross1",
        "cand_seq__user_video_cross2",
    }
    assert schema.split_column("uih_seq__video_id") == ("uih_seq", "video_id")
    assert schema.split_column("user_id") == (None, "user_id")
    timestamps = {spec.column for spec in schema.sample_specs(True)[0] if spec.is_timestamp}
    assert timestamps == {"uih_seq__action_timestamp", "cand_seq__query_time"}


@pytest.mark.parametrize("recipe, mtgr", [("kuairand_dlrm_hstu", False), ("kuairand_mtgr", True)])
def test_sample_specs_match_the_recipes(recipe, mtgr):
    from hstu.config import feature_specs, label_specs, load_config

    cfg = load_config(str(REPO / "recipes" / f"{recipe}.config"))
    ours = {spec.name: spec for spec in schema.sample_specs(mtgr)[0]}
    for spec in feature_specs(cfg):
        mine = ours[spec.name]
        assert (mine.column, mine.kind, mine.sequence, mine.num_buckets) == (
            spec.column,
            spec.kind,
            spec.sequence,
            spec.num_buckets,
        ), spec.name
        if spec.kind == "raw":
            assert mine.value_dtype == spec.value_dtype
        assert (mine.is_timestamp, mine.timestamps_ascending, mine.sequence_delim) == (
            spec.is_timestamp,
            spec.timestamps_ascending,
            spec.sequence_delim,
        ), spec.name
    ours_labels = {label.column: label for label in schema.sample_specs(mtgr)[1]}
    for label in label_specs(cfg):
        assert ours_labels[label.column] == label
