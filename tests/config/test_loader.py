"""load_config: the seed document's blocks, recipes, parse errors, required fields, defaults."""

from __future__ import annotations

import re

import pytest

from hstu.config import (
    ConfigError,
    PipelineConfig,
    feature_specs,
    label_specs,
    load_config,
    schema,
    sequence_names,
)


def model_config_blocks(markdown: str) -> list[str]:
    """Every `model_config { ... }` block of the document, found by brace matching."""
    blocks = []
    for match in re.finditer(r"model_config\s*\{", markdown):
        depth, index = 0, match.end() - 1
        while True:
            char = markdown[index]
            depth += {"{": 1, "}": -1}.get(char, 0)
            index += 1
            if depth == 0:
                break
        blocks.append(markdown[match.start() : index])
    return blocks


# Pipeline parts the seed blocks need: they name cand_seq___video_id (three underscores), so the
# candidate sequence is called "cand_seq_" (its sub-feature video_id becomes cand_seq_ + __ +
# video_id), and the label field is cand_seq___action_weight.
SEED_PIPELINE = """
train_input_path: "train.parquet"
eval_input_path: "eval.parquet"
model_dir: "model_dir"
train_config {
  sparse_optimizer { rowwise_adagrad_optimizer { lr: 0.001 } constant_learning_rate {} }
  dense_optimizer { adam_optimizer { lr: 0.001 } constant_learning_rate {} }
  num_epochs: 1
  mixed_precision: "BF16"
}
data_config {
  batch_size: 8
  dataset_type: ParquetDataset
  fg_mode: FG_DAG
  label_fields: "cand_seq___action_weight"
}
"""

CONTEXTUAL_FEATURES = "".join(
    f"""feature_configs {{ id_feature {{ feature_name: "{name}" expression: "user:{name}"
                       embedding_dim: 32 num_buckets: {buckets} data_type: "FP16" }} }}
"""
    for name, buckets in [
        ("user_id", 10000000),
        ("user_active_degree", 8),
        ("follow_user_num_range", 9),
        ("fans_user_num_range", 9),
        ("friend_user_num_range", 8),
        ("register_days_range", 8),
    ]
)


def grouped(sequence: str, features: list[tuple[str, str, str]]) -> str:
    """A sequence_feature with (kind, name, side) sub-features; ids get 32-dim tables."""
    body = ""
    for kind, name, side in features:
        table = (
            f' embedding_name: "{name}_emb" embedding_dim: 32 num_buckets: 1000'
            if kind == "id"
            else ""
        )
        feature = f'feature_name: "{name}" expression: "{side}:{name}"{table}'
        body += f"    features {{ {kind}_feature {{ {feature} }} }}\n"
    return (
        f'feature_configs {{\n  sequence_feature {{\n    sequence_name: "{sequence}"\n'
        f'    sequence_length: 8000\n    sequence_delim: "|"\n{body}  }}\n}}\n'
    )


def standalone(kind: str, name: str, side: str) -> str:
    table = " embedding_dim: 32 num_buckets: 1000" if kind == "id" else ""
    return (
        f'feature_configs {{ sequence_{kind}_feature {{ feature_name: "{name}" '
        f'expression: "{side}:{name}"{table} }} }}\n'
    )


def _seed_blocks(kit) -> list[str]:
    if not kit.SEED_DOC.exists():
        pytest.skip(f"seed document not found at {kit.SEED_DOC} (it lives in ../shared)")
    blocks = model_config_blocks(kit.SEED_DOC.read_text(encoding="utf-8"))
    assert len(blocks) == 2, f"expected the MetaGR and MTGR blocks, found {len(blocks)}"
    return blocks


def test_seed_metagr_block_loads_verbatim(kit):
    metagr, _ = _seed_blocks(kit)
    features = (
        grouped(
            "uih_seq",
            [
                ("id", "video_id", "item"),
                ("raw", "action_weight", "user"),
                ("raw", "watch_time", "user"),
                ("raw", "action_timestamp", "user"),
            ],
        )
        + grouped("cand_seq_", [("id", "video_id", "item"), ("raw", "query_time", "context")])
        + CONTEXTUAL_FEATURES
    )
    cfg = kit.load(SEED_PIPELINE + features + metagr)

    dlrm = cfg.model_config.dlrm_hstu
    assert schema.enum_name("Kernel", cfg.model_config.kernel) == "TRITON"
    assert dlrm.max_seq_len == 8000
    assert (dlrm.hstu.stu.embedding_dim, dlrm.hstu.stu.num_heads) == (512, 4)
    encoder = dlrm.hstu.input_preprocessor.contextual_preprocessor.action_encoder
    assert list(encoder.simple_action_encoder.action_weights) == [1, 2]
    assert [t.task_name for t in dlrm.fusion_mtl_tower.task_configs] == ["is_click", "is_like"]

    assert sequence_names(cfg) == ("uih_seq", "cand_seq_")
    specs = {spec.name: spec for spec in feature_specs(cfg)}
    assert specs["cand_seq___video_id"].column == "cand_seq___video_id"
    assert specs["cand_seq___video_id"].embedding_name == "video_id_emb"
    assert specs["uih_seq__video_id"].embedding_name == "video_id_emb"
    assert specs["cand_seq___query_time"].value_dtype == "int64"
    assert specs["uih_seq__watch_time"].value_dtype == "float32"
    assert [(label.column, label.value_dtype) for label in label_specs(cfg)] == [
        ("cand_seq___action_weight", "int64")
    ]


def test_seed_mtgr_block_loads_verbatim_with_standalone_sequence_features(kit):
    _, mtgr = _seed_blocks(kit)
    features = (
        "".join(
            standalone(kind, name, side)
            for kind, name, side in [
                ("id", "uih_seq__video_id", "item"),
                ("id", "uih_seq__video_cate1", "item"),
                ("id", "uih_seq__video_cate2", "item"),
                ("raw", "uih_seq__action_weight", "user"),
                ("raw", "uih_seq__watch_time", "user"),
                ("raw", "uih_seq__action_timestamp", "user"),
                ("id", "cand_seq___video_id", "item"),
                ("id", "cand_seq___video_cate1", "item"),
                ("id", "cand_seq___video_cate2", "item"),
                ("id", "cand_seq___user_video_cross1", "item"),
                ("id", "cand_seq___user_video_cross2", "item"),
                ("raw", "cand_seq___query_time", "context"),
            ]
        )
        + CONTEXTUAL_FEATURES
    )
    cfg = kit.load(SEED_PIPELINE + features + mtgr)

    content = cfg.model_config.dlrm_hstu.hstu.input_preprocessor.contextual_preprocessor
    mlps = content.content_encoder.mlp_content_encoder
    # The doc's `hidden_dim: 256` shorthand becomes TorchEasyRec's hidden_units.
    assert list(mlps.uih_mlp.hidden_units) == [256]
    assert list(mlps.target_mlp.hidden_units) == [256]
    assert not mlps.uih_mlp.HasField("hidden_dim")
    postprocessor = cfg.model_config.dlrm_hstu.hstu.output_postprocessor
    assert postprocessor.WhichOneof("output_postprocessor") == "layernorm_postprocessor"

    # Standalone sequence features: one shared sequence key per side, column = input name.
    assert sequence_names(cfg) == ("uih_seq", "cand_seq")
    specs = {spec.name: spec for spec in feature_specs(cfg)}
    assert specs["cand_seq___user_video_cross1"].sequence == "cand_seq"
    assert specs["cand_seq___user_video_cross1"].column == "cand_seq___user_video_cross1"
    assert specs["uih_seq__video_cate2"].sequence == "uih_seq"
    assert specs["user_id"].sequence is None


def test_recipes_load(kit):
    for name in ("kuairand_dlrm_hstu", "kuairand_mtgr", "smoke", "kuairand_subset_cpu"):
        cfg = load_config(kit.REPO_ROOT / "recipes" / f"{name}.config")
        assert sequence_names(cfg) == ("uih_seq", "cand_seq")
    cfg = load_config(kit.REPO_ROOT / "recipes" / "kuairand_dlrm_hstu.config")
    assert [spec.column for spec in feature_specs(cfg)] == [
        "uih_seq__video_id",
        "uih_seq__action_weight",
        "uih_seq__watch_time",
        "uih_seq__action_timestamp",
        "cand_seq__video_id",
        "cand_seq__query_time",
        "user_id",
        "user_active_degree",
        "follow_user_num_range",
        "fans_user_num_range",
        "friend_user_num_range",
        "register_days_range",
    ]
    tasks = cfg.model_config.dlrm_hstu.fusion_mtl_tower.task_configs
    assert [(t.task_name, t.task_bitmask) for t in tasks] == [
        ("is_click", 1),
        ("is_like", 2),
        ("is_follow", 4),
        ("is_comment", 8),
        ("is_forward", 16),
        ("is_hate", 32),
        ("long_view", 64),
        ("is_profile_enter", 128),
    ]


def test_misspelled_field_suggests_the_nearest_names(kit):
    text = kit.edit("embedding_dim: 16 num_heads", "embeding_dim: 16 num_heads")
    kit.expect_error(
        text,
        "model_config.dlrm_hstu.hstu.stu",
        'unknown field "embeding_dim" in STU',
        'did you mean "embedding_dim"',
        at="embeding_dim",
    )


def test_wrong_enum_value_lists_the_values(kit):
    text = kit.edit("kernel: PYTORCH", "kernel: PYTORH")
    kit.expect_error(
        text,
        "model_config.kernel",
        "PYTORH is not a value of Kernel",
        "TRITON, PYTORCH, CUTLASS",
        'did you mean "PYTORCH"',
        at="PYTORH",
    )


def test_wrong_value_type_names_the_field(kit):
    text = kit.edit("max_seq_len: 128", "max_seq_len: many")
    kit.expect_error(text, "model_config.dlrm_hstu.max_seq_len", "many", at="many")


def test_singular_field_twice_is_an_error(kit):
    text = kit.edit("max_seq_len: 128", "max_seq_len: 128 max_seq_len: 777")
    kit.expect_error(
        text,
        "model_config.dlrm_hstu.max_seq_len",
        '"max_seq_len" is set more than once',
        at="777",  # the text parser points at the second value
    )


def test_two_members_of_a_oneof_is_an_error(kit):
    text = kit.edit("slice_content_encoder {}", "slice_content_encoder {} pad_content_encoder {}")
    kit.expect_error(
        text,
        "model_config.dlrm_hstu.hstu.input_preprocessor.contextual_preprocessor.content_encoder"
        ".pad_content_encoder",
        '"pad_content_encoder" and "slice_content_encoder" are both set',
        at="pad_content_encoder",
    )


def test_unclosed_brace_is_located(kit):
    text = kit.BASE + "eval_config {\n"
    with pytest.raises(ConfigError) as caught:
        kit.load(text)
    assert caught.value.where.line is not None
    assert "eval_config" in caught.value.path


def test_missing_required_field_names_the_message(kit):
    text = kit.edit(" num_heads: 2 hidden_dim", " hidden_dim")
    kit.expect_error(
        text,
        "model_config.dlrm_hstu.hstu.stu",
        'missing required field "num_heads"',
        at="stu { embedding_dim",
    )


def test_missing_required_top_level_path(kit):
    text = kit.edit('model_dir: "model_dir"\n', "")
    kit.expect_error(text, "(top level)", 'missing required field "model_dir"', at=kit.SOURCE)


def test_defaults_are_filled(kit):
    cfg = kit.load(kit.BASE)
    stu = cfg.model_config.dlrm_hstu.hstu.stu
    assert stu.HasField("output_dropout_ratio") and stu.output_dropout_ratio == pytest.approx(0.3)
    assert stu.scaling_seqlen == -1 and stu.HasField("scaling_seqlen")
    assert not stu.HasField("attn_alpha")  # no explicit default: resolved by the model
    assert cfg.model_config.dlrm_hstu.item_embedding_hidden_dim == 512
    assert cfg.data_config.eval_batch_size == 4  # derived from batch_size
    assert cfg.data_config.on_bad_rows == schema.enum_value("BadRowPolicy", "RAISE")
    assert cfg.eval_config.HasField("log_step_count_steps")
    assert cfg.export_config.exporter_type == "latest"
    sequence = cfg.feature_configs[0].sequence_feature
    assert sequence.sequence_pk == "user:uih_seq"
    sparse = cfg.train_config.sparse_optimizer
    assert sparse.WhichOneof("learning_rate") == "constant_learning_rate"


def test_one_dropout_ratio_is_broadcast_to_every_layer(kit):
    text = kit.edit(
        'mlp { hidden_units: [16] activation: "nn.SiLU"',
        'mlp { hidden_units: [16, 8] dropout_ratio: 0.25 activation: "nn.SiLU"',
    )
    cfg = kit.load(text)
    assert list(cfg.model_config.dlrm_hstu.fusion_mtl_tower.mlp.dropout_ratio) == [0.25, 0.25]


def test_mlp_hidden_dim_shorthand_conflicts_with_hidden_units(kit):
    text = kit.edit("mlp { hidden_units: [16]", "mlp { hidden_dim: 16 hidden_units: [16]")
    kit.expect_error(
        text,
        "model_config.dlrm_hstu.fusion_mtl_tower.mlp.hidden_dim",
        "not both",
        at="hidden_dim: 16 hidden_units",
    )


def test_unreadable_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the config"):
        load_config(tmp_path / "missing.config")
    binary = tmp_path / "binary.config"
    binary.write_bytes(b'model_dir: "x"\nmodel_config {\n  \xff\n}\n')
    with pytest.raises(ConfigError) as caught:
        load_config(binary)
    assert str(caught.value).startswith(f"{binary}:3:3: (top level): not UTF-8 text")


def test_pipeline_config_class_is_built_from_the_protos():
    assert PipelineConfig.DESCRIPTOR.full_name == "hstu.config.EasyRecConfig"
    assert schema.pool() is schema.pool()  # compiled once per process


def test_effective_config_round_trips_through_text(kit):
    # Training ships text_format.MessageToString(cfg) to its workers, which load it again.
    from google.protobuf import text_format

    cfg = kit.load(kit.BASE, overrides=["data_config.batch_size=2"])
    again = kit.load(text_format.MessageToString(cfg))
    assert again == cfg
