"""Shared pieces of the config tests: a small valid pipeline config and error assertions."""

from __future__ import annotations

from pathlib import Path

import pytest

from hstu.config import ConfigError, load_config_text

SOURCE = "test.config"

# A small but complete DlrmHSTU config: every rule the tests break starts from here.
BASE_CONFIG = """\
train_input_path: "train.parquet"
eval_input_path: "eval.parquet"
model_dir: "model_dir"
train_config {
  sparse_optimizer { rowwise_adagrad_optimizer { lr: 0.01 } }
  dense_optimizer { adam_optimizer { lr: 0.002 } }
  num_epochs: 1
}
data_config {
  batch_size: 4
  dataset_type: ParquetDataset
  label_fields: ["cand_seq__action_weight", "cand_seq__watch_time"]
}
feature_configs {
  sequence_feature {
    sequence_name: "uih_seq"
    sequence_length: 100
    sequence_delim: "|"
    features { id_feature { feature_name: "video_id" expression: "item:video_id"
                            embedding_name: "video_emb" embedding_dim: 8 num_buckets: 100 } }
    features { id_feature { feature_name: "cate" expression: "item:cate"
                            embedding_dim: 8 num_buckets: 10 } }
    features { raw_feature { feature_name: "action_weight" expression: "user:action_weight" } }
    features { raw_feature { feature_name: "watch_time" expression: "user:watch_time" } }
    features { raw_feature { feature_name: "action_timestamp"
                             expression: "user:action_timestamp" } }
  }
}
feature_configs {
  sequence_feature {
    sequence_name: "cand_seq"
    sequence_length: 10
    sequence_delim: "|"
    features { id_feature { feature_name: "video_id" expression: "item:video_id"
                            embedding_name: "video_emb" embedding_dim: 8 num_buckets: 100 } }
    features { raw_feature { feature_name: "query_time" expression: "context:query_time" } }
  }
}
feature_configs { id_feature { feature_name: "user_id" expression: "user:user_id"
                               embedding_dim: 8 num_buckets: 50 } }
feature_configs { id_feature { feature_name: "user_level" expression: "user:user_level"
                               embedding_dim: 8 num_buckets: 5 } }
model_config {
  feature_groups { group_name: "contextual" feature_names: ["user_id", "user_level"]
                   group_type: DEEP }
  feature_groups { group_name: "uih"
                   feature_names: "uih_seq__video_id" group_type: JAGGED_SEQUENCE }
  feature_groups { group_name: "candidate" feature_names: "cand_seq__video_id"
                   group_type: JAGGED_SEQUENCE }
  feature_groups { group_name: "uih_action" feature_names: "uih_seq__action_weight"
                   group_type: JAGGED_SEQUENCE }
  feature_groups { group_name: "uih_watchtime" feature_names: "uih_seq__watch_time"
                   group_type: JAGGED_SEQUENCE }
  feature_groups { group_name: "uih_timestamp" feature_names: "uih_seq__action_timestamp"
                   group_type: JAGGED_SEQUENCE }
  feature_groups { group_name: "candidate_timestamp" feature_names: "cand_seq__query_time"
                   group_type: JAGGED_SEQUENCE }
  dlrm_hstu {
    hstu {
      stu { embedding_dim: 16 num_heads: 2 hidden_dim: 8 attention_dim: 8 }
      positional_encoder { num_position_buckets: 64 num_time_buckets: 32 use_time_encoding: true }
      input_preprocessor {
        contextual_preprocessor {
          action_encoder { simple_action_encoder { action_embedding_dim: 4
                                                   action_weights: [1, 2, 4] } }
          action_mlp { simple_mlp { hidden_dim: 16 } }
          content_encoder { slice_content_encoder {} }
          content_mlp { simple_mlp { hidden_dim: 16 } }
        }
      }
      output_postprocessor {
        timestamp_layernorm_postprocessor {
          time_duration_period_units: [3600, 86400]
          time_duration_units_per_period: [24, 7]
        }
      }
    }
    fusion_mtl_tower {
      mlp { hidden_units: [16] activation: "nn.SiLU" use_ln: true }
      task_configs { task_name: "is_click" label_name: "cand_seq__action_weight" task_bitmask: 1
                     losses { binary_cross_entropy {} } metrics { auc {} } }
      task_configs { task_name: "is_like" label_name: "cand_seq__action_weight" task_bitmask: 2
                     losses { binary_cross_entropy {} }
                     metrics { grouped_auc { grouping_key: "user_id" } } }
      task_configs { task_name: "watch_time" label_name: "cand_seq__watch_time"
                     losses { l2_loss {} } metrics { mean_absolute_error {} } }
    }
    max_seq_len: 128
  }
  kernel: PYTORCH
}
"""

REPO_ROOT = Path(__file__).resolve().parents[2]
# The seed document sits beside the repository (../shared) on CI machines and here.
SEED_DOC = REPO_ROOT.parent / "shared" / "seed" / "dlrm_hstu.md"


def replace_once(text: str, old: str, new: str) -> str:
    """`text` with the single occurrence of `old` replaced (fails loudly if it is not unique)."""
    assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times"
    return text.replace(old, new)


def position(text: str, snippet: str, occurrence: int = 0) -> tuple[int, int]:
    """1-based (line, column) of the `occurrence`-th appearance of `snippet` in `text`."""
    start = -1
    for _ in range(occurrence + 1):
        start = text.index(snippet, start + 1)
    line = text.count("\n", 0, start) + 1
    column = start - (text.rfind("\n", 0, start) + 1) + 1
    return line, column


def load(text: str, overrides=()):
    return load_config_text(text, SOURCE, overrides)


def expect_error(text: str, path: str, *fragments: str, at=None, overrides=()) -> ConfigError:
    """Load `text`, expect ConfigError on `path` with every fragment in its message.

    `at` is where the error must point: a snippet of `text` (its first occurrence), a
    (snippet, occurrence) pair, or a literal location ("test.config:3:5", "--set '...'").
    """
    with pytest.raises(ConfigError) as caught:
        load(text, overrides)
    error = caught.value
    if isinstance(at, tuple):
        line, column = position(text, *at)
        where = f"{SOURCE}:{line}:{column}"
    elif isinstance(at, str) and not at.startswith(("--set", SOURCE)):
        line, column = position(text, at)
        where = f"{SOURCE}:{line}:{column}"
    else:
        where = at
    if where is not None:
        assert str(error.where) == where, f"error at {error.where}, expected {where}: {error}"
    assert error.path == path, f"path {error.path!r}, expected {path!r}: {error}"
    for fragment in fragments:
        assert fragment in error.problem, f"{fragment!r} not in {error.problem!r}"
    assert str(error) == f"{error.where}: {error.path}: {error.problem}"
    return error


class ConfigTestKit:
    """What the config tests share, handed out by the `kit` fixture (no imports from conftest)."""

    BASE = BASE_CONFIG
    SOURCE = SOURCE
    SEED_DOC = SEED_DOC
    REPO_ROOT = REPO_ROOT
    replace_once = staticmethod(replace_once)
    position = staticmethod(position)
    load = staticmethod(load)
    expect_error = staticmethod(expect_error)

    def edit(self, *pairs: str) -> str:
        """BASE with each (old, new) pair replaced once."""
        text = self.BASE
        for old, new in zip(pairs[::2], pairs[1::2], strict=True):
            text = replace_once(text, old, new)
        return text


@pytest.fixture
def kit() -> ConfigTestKit:
    return ConfigTestKit()
