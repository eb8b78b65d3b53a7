"""What the data pipeline and the model need to know about each feature, derived from the config.

`FeatureSpec` is the contract between hstu/config (which derives the specs from
`feature_configs`), hstu/data (which reads `column` and builds the batch) and hstu/model.py
(which builds embedding tables from the id features and reads raw features by `name`).
"""

from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    # Name used in feature groups and as the key in JaggedBatch: "user_id", "uih_seq__video_id".
    name: str
    # Column read from the sample file. For a sub-feature of sequence_feature S whose input is
    # "side:x", the column is "S__x" (TorchEasyRec's rule), which may differ from `name`.
    column: str
    # "id": looked up in an embedding table (goes into the KeyedJaggedTensor).
    # "raw": numeric values used as they are (action bitmasks, watch times, timestamps).
    kind: Literal["id", "raw"]
    # Sequence name ("uih_seq", "cand_seq") for sub-features of a sequence_feature, else None
    # (a scalar feature: one value per row).
    sequence: str | None = None
    # id features only: embedding table (features with the same embedding_name share it).
    embedding_name: str | None = None
    embedding_dim: int | None = None
    num_buckets: int | None = None
    # Embedding storage dtype: "FP32" or "FP16".
    data_type: str = "FP32"
    # raw features only: dtype of the values in JaggedBatch.raw. Timestamps and action bitmasks
    # are int64 (never rounded through float32); everything else float32.
    value_dtype: Literal["int64", "float32"] = "int64"


@dataclasses.dataclass(frozen=True)
class LabelSpec:
    # Label column, e.g. "cand_seq__action_weight" (list<int64>) or "cand_seq__watch_time"
    # (list<float32>); aligned with the candidate sequence.
    column: str
    value_dtype: Literal["int64", "float32"]
    # The sequence the label is aligned with (its lengths must equal that sequence's).
    sequence: str = "cand_seq"
