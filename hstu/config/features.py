"""What the data pipeline and the model need to know about each feature, derived from the config.

`FeatureSpec` is the contract between hstu/config (which derives the specs from
`feature_configs`), hstu/data (which reads `column` and builds the batch) and hstu/model.py
(which builds embedding tables from the id features and reads raw features by `name`).

feature_specs(cfg), label_specs(cfg) and sequence_names(cfg) below are the only place that
turns feature_configs into names, columns, tables and dtypes; the group-name constants are the
names DlrmHSTU reads its feature groups by.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from google.protobuf.message import Message

from hstu.config.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ZchSpec:
    """An id feature's zero-collision hashing (TorchEasyRec's zch block): the table has
    `zch_size` rows and ids of any int64 value are mapped to them by TorchRec's
    managed-collision module with this eviction policy."""

    zch_size: int
    eviction_interval: int
    policy: Literal["lfu", "lru", "distance_lfu"]
    decay_exponent: float = 1.0


def zch_spec(config: Message) -> ZchSpec | None:
    """The ZchSpec of an IdFeature message, None without a zch block."""
    if not config.HasField("zch"):
        return None
    zch = config.zch
    policy = zch.WhichOneof("eviction_policy")
    decay = float(getattr(zch, policy).decay_exponent) if policy != "lfu" else 1.0
    return ZchSpec(int(zch.zch_size), int(zch.eviction_interval), policy, decay)


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    # Name used in feature groups and as the key in JaggedBatch: "user_id", "uih_seq__video_id".
    name: str
    # Column read from the sample file. With fg_mode FG_NONE it is `name` (TorchEasyRec reads
    # encoded inputs by feature name); with FG_DAG / FG_NORMAL it comes from the expression:
    # "x" for "side:x", "S__x" inside sequence_feature S, which may differ from `name`.
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
    # A feature of the uih_timestamp or candidate_timestamp group: its values must be
    # non-negative and in time order within a row. The group decides, not the column's name.
    is_timestamp: bool = False
    # The time order of timestamp features: model_config.dlrm_hstu.
    # sequence_timestamp_is_ascending (True: oldest first; False: newest first).
    timestamps_ascending: bool = True
    # Element separator when a sequence column is stored as a string ("12|884|93"): the
    # sequence_delim of its sequence_feature (or of the standalone sequence_*_feature).
    sequence_delim: str = ";"
    # id features with a zch block: num_buckets is then the table's rows (zch_size), and the
    # ids in the data may be any value >= 0 (the model maps them to rows).
    zch: ZchSpec | None = None


@dataclasses.dataclass(frozen=True)
class LabelSpec:
    # Label column, e.g. "cand_seq__action_weight" (list<int64>) or "cand_seq__watch_time"
    # (list<float32>); aligned with the candidate sequence.
    column: str
    value_dtype: Literal["int64", "float32"]
    # The sequence the label is aligned with (its lengths must equal that sequence's).
    sequence: str = "cand_seq"
    # Element separator when the column is stored as a string: the candidate sequence's.
    sequence_delim: str = ";"


# ---- Feature groups DlrmHSTU reads by name (reference section 1.5) --------------------------

CONTEXTUAL = "contextual"
UIH = "uih"
CANDIDATE = "candidate"
UIH_ACTION = "uih_action"
UIH_WATCHTIME = "uih_watchtime"
UIH_TIMESTAMP = "uih_timestamp"
CANDIDATE_TIMESTAMP = "candidate_timestamp"

# group name -> allowed group types (FeatureGroupType names)
GROUP_TYPES: dict[str, tuple[str, ...]] = {
    CONTEXTUAL: ("DEEP", "SEQUENCE"),
    UIH: ("JAGGED_SEQUENCE",),
    CANDIDATE: ("JAGGED_SEQUENCE",),
    UIH_ACTION: ("JAGGED_SEQUENCE",),
    UIH_WATCHTIME: ("JAGGED_SEQUENCE",),
    UIH_TIMESTAMP: ("JAGGED_SEQUENCE",),
    CANDIDATE_TIMESTAMP: ("JAGGED_SEQUENCE",),
}
# Optional: no contextual group means no contextual tokens; uih_action is needed only with an
# action encoder (validation checks that), uih_watchtime only with watch-time thresholds.
OPTIONAL_GROUPS = (CONTEXTUAL, UIH_ACTION, UIH_WATCHTIME)
# Groups on the history side (one sequence) and on the candidate side (another sequence).
UIH_SIDE_GROUPS = (UIH, UIH_ACTION, UIH_WATCHTIME, UIH_TIMESTAMP)
CANDIDATE_SIDE_GROUPS = (CANDIDATE, CANDIDATE_TIMESTAMP)
# Groups of embedded ids, and groups of one raw value per token.
ID_GROUPS = (CONTEXTUAL, UIH, CANDIDATE)
RAW_GROUPS = (UIH_ACTION, UIH_WATCHTIME, UIH_TIMESTAMP, CANDIDATE_TIMESTAMP)
# Raw values kept as int64: action bitmasks and timestamps (never rounded through float32).
INT64_RAW_GROUPS = (UIH_ACTION, UIH_TIMESTAMP, CANDIDATE_TIMESTAMP)
# Groups of timestamps: checked as non-negative and time-ordered within a row.
TIMESTAMP_GROUPS = (UIH_TIMESTAMP, CANDIDATE_TIMESTAMP)

# Sequence keys for standalone sequence_id_feature / sequence_raw_feature configs, which have
# no sequence_name: one key per side, named like this project's grouped sequences.
STANDALONE_UIH_SEQUENCE = "uih_seq"
STANDALONE_CANDIDATE_SEQUENCE = "cand_seq"

CLASSIFICATION_LOSSES = (
    "binary_cross_entropy",
    "softmax_cross_entropy",
    "jrc_loss",
    "binary_focal_loss",
)
REGRESSION_LOSSES = ("l2_loss",)


@dataclasses.dataclass(frozen=True)
class DeclaredFeature:
    """One id or raw feature as declared in feature_configs, before groups are consulted."""

    # Full name: "user_id", or "uih_seq__video_id" for a sub-feature of sequence_feature uih_seq.
    name: str
    column: str
    kind: Literal["id", "raw"]
    # sequence_name of the enclosing sequence_feature; None for scalar and standalone features.
    sequence: str | None
    # A standalone sequence_id_feature / sequence_raw_feature.
    standalone_sequence: bool
    # The IdFeature or RawFeature message.
    config: Message
    # Field path of `config`, e.g. "feature_configs[3].sequence_feature.features[0].id_feature".
    path: str
    # sequence_delim of the enclosing sequence_feature, or of a standalone sequence feature;
    # None for scalar features.
    sequence_delim: str | None = None
    # Field path of that sequence_delim (for errors).
    sequence_delim_path: str | None = None

    @property
    def is_sequence(self) -> bool:
        return self.sequence is not None or self.standalone_sequence


def input_name(expression: str) -> str:
    """ "item:video_id" -> "video_id" (the column a feature reads; validation checks the form)."""
    return expression.partition(":")[2] or expression


# fg_mode values whose TorchEasyRec reader takes a feature's input from the column its
# expression names (and would run the feature generator on it); FG_NONE reads encoded columns
# named after the features.
EXPRESSION_FG_MODES = ("FG_DAG", "FG_NORMAL")


def fg_mode(cfg: Message) -> str:
    """data_config.fg_mode by name: "FG_NONE" (the default), "FG_DAG", ..."""
    from hstu.config import schema

    return schema.enum_name("FgMode", cfg.data_config.fg_mode)


def reads_expressions(cfg: Message) -> bool:
    """Whether features read the columns their expressions name (FG_DAG, FG_NORMAL) rather
    than columns named after the features (FG_NONE)."""
    return fg_mode(cfg) in EXPRESSION_FG_MODES


_SCALAR_KINDS = {"id_feature": "id", "raw_feature": "raw"}
_STANDALONE_KINDS = {"sequence_id_feature": "id", "sequence_raw_feature": "raw"}


def declared_features(cfg: Message) -> list[DeclaredFeature]:
    """Every id/raw feature of feature_configs, in declaration order.

    Names: a scalar or standalone sequence feature is named by its feature_name; sub-feature f
    of sequence_feature S is named "S__f". Columns follow TorchEasyRec's readers (its
    BaseFeature.inputs and the sequence features' side inputs):

    - fg_mode FG_NONE (encoded inputs): a feature reads the column named after the feature
      itself ("user_id", "video_id", "uih_seq__video_id"); expression is not used.
    - fg_mode FG_DAG / FG_NORMAL: a feature reads the column named after the colon of its
      expression; inside sequence_feature S, expression "side:x" reads column "S__x".
    """
    by_expression = reads_expressions(cfg)
    declared = []
    for index, feature_config in enumerate(cfg.feature_configs):
        which = feature_config.WhichOneof("feature")
        path = f"feature_configs[{index}].{which}"
        if which in _SCALAR_KINDS or which in _STANDALONE_KINDS:
            feature = getattr(feature_config, which)
            declared.append(
                DeclaredFeature(
                    name=feature.feature_name,
                    column=(
                        input_name(feature.expression)
                        if by_expression and feature.expression
                        else feature.feature_name
                    ),
                    kind=_SCALAR_KINDS.get(which) or _STANDALONE_KINDS[which],
                    sequence=None,
                    standalone_sequence=which in _STANDALONE_KINDS,
                    config=feature,
                    path=path,
                    sequence_delim=(
                        feature.sequence_delim if which in _STANDALONE_KINDS else None
                    ),
                    sequence_delim_path=f"{path}.sequence_delim",
                )
            )
        elif which == "sequence_feature":
            sequence = feature_config.sequence_feature
            prefix = sequence.sequence_name
            for sub_index, sub_config in enumerate(sequence.features):
                sub_which = sub_config.WhichOneof("feature")
                if sub_which not in _SCALAR_KINDS:
                    continue  # empty or unsupported: validation reports it
                feature = getattr(sub_config, sub_which)
                source = (
                    input_name(feature.expression)
                    if by_expression and feature.expression
                    else feature.feature_name
                )
                declared.append(
                    DeclaredFeature(
                        name=f"{prefix}__{feature.feature_name}",
                        column=f"{prefix}__{source}",
                        kind=_SCALAR_KINDS[sub_which],
                        sequence=prefix,
                        standalone_sequence=False,
                        config=feature,
                        path=f"{path}.features[{sub_index}].{sub_which}",
                        sequence_delim=sequence.sequence_delim,
                        sequence_delim_path=f"{path}.sequence_delim",
                    )
                )
    return declared


def group_feature_names(cfg: Message) -> dict[str, list[str]]:
    """group_name -> feature_names, for the groups of model_config."""
    return {
        group.group_name: list(group.feature_names) for group in cfg.model_config.feature_groups
    }


def embedding_name(feature: DeclaredFeature) -> str:
    """The table an id feature looks up: its embedding_name, else "<full name>_emb"."""
    return feature.config.embedding_name or f"{feature.name}_emb"


def _side_sequence(cfg: Message, side_groups: tuple[str, ...], standalone_key: str) -> str:
    by_name = {feature.name: feature for feature in declared_features(cfg)}
    groups = group_feature_names(cfg)
    for group in side_groups:
        for name in groups.get(group, []):
            feature = by_name.get(name)
            if feature is not None and feature.sequence is not None:
                return feature.sequence
            if feature is not None and feature.standalone_sequence:
                return standalone_key
    raise ConfigError(
        "<config>", "model_config.feature_groups", f"no sequence feature in groups {side_groups}"
    )


def sequence_names(cfg: Message) -> tuple[str, str]:
    """(history sequence, candidate sequence), e.g. ("uih_seq", "cand_seq").

    For grouped sequence features these are the sequence_name of the sequence_feature behind
    the uih and candidate groups; standalone sequence features get STANDALONE_*_SEQUENCE.
    """
    return (
        _side_sequence(cfg, UIH_SIDE_GROUPS, STANDALONE_UIH_SEQUENCE),
        _side_sequence(cfg, CANDIDATE_SIDE_GROUPS, STANDALONE_CANDIDATE_SEQUENCE),
    )


def feature_specs(cfg: Message) -> list[FeatureSpec]:
    """The features DlrmHSTU reads (those named by a feature group), in declaration order.

    Declared features that no group uses are left out: nothing reads their columns or builds
    their tables (`launch.py check` lists them). `cfg` must come from load_config (validated).
    """
    groups = group_feature_names(cfg)
    uih_sequence, candidate_sequence = sequence_names(cfg)
    used = {name for names in groups.values() for name in names}
    standalone_side = {}
    for side_groups, key in (
        (UIH_SIDE_GROUPS, uih_sequence),
        (CANDIDATE_SIDE_GROUPS, candidate_sequence),
    ):
        for group in side_groups:
            for name in groups.get(group, []):
                standalone_side[name] = key
    int64_raw = {name for group in INT64_RAW_GROUPS for name in groups.get(group, [])}
    timestamps = {name for group in TIMESTAMP_GROUPS for name in groups.get(group, [])}
    ascending = bool(cfg.model_config.dlrm_hstu.sequence_timestamp_is_ascending)

    specs = []
    for feature in declared_features(cfg):
        if feature.name not in used:
            continue
        sequence = feature.sequence
        if feature.standalone_sequence:
            sequence = standalone_side[feature.name]
        shared = dict(
            name=feature.name,
            column=feature.column,
            sequence=sequence,
            sequence_delim=sequence_delimiter(feature),
        )
        if feature.kind == "id":
            zch = zch_spec(feature.config)
            specs.append(
                FeatureSpec(
                    kind="id",
                    embedding_name=embedding_name(feature),
                    embedding_dim=feature.config.embedding_dim,
                    num_buckets=zch.zch_size if zch else feature.config.num_buckets,
                    data_type=feature.config.data_type,
                    value_dtype="int64",
                    zch=zch,
                    **shared,
                )
            )
        else:
            is_timestamp = feature.name in timestamps
            specs.append(
                FeatureSpec(
                    kind="raw",
                    value_dtype="int64" if feature.name in int64_raw else "float32",
                    is_timestamp=is_timestamp,
                    timestamps_ascending=ascending if is_timestamp else True,
                    **shared,
                )
            )
    return specs


def sequence_delimiter(feature: DeclaredFeature) -> str:
    """The separator of a string-encoded sequence column (";" for scalar features, which have
    none: TorchEasyRec's default). An empty one could not split anything."""
    if feature.sequence_delim is None:
        return ";"
    if not feature.sequence_delim:
        raise ConfigError(
            "<config>",
            feature.sequence_delim_path or feature.path,
            "sequence_delim is empty; it separates the elements of a string-encoded sequence "
            "column (e.g. \"|\" for \"12|884|93\")",
        )
    return feature.sequence_delim


def unused_features(cfg: Message) -> list[str]:
    """Declared features that no feature group names (feature_specs leaves them out)."""
    used = {name for names in group_feature_names(cfg).values() for name in names}
    return [feature.name for feature in declared_features(cfg) if feature.name not in used]


def task_label_kind(task: Message) -> Literal["classification", "regression"] | None:
    """From a task's losses; None if it has none or mixes both kinds (validation reports it)."""
    kinds = set()
    for loss in task.losses:
        which = loss.WhichOneof("loss")
        if which in CLASSIFICATION_LOSSES:
            kinds.add("classification")
        elif which in REGRESSION_LOSSES:
            kinds.add("regression")
    return kinds.pop() if len(kinds) == 1 else None


def unused_labels(cfg: Message) -> list[str]:
    """data_config.label_fields entries that no task uses (label_specs leaves them out)."""
    tasks = cfg.model_config.dlrm_hstu.fusion_mtl_tower.task_configs
    used = {task.label_name for task in tasks}
    return [column for column in cfg.data_config.label_fields if column not in used]


def label_specs(cfg: Message) -> list[LabelSpec]:
    """One LabelSpec per label column some task uses, in data_config.label_fields order.

    int64 for labels of classification tasks (action bitmasks, tested with task_bitmask),
    float32 for labels of regression (l2_loss) tasks. Label fields no task uses are left out
    (nothing reads them; `launch.py check` lists them). `cfg` must come from load_config.
    """
    _, candidate_sequence = sequence_names(cfg)
    delimiter = _candidate_delimiter(cfg)
    tasks = cfg.model_config.dlrm_hstu.fusion_mtl_tower.task_configs
    unused = set(unused_labels(cfg))
    specs = []
    for index, column in enumerate(cfg.data_config.label_fields):
        if column in unused:
            continue
        kinds = {task_label_kind(task) for task in tasks if task.label_name == column}
        if len(kinds) != 1 or None in kinds:
            raise ConfigError(
                "<config>",
                f"data_config.label_fields[{index}]",
                f"label {column!r} has no single task kind ({sorted(map(str, kinds))}); "
                "was the config loaded with load_config?",
            )
        dtype = "int64" if kinds.pop() == "classification" else "float32"
        specs.append(
            LabelSpec(
                column=column,
                value_dtype=dtype,
                sequence=candidate_sequence,
                sequence_delim=delimiter,
            )
        )
    return specs


def _candidate_delimiter(cfg: Message) -> str:
    """Labels are aligned with the candidates, so a string-encoded label column is split like
    the candidate sequence: the sequence_delim of the first feature of the candidate group."""
    by_name = {feature.name: feature for feature in declared_features(cfg)}
    for name in group_feature_names(cfg).get(CANDIDATE, []):
        if name in by_name:
            return sequence_delimiter(by_name[name])
    return ";"
