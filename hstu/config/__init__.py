"""Pipeline config: TorchEasyRec's text-format config language, parsed, completed and checked.

    cfg = load_config("recipes/kuairand_dlrm_hstu.config", overrides=["data_config.batch_size=8"])
    cfg.model_config.dlrm_hstu.hstu.stu.embedding_dim     # field names are TorchEasyRec's
    feature_specs(cfg), label_specs(cfg), sequence_names(cfg)

See docs/config.md for the language, what is supported, --set and the error format.
"""

from hstu.config import schema
from hstu.config.errors import ConfigError, Location
from hstu.config.features import (
    FeatureSpec,
    LabelSpec,
    feature_specs,
    label_specs,
    sequence_names,
    unused_features,
    unused_labels,
)
from hstu.config.loader import load_config, load_config_text
from hstu.config.support import ignored_settings

# The message class of a whole pipeline config (TorchEasyRec's EasyRecConfig), built from
# hstu/config/protos/ when this package is imported.
PipelineConfig = schema.message_class("EasyRecConfig")

__all__ = [
    "ConfigError",
    "FeatureSpec",
    "LabelSpec",
    "Location",
    "PipelineConfig",
    "feature_specs",
    "ignored_settings",
    "label_specs",
    "load_config",
    "load_config_text",
    "schema",
    "sequence_names",
    "unused_features",
    "unused_labels",
]
