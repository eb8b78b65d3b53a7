"""Cross-field rules of a DlrmHSTU pipeline config (after parsing, overrides and defaults).

Each rule raises ConfigError at the field that breaks it (file:line:col from the Locator, or
the --set that set it). Rules follow TorchEasyRec's DlrmHSTU (reference sections 1.5 and 4)
plus what this project needs to read the data and build the model.
"""

from __future__ import annotations

import re

from google.protobuf.message import Message

from hstu.config import schema
from hstu.config.errors import ConfigError, one_of, suggest
from hstu.config.features import (
    CANDIDATE,
    EXPRESSION_FG_MODES,
    CANDIDATE_SIDE_GROUPS,
    CONTEXTUAL,
    GROUP_TYPES,
    ID_GROUPS,
    OPTIONAL_GROUPS,
    RAW_GROUPS,
    STANDALONE_CANDIDATE_SEQUENCE,
    STANDALONE_UIH_SEQUENCE,
    UIH,
    UIH_ACTION,
    UIH_SIDE_GROUPS,
    UIH_WATCHTIME,
    DeclaredFeature,
    declared_features,
    embedding_name,
    fg_mode,
    task_label_kind,
)
from hstu.config.locations import Locator
from hstu.config.support import NOT_YET, fg_generator_message

MIXED_PRECISION = ("", "BF16", "FP16")
# TorchEasyRec's MaxCompute dataset types: read here as parquet when the paths are files.
ODPS_DATASETS = ("OdpsDataset", "OdpsDatasetV1")
EMBEDDING_DATA_TYPES = ("FP32", "FP16")
EXPRESSION_SIDES = ("user", "item", "context")
# Common activations an MLP may name (checked without importing torch); any other argument-free
# torch.nn module named "nn.<Class>" is accepted too.
ACTIVATIONS = (
    "nn.ReLU",
    "nn.SiLU",
    "nn.GELU",
    "nn.Sigmoid",
    "nn.Tanh",
    "nn.LeakyReLU",
    "nn.ELU",
    "nn.Identity",
)
CLASSIFICATION_METRICS = ("auc", "grouped_auc", "accuracy", "multiclass_auc")
REGRESSION_METRICS = ("mean_absolute_error", "mean_squared_error", "xauc", "grouped_xauc")
MULTICLASS_AUC_AVERAGES = ("macro", "weighted")
TIME_BUCKET_FNS = ("sqrt", "log")


def _is_torch_module(name: str) -> bool:
    """Whether "nn.<Class>" names a torch.nn module (imports torch: only for uncommon names)."""
    prefix, _, class_name = name.partition(".")
    if prefix != "nn" or not class_name.isidentifier():
        return False
    from torch import nn

    module = getattr(nn, class_name, None)
    return isinstance(module, type) and issubclass(module, nn.Module)


class _Checker:
    def __init__(self, config: Message, locator: Locator):
        self.config = config
        self.locator = locator

    def fail(self, path: str, problem: str) -> None:
        raise ConfigError(self.locator.where(path), path, problem)

    def at(self, path: str) -> str:
        """'line L:C' of a field, to mention a second location inside a message."""
        location = self.locator.where(path)
        return str(location)

    # ---- top level ---------------------------------------------------------------------

    def top_level(self) -> None:
        config = self.config
        for name in ("model_config", "data_config", "train_config"):
            if not config.HasField(name):
                self.fail("", f"missing {name} {{ ... }}")
        if not len(config.feature_configs):
            self.fail("", "missing feature_configs { ... }: no features are declared")
        if config.model_config.WhichOneof("model") != "dlrm_hstu":
            self.fail("model_config", "expected a dlrm_hstu { ... } block (the only model here)")

    # ---- data_config / train_config / export_config --------------------------------------

    def data(self) -> None:
        data = self.config.data_config
        dataset = schema.enum_name("DatasetType", data.dataset_type)
        if dataset in ODPS_DATASETS:
            # TorchEasyRec's benchmark configs read MaxCompute tables. With the input paths
            # pointed at parquet files (the only change such a config needs here), the same
            # columns are read from parquet; an odps:// path itself cannot be read.
            for name in ("train_input_path", "eval_input_path"):
                path = getattr(self.config, name)
                if path.startswith("odps://"):
                    self.fail(
                        name,
                        f"{path!r} is a MaxCompute table, which this project cannot read: "
                        "export it to parquet (one row per sample, the same columns) and set "
                        f"{name} to those files (dataset_type {dataset} then reads them as "
                        "ParquetDataset does)",
                    )
        elif dataset != "ParquetDataset":
            self.fail(
                "data_config.dataset_type",
                f"{dataset} is {NOT_YET}; use ParquetDataset",
            )
        fg_mode = schema.enum_name("FgMode", data.fg_mode)
        if fg_mode not in ("FG_NONE",) + EXPRESSION_FG_MODES:
            self.fail(
                "data_config.fg_mode",
                f"{fg_mode} is {NOT_YET}; use FG_NONE (columns named after the features) or "
                "FG_DAG (columns named by the features' expressions)",
            )
        for name in ("batch_size", "eval_batch_size"):
            if getattr(data, name) == 0:
                self.fail(f"data_config.{name}", "must be at least 1")
        if data.sample_cost_field and not data.batch_cost_size:
            self.fail(
                "data_config.sample_cost_field",
                f"sample_cost_field {data.sample_cost_field!r} needs batch_cost_size (the budget "
                "each batch's summed cost must stay within); without it batches go by rows",
            )
        if data.shuffle and data.shuffle_buffer_size == 0:
            self.fail("data_config.shuffle_buffer_size", "must be at least 1 when shuffle is on")
        if not len(data.label_fields):
            self.fail("data_config.label_fields", "no label columns: tasks need labels")
        seen: dict[str, int] = {}
        for index, label in enumerate(data.label_fields):
            if label in seen:
                self.fail(f"data_config.label_fields[{index}]", f"label {label!r} listed twice")
            seen[label] = index

    def _optimizer(self, path: str, optimizer: Message, choices: list[str]) -> None:
        which = optimizer.WhichOneof("optimizer")
        if which is None:
            self.fail(path, f"no optimizer chosen; expected one of {one_of(choices)}")
        chosen = getattr(optimizer, which)
        if chosen.lr <= 0:
            self.fail(f"{path}.{which}.lr", f"learning rate must be > 0, got {chosen.lr:g}")

    def train(self) -> None:
        train = self.config.train_config
        self._optimizer(
            "train_config.sparse_optimizer",
            train.sparse_optimizer,
            ["sgd_optimizer", "adagrad_optimizer", "adam_optimizer", "rowwise_adagrad_optimizer"],
        )
        self._optimizer(
            "train_config.dense_optimizer",
            train.dense_optimizer,
            ["sgd_optimizer", "adagrad_optimizer", "adam_optimizer", "adamw_optimizer"],
        )
        if train.mixed_precision not in MIXED_PRECISION:
            self.fail(
                "train_config.mixed_precision",
                f'{train.mixed_precision!r}: expected "BF16", "FP16" or "" (none)',
            )
        export = self.config.export_config
        if export.mixed_precision not in MIXED_PRECISION:
            self.fail(
                "export_config.mixed_precision",
                f'{export.mixed_precision!r}: expected "BF16", "FP16" or "" (none)',
            )

    # ---- feature_configs -----------------------------------------------------------------

    def features(self) -> dict[str, DeclaredFeature]:
        sequence_paths: dict[str, str] = {}
        for index, feature_config in enumerate(self.config.feature_configs):
            path = f"feature_configs[{index}]"
            which = feature_config.WhichOneof("feature")
            if which is None:
                self.fail(path, "empty feature config: expected id_feature, raw_feature, ...")
            if which != "sequence_feature":
                continue
            sequence = feature_config.sequence_feature
            sequence_path = f"{path}.sequence_feature"
            name = sequence.sequence_name
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                self.fail(
                    f"{sequence_path}.sequence_name",
                    f"{name!r} is not a name (letters, digits, underscores)",
                )
            if name in sequence_paths:
                self.fail(
                    f"{sequence_path}.sequence_name",
                    f"sequence {name!r} is declared twice "
                    f"(first at {self.at(sequence_paths[name])})",
                )
            sequence_paths[name] = f"{sequence_path}.sequence_name"
            if not len(sequence.features):
                self.fail(sequence_path, f"sequence {name!r} has no features")
            for sub_index, sub_config in enumerate(sequence.features):
                if sub_config.WhichOneof("feature") is None:
                    self.fail(
                        f"{sequence_path}.features[{sub_index}]",
                        "empty feature: expected id_feature or raw_feature",
                    )

        by_name: dict[str, DeclaredFeature] = {}
        for feature in declared_features(self.config):
            config = feature.config
            if not config.feature_name:
                self.fail(f"{feature.path}.feature_name", "must not be empty")
            if feature.name in by_name:
                first = by_name[feature.name]
                self.fail(
                    f"{feature.path}.feature_name",
                    f"feature {feature.name!r} is declared twice "
                    f"(first at {self.at(first.path + '.feature_name')})",
                )
            by_name[feature.name] = feature
            self._expression(feature)
            if feature.kind == "id":
                self._id_feature(feature)
        self._shared_tables(by_name)
        return by_name

    def _expression(self, feature: DeclaredFeature) -> None:
        """With fg_mode FG_DAG / FG_NORMAL a feature's input column comes from its expression,
        so it needs one; with FG_NONE the column is the feature's name (TorchEasyRec reads
        encoded inputs so and never looks at expression), which may then be absent."""
        config = feature.config
        mode = fg_mode(self.config)
        if not config.HasField("expression"):
            if mode in EXPRESSION_FG_MODES:
                self.fail(
                    feature.path,
                    f"fg_mode {mode} ({self.at('data_config.fg_mode')}) reads each feature from "
                    f"the column its expression names, and {feature.name!r} has no expression: "
                    f'add one (e.g. expression: "user:{config.feature_name}") or set '
                    "data_config.fg_mode: FG_NONE (columns named after the features)",
                )
            return
        side, colon, column = config.expression.partition(":")
        if side == "feature" and colon and mode in EXPRESSION_FG_MODES:
            # "feature:x" is the output of another feature inside TorchEasyRec's FG DAG.
            self.fail(
                f"{feature.path}.expression",
                fg_generator_message(
                    mode,
                    self.at("data_config.fg_mode"),
                    f"{feature.name!r} from another feature's output ({config.expression!r})",
                ),
            )
        if not colon or side not in EXPRESSION_SIDES or not column:
            self.fail(
                f"{feature.path}.expression",
                f"{config.expression!r}: expected side:name with side one of "
                f'{one_of(EXPRESSION_SIDES)} (e.g. "item:video_id")',
            )

    def _zch(self, feature: DeclaredFeature) -> None:
        zch, path = feature.config.zch, f"{feature.path}.zch"
        mode = fg_mode(self.config)
        if mode in EXPRESSION_FG_MODES:
            # TorchEasyRec's generator hashes zch inputs (hash_bucket_size 2^63 - 1) first.
            self.fail(
                path,
                fg_generator_message(
                    mode, self.at("data_config.fg_mode"), f"the hashed ids of {feature.name!r}"
                ),
            )
        if zch.zch_size < 2:
            self.fail(
                f"{path}.zch_size",
                f"must be at least 2 (the last row is shared by ids not admitted), got "
                f"{zch.zch_size}",
            )
        if zch.eviction_interval == 0:
            self.fail(f"{path}.eviction_interval", "must be at least 1")
        policy = zch.WhichOneof("eviction_policy")
        if policy is None:
            self.fail(
                path,
                "choose an eviction policy: lfu {}, lru {} or distance_lfu {} (TorchEasyRec "
                "needs one too)",
            )
        options = getattr(zch, policy)
        if policy != "lfu" and options.decay_exponent < 0:
            self.fail(
                f"{path}.{policy}.decay_exponent",
                f"must be >= 0, got {options.decay_exponent:g}",
            )

    def _id_feature(self, feature: DeclaredFeature) -> None:
        config, path = feature.config, feature.path
        if config.embedding_dim == 0:
            self.fail(f"{path}.embedding_dim", "must be at least 1")
        if config.HasField("zch"):
            self._zch(feature)
        elif not config.HasField("num_buckets"):
            self.fail(
                path,
                "num_buckets is required: ids are table rows, 0 <= id < num_buckets (or set "
                "zch { zch_size ... } for ids of any value)",
            )
        if config.HasField("num_buckets") and config.num_buckets == 0:
            self.fail(f"{path}.num_buckets", "must be at least 1")
        if config.data_type not in EMBEDDING_DATA_TYPES:
            self.fail(
                f"{path}.data_type",
                f"{config.data_type!r}: expected one of {one_of(EMBEDDING_DATA_TYPES)}",
            )
        if config.value_dim > 1:
            self.fail(f"{path}.value_dim", f"multi-valued ids are {NOT_YET}; use 1")

    def _shared_tables(self, by_name: dict[str, DeclaredFeature]) -> None:
        tables: dict[str, DeclaredFeature] = {}
        for feature in by_name.values():
            if feature.kind != "id":
                continue
            table = embedding_name(feature)
            first = tables.setdefault(table, feature)
            has_zch = feature.config.HasField("zch")
            if has_zch != first.config.HasField("zch") or (
                has_zch and feature.config.zch != first.config.zch
            ):
                self.fail(
                    f"{feature.path}.zch" if has_zch else feature.path,
                    f"{feature.name!r} shares table {table!r} with {first.name!r} "
                    f"({self.at(first.path)}), so their zch blocks must be the same",
                )
            fields = ("embedding_dim", "data_type")
            if not has_zch:
                fields = ("embedding_dim", "num_buckets", "data_type")
            for field in fields:
                mine, theirs = getattr(feature.config, field), getattr(first.config, field)
                if mine != theirs:
                    self.fail(
                        f"{feature.path}.{field}",
                        f"{feature.name!r} shares table {table!r} with {first.name!r} "
                        f"({self.at(first.path)}), so {field} must match: {mine} != {theirs}",
                    )

    # ---- feature groups --------------------------------------------------------------------

    def groups(self, features: dict[str, DeclaredFeature]) -> dict[str, list[DeclaredFeature]]:
        model = self.config.model_config
        groups: dict[str, list[DeclaredFeature]] = {}
        group_paths: dict[str, str] = {}
        for index, group in enumerate(model.feature_groups):
            path = f"model_config.feature_groups[{index}]"
            name = group.group_name
            if name not in GROUP_TYPES:
                self.fail(
                    f"{path}.group_name",
                    f"unknown group {name!r}{suggest(name, GROUP_TYPES)}; DlrmHSTU reads the "
                    f"groups {one_of(GROUP_TYPES)}",
                )
            if name in groups:
                self.fail(
                    f"{path}.group_name",
                    f"group {name!r} is defined twice (first at {self.at(group_paths[name])})",
                )
            group_paths[name] = path
            group_type = schema.enum_name("FeatureGroupType", group.group_type)
            if group_type not in GROUP_TYPES[name]:
                self.fail(
                    f"{path}.group_type",
                    f"group {name!r} must be {' or '.join(GROUP_TYPES[name])}, got {group_type}",
                )
            if not len(group.feature_names):
                self.fail(path, f"group {name!r} has no feature_names")
            members = []
            for feature_index, feature_name in enumerate(group.feature_names):
                feature_path = f"{path}.feature_names[{feature_index}]"
                feature = features.get(feature_name)
                if feature is None:
                    self.fail(
                        feature_path,
                        f"feature {feature_name!r} is not declared in feature_configs"
                        f"{suggest(feature_name, features)}",
                    )
                self._group_member(name, feature, feature_path)
                members.append(feature)
            if name in RAW_GROUPS and len(members) != 1:
                self.fail(path, f"group {name!r} takes exactly one raw feature, got {len(members)}")
            groups[name] = members

        missing = [
            name for name in GROUP_TYPES if name not in groups and name not in OPTIONAL_GROUPS
        ]
        if missing:
            self.fail(
                "model_config",
                f"missing feature group {missing[0]!r}; DlrmHSTU needs the groups "
                f"{one_of(n for n in GROUP_TYPES if n not in OPTIONAL_GROUPS)} "
                f"({one_of(OPTIONAL_GROUPS)} optional)",
            )
        self._sides(groups, group_paths)
        return groups

    def _group_member(self, group: str, feature: DeclaredFeature, path: str) -> None:
        if group in ID_GROUPS and feature.kind != "id":
            self.fail(path, f"group {group!r} takes id features; {feature.name!r} is a raw feature")
        if group in RAW_GROUPS and feature.kind != "raw":
            self.fail(
                path,
                f"group {group!r} takes a raw feature (values used as they are); "
                f"{feature.name!r} is an id feature",
            )
        if group == CONTEXTUAL and feature.is_sequence:
            self.fail(
                path, f"group 'contextual' takes scalar features; {feature.name!r} is a sequence"
            )
        if group != CONTEXTUAL and not feature.is_sequence:
            self.fail(
                path,
                f"group {group!r} takes sequence features; {feature.name!r} is a scalar feature",
            )

    def _sides(self, groups: dict[str, list[DeclaredFeature]], group_paths: dict[str, str]):
        """History groups read one sequence, candidate groups another.

        A side is either one sequence_feature, or standalone sequence_id_feature /
        sequence_raw_feature configs, which share the side's key (STANDALONE_*_SEQUENCE).
        """
        keys = {}
        for side, side_groups, standalone_key in (
            ("history", UIH_SIDE_GROUPS, STANDALONE_UIH_SEQUENCE),
            ("candidate", CANDIDATE_SIDE_GROUPS, STANDALONE_CANDIDATE_SEQUENCE),
        ):
            first: tuple[str, str, str] | None = None  # (source, description, path)
            for group in side_groups:
                for index, feature in enumerate(groups.get(group, [])):
                    if feature.sequence is not None:
                        source = f"sequence_feature {feature.sequence!r}"
                    else:
                        source = "standalone sequence features"
                    path = f"{group_paths[group]}.feature_names[{index}]"
                    if first is None:
                        first = (source, feature.sequence or standalone_key, path)
                    elif source != first[0]:
                        self.fail(
                            path,
                            f"the {side} groups ({one_of(side_groups)}) must all read one "
                            f"sequence: {feature.name!r} comes from {source}, but "
                            f"{self.at(first[2])} from {first[0]}",
                        )
            keys[side] = first
        history, candidate = keys["history"], keys["candidate"]
        if history and candidate and history[1] == candidate[1]:
            self.fail(
                candidate[2],
                f"history and candidate groups both use the sequence key {history[1]!r}; "
                "candidates need their own sequence",
            )

    # ---- dlrm_hstu --------------------------------------------------------------------------

    def model(self, groups: dict[str, list[DeclaredFeature]]) -> None:
        base = "model_config.dlrm_hstu"
        dlrm = self.config.model_config.dlrm_hstu
        hstu = dlrm.hstu
        if dlrm.max_seq_len == 0:
            self.fail(f"{base}.max_seq_len", "must be at least 1")
        if dlrm.item_embedding_hidden_dim == 0:
            self.fail(f"{base}.item_embedding_hidden_dim", "must be at least 1")

        stu, stu_path = hstu.stu, f"{base}.hstu.stu"
        for name in ("embedding_dim", "num_heads", "hidden_dim", "attention_dim"):
            if getattr(stu, name) == 0:
                self.fail(f"{stu_path}.{name}", "must be at least 1")
        self._ratio(f"{stu_path}.output_dropout_ratio", stu.output_dropout_ratio)
        self._ratio(f"{base}.hstu.input_dropout_ratio", hstu.input_dropout_ratio)
        if hstu.attn_num_layers == 0:
            self.fail(f"{base}.hstu.attn_num_layers", "must be at least 1")

        encoder, encoder_path = hstu.positional_encoder, f"{base}.hstu.positional_encoder"
        if encoder.num_position_buckets == 0:
            self.fail(f"{encoder_path}.num_position_buckets", "must be at least 1")
        if encoder.use_time_encoding and encoder.num_time_buckets == 0:
            self.fail(
                f"{encoder_path}.num_time_buckets", "must be at least 1 when use_time_encoding"
            )
        if encoder.time_bucket_fn not in TIME_BUCKET_FNS:
            self.fail(
                f"{encoder_path}.time_bucket_fn",
                f"{encoder.time_bucket_fn!r}: expected {' or '.join(map(repr, TIME_BUCKET_FNS))}",
            )
        if encoder.time_bucket_increments <= 0:
            self.fail(f"{encoder_path}.time_bucket_increments", "must be > 0")

        self._preprocessor(groups)
        self._postprocessor()
        self._contextual(groups)
        self._kernel()
        tower = dlrm.fusion_mtl_tower
        if tower.HasField("mlp"):
            self._mlp(f"{base}.fusion_mtl_tower.mlp", tower.mlp)

    def _ratio(self, path: str, value: float) -> None:
        if not 0.0 <= value < 1.0:
            self.fail(path, f"a dropout ratio must be in [0, 1), got {value:g}")

    def _mlp(self, path: str, mlp: Message) -> None:
        if not len(mlp.hidden_units):
            self.fail(path, "hidden_units is empty: an MLP needs at least one layer")
        for index, units in enumerate(mlp.hidden_units):
            if units == 0:
                self.fail(f"{path}.hidden_units[{index}]", "must be at least 1")
        if len(mlp.dropout_ratio) not in (0, len(mlp.hidden_units)):
            self.fail(
                f"{path}.dropout_ratio",
                f"give one ratio, or one per layer ({len(mlp.hidden_units)}); "
                f"got {len(mlp.dropout_ratio)}",
            )
        for index, ratio in enumerate(mlp.dropout_ratio):
            self._ratio(f"{path}.dropout_ratio[{index}]", ratio)
        if mlp.activation not in ACTIVATIONS and not _is_torch_module(mlp.activation):
            self.fail(
                f"{path}.activation",
                f"{mlp.activation!r}: expected one of {one_of(ACTIVATIONS)}"
                f"{suggest(mlp.activation, ACTIVATIONS)}",
            )
        if mlp.use_bn and mlp.use_ln:
            self.fail(f"{path}.use_ln", "use_bn and use_ln cannot both be true")

    def _group_dim(self, features: list[DeclaredFeature]) -> int:
        return sum(feature.config.embedding_dim for feature in features)

    def _preprocessor(self, groups: dict[str, list[DeclaredFeature]]) -> None:
        path = "model_config.dlrm_hstu.hstu.input_preprocessor"
        preprocessor = self.config.model_config.dlrm_hstu.hstu.input_preprocessor
        if preprocessor.WhichOneof("input_preprocessor") != "contextual_preprocessor":
            self.fail(path, "expected contextual_preprocessor { ... }")
        contextual = preprocessor.contextual_preprocessor
        path = f"{path}.contextual_preprocessor"

        uih_dim, candidate_dim = self._group_dim(groups[UIH]), self._group_dim(groups[CANDIDATE])
        content = contextual.content_encoder
        which = content.WhichOneof("content_encoder")
        content_path = f"{path}.content_encoder"
        if which is None:
            self.fail(
                content_path,
                "expected slice_content_encoder, pad_content_encoder or mlp_content_encoder",
            )
        if which == "slice_content_encoder" and candidate_dim < uih_dim:
            self.fail(
                f"{content_path}.slice_content_encoder",
                f"slice needs the candidate group at least as wide as the uih group: "
                f"candidate {candidate_dim} < uih {uih_dim} (summed embedding_dim)",
            )
        if which == "pad_content_encoder" and candidate_dim <= uih_dim:
            self.fail(
                f"{content_path}.pad_content_encoder",
                f"pad needs the candidate group wider than the uih group: "
                f"candidate {candidate_dim} <= uih {uih_dim} (summed embedding_dim)",
            )
        if which == "mlp_content_encoder":
            mlps = content.mlp_content_encoder
            mlp_path = f"{content_path}.mlp_content_encoder"
            self._mlp(f"{mlp_path}.uih_mlp", mlps.uih_mlp)
            self._mlp(f"{mlp_path}.target_mlp", mlps.target_mlp)
            if mlps.uih_mlp.hidden_units[-1] != mlps.target_mlp.hidden_units[-1]:
                self.fail(
                    f"{mlp_path}.target_mlp",
                    f"uih_mlp and target_mlp must end at the same width: "
                    f"{mlps.uih_mlp.hidden_units[-1]} != {mlps.target_mlp.hidden_units[-1]}",
                )
        self._contextualized_mlp(f"{path}.content_mlp", contextual.content_mlp, groups)

        if contextual.HasField("action_encoder"):
            self._action_encoder(f"{path}.action_encoder", contextual.action_encoder, groups)
            if not contextual.HasField("action_mlp"):
                self.fail(f"{path}.action_encoder", "an action_encoder needs an action_mlp")
            self._contextualized_mlp(f"{path}.action_mlp", contextual.action_mlp, groups)

    def _contextualized_mlp(self, path: str, mlp: Message, groups) -> None:
        which = mlp.WhichOneof("contextualized_mlp")
        if which is None:
            self.fail(path, "expected simple_mlp { hidden_dim: N } or parameterized_mlp { ... }")
        chosen = getattr(mlp, which)
        if chosen.hidden_dim == 0:
            self.fail(f"{path}.{which}.hidden_dim", "must be at least 1")
        if which == "parameterized_mlp":
            if CONTEXTUAL not in groups:
                self.fail(
                    f"{path}.{which}",
                    "parameterized_mlp is computed from the contextual features: add a "
                    "contextual feature group or use simple_mlp",
                )
            self._ratio(f"{path}.{which}.contextual_dropout_ratio", chosen.contextual_dropout_ratio)

    def _bits(self, path: str, values, seen: dict[int, str]) -> None:
        for index, value in enumerate(values):
            element = f"{path}[{index}]"
            if value <= 0 or value & (value - 1):
                self.fail(element, f"{value} is not a power of two (one bit per action)")
            if value in seen:
                self.fail(element, f"bit {value} is used twice (also at {seen[value]})")
            seen[value] = element

    def _action_encoder(self, path: str, encoder: Message, groups) -> None:
        if encoder.WhichOneof("action_encoder") != "simple_action_encoder":
            self.fail(path, "expected simple_action_encoder { ... }")
        if UIH_ACTION not in groups:
            self.fail(
                path, "an action encoder reads the uih_action feature group, which is missing"
            )
        simple, path = encoder.simple_action_encoder, f"{path}.simple_action_encoder"
        if simple.action_embedding_dim == 0:
            self.fail(
                f"{path}.action_embedding_dim" if simple.HasField("action_embedding_dim") else path,
                "action_embedding_dim must be at least 1",
            )
        if not len(simple.action_weights):
            self.fail(path, "action_weights is empty: list the bit of each action")
        seen: dict[int, str] = {}
        self._bits(f"{path}.action_weights", simple.action_weights, seen)
        thresholds, weights = (
            simple.watchtime_to_action_thresholds,
            simple.watchtime_to_action_weights,
        )
        if len(thresholds) != len(weights):
            self.fail(
                f"{path}.watchtime_to_action_weights",
                f"needs one weight per threshold: {len(weights)} weights, "
                f"{len(thresholds)} watchtime_to_action_thresholds",
            )
        self._bits(f"{path}.watchtime_to_action_weights", weights, seen)
        if len(thresholds) and UIH_WATCHTIME not in groups:
            self.fail(
                f"{path}.watchtime_to_action_thresholds",
                "watch-time actions need the uih_watchtime feature group",
            )

    def _postprocessor(self) -> None:
        path = "model_config.dlrm_hstu.hstu.output_postprocessor"
        postprocessor = self.config.model_config.dlrm_hstu.hstu.output_postprocessor
        which = postprocessor.WhichOneof("output_postprocessor")
        if which is None:
            self.fail(
                path,
                "expected l2norm_postprocessor, layernorm_postprocessor or "
                "timestamp_layernorm_postprocessor",
            )
        if which == "timestamp_layernorm_postprocessor":
            timestamp = postprocessor.timestamp_layernorm_postprocessor
            path = f"{path}.{which}"
            units, per_period = (
                timestamp.time_duration_period_units,
                timestamp.time_duration_units_per_period,
            )
            if len(units) != len(per_period):
                self.fail(
                    f"{path}.time_duration_units_per_period",
                    f"needs one entry per time_duration_period_units entry: "
                    f"{len(per_period)} != {len(units)}",
                )
            if not len(units):
                self.fail(path, "time_duration_period_units is empty")
            for name, values in (
                ("time_duration_period_units", units),
                ("time_duration_units_per_period", per_period),
            ):
                for index, value in enumerate(values):
                    if value == 0:
                        self.fail(f"{path}.{name}[{index}]", "must be at least 1")

    def _contextual(self, groups) -> None:
        dlrm = self.config.model_config.dlrm_hstu
        if dlrm.concat_contextual_features:
            return
        contextual = groups.get(CONTEXTUAL, [])
        if not contextual:
            return
        first = contextual[0]
        for index, feature in enumerate(contextual):
            if feature.config.embedding_dim != first.config.embedding_dim:
                group_index = [g.group_name for g in self.config.model_config.feature_groups].index(
                    CONTEXTUAL
                )
                self.fail(
                    f"model_config.feature_groups[{group_index}].feature_names[{index}]",
                    f"contextual features must share one embedding_dim unless "
                    f"dlrm_hstu.concat_contextual_features is true: {feature.name!r} has "
                    f"{feature.config.embedding_dim}, {first.name!r} has "
                    f"{first.config.embedding_dim}",
                )

    def _kernel(self) -> None:
        model = self.config.model_config
        if schema.enum_name("Kernel", model.kernel) != "CUTLASS":
            return
        stu = model.dlrm_hstu.hstu.stu
        if stu.attention_dim != stu.hidden_dim:
            self.fail(
                "model_config.dlrm_hstu.hstu.stu.attention_dim",
                f"kernel CUTLASS ({self.at('model_config.kernel')}) needs attention_dim == "
                f"hidden_dim; got attention_dim {stu.attention_dim}, hidden_dim {stu.hidden_dim}",
            )
        if self.config.train_config.mixed_precision not in ("BF16", "FP16"):
            self.fail(
                "train_config.mixed_precision",
                f"kernel CUTLASS ({self.at('model_config.kernel')}) runs attention in BF16/FP16 "
                'only: set train_config.mixed_precision to "BF16" or "FP16"',
            )

    # ---- tasks and labels --------------------------------------------------------------------

    def tasks(self, features: dict[str, DeclaredFeature], groups) -> None:
        base = "model_config.dlrm_hstu.fusion_mtl_tower"
        tasks = self.config.model_config.dlrm_hstu.fusion_mtl_tower.task_configs
        labels = list(self.config.data_config.label_fields)
        if not len(tasks):
            self.fail(base, "no task_configs: the model needs at least one task")
        names: dict[str, str] = {}
        label_kinds: dict[str, tuple[str, str]] = {}  # label -> (kind, task path)
        for index, task in enumerate(tasks):
            path = f"{base}.task_configs[{index}]"
            if not task.task_name:
                self.fail(f"{path}.task_name", "must not be empty")
            if task.task_name in names:
                self.fail(
                    f"{path}.task_name",
                    f"task {task.task_name!r} is defined twice "
                    f"(first at {self.at(names[task.task_name])})",
                )
            names[task.task_name] = f"{path}.task_name"
            if task.label_name not in labels:
                self.fail(
                    f"{path}.label_name",
                    f"label {task.label_name!r} is not in data_config.label_fields "
                    f"({one_of(labels)}){suggest(task.label_name, labels)}",
                )
            if not len(task.losses):
                self.fail(path, f"task {task.task_name!r} has no losses")
            for loss_index, loss in enumerate(task.losses):
                self._loss(f"{path}.losses[{loss_index}]", path, task, loss, groups)
            kind = task_label_kind(task)
            if kind is None:
                self.fail(f"{path}.losses", "mixes classification and regression losses")
            if task.weight < 0:
                self.fail(f"{path}.weight", f"must be >= 0, got {task.weight:g}")
            if kind == "classification":
                if not task.HasField("task_bitmask"):
                    self.fail(
                        path,
                        f"task {task.task_name!r} is a classification task on the bitmask label "
                        f"{task.label_name!r}: set task_bitmask (the action bit it predicts)",
                    )
                if task.task_bitmask == 0:
                    self.fail(f"{path}.task_bitmask", "must not be 0")
            elif task.HasField("task_bitmask"):
                self.fail(
                    f"{path}.task_bitmask",
                    "a regression (l2_loss) task uses its label as a number: remove task_bitmask",
                )
            previous = label_kinds.setdefault(task.label_name, (kind, path))
            if previous[0] != kind:
                self.fail(
                    f"{path}.label_name",
                    f"label {task.label_name!r} is used by a {previous[0]} task "
                    f"({self.at(previous[1])}) and by this {kind} task; "
                    "a label column has one type",
                )
            self._metrics(path, task, kind, features, groups)

    def _contextual_key(self, path: str, key: str, groups, what: str) -> None:
        """`key` names a feature of the contextual group: one value per row, read with the
        batch (a scalar feature outside every group is not read)."""
        contextual = [feature.name for feature in groups.get(CONTEXTUAL, [])]
        if key not in contextual:
            self.fail(
                path,
                f"{key!r} must be a feature of the contextual group ({what} takes one value "
                f"per row: {one_of(contextual) or 'the config has no contextual group'})"
                f"{suggest(key, contextual)}",
            )

    def _loss(self, path: str, task_path: str, task: Message, loss: Message, groups) -> None:
        which = loss.WhichOneof("loss")
        if which is None:
            self.fail(
                path,
                "empty loss: expected binary_cross_entropy, binary_focal_loss, "
                "softmax_cross_entropy, jrc_loss or l2_loss { ... }",
            )
        if which == "softmax_cross_entropy" and task.num_class < 2:
            self.fail(
                f"{path}.{which}",
                f"softmax_cross_entropy needs num_class >= 2, got {task.num_class}",
            )
        if which in ("binary_cross_entropy", "binary_focal_loss", "l2_loss"):
            if task.num_class != 1:
                self.fail(
                    f"{task_path}.num_class",
                    f"{which} gives one logit per candidate: num_class must be 1, "
                    f"got {task.num_class}",
                )
        if which == "jrc_loss":
            jrc = loss.jrc_loss
            if task.num_class != 2:
                self.fail(
                    f"{task_path}.num_class" if task.HasField("num_class") else task_path,
                    f"jrc_loss scores two classes per candidate: set num_class: 2 (got "
                    f"{task.num_class})",
                )
            self._contextual_key(
                f"{path}.jrc_loss.session_name", jrc.session_name, groups, "a session"
            )
            if not 0.0 <= jrc.alpha <= 1.0:
                self.fail(f"{path}.jrc_loss.alpha", f"must be in [0, 1], got {jrc.alpha:g}")
        if which == "binary_focal_loss":
            focal = loss.binary_focal_loss
            if focal.gamma < 0:
                self.fail(f"{path}.binary_focal_loss.gamma", f"must be >= 0, got {focal.gamma:g}")
            if not 0.0 < focal.alpha < 1.0:
                self.fail(
                    f"{path}.binary_focal_loss.alpha", f"must be in (0, 1), got {focal.alpha:g}"
                )

    def _metrics(self, path: str, task: Message, kind: str, features, groups) -> None:
        allowed = CLASSIFICATION_METRICS if kind == "classification" else REGRESSION_METRICS
        for index, metric in enumerate(task.metrics):
            metric_path = f"{path}.metrics[{index}]"
            which = metric.WhichOneof("metric")
            if which is None:
                self.fail(metric_path, f"empty metric: expected one of {one_of(allowed)}")
            if which == "recall_at_k":
                self.fail(
                    f"{metric_path}.{which}",
                    "recall_at_k is a retrieval metric; TorchEasyRec's rank models (DlrmHSTU "
                    f"among them) refuse it too: use one of {one_of(allowed)}",
                )
            if which not in allowed:
                self.fail(
                    f"{metric_path}.{which}",
                    f"{which} does not fit a {kind} task; expected one of {one_of(allowed)}",
                )
            options, options_path = getattr(metric, which), f"{metric_path}.{which}"
            if which in ("auc", "grouped_auc") and task.num_class > 2:
                self.fail(
                    options_path,
                    f"{which} scores one class; this task has num_class {task.num_class}: use "
                    "multiclass_auc or accuracy",
                )
            if which in ("grouped_auc", "grouped_xauc"):
                self._contextual_key(
                    f"{options_path}.grouping_key", options.grouping_key, groups, "a group"
                )
            if which in ("auc", "multiclass_auc") and options.thresholds == 1:
                self.fail(f"{options_path}.thresholds", "must be 0 (exact) or >= 2")
            if which == "multiclass_auc":
                if task.num_class < 2:
                    self.fail(
                        options_path,
                        "multiclass_auc needs num_class >= 2 (a softmax task); use auc",
                    )
                if options.average not in MULTICLASS_AUC_AVERAGES:
                    self.fail(
                        f"{options_path}.average",
                        f"{options.average!r}: expected {one_of(MULTICLASS_AUC_AVERAGES)}",
                    )
            if which == "accuracy":
                if not 0.0 <= options.threshold <= 1.0:
                    self.fail(
                        f"{options_path}.threshold", f"must be in [0, 1], got {options.threshold:g}"
                    )
                if options.top_k < 1 or (task.num_class > 1 and options.top_k > task.num_class):
                    self.fail(
                        f"{options_path}.top_k",
                        f"must be in [1, num_class {task.num_class}], got {options.top_k}",
                    )
            if which == "xauc":
                if not 0.0 < options.sample_ratio <= 1.0:
                    self.fail(
                        f"{options_path}.sample_ratio",
                        f"must be in (0, 1], got {options.sample_ratio:g}",
                    )
                if options.HasField("max_pairs") and options.max_pairs == 0:
                    self.fail(f"{options_path}.max_pairs", "must be at least 1")
            if which == "grouped_xauc" and options.max_pairs_per_group == 0:
                self.fail(f"{options_path}.max_pairs_per_group", "must be at least 1")


def validate(config: Message, locator: Locator) -> None:
    """Raise ConfigError at the first broken rule (in the order the checks read the config)."""
    checker = _Checker(config, locator)
    checker.top_level()
    checker.data()
    checker.train()
    features = checker.features()
    groups = checker.groups(features)
    checker.model(groups)
    checker.tasks(features, groups)
