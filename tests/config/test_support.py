"""Fields TorchEasyRec has and this project does not implement: errors, not silence."""

from __future__ import annotations

from hstu.config import ignored_settings, schema
from hstu.config.support import IGNORED, UNSUPPORTED

NOT_YET = "supported by TorchEasyRec, not yet by this project"


def test_every_listed_field_exists_in_the_schema():
    for key in [*UNSUPPORTED, *IGNORED]:
        message, field = key.split(".")
        assert field in schema.message_descriptor(message).fields_by_name, key


def test_unsupported_scalar_is_located(kit):
    text = kit.edit("attention_dim: 8 }", "attention_dim: 8 sla_k1: 64 }")
    kit.expect_error(text, "model_config.dlrm_hstu.hstu.stu.sla_k1", NOT_YET, at="sla_k1")


def test_unsupported_scalar_at_its_default_is_accepted(kit):
    kit.load(kit.edit("attention_dim: 8 }", "attention_dim: 8 sla_k1: 0 }"))


def test_unsupported_feature_type_with_contents(kit):
    # combo_feature is only a placeholder here: the parser trips over its contents, and the
    # error names the unsupported field rather than an unknown inner field.
    text = kit.BASE + (
        'feature_configs { combo_feature { feature_name: "os_cate" '
        'expression: ["user:os", "item:cate"] embedding_dim: 8 } }\n'
    )
    kit.expect_error(
        text,
        "feature_configs[4].combo_feature",
        NOT_YET,
        "use id_feature or raw_feature",
        at="combo_feature",
    )


def test_unsupported_model(kit):
    text = kit.BASE[: kit.BASE.index("  dlrm_hstu {")] + "  deepfm { wide_output_dim: 4 }\n}\n"
    error = kit.expect_error(text, "model_config.deepfm", NOT_YET, at="deepfm")
    assert "dlrm_hstu only" in error.problem


def test_second_model_next_to_dlrm_hstu(kit):
    text = kit.edit("  kernel: PYTORCH", "  kernel: PYTORCH\n  deepfm {}")
    kit.expect_error(
        text, "model_config.deepfm", '"deepfm" and "dlrm_hstu" are both set', at="deepfm"
    )


def test_unsupported_preprocessor(kit):
    text = kit.edit(
        "contextual_preprocessor {\n",
        "contextual_interleave_preprocessor { enable_interleaving: true }\n"
        "        contextual_preprocessor {\n",
    )
    kit.expect_error(
        text,
        "model_config.dlrm_hstu.hstu.input_preprocessor.contextual_interleave_preprocessor",
        NOT_YET,
        at="contextual_interleave_preprocessor",
    )


def test_unsupported_id_feature_option(kit):
    text = kit.edit("num_buckets: 5 }", "num_buckets: 5 hash_bucket_size: 1000 }")
    kit.expect_error(
        text,
        "feature_configs[3].id_feature.hash_bucket_size",
        NOT_YET,
        "store ids already reduced",
        at="hash_bucket_size",
    )


def test_ignored_fields_are_reported_as_notes(kit):
    text = kit.edit("num_epochs: 1", "num_epochs: 1 use_tensorboard: false")
    notes = dict(ignored_settings(kit.load(text)))
    assert notes == {"train_config.use_tensorboard": "metrics go to MLflow"}


def test_train_metrics_are_not_implemented(kit):
    text = kit.edit(
        "metrics { mean_absolute_error {} }", "metrics { mean_absolute_error {} } train_metrics {}"
    )
    kit.expect_error(
        text,
        "model_config.dlrm_hstu.fusion_mtl_tower.task_configs[2].train_metrics",
        NOT_YET,
        at="train_metrics",
    )


def test_docs_field_reference_is_current():
    # docs/config.md's field reference is generated: regenerate it with
    # `python -c "from hstu.config.support import field_reference; print(field_reference())"`
    # between its markers when a status or note changes.
    from pathlib import Path

    from hstu.config.support import field_reference

    text = (Path(__file__).resolve().parents[2] / "docs" / "config.md").read_text()
    section = text.split("<!-- field-reference:begin -->\n")[1].split(
        "\n<!-- field-reference:end -->"
    )[0]
    assert section == field_reference()


def test_every_reference_note_names_a_real_field():
    from hstu.config import schema
    from hstu.config.support import FIELD_NOTES, REFERENCE_MESSAGES

    for key in FIELD_NOTES:
        message, field = key.split(".")
        assert message in REFERENCE_MESSAGES, key
        assert field in schema.message_descriptor(message).fields_by_name, key
