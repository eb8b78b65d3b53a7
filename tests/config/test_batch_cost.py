"""data_config.batch_cost_size / sample_cost_field (TorchEasyRec's names) and token_budget, this
project's earlier name of batch_cost_size: accepted, merged into one value, conflicts refused."""

from __future__ import annotations

from google.protobuf import text_format

from hstu.config.support import UNSUPPORTED

DATA = "  batch_size: 4\n"


def with_data(kit, fields: str) -> str:
    return kit.edit(DATA, DATA + fields)


def test_torcheasyrec_fields_are_no_longer_refused(kit):
    assert "DataConfig.batch_cost_size" not in UNSUPPORTED
    assert "DataConfig.sample_cost_field" not in UNSUPPORTED
    cfg = kit.load(with_data(kit, '  batch_cost_size: 4096\n  sample_cost_field: "cost"\n'))
    assert cfg.data_config.batch_cost_size == 4096
    assert cfg.data_config.sample_cost_field == "cost"


def test_either_name_gives_both_fields_the_budget(kit):
    for fields in ("  batch_cost_size: 500\n", "  token_budget: 500\n",
                   "  batch_cost_size: 500\n  token_budget: 500\n"):
        data = kit.load(with_data(kit, fields)).data_config
        assert data.batch_cost_size == data.token_budget == 500, fields
    data = kit.load(kit.BASE, overrides=["data_config.token_budget=700"]).data_config
    assert data.batch_cost_size == data.token_budget == 700


def test_no_budget_leaves_batch_cost_size_unset(kit):
    data = kit.load(kit.BASE).data_config
    assert not data.HasField("batch_cost_size") and data.token_budget == 0
    data = kit.load(with_data(kit, "  batch_cost_size: 0\n")).data_config
    assert data.batch_cost_size == 0 and data.token_budget == 0


def test_different_values_under_the_two_names_are_an_error(kit):
    text = with_data(kit, "  batch_cost_size: 500\n  token_budget: 600\n")
    line, column = kit.position(text, "batch_cost_size: 500")
    error = kit.expect_error(
        text,
        "data_config.token_budget",
        "token_budget 600 disagrees with batch_cost_size 500",
        "set batch_cost_size only",
        at="token_budget: 600",
    )
    assert f"{kit.SOURCE}:{line}:{column}" in error.problem  # where the other one is
    override = "data_config.token_budget=0"
    kit.expect_error(
        with_data(kit, "  batch_cost_size: 500\n"),
        "data_config.token_budget",
        "disagrees",
        at=f"--set {override!r}",
        overrides=[override],
    )


def test_sample_cost_field_needs_a_budget(kit):
    text = with_data(kit, '  sample_cost_field: "cost"\n')
    kit.expect_error(
        text, "data_config.sample_cost_field", "needs batch_cost_size", at="sample_cost_field"
    )
    kit.load(with_data(kit, '  sample_cost_field: "cost"\n  token_budget: 9\n'))


def test_the_saved_config_loads_again_unchanged(kit):
    # Training ships text_format.MessageToString(cfg) to its workers, which load it again.
    cfg = kit.load(with_data(kit, '  token_budget: 300\n  sample_cost_field: "cost"\n'))
    again = kit.load(text_format.MessageToString(cfg))
    assert again == cfg and again.data_config.batch_cost_size == 300
