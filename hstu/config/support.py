"""Which TorchEasyRec fields this project does not implement yet, and which it accepts but ignores.

The schema keeps every TorchEasyRec field so that an existing config parses; this table decides
what happens when one is set. A field listed in UNSUPPORTED is an error when it is present
(a message), non-empty (a repeated field) or differs from its default (a scalar). A field in
IGNORED is accepted, and `launch.py check` prints a note that it has no effect here. Keys are
`<message>.<field>` of the hstu.config package; a test checks that each key exists.
"""

from __future__ import annotations

from collections.abc import Iterator

from google.protobuf import descriptor
from google.protobuf.message import Message

from hstu.config.errors import ConfigError
from hstu.config.locations import Locator

NOT_YET = "supported by TorchEasyRec, not yet by this project"

_OTHER_FEATURE_TYPES = (
    "combo_feature lookup_feature match_feature expr_feature overlap_feature tokenize_feature "
    "custom_feature kv_dot_product bool_mask_feature combine_feature"
).split()
_OTHER_MODELS = (
    "dlrm deepfm multi_tower multi_tower_din mask_net wide_and_deep dcn_v1 dcn_v2 xdeepfm wukong "
    "simple_multi_task mmoe dbmtl ple dc2vr pepnet ultra_hstu dssm dssm_v2 dat hstu_match mind "
    "tdm rocket_launching sid_rqvae sid_rqkmeans generative_qwen prompt_generative_qwen"
).split()


# field -> what to do instead (may be empty)
UNSUPPORTED: dict[str, str] = {
    "EasyRecConfig.item_input_path": "it is for retrieval models",
    # train_config
    "TrainConfig.fine_tune_checkpoint": "",
    "TrainConfig.fine_tune_ckpt_param_map": "",
    "TrainConfig.is_profiling": "",
    "TrainConfig.global_embedding_constraints": "the sharding planner chooses freely",
    "TrainConfig.grad_scaler": "use BF16 mixed precision, which needs no scaler",
    "TrainConfig.gradient_accumulation_steps": "",
    "TrainConfig.grad_clipping": "",
    "TrainConfig.save_checkpoints_timestamp_interval": "",
    "TrainConfig.save_checkpoints_timestamps": "",
    "TrainConfig.save_checkpoints_timestamp_quorum": "",
    "TrainConfig.delta_embedding_dump_config": "",
    "SparseOptimizer.lars_sgd_optimizer": "use sgd, adagrad, adam or rowwise_adagrad",
    "SparseOptimizer.lamb_optimizer": "use sgd, adagrad, adam or rowwise_adagrad",
    "SparseOptimizer.partial_rowwise_lamb_optimizer": "use sgd, adagrad, adam or rowwise_adagrad",
    "SparseOptimizer.partial_rowwise_adam_optimizer": "use sgd, adagrad, adam or rowwise_adagrad",
    "FusedSGDOptimizer.gradient_clipping": "",
    "FusedAdagradOptimizer.gradient_clipping": "",
    "FusedAdamOptimizer.gradient_clipping": "",
    "FusedRowWiseAdagradOptimizer.gradient_clipping": "",
    "DenseOptimizer.param_optimizers": "one dense optimizer covers all dense parameters",
    # data_config
    "DataConfig.input_fields": "it is for CsvDataset",
    "DataConfig.delimiter": "it is for CsvDataset",
    "DataConfig.with_header": "it is for CsvDataset",
    "DataConfig.input_fields_str": "",
    "DataConfig.is_orderby_partition": "it is for OdpsDataset",
    "DataConfig.sample_mask_prob": "",
    "DataConfig.negative_sample_mask_prob": "",
    "DataConfig.force_base_data_group": "",
    "DataConfig.sample_weight_fields": "",
    "DataConfig.min_batch_size": "use drop_remainder",
    "DataConfig.negative_sampler": "samplers are for retrieval models",
    "DataConfig.negative_sampler_v2": "samplers are for retrieval models",
    "DataConfig.hard_negative_sampler": "samplers are for retrieval models",
    "DataConfig.hard_negative_sampler_v2": "samplers are for retrieval models",
    "DataConfig.tdm_sampler": "samplers are for retrieval models",
    # feature_configs
    **{f"FeatureConfig.{name}": "use id_feature or raw_feature" for name in _OTHER_FEATURE_TYPES},
    **{
        f"FeatureConfig.sequence_{name}": "use sequence_id_feature or sequence_raw_feature"
        for name in _OTHER_FEATURE_TYPES
    },
    **{
        f"SeqFeatureConfig.{name}": "use id_feature or raw_feature" for name in _OTHER_FEATURE_TYPES
    },
    "IdFeature.hash_bucket_size": (
        "store ids already reduced to [0, num_buckets) and set num_buckets"
    ),
    "IdFeature.vocab_list": "store integer ids and set num_buckets",
    "IdFeature.vocab_dict": "store integer ids and set num_buckets",
    "IdFeature.vocab_file": "store integer ids and set num_buckets",
    "IdFeature.asset_dir": "",
    "IdFeature.default_bucketize_value": "",
    "IdFeature.weighted": "",
    "IdFeature.init_fn": "tables use TorchRec's default uniform init",
    "IdFeature.use_mask": "",
    "ZeroCollisionHash.threshold_filtering_func": "it is evaluated Python code; use the "
    "eviction policies",
    "IdFeature.dynamicemb": "",
    "IdFeature.fg_encoded_default_value": "missing values are handled by data_config.on_bad_rows",
    "IdFeature.trainable": "",
    "IdFeature.stub_type": "",
    "IdFeature.embedding_constraints": "the sharding planner chooses freely",
    "RawFeature.embedding_name": "raw features are used as numbers, not embedded",
    "RawFeature.embedding_dim": "raw features are used as numbers, not embedded",
    "RawFeature.boundaries": "raw features are used as numbers, not bucketized",
    "RawFeature.value_dim": "raw features hold one number per element",
    "RawFeature.normalizer": "",
    "RawFeature.init_fn": "",
    "RawFeature.use_mask": "",
    "RawFeature.fg_encoded_default_value": "missing values are handled by data_config.on_bad_rows",
    "RawFeature.stub_type": "",
    "RawFeature.autodis": "",
    "RawFeature.mlp": "",
    "RawFeature.embedding_constraints": "",
    # model_config
    **{f"ModelConfig.{name}": "this project implements dlrm_hstu only" for name in _OTHER_MODELS},
    "ModelConfig.num_class": "set num_class per task in fusion_mtl_tower.task_configs",
    "ModelConfig.losses": "set losses per task in fusion_mtl_tower.task_configs",
    "ModelConfig.metrics": "set metrics per task in fusion_mtl_tower.task_configs",
    "ModelConfig.train_metrics": "",
    "ModelConfig.variational_dropout": "",
    "ModelConfig.use_pareto_loss_weight": "",
    "FeatureGroupConfig.sequence_groups": "",
    "FeatureGroupConfig.sequence_encoders": "",
    "FeatureGroupConfig.embedding_name_suffix": "",
    "HSTU.attn_truncation_split_layer": "",
    "HSTU.attn_truncation_tail_len": "",
    "HSTU.name": "it names UltraHSTU channels",
    "STU.sla_k1": "semi-local attention",
    "STU.sla_k2": "semi-local attention",
    "GRInputPreprocessor.contextual_interleave_preprocessor": "use contextual_preprocessor",
    "GRInputPreprocessor.uih_preprocessor": "use contextual_preprocessor",
    "FusionSubTaskConfig.train_metrics": "",
    # eval_config / export_config
    "EvalConfig.evaluator_type": 'only "latest" is implemented',
    "ExportConfig.exporter_type": 'only "latest" is implemented',
    "ExportConfig.export_format": "only TORCHSCRIPT is implemented",
}

# field -> why it has no effect here
IGNORED: dict[str, str] = {
    "TrainConfig.use_tensorboard": "metrics go to MLflow",
    "TrainConfig.tensorboard_summaries": "metrics go to MLflow",
    "DataConfig.fg_encoded": "deprecated in TorchEasyRec; features are read from their columns",
    "DataConfig.fg_encoded_multival_sep": "multi-valued elements are not supported",
    "DataConfig.fg_threads": "no feature generation runs here",
    "DataConfig.in_order": "Ray Data decides the order",
    "DataConfig.odps_data_quota_name": "MaxCompute (odps://) tables are not read here; the "
    "inputs are parquet",
    "DataConfig.odps_data_compression": "MaxCompute (odps://) tables are not read here; the "
    "inputs are parquet",
    "IdFeature.pooling": "ids are single-valued, so pooling changes nothing",
    "IdFeature.default_value": "no feature generation runs here",
    "IdFeature.separator": "no feature generation runs here",
    "IdFeature.fg_value_type": "no feature generation runs here",
    "IdFeature.sequence_length": "it is a feature-generation cap, not a model cap",
    "IdFeature.sequence_fields": "no feature generation runs here",
    "RawFeature.pooling": "raw features are not embedded",
    "RawFeature.default_value": "no feature generation runs here",
    "RawFeature.separator": "no feature generation runs here",
    "RawFeature.trainable": "raw features have no parameters",
    "RawFeature.data_type": "raw features have no table",
    "RawFeature.sequence_length": "it is a feature-generation cap, not a model cap",
    "RawFeature.sequence_fields": "no feature generation runs here",
    "GRSimpleActionEncoder.embedding_init_std": "fixed at 0.1, as in TorchEasyRec",
    "MetricConfig.step_decay_rate": "it decays train_metrics, which are not implemented",
    "DataConfig.num_workers": "Ray Data runs the reading: it gets the CPUs the training "
    "workers leave (--cpus-per-worker)",
    "DataConfig.pin_memory": "on a GPU every batch is pinned and copied on a side stream "
    "one step ahead (hstu/train/prefetch.py), whatever this says",
    "EvalConfig.log_step_count_steps": "evaluation prints one line per evaluation",
    "ExportConfig.mixed_precision": "the export is a float32 program that loads on CPU",
    "ExportConfig.cudnn_allow_tf32": "the export is a float32 program that loads on CPU",
    "ExportConfig.cuda_matmul_allow_tf32": "the export is a float32 program that loads on CPU",
}


def _is_set(field: descriptor.FieldDescriptor, value) -> bool:
    if field.is_repeated:
        return len(value) > 0
    if field.message_type is not None:
        return True
    return value != field.default_value


def _walk(message: Message, path: str) -> Iterator[tuple[str, str, descriptor.FieldDescriptor]]:
    """(key, path, field) of every field set in `message` and below, outermost first."""
    for field, value in message.ListFields():
        key = f"{field.containing_type.name}.{field.name}"
        field_path = f"{path}.{field.name}" if path else field.name
        if _is_set(field, value):
            yield key, field_path, field
        if field.message_type is None or field.message_type.GetOptions().map_entry:
            continue
        if field.is_repeated:
            for index, element in enumerate(value):
                yield from _walk(element, f"{field_path}[{index}]")
        else:
            yield from _walk(value, field_path)


def unsupported_message(key: str) -> str:
    hint = UNSUPPORTED[key]
    return f"{NOT_YET}" + (f"; {hint}" if hint else "")


# Fields whose values only TorchEasyRec's feature generator (pyfg) turns into model inputs:
# hashing, vocabularies, bucketizing, normalizing, and every feature type other than id and raw
# features. Under fg_mode FG_DAG / FG_NORMAL TorchEasyRec would run the generator on the raw
# columns at train time; this project has no generator, so such a config gets one line that
# says so (fg_generator_message) instead of the generic "not yet" message.
FG_GENERATED: frozenset[str] = frozenset(
    [
        "IdFeature.hash_bucket_size",
        "IdFeature.vocab_list",
        "IdFeature.vocab_dict",
        "IdFeature.vocab_file",
        "IdFeature.asset_dir",
        "IdFeature.default_bucketize_value",
        "IdFeature.weighted",
        "RawFeature.boundaries",
        "RawFeature.normalizer",
        *(f"FeatureConfig.{name}" for name in _OTHER_FEATURE_TYPES),
        *(f"FeatureConfig.sequence_{name}" for name in _OTHER_FEATURE_TYPES),
        *(f"SeqFeatureConfig.{name}" for name in _OTHER_FEATURE_TYPES),
    ]
)


def fg_generator_message(mode: str, mode_where: str, what: str) -> str:
    """The one line for a config that needs TorchEasyRec's feature generator at train time."""
    return (
        f"fg_mode {mode} ({mode_where}) asks for TorchEasyRec's feature generator (pyfg) to "
        f"compute {what} from the raw columns at train time, and this project runs no feature "
        "generator: generate the features offline (TorchEasyRec's FG, or your own job) into "
        "columns named after the features (ids already in [0, num_buckets), raw values as "
        "numbers), then set data_config.fg_mode: FG_NONE"
    )


def check_unsupported(config: Message, locator: Locator) -> None:
    """Raise ConfigError for the first field set that this project does not implement."""
    from hstu.config import schema
    from hstu.config.features import EXPRESSION_FG_MODES

    mode = schema.enum_name("FgMode", config.data_config.fg_mode)
    for key, path, _ in _walk(config, ""):
        if key not in UNSUPPORTED:
            continue
        if mode in EXPRESSION_FG_MODES and key in FG_GENERATED:
            field = key.split(".", 1)[1]
            problem = fg_generator_message(
                mode, str(locator.where("data_config.fg_mode")), f"this feature ({field})"
            )
            raise ConfigError(locator.where(path), path, problem)
        raise ConfigError(locator.where(path), path, unsupported_message(key))


def ignored_settings(config: Message) -> list[tuple[str, str]]:
    """(field path, reason) of every field set that this project accepts but ignores."""
    return [(path, IGNORED[key]) for key, path, _ in _walk(config, "") if key in IGNORED]


def unsupported_ancestor(path: str) -> tuple[str, str] | None:
    """For a parse error inside `path`: the enclosing field that is unsupported, if any.

    Returns (path of that field, message). Used when the text parser trips over the contents of
    a message this project only keeps as an empty placeholder (e.g. combo_feature { ... }).
    """
    from hstu.config import schema

    message = schema.message_descriptor("EasyRecConfig")
    current = ""
    for part in path.split("."):
        name = part.split("[", 1)[0]
        field = message.fields_by_name.get(name) if message is not None else None
        if field is None:
            return None
        current = f"{current}.{part}" if current else part
        key = f"{message.name}.{name}"
        if key in UNSUPPORTED:
            return current, unsupported_message(key)
        message = field.message_type
    return None


def reading_notes(config: Message) -> list[str]:
    """How this project reads the inputs of a config written for TorchEasyRec's readers, where
    that differs from what the config names (for `launch.py check`)."""
    from hstu.config import schema
    from hstu.config.features import EXPRESSION_FG_MODES

    notes = []
    data = config.data_config
    dataset = schema.enum_name("DatasetType", data.dataset_type)
    if dataset != "ParquetDataset":
        notes.append(
            f"data_config.dataset_type {dataset}: the input paths are read as parquet "
            "(ParquetDataset); MaxCompute tables are not reachable from here"
        )
    from hstu.config.features import declared_features

    for feature in declared_features(config):
        if feature.kind == "id" and feature.config.HasField("zch"):
            if feature.config.HasField("num_buckets"):
                notes.append(
                    f"{feature.path}.num_buckets has no effect with zch: the table has "
                    f"zch_size {feature.config.zch.zch_size} rows (as in TorchEasyRec)"
                )
    mode = schema.enum_name("FgMode", data.fg_mode)
    if mode in EXPRESSION_FG_MODES:
        notes.append(
            f"data_config.fg_mode {mode}: no feature generator runs here; each feature reads the "
            "column its expression names, as it is (ids must already be < num_buckets); for id "
            "features with num_buckets and raw features without boundaries or normalizer, "
            "TorchEasyRec's generator only parses those values"
        )
    return notes


# ---- The field reference of docs/config.md ------------------------------------------------

# The TorchEasyRec messages a DlrmHSTU config uses, in the order docs/config.md lists them.
REFERENCE_MESSAGES: tuple[str, ...] = (
    "DlrmHSTU",
    "HSTU",
    "STU",
    "GRPositionalEncoder",
    "GRInputPreprocessor",
    "GRContextualPreprocessor",
    "GRActionEncoder",
    "GRSimpleActionEncoder",
    "GRContentEncoder",
    "GRMLPContentEncoder",
    "GRContextualizedMLP",
    "GRSimpleContextualizedMLP",
    "GRParameterizedContextualizedMLP",
    "GROutputPostprocessor",
    "GRTimestampLayerNormPostprocessor",
    "MLP",
    "FusionMTLTower",
    "FusionSubTaskConfig",
    "FeatureGroupConfig",
    "FeatureConfig",
    "SeqFeatureConfig",
    "SequenceFeature",
    "IdFeature",
    "RawFeature",
    "ZeroCollisionHash",
    "LRU_EvictionPolicy",
    "DistanceLFU_EvictionPolicy",
    "LossConfig",
    "BinaryCrossEntropy",
    "BinaryFocalLoss",
    "SoftmaxCrossEntropy",
    "JRCLoss",
    "L2Loss",
    "MetricConfig",
    "AUC",
    "GroupedAUC",
    "MulticlassAUC",
    "Accuracy",
    "MeanAbsoluteError",
    "MeanSquaredError",
    "XAUC",
    "GroupedXAUC",
    "RecallAtK",
)

# What "supported" means for fields with rules or meanings worth a line (validate.py enforces
# the rules; a field not listed here, in UNSUPPORTED or in IGNORED is supported as
# TorchEasyRec defines it).
FIELD_NOTES: dict[str, str] = {
    "DlrmHSTU.max_seq_len": "attention divisor S, not a truncation",
    "DlrmHSTU.enable_global_average_loss": "loss scaled by local / mean candidates per rank",
    "DlrmHSTU.sequence_timestamp_is_ascending": "set false for newest-first data (flipped in "
    "the model)",
    "STU.attn_alpha": "unset: 1/sqrt(attention_dim)",
    "HSTU.input_dropout_ratio": "TRITON applies it inside the positional op",
    "STU.contextual_seq_len": "-1: the preprocessor's contextual tokens",
    "STU.scaling_seqlen": "-1: dlrm_hstu.max_seq_len",
    "STU.recompute_normed_x": "memory only; no numeric effect",
    "STU.recompute_uvqk": (
        "memory only; no numeric effect (PYTORCH and CUTLASS; the fused TRITON layer keeps "
        "the u, v, q, k projection for the attention's backward anyway and stores no SiLU'd u, "
        "so the flag saves nothing there and is ignored)"
    ),
    "STU.recompute_y": "memory only; no numeric effect",
    "STU.sort_by_length": "TRITON launches the longest rows first; scheduling only, no "
    "numeric effect",
    "GRPositionalEncoder.time_bucket_fn": "sqrt or log",
    "GRSimpleActionEncoder.action_weights": "distinct powers of two",
    "GRSimpleActionEncoder.watchtime_to_action_weights": "one per threshold, distinct bits",
    "GRContentEncoder.slice_content_encoder": "candidate width >= history width",
    "GRContentEncoder.pad_content_encoder": "candidate width > history width",
    "GRContentEncoder.mlp_content_encoder": "uih_mlp and target_mlp end at one width",
    "GRParameterizedContextualizedMLP.contextual_dropout_ratio": "in [0, 1)",
    "MLP.activation": 'an argument-free torch.nn module, "nn.SiLU", ...',
    "MLP.use_bn": "not together with use_ln",
    "MLP.hidden_dim": "this project's shorthand for hidden_units: [N]",
    "FusionSubTaskConfig.task_bitmask": "required by classification tasks, refused by l2_loss",
    "FusionSubTaskConfig.num_class": "1 (BCE, focal, L2), 2 (jrc), >= 2 (softmax CE)",
    "FusionSubTaskConfig.label_name": "one of data_config.label_fields",
    "FeatureGroupConfig.group_name": "contextual, uih, candidate, uih_action, uih_watchtime, "
    "uih_timestamp, candidate_timestamp",
    "FeatureGroupConfig.group_type": "contextual DEEP or SEQUENCE, the others JAGGED_SEQUENCE",
    "FeatureConfig.sequence_feature": "sub-feature f of S is named and read as S__f",
    "FeatureConfig.sequence_id_feature": "standalone; its side (history or candidates) is "
    "the side of the groups that name it",
    "FeatureConfig.sequence_raw_feature": "standalone, as sequence_id_feature",
    "SequenceFeature.sequence_delim": "splits string-encoded sequence columns",
    "IdFeature.expression": "fg_mode FG_NONE: optional and unused (column = feature name); "
    "FG_DAG / FG_NORMAL: required, names the column",
    "IdFeature.num_buckets": "required without zch; ids are rows, 0 <= id < num_buckets",
    "IdFeature.zch": "ids of any value in a table of zch_size rows (section \"Zero-collision "
    "hashing\")",
    "ZeroCollisionHash.zch_size": "table rows, >= 2 (the last is shared by ids not admitted)",
    "ZeroCollisionHash.eviction_interval": "steps between admissions and evictions",
    "ZeroCollisionHash.lfu": "TorchRec's LFU_EvictionPolicy",
    "ZeroCollisionHash.lru": "TorchRec's LRU_EvictionPolicy",
    "ZeroCollisionHash.distance_lfu": "TorchRec's DistanceLFU_EvictionPolicy",
    "LRU_EvictionPolicy.decay_exponent": ">= 0",
    "DistanceLFU_EvictionPolicy.decay_exponent": ">= 0",
    "IdFeature.embedding_name": "shared tables agree on dim, buckets, data type",
    "IdFeature.data_type": "FP32 or FP16 table storage",
    "IdFeature.value_dim": "1 (one id per element)",
    "IdFeature.sequence_delim": "standalone sequence features: splits string columns",
    "RawFeature.expression": "as IdFeature.expression",
    "RawFeature.sequence_delim": "standalone sequence features: splits string columns",
    "RawFeature.value_dim": "1",
    "BinaryCrossEntropy.label_smoothing": "y (1 - s) + s / 2",
    "BinaryFocalLoss.gamma": ">= 0",
    "BinaryFocalLoss.alpha": "in (0, 1)",
    "JRCLoss.session_name": "a contextual feature; rows with equal values share a session",
    "JRCLoss.alpha": "weight of the cross entropy, in [0, 1]",
    "AUC.thresholds": "0 exact, else binned as torchmetrics",
    "GroupedAUC.grouping_key": "a contextual feature",
    "MulticlassAUC.average": "macro or weighted",
    "Accuracy.threshold": "num_class 1: positive when score > threshold",
    "Accuracy.top_k": "num_class >= 2",
    "XAUC.sample_ratio": "exact when the pairs drawn cover every pair",
    "GroupedXAUC.grouping_key": "a contextual feature",
    "MetricConfig.recall_at_k": "error: a retrieval metric, refused by TorchEasyRec's rank "
    "models too",
    "MetricConfig.auc": "num_class <= 2",
    "MetricConfig.grouped_auc": "num_class <= 2",
}


def field_status(message: str, field: str) -> str:
    """How this project treats `message.field`: "supported[: note]", "accepted, no effect:
    why" or "error: <message>"."""
    key = f"{message}.{field}"
    if key in UNSUPPORTED:
        return f"error: {unsupported_message(key)}"
    if key in IGNORED:
        return f"accepted, no effect: {IGNORED[key]}"
    note = FIELD_NOTES.get(key)
    if note is not None and note.startswith("error:"):
        return note
    return "supported" + (f": {note}" if note else "")


def field_reference() -> str:
    """The markdown tables of docs/config.md's field reference, one per message (a test keeps
    the document equal to this)."""
    from hstu.config import schema

    out = []
    for name in REFERENCE_MESSAGES:
        message = schema.message_descriptor(name)
        out.append(f"**{name}**\n")
        out.append("| field | here |")
        out.append("|---|---|")
        for field in message.fields:
            out.append(f"| `{field.name}` | {field_status(name, field.name)} |")
        out.append("")
    return "\n".join(out)
