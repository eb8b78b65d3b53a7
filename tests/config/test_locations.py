"""The position scanner that maps field paths to line:column."""

from __future__ import annotations

from hstu.config import schema
from hstu.config.locations import Locator, parent_path, scan

TEXT = """\
# a comment with { braces } and "quotes"
model_config {
  feature_groups { group_name: "a#b" feature_names: ["x", "y"] }
  feature_groups < group_name: 'c' >
  dlrm_hstu {
    hstu { stu { embedding_dim: 5 } }
    max_seq_len: -3; fusion_mtl_tower { task_configs: [{ task_name: "t" "u" }, { task_name: "v" }] }
  }
}
"""


def root():
    return schema.message_descriptor("EasyRecConfig")


def test_positions_of_nested_and_repeated_fields():
    positions = scan(TEXT, root()).positions
    assert positions["model_config"] == (2, 1)
    assert positions["model_config.feature_groups"] == (3, 3)
    assert positions["model_config.feature_groups[0].group_name"] == (3, 20)
    assert positions["model_config.feature_groups[0].feature_names[1]"] == (3, 59)
    assert positions["model_config.feature_groups[1].group_name"] == (4, 20)
    assert positions["model_config.dlrm_hstu.hstu.stu.embedding_dim"] == (6, 18)
    assert positions["model_config.dlrm_hstu.max_seq_len"] == (7, 5)
    tasks = "model_config.dlrm_hstu.fusion_mtl_tower.task_configs"
    assert positions[f"{tasks}[0].task_name"] == (7, 58)
    assert positions[f"{tasks}[1].task_name"] == (7, 82)


def test_scan_stops_inside_a_message_and_reports_what_is_open():
    result = scan(TEXT, root(), stop=(6, 33))  # at the 5 of embedding_dim: 5
    assert result.open_messages[-1] == "model_config.dlrm_hstu.hstu.stu"
    assert result.pending_field == "model_config.dlrm_hstu.hstu.stu.embedding_dim"
    result = scan(TEXT, root(), stop=(7, 5))  # at max_seq_len, between fields
    assert result.open_messages == ["model_config", "model_config.dlrm_hstu"]
    assert result.pending_field is None


def test_locator_falls_back_to_the_enclosing_field_and_honours_overrides():
    locator = Locator("f.config", scan(TEXT, root()).positions)
    assert str(locator.where("model_config.dlrm_hstu.hstu.stu.num_heads")) == "f.config:6:12"
    assert str(locator.where("train_config.num_steps")) == "f.config"
    from hstu.config.errors import Location

    locator.set_by_override("model_config.dlrm_hstu.hstu", Location("--set 'x'"))
    assert str(locator.where("model_config.dlrm_hstu.hstu.stu.embedding_dim")) == "--set 'x'"
    assert str(locator.where("model_config.dlrm_hstu.max_seq_len")) == "f.config:7:5"


def test_parent_path():
    assert parent_path("a.b[2].c") == "a.b[2]"
    assert parent_path("a.b[2]") == "a.b"
    assert parent_path("a") == ""
