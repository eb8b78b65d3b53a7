"""DlrmHSTU: TorchRec embeddings + the HSTU encoder + a fused multi-task tower (docs/model.md).

Built from a TorchEasyRec-compatible config (`cfg.model_config.dlrm_hstu`, field names as in
docs/dlrm_hstu_reference.md section 4). The only sparse part is `embedding_collection`
(hstu/modules/embeddings.py: one TorchRec EmbeddingCollection per embedding_dim, over every id
feature); the trainer builds it on the meta device and shards each collection. Nothing else in
this file knows about distribution, except the global-average loss, which asks
torch.distributed for the candidate count of the other ranks when it is initialised.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from torch import nn
from torchrec.modules.embedding_configs import DataType, EmbeddingConfig

from hstu.config.errors import ModelConfigError
from hstu.config.features import FeatureSpec, LabelSpec
from hstu.data.batch import JaggedBatch
from hstu.metrics import global_average_scale
from hstu.modules.action_encoder import SimpleActionEncoder
from hstu.modules.content_encoder import MLPContentEncoder, PadContentEncoder, SliceContentEncoder
from hstu.modules.contextual_preprocessor import ContextualPreprocessor
from hstu.modules.contextualized_mlp import (
    ParameterizedContextualizedMLP,
    SimpleContextualizedMLP,
)
from hstu.modules.embeddings import MultiDimEmbeddingCollection
from hstu.modules.fusion_tower import FusionMTLTower
from hstu.modules.graphed_scoring import GraphedScoring
from hstu.modules.hstu_transducer import HSTUTransducer
from hstu.modules.item_tower import ItemTower
from hstu.modules.mlp import MLP
from hstu.modules.positional_encoder import HSTUPositionalEncoder
from hstu.modules.postprocessors import (
    L2NormPostprocessor,
    LayerNormPostprocessor,
    TimestampLayerNormPostprocessor,
)
from hstu.modules.scoring import score_candidates, task_outputs
from hstu.modules.stu import STULayer, STUStack
from hstu.ops import Kernel
from hstu.tasks import parse_tasks, task_labels, task_losses


def _which(message, field_names: Sequence[str], path: str) -> str:
    """The one sub-message of a oneof that is set (checked by name, not by oneof name)."""
    chosen = [name for name in field_names if message.HasField(name)]
    if len(chosen) != 1:
        raise ModelConfigError(path, f"set exactly one of {', '.join(field_names)}")
    return chosen[0]


# Feature groups DlrmHSTU reads by name (reference 1.5).
REQUIRED_GROUPS = ("uih", "candidate", "uih_timestamp", "candidate_timestamp")
OPTIONAL_GROUPS = ("contextual", "uih_action", "uih_watchtime")


@dataclasses.dataclass
class ModelOutput:
    """Per-task outputs flattened over all candidates of the batch, in batch order.

    logits[task]: [sum t] (num_class 1) or [sum t, num_class]. probs[task]: [sum t]:
    sigmoid(logit) for binary tasks, P(class 1) for num_class 2 (softmax), the predicted value
    for regression (l2_loss) tasks. num_targets [B]: candidates per row, to regroup per row.
    """

    logits: dict[str, torch.Tensor]
    probs: dict[str, torch.Tensor]
    num_targets: torch.Tensor


def _mlp_from_config(cfg, in_features: int) -> MLP:
    return MLP(
        in_features,
        list(cfg.hidden_units),
        activation=cfg.activation,
        use_bn=cfg.use_bn,
        use_ln=cfg.use_ln,
        bias=cfg.bias,
        dropout_ratio=list(cfg.dropout_ratio),
    )


def _contextualized_mlp(cfg, path, *, in_dim, out_dim, contextual_dim, kernel) -> nn.Module:
    kind = _which(cfg, ("simple_mlp", "parameterized_mlp"), path)
    if kind == "simple_mlp":
        return SimpleContextualizedMLP(in_dim, out_dim, cfg.simple_mlp.hidden_dim, kernel=kernel)
    return ParameterizedContextualizedMLP(
        contextual_dim,
        in_dim,
        out_dim,
        cfg.parameterized_mlp.hidden_dim,
        contextual_dropout_ratio=cfg.parameterized_mlp.contextual_dropout_ratio,
        kernel=kernel,
    )


def _embedding_tables(features: Sequence[FeatureSpec]) -> list[EmbeddingConfig]:
    """One table per embedding_name (features with the same name share it). Widths may differ
    between tables: MultiDimEmbeddingCollection keeps one EmbeddingCollection per width."""
    tables: dict[str, EmbeddingConfig] = {}
    for spec in features:
        if spec.kind != "id":
            continue
        table_name = spec.embedding_name or f"{spec.name}_emb"
        if spec.data_type not in ("FP32", "FP16"):
            raise ModelConfigError(
                f"feature {spec.name}", f"data_type {spec.data_type!r}; expected FP32 or FP16"
            )
        if not spec.num_buckets or not spec.embedding_dim:
            raise ModelConfigError(
                f"feature {spec.name}", "id features need num_buckets and embedding_dim"
            )
        existing = tables.get(table_name)
        if existing is None:
            tables[table_name] = EmbeddingConfig(
                name=table_name,
                num_embeddings=int(spec.num_buckets),
                embedding_dim=int(spec.embedding_dim),
                data_type=DataType.FP16 if spec.data_type == "FP16" else DataType.FP32,
                feature_names=[spec.name],
            )
            continue
        shape = (existing.num_embeddings, existing.embedding_dim, existing.data_type)
        wanted = (
            int(spec.num_buckets),
            int(spec.embedding_dim),
            DataType.FP16 if spec.data_type == "FP16" else DataType.FP32,
        )
        if shape != wanted:
            raise ModelConfigError(
                f"feature {spec.name}",
                f"shares embedding_name {table_name!r} with {existing.feature_names} but has "
                f"num_buckets/embedding_dim/data_type {wanted[0]}/{wanted[1]}/{spec.data_type} "
                f"instead of {shape[0]}/{shape[1]}/{existing.data_type.name}",
            )
        existing.feature_names.append(spec.name)
    return list(tables.values())


class DlrmHSTU(nn.Module):
    def __init__(
        self,
        cfg,
        features: Sequence[FeatureSpec],
        labels: Sequence[LabelSpec],
        *,
        embedding_device: torch.device | None = None,
    ) -> None:
        """cfg: the PipelineConfig message (reads cfg.model_config). features / labels: from
        hstu.config.features.feature_specs(cfg) / label_specs(cfg). embedding_device: where the
        embedding tables live ("meta" for the trainer, which materialises them when sharding).
        """
        super().__init__()
        model_cfg = cfg.model_config
        if not model_cfg.HasField("dlrm_hstu"):
            raise ModelConfigError("model", "DlrmHSTU needs a dlrm_hstu block")
        hstu_model = model_cfg.dlrm_hstu
        self.kernel = Kernel.parse(model_cfg.kernel)
        self.features = {spec.name: spec for spec in features}
        self.label_specs = {spec.column: spec for spec in labels}
        self.groups = self._resolve_groups(model_cfg)
        self.max_seq_len = int(hstu_model.max_seq_len)
        self.enable_global_average_loss = bool(hstu_model.enable_global_average_loss)
        self.sequence_timestamp_is_ascending = bool(hstu_model.sequence_timestamp_is_ascending)
        self.concat_contextual_features = bool(hstu_model.concat_contextual_features)
        self.tasks = parse_tasks(hstu_model.fusion_mtl_tower)
        for task in self.tasks:
            if task.label_name not in self.label_specs:
                raise ModelConfigError(
                    f"dlrm_hstu.fusion_mtl_tower.task_configs[{task.name}].label_name",
                    f"{task.label_name!r} is not a label column; known: "
                    f"{', '.join(self.label_specs) or '(none)'}",
                )

        self.embedding_collection = MultiDimEmbeddingCollection(
            _embedding_tables(features),
            device=embedding_device,
            zch={spec.embedding_name: spec.zch for spec in features if spec.zch is not None},
        )

        self.uih_dim = sum(self._feature_width(name) for name in self.groups["uih"])
        self.candidate_dim = sum(self._feature_width(name) for name in self.groups["candidate"])
        contextual_dims = [self._feature_width(name) for name in self.groups["contextual"]]
        self.contextual_dim = sum(contextual_dims)
        if self.concat_contextual_features:
            num_slots, slot_dim = (1, self.contextual_dim) if contextual_dims else (0, 0)
        else:
            # One token per feature through one batched affine map: every slot needs the same
            # width. Concatenated (one token), widths may differ.
            names = self.groups["contextual"]
            for name, dim in zip(names, contextual_dims):
                if dim != contextual_dims[0]:
                    raise ModelConfigError(
                        "feature_groups[contextual]",
                        f"contextual feature {name!r} has embedding_dim {dim} but {names[0]!r} "
                        f"has {contextual_dims[0]}; make them equal or set "
                        "dlrm_hstu.concat_contextual_features: true",
                    )
            num_slots = len(contextual_dims)
            slot_dim = contextual_dims[0] if contextual_dims else 0

        self.encoder = self._build_encoder(hstu_model.hstu, num_slots, slot_dim)
        embedding_dim = int(hstu_model.hstu.stu.embedding_dim)
        self.item_tower = ItemTower(
            self.candidate_dim,
            embedding_dim,
            hidden_dim=int(hstu_model.item_embedding_hidden_dim),
            kernel=self.kernel.non_attention(),
        )
        tower_cfg = hstu_model.fusion_mtl_tower
        tower_mlp = (
            _mlp_from_config(tower_cfg.mlp, embedding_dim) if tower_cfg.HasField("mlp") else None
        )
        self.fusion_tower = FusionMTLTower(
            embedding_dim, [task.num_class for task in self.tasks], tower_mlp
        )
        # A GraphedScoring (use_cuda_graphs) or None; not a module: no state of its own.
        self.graphed_scoring = None

    # ---- construction helpers -------------------------------------------------------------

    def _resolve_groups(self, model_cfg) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for index, group in enumerate(model_cfg.feature_groups):
            for name in group.feature_names:
                if name not in self.features:
                    raise ModelConfigError(
                        f"feature_groups[{index}] ({group.group_name})",
                        f"feature {name!r} is not defined in feature_configs",
                    )
            groups[group.group_name] = list(group.feature_names)
        for name in REQUIRED_GROUPS:
            if not groups.get(name):
                raise ModelConfigError(
                    "feature_groups", f"DlrmHSTU needs a non-empty feature group {name!r}"
                )
        for name in OPTIONAL_GROUPS:
            groups.setdefault(name, [])
        for group in ("uih_action", "uih_watchtime", "uih_timestamp", "candidate_timestamp"):
            members = groups[group]
            if len(members) > 1:
                raise ModelConfigError(
                    f"feature_groups[{group}]", f"holds one raw feature; got {members}"
                )
            if members and self.features[members[0]].kind != "raw":
                raise ModelConfigError(
                    f"feature_groups[{group}]", f"{members[0]!r} must be a raw feature"
                )
        for group in ("uih", "candidate"):
            sequences = {self.features[name].sequence for name in groups[group]}
            if len(sequences) != 1 or None in sequences:
                raise ModelConfigError(
                    f"feature_groups[{group}]",
                    f"features must all belong to one sequence; got {sorted(map(str, sequences))}",
                )
        for name in groups["contextual"]:
            if self.features[name].kind != "id" or self.features[name].sequence is not None:
                raise ModelConfigError(
                    "feature_groups[contextual]", f"{name!r} must be a scalar id feature"
                )
        return groups

    def _feature_width(self, name: str) -> int:
        spec = self.features[name]
        return int(spec.embedding_dim) if spec.kind == "id" else 1

    def _build_encoder(self, hstu_cfg, num_slots: int, slot_dim: int) -> HSTUTransducer:
        kernel = self.kernel.non_attention()
        stu_cfg = hstu_cfg.stu
        embedding_dim = int(stu_cfg.embedding_dim)
        if hstu_cfg.attn_truncation_split_layer or hstu_cfg.attn_truncation_tail_len:
            raise ModelConfigError(
                "dlrm_hstu.hstu.attn_truncation_*", "attention truncation is not implemented"
            )
        if stu_cfg.sla_k1 or stu_cfg.sla_k2:
            raise ModelConfigError(
                "dlrm_hstu.hstu.stu.sla_k1", "semi-local attention is not implemented"
            )
        preprocessor_kind = _which(
            hstu_cfg.input_preprocessor,
            ("contextual_preprocessor", "contextual_interleave_preprocessor", "uih_preprocessor"),
            "dlrm_hstu.hstu.input_preprocessor",
        )
        if preprocessor_kind != "contextual_preprocessor":
            raise ModelConfigError(
                "dlrm_hstu.hstu.input_preprocessor",
                f"{preprocessor_kind} is not implemented; use contextual_preprocessor",
            )
        pre_cfg = hstu_cfg.input_preprocessor.contextual_preprocessor
        path = "dlrm_hstu.hstu.input_preprocessor.contextual_preprocessor"

        content_kind = _which(
            pre_cfg.content_encoder,
            ("slice_content_encoder", "pad_content_encoder", "mlp_content_encoder"),
            f"{path}.content_encoder",
        )
        if content_kind == "slice_content_encoder":
            content_encoder = SliceContentEncoder(self.uih_dim, self.candidate_dim, kernel)
        elif content_kind == "pad_content_encoder":
            content_encoder = PadContentEncoder(self.uih_dim, self.candidate_dim, kernel)
        else:
            mlp_cfg = pre_cfg.content_encoder.mlp_content_encoder
            content_encoder = MLPContentEncoder(
                _mlp_from_config(mlp_cfg.uih_mlp, self.uih_dim),
                _mlp_from_config(mlp_cfg.target_mlp, self.candidate_dim),
                kernel,
            )
        content_mlp = _contextualized_mlp(
            pre_cfg.content_mlp,
            f"{path}.content_mlp",
            in_dim=content_encoder.output_dim,
            out_dim=embedding_dim,
            contextual_dim=self.contextual_dim,
            kernel=kernel,
        )
        action_encoder = action_mlp = None
        if pre_cfg.HasField("action_encoder"):
            if not self.groups["uih_action"]:
                raise ModelConfigError(
                    f"{path}.action_encoder", "needs the feature group uih_action"
                )
            if not pre_cfg.HasField("action_mlp"):
                raise ModelConfigError(f"{path}.action_mlp", "required with action_encoder")
            enc = pre_cfg.action_encoder.simple_action_encoder
            if enc.watchtime_to_action_thresholds and not self.groups["uih_watchtime"]:
                raise ModelConfigError(
                    f"{path}.action_encoder.simple_action_encoder.watchtime_to_action_thresholds",
                    "needs the feature group uih_watchtime",
                )
            action_encoder = SimpleActionEncoder(
                int(enc.action_embedding_dim),
                list(enc.action_weights),
                list(enc.watchtime_to_action_thresholds),
                list(enc.watchtime_to_action_weights),
                kernel=kernel,
            )
            action_mlp = _contextualized_mlp(
                pre_cfg.action_mlp,
                f"{path}.action_mlp",
                in_dim=action_encoder.output_dim,
                out_dim=embedding_dim,
                contextual_dim=self.contextual_dim,
                kernel=kernel,
            )
        preprocessor = ContextualPreprocessor(
            embedding_dim=embedding_dim,
            num_contextual_slots=num_slots,
            contextual_slot_dim=slot_dim,
            content_encoder=content_encoder,
            content_mlp=content_mlp,
            action_encoder=action_encoder,
            action_mlp=action_mlp,
            kernel=kernel,
        )

        pos_cfg = hstu_cfg.positional_encoder
        positional_encoder = HSTUPositionalEncoder(
            embedding_dim=embedding_dim,
            num_position_buckets=int(pos_cfg.num_position_buckets),
            num_time_buckets=int(pos_cfg.num_time_buckets),
            use_time_encoding=bool(pos_cfg.use_time_encoding),
            time_bucket_fn=pos_cfg.time_bucket_fn,
            time_bucket_increments=float(pos_cfg.time_bucket_increments),
            kernel=kernel,
        )

        if stu_cfg.scaling_seqlen == 0:
            raise ModelConfigError(
                "dlrm_hstu.hstu.stu.scaling_seqlen", "0 would divide by zero; use < 0 or > 0"
            )
        scaling_seqlen = (
            int(stu_cfg.scaling_seqlen) if stu_cfg.scaling_seqlen > 0 else self.max_seq_len
        )
        contextual_seq_len = (
            int(stu_cfg.contextual_seq_len) if stu_cfg.contextual_seq_len >= 0 else num_slots
        )
        layers = [
            STULayer(
                embedding_dim=embedding_dim,
                num_heads=int(stu_cfg.num_heads),
                hidden_dim=int(stu_cfg.hidden_dim),
                attention_dim=int(stu_cfg.attention_dim),
                scaling_seqlen=scaling_seqlen,
                output_dropout_ratio=float(stu_cfg.output_dropout_ratio),
                max_attn_len=int(stu_cfg.max_attn_len),
                attn_alpha=float(stu_cfg.attn_alpha) or None,
                use_group_norm=bool(stu_cfg.use_group_norm),
                recompute_normed_x=bool(stu_cfg.recompute_normed_x),
                recompute_uvqk=bool(stu_cfg.recompute_uvqk),
                recompute_y=bool(stu_cfg.recompute_y),
                sort_by_length=bool(stu_cfg.sort_by_length),
                contextual_seq_len=contextual_seq_len,
                kernel=self.kernel,
            )
            for _ in range(int(hstu_cfg.attn_num_layers))
        ]

        post_kind = _which(
            hstu_cfg.output_postprocessor,
            (
                "l2norm_postprocessor",
                "layernorm_postprocessor",
                "timestamp_layernorm_postprocessor",
            ),
            "dlrm_hstu.hstu.output_postprocessor",
        )
        if post_kind == "l2norm_postprocessor":
            postprocessor: nn.Module = L2NormPostprocessor()
        elif post_kind == "layernorm_postprocessor":
            postprocessor = LayerNormPostprocessor(embedding_dim, kernel=kernel)
        else:
            ts_cfg = hstu_cfg.output_postprocessor.timestamp_layernorm_postprocessor
            postprocessor = TimestampLayerNormPostprocessor(
                embedding_dim,
                list(ts_cfg.time_duration_period_units),
                list(ts_cfg.time_duration_units_per_period),
                kernel=kernel,
            )
        return HSTUTransducer(
            preprocessor=preprocessor,
            positional_encoder=positional_encoder,
            stu_stack=STUStack(layers),
            postprocessor=postprocessor,
            input_dropout_ratio=float(hstu_cfg.input_dropout_ratio),
            kernel=kernel,
        )

    def use_cuda_graphs(self, enabled: bool = True, *, max_graphs: int = 8,
                        capture: bool = True) -> None:
        """Training steps run the encoder and towers from CUDA graphs, one per shape bucket
        (hstu/modules/graphed_scoring.py). capture=False pads the same way but runs eagerly (the
        CPU tests)."""
        self.graphed_scoring = (GraphedScoring(capture=capture, max_graphs=max_graphs)
                                if enabled else None)

    def set_kernel(self, kernel: Kernel | str) -> None:
        """Switch every op of the model to `kernel` (attention may be CUTLASS; the rest TRITON)."""
        self.kernel = Kernel.parse(kernel)
        for module in self.modules():
            if module is self or not hasattr(module, "kernel"):
                continue
            attention = isinstance(module, STULayer)
            module.kernel = self.kernel if attention else self.kernel.non_attention()

    # ---- forward ---------------------------------------------------------------------------

    def _group_values(self, embedded, batch: JaggedBatch, group: str) -> torch.Tensor:
        """[rows, width]: the group's features side by side (ids embedded, raw as one column)."""
        columns = []
        for name in self.groups[group]:
            if self.features[name].kind == "id":
                columns.append(embedded[name].values().float())
            else:
                columns.append(batch.raw[name].float().unsqueeze(1))
        return torch.cat(columns, dim=1) if len(columns) > 1 else columns[0]

    def _raw(self, batch: JaggedBatch, group: str) -> torch.Tensor | None:
        members = self.groups[group]
        if not members:
            return None
        if members[0] not in batch.raw:
            raise KeyError(f"batch.raw has no feature {members[0]!r} (feature group {group})")
        return batch.raw[members[0]]

    def _contextual(self, embedded, batch: JaggedBatch) -> torch.Tensor | None:
        if not self.groups["contextual"]:
            return None
        columns = []
        for name in self.groups["contextual"]:
            jagged = embedded[name]
            lengths = jagged.lengths()
            # The value check reads the lengths: on the CPU only (on a GPU it would stall the
            # host every step; the data pipeline builds one value per row for these features).
            wrong = lengths.numel() != batch.batch_size or (
                lengths.device.type == "cpu" and bool((lengths != 1).any())
            )
            if wrong:
                raise ValueError(
                    f"contextual feature {name!r} must have exactly one value per row; got "
                    f"lengths {lengths.tolist()}"
                )
            columns.append(jagged.values().float())
        return torch.cat(columns, dim=1)

    @staticmethod
    def _max_item_len(batch: JaggedBatch, uih_sequence: str, candidate_sequence: str):
        """The longest history + candidates of a row, from the lengths the host holds (None
        when it holds none: the encoder then reads it from the device)."""
        lengths = batch.lengths_on_host()
        if lengths is None:
            return None
        items = lengths[uih_sequence].to(torch.int64) + lengths[candidate_sequence].to(torch.int64)
        return int(items.max()) if items.numel() else 0

    def forward(self, batch: JaggedBatch) -> ModelOutput:
        embedded = self.embedding_collection(batch.sparse)
        uih_sequence = self.features[self.groups["uih"][0]].sequence
        candidate_sequence = self.features[self.groups["candidate"][0]].sequence
        uih_lengths = batch.seq_lengths[uih_sequence].to(torch.int64)
        num_targets = batch.seq_lengths[candidate_sequence].to(torch.int64)

        inputs = dict(
            contextual=self._contextual(embedded, batch),
            uih=self._group_values(embedded, batch, "uih"),
            uih_lengths=uih_lengths,
            candidates=self._group_values(embedded, batch, "candidate"),
            num_targets=num_targets,
            uih_timestamps=self._raw(batch, "uih_timestamp").to(torch.int64),
            candidate_timestamps=self._raw(batch, "candidate_timestamp").to(torch.int64),
            uih_actions=self._raw(batch, "uih_action"),
            uih_watch_times=self._raw(batch, "uih_watchtime"),
            max_item_len=self._max_item_len(batch, uih_sequence, candidate_sequence),
        )
        # CUDA graphs only for training steps (eval runs the same modules eagerly).
        graphed = self.graphed_scoring if self.training and torch.is_grad_enabled() else None
        per_task = score_candidates(
            self.encoder, self.item_tower, self.fusion_tower, inputs,
            ascending=self.sequence_timestamp_is_ascending, graphed=graphed,
        )
        logits, probs = task_outputs(self.tasks, per_task)
        return ModelOutput(logits=logits, probs=probs, num_targets=num_targets)

    # ---- labels, losses, metric inputs ----------------------------------------------------

    def task_labels(self, batch: JaggedBatch) -> dict[str, torch.Tensor]:
        """Per task, the label of every candidate (hstu.tasks.task_labels)."""
        return task_labels(self.tasks, batch)

    def compute_losses(
        self, output: ModelOutput, batch: JaggedBatch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total, {task: weighted loss}) (hstu.tasks.task_losses); with
        enable_global_average_loss, scaled so that averaging gradients over ranks gives the
        mean over every candidate of every rank."""
        scale = (
            global_average_scale(output.num_targets) if self.enable_global_average_loss else 1.0
        )
        return task_losses(
            self.tasks, output.logits, batch, scale, num_targets=output.num_targets
        )

    def grouping_key(
        self, batch: JaggedBatch, name: str, num_targets: torch.Tensor
    ) -> torch.Tensor:
        """The per-row value of feature `name` (e.g. user_id), repeated for each candidate."""
        if name in self.features and self.features[name].kind == "id":
            jagged = batch.sparse[name]
            if bool((jagged.lengths() != 1).any()):
                raise ValueError(f"grouping key {name!r} must have one value per row")
            per_row = jagged.values()
        elif name in batch.raw and batch.raw[name].shape[0] == batch.batch_size:
            per_row = batch.raw[name]
        else:
            raise KeyError(f"grouping key {name!r} is not a scalar feature of the batch")
        return torch.repeat_interleave(per_row, num_targets)


def model_summary(cfg, seq_len: int | None = None) -> dict:
    """Parameter counts and encoder FLOPs, without allocating any table (meta device).

    FLOPs count a multiply-add as 2 and cover the forward pass. Per STU layer and token:
      linear = 2 * D * 2H(d_v + d_qk)        (uvqk projection)
             + 2 * 3H d_v * D                (output projection)
    attention per row of N tokens, causal (each query sees half the row on average):
      attention = 2 * H * (d_qk + d_v) * N^2 / 2
    encoder per sample = layers * (N * linear + attention(N)), N = seq_len (default
    dlrm_hstu.max_seq_len); encoder per token = that / N.
    """
    from hstu.config.features import feature_specs, label_specs

    meta = torch.device("meta")
    with meta:
        model = DlrmHSTU(cfg, feature_specs(cfg), label_specs(cfg), embedding_device=meta)
    sparse_ids = {id(p) for p in model.embedding_collection.parameters()}
    dense = sum(p.numel() for p in model.parameters() if id(p) not in sparse_ids)
    sparse = sum(p.numel() for p in model.embedding_collection.parameters())
    sparse_bytes = sum(
        p.numel() * p.element_size() for p in model.embedding_collection.parameters()
    )
    stu = cfg.model_config.dlrm_hstu.hstu.stu
    layers = int(cfg.model_config.dlrm_hstu.hstu.attn_num_layers)
    d, h, dv, dqk = int(stu.embedding_dim), int(stu.num_heads), int(stu.hidden_dim), int(
        stu.attention_dim
    )
    n = int(seq_len or cfg.model_config.dlrm_hstu.max_seq_len)
    linear_per_token = 2 * d * 2 * h * (dv + dqk) + 2 * 3 * h * dv * d
    attention_per_sample = 2 * h * (dqk + dv) * n * n // 2
    per_sample = layers * (n * linear_per_token + attention_per_sample)
    return {
        "dense_parameters": dense,
        "sparse_parameters": sparse,
        "sparse_bytes": sparse_bytes,
        "stu_parameters": sum(p.numel() for p in model.encoder.stu_stack.parameters()),
        "encoder_seq_len": n,
        "encoder_layers": layers,
        "encoder_linear_flops_per_token": layers * linear_per_token,
        "encoder_flops_per_sample": per_sample,
        "encoder_flops_per_token": per_sample / n,
        "flops_formula": (
            "per layer: N*(4*D*H*(d_v+d_qk) + 6*H*d_v*D) + H*(d_qk+d_v)*N^2 "
            "(forward, multiply-add = 2, causal half)"
        ),
    }
