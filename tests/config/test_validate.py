"""One test per cross-field rule: each breaks the valid BASE config and checks the error names
the field path, its line:column and what was expected."""

from __future__ import annotations

import pytest

GROUPS = "model_config.feature_groups"
PRE = "model_config.dlrm_hstu.hstu.input_preprocessor.contextual_preprocessor"
ACTION = f"{PRE}.action_encoder.simple_action_encoder"
TASKS = "model_config.dlrm_hstu.fusion_mtl_tower.task_configs"


def test_base_config_is_valid(kit):
    kit.load(kit.BASE)


# ---- feature groups ---------------------------------------------------------------------------


def test_unknown_group_name(kit):
    text = kit.edit('group_name: "uih_timestamp"', 'group_name: "uih_timestamps"')
    kit.expect_error(
        text,
        f"{GROUPS}[5].group_name",
        "unknown group 'uih_timestamps'",
        'did you mean "uih_timestamp"',
        at='group_name: "uih_timestamps"',
    )


def test_group_type(kit):
    text = kit.edit(
        'feature_names: "uih_seq__video_id" group_type: JAGGED_SEQUENCE',
        'feature_names: "uih_seq__video_id" group_type: DEEP',
    )
    kit.expect_error(
        text,
        f"{GROUPS}[1].group_type",
        "group 'uih' must be JAGGED_SEQUENCE, got DEEP",
        at=("group_type: DEEP", 1),
    )


def test_contextual_group_may_be_sequence_type(kit):
    kit.load(kit.edit("group_type: DEEP }", "group_type: SEQUENCE }"))


def test_missing_required_group(kit):
    text = kit.edit(
        """  feature_groups { group_name: "uih_timestamp" feature_names: "uih_seq__action_timestamp"
                   group_type: JAGGED_SEQUENCE }
""",
        "",
    )
    kit.expect_error(
        text, "model_config", "missing feature group 'uih_timestamp'", at="model_config {"
    )


def test_uih_watchtime_group_is_optional(kit):
    kit.load(
        kit.edit(
            """  feature_groups { group_name: "uih_watchtime" feature_names: "uih_seq__watch_time"
                   group_type: JAGGED_SEQUENCE }
""",
            "",
        )
    )


def test_group_defined_twice(kit):
    text = kit.edit('group_name: "candidate_timestamp"', 'group_name: "candidate"')
    kit.expect_error(
        text,
        f"{GROUPS}[6].group_name",
        "group 'candidate' is defined twice",
        at=('group_name: "candidate"', 1),
    )


def test_feature_in_group_must_be_declared(kit):
    text = kit.edit('feature_names: "cand_seq__query_time"', 'feature_names: "cand_seq__query_tme"')
    kit.expect_error(
        text,
        f"{GROUPS}[6].feature_names[0]",
        "feature 'cand_seq__query_tme' is not declared in feature_configs",
        'did you mean "cand_seq__query_time"',
        at='feature_names: "cand_seq__query_tme"',
    )


def test_id_group_rejects_raw_feature(kit):
    text = kit.edit(
        'feature_names: "uih_seq__video_id" group_type',
        'feature_names: ["uih_seq__video_id", "uih_seq__watch_time"] group_type',
    )
    kit.expect_error(
        text,
        f"{GROUPS}[1].feature_names[1]",
        "group 'uih' takes id features",
        at='"uih_seq__watch_time"',
    )


def test_raw_group_rejects_id_feature(kit):
    text = kit.edit('feature_names: "uih_seq__action_weight"', 'feature_names: "uih_seq__cate"')
    kit.expect_error(
        text,
        f"{GROUPS}[3].feature_names[0]",
        "group 'uih_action' takes a raw feature",
        at='feature_names: "uih_seq__cate"',
    )


def test_contextual_group_takes_scalar_features(kit):
    text = kit.edit('["user_id", "user_level"]', '["user_id", "uih_seq__cate"]')
    kit.expect_error(
        text,
        f"{GROUPS}[0].feature_names[1]",
        "takes scalar features; 'uih_seq__cate' is a sequence",
        at='"uih_seq__cate"',
    )


def test_raw_group_takes_exactly_one_feature(kit):
    text = kit.edit(
        'feature_names: "uih_seq__action_timestamp"',
        'feature_names: ["uih_seq__action_timestamp", "uih_seq__watch_time"]',
    )
    kit.expect_error(
        text,
        f"{GROUPS}[5]",
        "group 'uih_timestamp' takes exactly one raw feature, got 2",
        at='feature_groups { group_name: "uih_timestamp"',
    )


def test_history_groups_come_from_one_sequence(kit):
    text = kit.edit(
        'feature_names: "uih_seq__action_weight"', 'feature_names: "cand_seq__query_time"'
    )
    kit.expect_error(
        text,
        f"{GROUPS}[3].feature_names[0]",
        "must all read one sequence",
        "'cand_seq__query_time' comes from sequence_feature 'cand_seq'",
        at='feature_names: "cand_seq__query_time"',
    )


def test_candidate_groups_need_their_own_sequence(kit):
    text = kit.edit(
        'feature_names: "cand_seq__video_id"',
        'feature_names: "uih_seq__cate"',
        'feature_names: "cand_seq__query_time"',
        'feature_names: "uih_seq__action_timestamp"',
    )
    kit.expect_error(
        text,
        f"{GROUPS}[2].feature_names[0]",
        "history and candidate groups both use the sequence key 'uih_seq'",
        at='feature_names: "uih_seq__cate"',
    )


# ---- content encoders ---------------------------------------------------------------------------


def test_slice_content_encoder_needs_candidate_at_least_as_wide(kit):
    text = kit.edit(
        'feature_names: "uih_seq__video_id" group_type',
        'feature_names: ["uih_seq__video_id", "uih_seq__cate"] group_type',
    )
    kit.expect_error(
        text,
        f"{PRE}.content_encoder.slice_content_encoder",
        "candidate 8 < uih 16",
        at="slice_content_encoder",
    )


def test_pad_content_encoder_needs_candidate_wider(kit):
    text = kit.edit("slice_content_encoder {}", "pad_content_encoder {}")
    kit.expect_error(
        text,
        f"{PRE}.content_encoder.pad_content_encoder",
        "candidate 8 <= uih 8",
        at="pad_content_encoder",
    )


def test_mlp_content_encoder_outputs_must_match(kit):
    text = kit.edit(
        "slice_content_encoder {}",
        "mlp_content_encoder { uih_mlp { hidden_units: [16] } target_mlp { hidden_units: [12] } }",
    )
    kit.expect_error(
        text,
        f"{PRE}.content_encoder.mlp_content_encoder.target_mlp",
        "same width: 16 != 12",
        at="target_mlp",
    )


# ---- action encoder, postprocessor ------------------------------------------------------------


def test_action_weights_are_powers_of_two(kit):
    text = kit.edit("action_weights: [1, 2, 4]", "action_weights: [1, 3, 4]")
    line, column = kit.position(text, "action_weights: [1, 3, 4]")
    kit.expect_error(
        text,
        f"{ACTION}.action_weights[1]",
        "3 is not a power of two",
        at=f"{kit.SOURCE}:{line}:{column + len('action_weights: [1, ')}",
    )


def test_action_weights_are_distinct(kit):
    text = kit.edit("action_weights: [1, 2, 4]", "action_weights: [1, 2, 2]")
    line, column = kit.position(text, "action_weights: [1, 2, 2]")
    kit.expect_error(
        text,
        f"{ACTION}.action_weights[2]",
        "bit 2 is used twice",
        at=f"{kit.SOURCE}:{line}:{column + len('action_weights: [1, 2, ')}",
    )


def test_watchtime_thresholds_and_weights_have_equal_length(kit):
    text = kit.edit(
        "action_weights: [1, 2, 4]",
        "action_weights: [1, 2, 4] watchtime_to_action_thresholds: [60, 300] "
        "watchtime_to_action_weights: [8]",
    )
    kit.expect_error(
        text,
        f"{ACTION}.watchtime_to_action_weights",
        "1 weights, 2 watchtime_to_action_thresholds",
        at="watchtime_to_action_weights",
    )


def test_watchtime_weights_must_not_reuse_action_bits(kit):
    text = kit.edit(
        "action_weights: [1, 2, 4]",
        "action_weights: [1, 2, 4] watchtime_to_action_thresholds: [60] "
        "watchtime_to_action_weights: [2]",
    )
    line, column = kit.position(text, "watchtime_to_action_weights: [2]")
    kit.expect_error(
        text,
        f"{ACTION}.watchtime_to_action_weights[0]",
        "bit 2 is used twice",
        at=f"{kit.SOURCE}:{line}:{column + len('watchtime_to_action_weights: [')}",
    )


def test_watchtime_actions_need_the_uih_watchtime_group(kit):
    text = kit.edit(
        "action_weights: [1, 2, 4]",
        "action_weights: [1, 2, 4] watchtime_to_action_thresholds: [60] "
        "watchtime_to_action_weights: [8]",
        """  feature_groups { group_name: "uih_watchtime" feature_names: "uih_seq__watch_time"
                   group_type: JAGGED_SEQUENCE }
""",
        "",
    )
    kit.expect_error(
        text,
        f"{ACTION}.watchtime_to_action_thresholds",
        "need the uih_watchtime feature group",
        at="watchtime_to_action_thresholds",
    )


def test_time_duration_lists_have_equal_length(kit):
    text = kit.edit(
        "time_duration_units_per_period: [24, 7]", "time_duration_units_per_period: [24]"
    )
    kit.expect_error(
        text,
        "model_config.dlrm_hstu.hstu.output_postprocessor.timestamp_layernorm_postprocessor"
        ".time_duration_units_per_period",
        "1 != 2",
        at="time_duration_units_per_period",
    )


# ---- kernel -------------------------------------------------------------------------------------


def test_cutlass_needs_attention_dim_equal_to_hidden_dim(kit):
    text = kit.edit(
        "kernel: PYTORCH",
        "kernel: CUTLASS",
        "attention_dim: 8",
        "attention_dim: 4",
        "num_epochs: 1",
        'num_epochs: 1 mixed_precision: "BF16"',
    )
    line, column = kit.position(text, "kernel: CUTLASS")
    kit.expect_error(
        text,
        "model_config.dlrm_hstu.hstu.stu.attention_dim",
        f"kernel CUTLASS ({kit.SOURCE}:{line}:{column}) needs attention_dim == hidden_dim",
        "attention_dim 4, hidden_dim 8",
        at="attention_dim: 4",
    )


def test_cutlass_needs_mixed_precision(kit):
    text = kit.edit("kernel: PYTORCH", "kernel: CUTLASS")
    kit.expect_error(text, "train_config.mixed_precision", '"BF16" or "FP16"', at="train_config {")


def test_cutlass_with_matching_dims_and_bf16_loads(kit):
    kit.load(
        kit.edit(
            "kernel: PYTORCH",
            "kernel: CUTLASS",
            "num_epochs: 1",
            'num_epochs: 1 mixed_precision: "BF16"',
        )
    )


# ---- features and tables ------------------------------------------------------------------------


def test_contextual_features_share_one_dim(kit):
    text = kit.edit("embedding_dim: 8 num_buckets: 5 }", "embedding_dim: 16 num_buckets: 5 }")
    kit.expect_error(
        text,
        f"{GROUPS}[0].feature_names[1]",
        "contextual features must share one embedding_dim unless",
        at='"user_level"]',
    )


def test_tables_of_different_widths_load_when_contextual_features_are_concatenated(kit):
    # The model keeps one EmbeddingCollection per width (hstu/modules/embeddings.py).
    text = kit.edit(
        "embedding_dim: 8 num_buckets: 5 }",
        "embedding_dim: 16 num_buckets: 5 }",
        "max_seq_len: 128",
        "max_seq_len: 128 concat_contextual_features: true",
    )
    kit.load(text)


def test_shared_table_must_agree(kit):
    text = kit.BASE
    second = text.index("num_buckets: 100", text.index("num_buckets: 100") + 1)
    text = text[:second] + "num_buckets: 200" + text[second + len("num_buckets: 100") :]
    kit.expect_error(
        text,
        "feature_configs[1].sequence_feature.features[0].id_feature.num_buckets",
        "shares table 'video_emb' with 'uih_seq__video_id'",
        "num_buckets must match: 200 != 100",
        at="num_buckets: 200",
    )


def test_feature_declared_twice(kit):
    text = (
        kit.BASE + 'feature_configs { id_feature { feature_name: "user_id" '
        'expression: "user:uid" embedding_dim: 8 num_buckets: 5 } }\n'
    )
    kit.expect_error(
        text,
        "feature_configs[4].id_feature.feature_name",
        "feature 'user_id' is declared twice",
        at=('feature_name: "user_id"', 1),
    )


def test_expression_needs_side_and_name(kit):
    text = kit.edit('expression: "user:user_level"', 'expression: "user_level"')
    kit.expect_error(
        text,
        "feature_configs[3].id_feature.expression",
        "expected side:name",
        at='expression: "user_level"',
    )


def test_id_feature_needs_num_buckets(kit):
    text = kit.edit("embedding_dim: 8 num_buckets: 5 }", "embedding_dim: 8 }")
    kit.expect_error(
        text,
        "feature_configs[3].id_feature",
        "num_buckets is required",
        at='id_feature { feature_name: "user_level"',
    )


def test_embedding_data_type(kit):
    text = kit.edit("num_buckets: 5 }", 'num_buckets: 5 data_type: "INT8" }')
    kit.expect_error(
        text,
        "feature_configs[3].id_feature.data_type",
        "expected one of FP32, FP16",
        at="data_type",
    )


# ---- tasks and labels ---------------------------------------------------------------------------


def test_task_label_must_be_a_label_field(kit):
    text = kit.edit(
        'task_name: "is_click" label_name: "cand_seq__action_weight"',
        'task_name: "is_click" label_name: "cand_seq__action_weigth"',
    )
    kit.expect_error(
        text,
        f"{TASKS}[0].label_name",
        "label 'cand_seq__action_weigth' is not in data_config.label_fields",
        'did you mean "cand_seq__action_weight"',
        at='label_name: "cand_seq__action_weigth"',
    )


def test_classification_task_needs_task_bitmask(kit):
    text = kit.edit(
        'label_name: "cand_seq__action_weight" task_bitmask: 1',
        'label_name: "cand_seq__action_weight"',
    )
    kit.expect_error(
        text,
        f"{TASKS}[0]",
        "set task_bitmask",
        at='task_configs { task_name: "is_click"',
    )


def test_regression_task_takes_no_task_bitmask(kit):
    text = kit.edit(
        'label_name: "cand_seq__watch_time"', 'label_name: "cand_seq__watch_time" task_bitmask: 4'
    )
    kit.expect_error(text, f"{TASKS}[2].task_bitmask", "remove task_bitmask", at="task_bitmask: 4")


def test_label_has_one_type(kit):
    text = kit.edit(
        'task_name: "watch_time" label_name: "cand_seq__watch_time"',
        'task_name: "watch_time" label_name: "cand_seq__action_weight"',
    )
    kit.expect_error(
        text,
        f"{TASKS}[2].label_name",
        "used by a classification task",
        at=('label_name: "cand_seq__action_weight"', 2),
    )


def test_metric_must_fit_the_task(kit):
    text = kit.edit("metrics { mean_absolute_error {} }", "metrics { auc {} }")
    kit.expect_error(
        text,
        f"{TASKS}[2].metrics[0].auc",
        "auc does not fit a regression task",
        at=("auc {}", 1),
    )


def test_grouped_auc_key_is_a_contextual_feature(kit):
    text = kit.edit('grouping_key: "user_id"', 'grouping_key: "video_id"')
    kit.expect_error(
        text,
        f"{TASKS}[1].metrics[0].grouped_auc.grouping_key",
        "must be a feature of the contextual group",
        at='grouping_key: "video_id"',
    )


def test_task_names_are_unique(kit):
    text = kit.edit('task_name: "is_like"', 'task_name: "is_click"')
    kit.expect_error(
        text,
        f"{TASKS}[1].task_name",
        "task 'is_click' is defined twice",
        at=('task_name: "is_click"', 1),
    )


# ---- scalar sanity ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "old, new, path, fragment",
    [
        (
            'activation: "nn.SiLU"',
            'activation: "nn.Swish"',
            "model_config.dlrm_hstu.fusion_mtl_tower.mlp.activation",
            "expected one of nn.ReLU",
        ),
        (
            "use_ln: true",
            "use_ln: true use_bn: true",
            "model_config.dlrm_hstu.fusion_mtl_tower.mlp.use_ln",
            "cannot both be true",
        ),
        (
            "use_time_encoding: true",
            'use_time_encoding: true time_bucket_fn: "linear"',
            "model_config.dlrm_hstu.hstu.positional_encoder.time_bucket_fn",
            "expected 'sqrt' or 'log'",
        ),
        ("max_seq_len: 128", "max_seq_len: 0", "model_config.dlrm_hstu.max_seq_len", "at least 1"),
        ("num_heads: 2", "num_heads: 0", "model_config.dlrm_hstu.hstu.stu.num_heads", "at least 1"),
        (
            "num_epochs: 1",
            'num_epochs: 1 mixed_precision: "bf16"',
            "train_config.mixed_precision",
            'expected "BF16", "FP16" or ""',
        ),
        (
            "lr: 0.01",
            "lr: 0",
            "train_config.sparse_optimizer.rowwise_adagrad_optimizer.lr",
            "must be > 0",
        ),
        ("batch_size: 4", "batch_size: 0", "data_config.batch_size", "at least 1"),
        (
            "dataset_type: ParquetDataset",
            "dataset_type: CsvDataset",
            "data_config.dataset_type",
            "supported by TorchEasyRec, not yet by this project",
        ),
        (
            'train_input_path: "train.parquet"',
            'train_input_path: "odps://project/tables/kuairand_train"',
            "train_input_path",
            "is a MaxCompute table, which this project cannot read",
        ),
        (
            "dataset_type: ParquetDataset",
            "dataset_type: ParquetDataset fg_mode: FG_BUCKETIZE",
            "data_config.fg_mode",
            "supported by TorchEasyRec, not yet by this project",
        ),
    ],
)
def test_field_values(kit, old, new, path, fragment):
    text = kit.edit(old, new)
    if path == "train_input_path":
        text = kit.replace_once(text, "dataset_type: ParquetDataset", "dataset_type: OdpsDataset")
    error = kit.expect_error(text, path, fragment)
    assert error.where.line is not None


def test_sparse_optimizer_must_be_chosen(kit):
    text = kit.edit(
        "sparse_optimizer { rowwise_adagrad_optimizer { lr: 0.01 } }",
        "sparse_optimizer { constant_learning_rate {} }",
    )
    kit.expect_error(
        text,
        "train_config.sparse_optimizer",
        "no optimizer chosen; expected one of sgd_optimizer",
        at="sparse_optimizer",
    )


def test_train_config_is_required(kit):
    start = kit.BASE.index("train_config {")
    end = kit.BASE.index("data_config {")
    text = kit.BASE[:start] + kit.BASE[end:]
    kit.expect_error(text, "(top level)", "missing train_config", at=kit.SOURCE)


def test_any_torch_nn_activation_is_accepted(kit):
    kit.load(kit.edit('activation: "nn.SiLU"', 'activation: "nn.Hardswish"'))


CONTEXTUAL_GROUP = (
    '  feature_groups { group_name: "contextual" feature_names: ["user_id", "user_level"]\n'
    "                   group_type: DEEP }\n"
)
UIH_ACTION_GROUP = (
    '  feature_groups { group_name: "uih_action" feature_names: "uih_seq__action_weight"\n'
    "                   group_type: JAGGED_SEQUENCE }\n"
)
ACTION_ENCODER = """          action_encoder { simple_action_encoder { action_embedding_dim: 4
                                                   action_weights: [1, 2, 4] } }
          action_mlp { simple_mlp { hidden_dim: 16 } }
"""


def test_contextual_group_is_optional(kit):
    text = kit.edit(
        CONTEXTUAL_GROUP,
        "",
        'metrics { grouped_auc { grouping_key: "user_id" } }',
        "metrics { auc {} }",
    )
    kit.load(text)


def test_parameterized_mlp_needs_the_contextual_group(kit):
    text = kit.edit(
        CONTEXTUAL_GROUP,
        "",
        'metrics { grouped_auc { grouping_key: "user_id" } }',
        "metrics { auc {} }",
        "content_mlp { simple_mlp { hidden_dim: 16 } }",
        "content_mlp { parameterized_mlp { hidden_dim: 16 } }",
    )
    kit.expect_error(
        text,
        f"{PRE}.content_mlp.parameterized_mlp",
        "computed from the contextual features",
        at="parameterized_mlp",
    )


def test_uih_action_group_is_needed_only_by_an_action_encoder(kit):
    kit.load(kit.edit(UIH_ACTION_GROUP, "", ACTION_ENCODER, ""))
    text = kit.edit(UIH_ACTION_GROUP, "")
    kit.expect_error(
        text,
        f"{PRE}.action_encoder",
        "reads the uih_action feature group, which is missing",
        at="action_encoder",
    )


def test_num_class_fits_the_loss(kit):
    text = kit.edit(
        'label_name: "cand_seq__action_weight" task_bitmask: 1',
        'label_name: "cand_seq__action_weight" task_bitmask: 1 num_class: 2',
    )
    kit.expect_error(text, f"{TASKS}[0].num_class", "num_class must be 1, got 2", at="num_class: 2")
    text = kit.edit(
        "task_bitmask: 1\n                     losses { binary_cross_entropy {} }",
        "task_bitmask: 1\n                     losses { softmax_cross_entropy {} }",
    )
    kit.expect_error(
        text,
        f"{TASKS}[0].losses[0].softmax_cross_entropy",
        "needs num_class >= 2, got 1",
        at="softmax_cross_entropy",
    )
    kit.load(
        kit.edit(
            "task_bitmask: 1\n                     losses { binary_cross_entropy {} }",
            "task_bitmask: 1 num_class: 2\n"
            "                     losses { softmax_cross_entropy { label_smoothing: 0.1 } }",
        )
    )


def test_odps_dataset_with_parquet_paths_reads_them_as_parquet(kit):
    # TorchEasyRec's 27K benchmark config keeps dataset_type OdpsDataset; only its paths change.
    cfg = kit.load(kit.edit("dataset_type: ParquetDataset", "dataset_type: OdpsDataset"))
    from hstu.config.support import reading_notes

    assert any("read as parquet" in note for note in reading_notes(cfg))


@pytest.mark.parametrize("mode", ["FG_DAG", "FG_NORMAL"])
def test_features_that_need_the_feature_generator_get_one_line_naming_fg_mode(kit, mode):
    text = kit.edit(
        "dataset_type: ParquetDataset",
        f"dataset_type: ParquetDataset fg_mode: {mode}",
        'feature_name: "user_level" expression: "user:user_level"',
        'feature_name: "user_level" expression: "user:user_level" hash_bucket_size: 5',
    )
    error = kit.expect_error(
        text,
        "feature_configs[3].id_feature.hash_bucket_size",
        f"fg_mode {mode} (test.config:",
        "feature generator (pyfg)",
        "this feature (hash_bucket_size)",
        "set data_config.fg_mode: FG_NONE",
        at="hash_bucket_size",
    )
    assert "\n" not in str(error)


def test_a_dag_intermediate_input_needs_the_feature_generator(kit):
    text = kit.edit(
        "dataset_type: ParquetDataset",
        "dataset_type: ParquetDataset fg_mode: FG_DAG",
        'expression: "user:user_level"',
        'expression: "feature:user_bucket"',
    )
    kit.expect_error(
        text,
        "feature_configs[3].id_feature.expression",
        "fg_mode FG_DAG",
        "another feature's output ('feature:user_bucket')",
        at='expression: "feature:user_bucket"',
    )


def test_fg_dag_and_fg_normal_with_identity_features_load(kit):
    for mode in ("FG_DAG", "FG_NORMAL"):
        text = kit.edit(
            "dataset_type: ParquetDataset", f"dataset_type: ParquetDataset fg_mode: {mode}"
        )
        from hstu.config.support import reading_notes

        notes = reading_notes(kit.load(text))
        assert any(f"fg_mode {mode}: no feature generator runs here" in n for n in notes)


# ---- losses and metrics TorchEasyRec's task towers accept --------------------------------

INDENT = "\n                     "
JRC_LIKE = (
    f"task_bitmask: 2{INDENT}losses {{ binary_cross_entropy {{}} }}",
    f'task_bitmask: 2 num_class: 2{INDENT}losses {{ jrc_loss {{ session_name: "user_id" }} }}',
)


def test_jrc_loss_with_two_classes_and_a_contextual_session_loads(kit):
    cfg = kit.load(kit.edit(*JRC_LIKE))
    like = cfg.model_config.dlrm_hstu.fusion_mtl_tower.task_configs[1]
    assert (like.losses[0].jrc_loss.session_name, like.losses[0].jrc_loss.alpha) == ("user_id", 0.5)


def test_jrc_loss_needs_num_class_2(kit):
    text = kit.edit(JRC_LIKE[0], JRC_LIKE[1].replace(" num_class: 2", ""))
    kit.expect_error(text, f"{TASKS}[1].num_class", "jrc_loss scores two classes", "num_class: 2")


def test_jrc_session_must_be_a_contextual_feature(kit):
    text = kit.edit(JRC_LIKE[0], JRC_LIKE[1].replace('"user_id"', '"user_idd"'))
    kit.expect_error(
        text,
        f"{TASKS}[1].losses[0].jrc_loss.session_name",
        "'user_idd' must be a feature of the contextual group",
        'did you mean "user_id"',
        at='session_name: "user_idd"',
    )


@pytest.mark.parametrize(
    "options, field, fragment",
    [("gamma: -1", "gamma", "must be >= 0"), ("alpha: 1", "alpha", "must be in (0, 1)")],
)
def test_binary_focal_loss_parameters(kit, options, field, fragment):
    text = kit.edit(
        "task_bitmask: 1\n                     losses { binary_cross_entropy {} }",
        f"task_bitmask: 1\n                     losses {{ binary_focal_loss {{ {options} }} }}",
    )
    kit.expect_error(
        text, f"{TASKS}[0].losses[0].binary_focal_loss.{field}", fragment, at=options
    )


def test_focal_loss_and_the_other_metrics_load(kit):
    text = kit.edit(
        f"task_bitmask: 1{INDENT}losses {{ binary_cross_entropy {{}} }} metrics {{ auc {{}} }}",
        f"task_bitmask: 1{INDENT}losses {{ binary_focal_loss {{ gamma: 1.5 alpha: 0.25 }} }}"
        " metrics { auc {} } metrics { accuracy { threshold: 0.3 } }",
        "losses { l2_loss {} } metrics { mean_absolute_error {} }",
        "losses { l2_loss {} } metrics { mean_absolute_error {} } metrics { mean_squared_error {} }"
        " metrics { xauc { in_batch: true } }"
        ' metrics { grouped_xauc { grouping_key: "user_id" max_pairs_per_group: 10 } }',
    )
    tasks = kit.load(text).model_config.dlrm_hstu.fusion_mtl_tower.task_configs
    assert [m.WhichOneof("metric") for m in tasks[2].metrics] == [
        "mean_absolute_error", "mean_squared_error", "xauc", "grouped_xauc"
    ]


@pytest.mark.parametrize(
    "metric, path, fragment",
    [
        ("recall_at_k {}", "metrics[0].recall_at_k", "refuse it too"),
        ("xauc {}", "metrics[0].xauc", "does not fit a classification task"),
        ("multiclass_auc {}", "metrics[0].multiclass_auc", "needs num_class >= 2"),
        ("accuracy { top_k: 0 }", "metrics[0].accuracy.top_k", "must be in [1, num_class 1]"),
    ],
)
def test_metric_rules(kit, metric, path, fragment):
    text = kit.edit(
        "losses { binary_cross_entropy {} } metrics { auc {} }",
        f"losses {{ binary_cross_entropy {{}} }} metrics {{ {metric} }}",
    )
    kit.expect_error(text, f"{TASKS}[0].{path}", fragment)


def test_auc_on_more_than_two_classes_points_to_multiclass_auc(kit):
    text = kit.edit(
        f"task_bitmask: 1{INDENT}losses {{ binary_cross_entropy {{}} }} metrics {{ auc {{}} }}",
        "task_bitmask: 1 num_class: 3\n"
        "                     losses { softmax_cross_entropy {} } metrics { auc {} }",
    )
    kit.expect_error(text, f"{TASKS}[0].metrics[0].auc", "use multiclass_auc or accuracy")


# ---- zch ------------------------------------------------------------------------------------

ZCH_OLD = (
    'id_feature { feature_name: "video_id" expression: "item:video_id"\n'
    '                            embedding_name: "video_emb" embedding_dim: 8 num_buckets: 100 }'
)


def zch_text(kit, block: str, second: str | None = None) -> str:
    """BASE with the history's (and the candidates', `second` or the same) video table on zch
    instead of num_buckets."""
    first = ZCH_OLD.replace("num_buckets: 100", f"zch {{ {block} }}")
    other = ZCH_OLD.replace("num_buckets: 100", f"zch {{ {second or block} }}")
    text = kit.BASE.replace(ZCH_OLD, first, 1)
    return text.replace(ZCH_OLD, other, 1)


def test_zch_loads_and_gives_the_table_zch_size_rows(kit):
    from hstu.config import feature_specs

    cfg = kit.load(zch_text(kit, "zch_size: 1000 eviction_interval: 2 distance_lfu {}"))
    video = {spec.name: spec for spec in feature_specs(cfg)}["uih_seq__video_id"]
    assert (video.num_buckets, video.zch.policy, video.zch.eviction_interval) == (
        1000, "distance_lfu", 2
    )


@pytest.mark.parametrize(
    "block, path, fragment",
    [
        ("zch_size: 1000", "zch", "choose an eviction policy"),
        ("zch_size: 1 lfu {}", "zch.zch_size", "must be at least 2"),
        ("zch_size: 10 eviction_interval: 0 lfu {}", "zch.eviction_interval", "at least 1"),
        ("zch_size: 10 lru { decay_exponent: -1 }", "zch.lru.decay_exponent", "must be >= 0"),
    ],
)
def test_zch_rules(kit, block, path, fragment):
    kit.expect_error(
        zch_text(kit, block), f"feature_configs[0].sequence_feature.features[0].id_feature.{path}",
        fragment,
    )


def test_a_shared_zch_table_needs_one_zch_block(kit):
    text = zch_text(kit, "zch_size: 1000 lfu {}", "zch_size: 2000 lfu {}")
    kit.expect_error(
        text,
        "feature_configs[1].sequence_feature.features[0].id_feature.zch",
        "shares table 'video_emb'",
        "zch blocks must be the same",
    )


def test_zch_under_fg_dag_needs_the_feature_generator(kit):
    text = zch_text(kit, "zch_size: 1000 lfu {}").replace(
        "dataset_type: ParquetDataset", "dataset_type: ParquetDataset fg_mode: FG_DAG"
    )
    kit.expect_error(
        text,
        "feature_configs[0].sequence_feature.features[0].id_feature.zch",
        "fg_mode FG_DAG",
        "the hashed ids of 'uih_seq__video_id'",
    )


def test_zch_with_num_buckets_too_is_a_note(kit):
    from hstu.config.support import reading_notes

    text = kit.BASE.replace(
        "embedding_dim: 8 num_buckets: 100 }", "embedding_dim: 8 num_buckets: 100 "
        "zch { zch_size: 500 lfu {} } }"
    )
    notes = reading_notes(kit.load(text))
    assert any("num_buckets has no effect with zch" in note for note in notes)


def test_threshold_filtering_is_not_implemented(kit):
    text = zch_text(kit, 'zch_size: 10 lfu {} threshold_filtering_func: "lambda x: x"')
    kit.expect_error(text, "feature_configs[0].sequence_feature.features[0].id_feature.zch"
                     ".threshold_filtering_func", "not yet by this project")
