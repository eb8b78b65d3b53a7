"""feature_specs / label_specs / sequence_names: names, columns, tables and dtypes."""

from __future__ import annotations

import pytest

from hstu.config import (
    ConfigError,
    feature_specs,
    label_specs,
    sequence_names,
    unused_features,
    unused_labels,
)


def test_feature_specs_of_grouped_sequences(kit):
    cfg = kit.load(kit.BASE)
    specs = {spec.name: spec for spec in feature_specs(cfg)}
    # Declared but in no group: not read, no table.
    assert "uih_seq__cate" not in specs
    assert unused_features(cfg) == ["uih_seq__cate"]

    video = specs["uih_seq__video_id"]
    assert (video.column, video.kind, video.sequence) == ("uih_seq__video_id", "id", "uih_seq")
    assert (video.embedding_name, video.embedding_dim, video.num_buckets) == ("video_emb", 8, 100)
    assert specs["cand_seq__video_id"].embedding_name == "video_emb"  # shared table
    user = specs["user_id"]
    assert (user.sequence, user.embedding_name, user.data_type) == (None, "user_id_emb", "FP32")

    # Raw values: bitmasks and timestamps int64, everything else float32.
    assert specs["uih_seq__action_weight"].value_dtype == "int64"
    assert specs["uih_seq__action_timestamp"].value_dtype == "int64"
    assert specs["cand_seq__query_time"].value_dtype == "int64"
    assert specs["uih_seq__watch_time"].value_dtype == "float32"
    assert {spec.kind for spec in specs.values() if spec.name.endswith("time")} == {"raw"}


def test_fg_dag_reads_the_column_its_expression_names(kit):
    # TorchEasyRec's sequence features with fg_mode FG_DAG: side input "S__x" for "side:x".
    text = kit.edit(
        'feature_name: "action_weight" expression: "user:action_weight"',
        'feature_name: "action_weight" expression: "user:actions"',
        "dataset_type: ParquetDataset",
        "dataset_type: ParquetDataset fg_mode: FG_DAG",
    )
    specs = {spec.name: spec for spec in feature_specs(kit.load(text))}
    assert specs["uih_seq__action_weight"].column == "uih_seq__actions"


def test_fg_none_reads_the_column_named_after_the_feature(kit):
    # TorchEasyRec reads encoded (FG_NONE) inputs by feature name; the expression is unused.
    text = kit.edit(
        'feature_name: "action_weight" expression: "user:action_weight"',
        'feature_name: "action_weight" expression: "user:actions"',
        'feature_name: "user_id" expression: "user:user_id"',
        'feature_name: "user_id" expression: "user:uid"',
    )
    specs = {spec.name: spec for spec in feature_specs(kit.load(text))}
    assert specs["uih_seq__action_weight"].column == "uih_seq__action_weight"
    assert specs["user_id"].column == "user_id"


def test_fg_none_features_need_no_expression(kit):
    # TorchEasyRec's 27K benchmark config declares every feature without an expression.
    text = kit.edit(
        'feature_name: "user_id" expression: "user:user_id"',
        'feature_name: "user_id"',
        'features { raw_feature { feature_name: "watch_time" expression: "user:watch_time" } }',
        'features { raw_feature { feature_name: "watch_time" } }',
    )
    specs = {spec.name: spec for spec in feature_specs(kit.load(text))}
    assert (specs["user_id"].column, specs["uih_seq__watch_time"].column) == (
        "user_id",
        "uih_seq__watch_time",
    )


def test_fg_dag_features_need_an_expression(kit):
    text = kit.edit(
        'feature_name: "user_id" expression: "user:user_id"',
        'feature_name: "user_id"',
        "dataset_type: ParquetDataset",
        "dataset_type: ParquetDataset fg_mode: FG_DAG",
    )
    kit.expect_error(
        text,
        "feature_configs[2].id_feature",
        "fg_mode FG_DAG (test.config:",
        "'user_id' has no expression",
        "data_config.fg_mode: FG_NONE",
        at='id_feature { feature_name: "user_id"',
    )


STANDALONE_CANDIDATES = """
feature_configs { sequence_id_feature { feature_name: "item_video_id" expression: "item:video_id"
                  embedding_name: "video_emb" embedding_dim: 8 num_buckets: 100 } }
feature_configs { sequence_raw_feature { feature_name: "item_query_time"
                  expression: "context:query_time" } }
"""


def _with_standalone_candidates(kit, candidates: str = STANDALONE_CANDIDATES) -> str:
    """The base config with its candidate sequence group replaced by standalone features."""
    return kit.edit(
        'feature_names: "cand_seq__video_id"',
        'feature_names: "item_video_id"',
        'feature_names: "cand_seq__query_time"',
        'feature_names: "item_query_time"',
        'sequence_name: "cand_seq"',
        'sequence_name: "unused_seq"',
    ) + candidates


def test_standalone_sequence_features_share_one_key_per_side(kit):
    text = _with_standalone_candidates(kit)
    cfg = kit.load(text)
    assert sequence_names(cfg) == ("uih_seq", "cand_seq")
    specs = {spec.name: spec for spec in feature_specs(cfg)}
    video = specs["item_video_id"]
    # fg_mode FG_NONE (the default): the column is the feature's name, not the expression's.
    assert (video.sequence, video.column, video.embedding_name) == (
        "cand_seq",
        "item_video_id",
        "video_emb",
    )
    assert (specs["item_query_time"].sequence, specs["item_query_time"].value_dtype) == (
        "cand_seq",
        "int64",
    )
    assert [label.sequence for label in label_specs(cfg)] == ["cand_seq", "cand_seq"]


def test_one_side_cannot_mix_grouped_and_standalone_sequences(kit):
    text = kit.edit('feature_names: "cand_seq__query_time"', 'feature_names: "item_query_time"')
    kit.expect_error(
        text + STANDALONE_CANDIDATES,
        "model_config.feature_groups[6].feature_names[0]",
        "'item_query_time' comes from standalone sequence features",
        at='feature_names: "item_query_time"',
    )


def test_standalone_key_must_differ_from_the_other_side(kit):
    # The history side is a sequence_feature named "cand_seq", the candidates are standalone
    # (key "cand_seq"): two sequences under one key would be indistinguishable in a batch.
    text = kit.edit(
        'sequence_name: "cand_seq"',
        'sequence_name: "unused_seq"',
        'sequence_name: "uih_seq"',
        'sequence_name: "cand_seq"',
    )
    for old in (
        "uih_seq__video_id",
        "uih_seq__action_weight",
        "uih_seq__watch_time",
        "uih_seq__action_timestamp",
    ):
        text = kit.replace_once(text, f'"{old}"', f'"{old.replace("uih_seq", "cand_seq")}"')
    text = kit.replace_once(
        text, 'feature_names: "cand_seq__video_id"\n', 'feature_names: "item_video_id"\n'
    )
    text = kit.replace_once(
        text, 'feature_names: "cand_seq__query_time"', 'feature_names: "item_query_time"'
    )
    kit.expect_error(
        text + STANDALONE_CANDIDATES,
        "model_config.feature_groups[2].feature_names[0]",
        "both use the sequence key 'cand_seq'",
    )


def test_label_specs(kit):
    cfg = kit.load(kit.BASE)
    assert [(label.column, label.value_dtype, label.sequence) for label in label_specs(cfg)] == [
        ("cand_seq__action_weight", "int64", "cand_seq"),
        ("cand_seq__watch_time", "float32", "cand_seq"),
    ]
    assert sequence_names(cfg) == ("uih_seq", "cand_seq")


def test_label_no_task_uses_is_left_out(kit):
    text = kit.edit(
        """      task_configs { task_name: "watch_time" label_name: "cand_seq__watch_time"
                     losses { l2_loss {} } metrics { mean_absolute_error {} } }
""",
        "",
    )
    cfg = kit.load(text)
    assert [label.column for label in label_specs(cfg)] == ["cand_seq__action_weight"]
    assert unused_labels(cfg) == ["cand_seq__watch_time"]


def test_timestamp_features_come_from_the_timestamp_groups(kit):
    # Standalone candidates name their query time "item_query_time" (TorchEasyRec's 27K
    # naming): a timestamp because the candidate_timestamp group holds it, not by its name.
    text = _with_standalone_candidates(kit)
    specs = {spec.name: spec for spec in feature_specs(kit.load(text))}
    timestamps = {name for name, spec in specs.items() if spec.is_timestamp}
    assert timestamps == {"uih_seq__action_timestamp", "item_query_time"}
    assert all(spec.timestamps_ascending for spec in specs.values())


def test_newest_first_config_gives_descending_timestamp_specs(kit):
    flag = "model_config.dlrm_hstu.sequence_timestamp_is_ascending=false"
    specs = feature_specs(kit.load(kit.BASE, [flag]))
    order = {spec.name: spec.timestamps_ascending for spec in specs if spec.is_timestamp}
    assert order == {"uih_seq__action_timestamp": False, "cand_seq__query_time": False}


def test_sequence_delim_comes_from_the_sequence_config(kit):
    text = kit.BASE.replace('sequence_delim: "|"', 'sequence_delim: ";"', 1)  # uih_seq only
    cfg = kit.load(text)
    delims = {spec.name: spec.sequence_delim for spec in feature_specs(cfg)}
    assert delims["uih_seq__video_id"] == delims["uih_seq__action_timestamp"] == ";"
    assert delims["cand_seq__video_id"] == delims["cand_seq__query_time"] == "|"
    # Labels are aligned with the candidates: split like them.
    assert {label.sequence_delim for label in label_specs(cfg)} == {"|"}

    # Standalone sequence features carry their own (proto default ";").
    standalone = _with_standalone_candidates(
        kit,
        STANDALONE_CANDIDATES.replace(
            'expression: "item:video_id"', 'expression: "item:video_id" sequence_delim: ","'
        ),
    )
    cfg = kit.load(standalone)
    delims = {spec.name: spec.sequence_delim for spec in feature_specs(cfg)}
    assert (delims["item_video_id"], delims["item_query_time"]) == (",", ";")
    assert {label.sequence_delim for label in label_specs(cfg)} == {","}


def test_an_empty_sequence_delim_is_a_config_error(kit):
    text = kit.BASE.replace('sequence_delim: "|"', 'sequence_delim: ""', 1)
    with pytest.raises(ConfigError) as error:
        feature_specs(kit.load(text))
    assert error.value.path == "feature_configs[0].sequence_feature.sequence_delim"
