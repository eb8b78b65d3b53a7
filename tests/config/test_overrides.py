"""--set overrides: every value form, selectors, and errors that name the override."""

from __future__ import annotations

import pytest

from hstu.config import ConfigError, schema


def test_scalar_enum_string_and_bool(kit):
    cfg = kit.load(
        kit.BASE,
        overrides=[
            "data_config.batch_size=64",
            "model_config.kernel=TRITON",
            "model_dir=/tmp/run 1",
            'train_input_path="a b.parquet"',
            "model_config.dlrm_hstu.concat_contextual_features=true",
            "model_config.dlrm_hstu.hstu.stu.output_dropout_ratio=0.05",
        ],
    )
    assert cfg.data_config.batch_size == 64
    assert cfg.data_config.eval_batch_size == 64  # derived after overrides
    assert schema.enum_name("Kernel", cfg.model_config.kernel) == "TRITON"
    assert cfg.model_dir == "/tmp/run 1"
    assert cfg.train_input_path == "a b.parquet"
    assert cfg.model_config.dlrm_hstu.concat_contextual_features is True
    assert cfg.model_config.dlrm_hstu.hstu.stu.output_dropout_ratio == pytest.approx(0.05)


def test_repeated_list_and_index(kit):
    action = (
        "model_config.dlrm_hstu.hstu.input_preprocessor.contextual_preprocessor."
        "action_encoder.simple_action_encoder"
    )
    cfg = kit.load(
        kit.BASE,
        overrides=[f"{action}.action_weights=[1, 2, 4, 8]", f"{action}.action_weights[0]=16"],
    )
    encoder = cfg.model_config.dlrm_hstu.hstu.input_preprocessor.contextual_preprocessor
    assert list(encoder.action_encoder.simple_action_encoder.action_weights) == [16, 2, 4, 8]


def test_select_repeated_messages_by_index_and_by_name(kit):
    cfg = kit.load(
        kit.BASE,
        overrides=[
            "model_config.dlrm_hstu.fusion_mtl_tower.task_configs[is_like].weight=0.5",
            "model_config.dlrm_hstu.fusion_mtl_tower.task_configs[0].weight=2",
            "model_config.feature_groups[contextual].group_type=SEQUENCE",
            "feature_configs[user_id].id_feature.num_buckets=99",
            "feature_configs[uih_seq].sequence_feature.features[cate].id_feature.num_buckets=7",
        ],
    )
    tasks = cfg.model_config.dlrm_hstu.fusion_mtl_tower.task_configs
    assert (tasks[0].weight, tasks[1].weight, tasks[2].weight) == (2.0, 0.5, 1.0)
    assert schema.enum_name("FeatureGroupType", cfg.model_config.feature_groups[0].group_type) == (
        "SEQUENCE"
    )
    assert cfg.feature_configs[2].id_feature.num_buckets == 99
    assert cfg.feature_configs[0].sequence_feature.features[1].id_feature.num_buckets == 7


def test_whole_message_and_oneof_switch(kit):
    post = "model_config.dlrm_hstu.hstu.output_postprocessor"
    cfg = kit.load(
        kit.BASE,
        overrides=[
            f"{post}.layernorm_postprocessor={{}}",
            "model_config.dlrm_hstu.fusion_mtl_tower.mlp={hidden_units: [32, 16] use_ln: true}",
            "eval_config.num_steps=5",
        ],
    )
    dlrm = cfg.model_config.dlrm_hstu
    assert dlrm.hstu.output_postprocessor.WhichOneof("output_postprocessor") == (
        "layernorm_postprocessor"
    )
    assert list(dlrm.fusion_mtl_tower.mlp.hidden_units) == [32, 16]
    assert dlrm.fusion_mtl_tower.mlp.activation == "nn.ReLU"  # replaced whole, default refilled
    assert cfg.eval_config.num_steps == 5


@pytest.mark.parametrize(
    "override, path, fragment",
    [
        (
            "data_config.batch_sise=8",
            "data_config",
            'unknown field "batch_sise" in DataConfig (did you mean "batch_size"',
        ),
        ("data_config.batch_size=eight", "data_config.batch_size", "cannot set 'eight'"),
        (
            "model_config.kernel=CUTLAS",
            "model_config.kernel",
            "CUTLAS is not a value of Kernel; expected one of TRITON, PYTORCH, CUTLASS "
            '(did you mean "CUTLASS"?)',
        ),
        (
            "model_config.feature_groups[9].group_name=x",
            "model_config.feature_groups",
            "index 9 out of range: it has 7 element(s)",
        ),
        (
            "model_config.feature_groups[candidat].group_type=DEEP",
            "model_config.feature_groups",
            "no element named 'candidat' (did you mean \"candidate\"",
        ),
        (
            "model_config.feature_groups.group_type=DEEP",
            "model_config.feature_groups",
            "select an element",
        ),
        ("model_config.dlrm_hstu.hstu=3", "model_config.dlrm_hstu.hstu", "is a message (HSTU)"),
        ("data_config.label_fields=x", "data_config.label_fields", "give a list"),
        ("data_config.batch_size", "(top level)", "expected path.to.field=value"),
        ("data_config.batch_size.x=1", "data_config.batch_size", "is a value, it has no fields"),
        (
            "model_config.deepfm.wide_output_dim=3",
            "model_config.deepfm",
            "supported by TorchEasyRec, not yet by this project",
        ),
    ],
)
def test_bad_overrides_name_the_override_and_the_field(kit, override, path, fragment):
    kit.expect_error(kit.BASE, path, fragment, at=f"--set {override!r}", overrides=[override])


def test_validation_errors_point_at_the_override_that_caused_them(kit):
    override = "model_config.dlrm_hstu.hstu.stu.attention_dim=4"
    text = kit.edit(
        "kernel: PYTORCH",
        "kernel: CUTLASS",
        "num_epochs: 1",
        'num_epochs: 1 mixed_precision: "BF16"',
    )
    kit.expect_error(
        text,
        "model_config.dlrm_hstu.hstu.stu.attention_dim",
        "needs attention_dim == hidden_dim",
        at=f"--set {override!r}",
        overrides=[override],
    )


def test_override_of_an_unsupported_field_is_reported(kit):
    override = "model_config.dlrm_hstu.hstu.stu.sla_k1=16"
    error = kit.expect_error(
        kit.BASE,
        "model_config.dlrm_hstu.hstu.stu.sla_k1",
        "supported by TorchEasyRec, not yet by this project",
        at=f"--set {override!r}",
        overrides=[override],
    )
    assert isinstance(error, ConfigError)
