"""The serving module: DlrmHSTU's forward pass over plain tensors, for torch.export.

Training looks ids up through TorchRec EmbeddingCollections (one per embedding width), which
take a KeyedJaggedTensor and may be sharded; neither traces with torch.export. `ServingModule`
keeps the trained model's dense submodules as they are (encoder, item tower, fusion tower) and
replaces the lookup by `F.embedding` over the same table weights. Its input is a flat dict of tensors:

    <feature name>        one tensor per feature the model reads
                          scalar id feature (e.g. "user_id"):       int64 [B]
                          sequence id feature ("uih_seq__video_id"): int64 [total tokens of its sequence]
                          raw sequence feature:                      int64 or float32 [total tokens]
    <sequence>.lengths    int64 [B], e.g. "uih_seq.lengths", "cand_seq.lengths" (num_targets)

and its output a dict {task name: [sum of cand_seq lengths] float32}, the same `probs` as
DlrmHSTU.forward (sigmoid for binary tasks, P(class 1) for softmax tasks, the value for
regression tasks), candidates in input order. Everything else (the glue between lookup and
encoder) mirrors DlrmHSTU.forward line by line; tests/export checks the two agree.

Feature names never contain ".", so "<sequence>.lengths" cannot collide with a feature.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hstu.config.features import FeatureSpec
from hstu.modules.scoring import score_candidates, task_outputs

LENGTHS_SUFFIX = ".lengths"


def lengths_key(sequence: str) -> str:
    return sequence + LENGTHS_SUFFIX


@dataclasses.dataclass(frozen=True)
class ServingInput:
    """One input tensor of the exported program."""

    name: str
    dtype: str  # "int64" | "float32"
    # What its one dimension counts: "batch" (rows) or a sequence name (tokens of it).
    dim: str


def serving_inputs(features: list[FeatureSpec]) -> list[ServingInput]:
    """The program's inputs, in a fixed order: features as the config declares them, then one
    lengths tensor per sequence (history first)."""
    inputs = []
    sequences: list[str] = []
    for spec in features:
        dtype = "int64" if spec.kind == "id" else spec.value_dtype
        inputs.append(ServingInput(spec.name, dtype, spec.sequence or "batch"))
        if spec.sequence is not None and spec.sequence not in sequences:
            sequences.append(spec.sequence)
    inputs += [ServingInput(lengths_key(s), "int64", "batch") for s in sequences]
    return inputs


class ServingModule(nn.Module):
    """DlrmHSTU.forward over plain tensors; see the module docstring for inputs and outputs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.features: dict[str, FeatureSpec] = dict(model.features)
        self.groups: dict[str, list[str]] = {k: list(v) for k, v in model.groups.items()}
        self.tasks = list(model.tasks)
        self.task_names = [task.name for task in model.tasks]
        self.ascending = bool(model.sequence_timestamp_is_ascending)
        self.uih_sequence = self.features[self.groups["uih"][0]].sequence
        self.candidate_sequence = self.features[self.groups["candidate"][0]].sequence

        # The embedding tables' own weights (same storage): one table per embedding_name, of
        # every width (embedding_collection holds one EmbeddingCollection per width; its
        # `embeddings` maps table names to nn.Embedding across them).
        self.tables = nn.ParameterDict()
        self.table_of: dict[str, str] = {}
        embeddings = model.embedding_collection.embeddings
        for config in model.embedding_collection.embedding_configs():
            weight = embeddings[config.name].weight
            self.tables[config.name] = nn.Parameter(weight.detach(), requires_grad=False)
            for feature in config.feature_names:
                self.table_of[feature] = config.name
        self.encoder = model.encoder
        self.item_tower = model.item_tower
        self.fusion_tower = model.fusion_tower
        # zch tables (hstu/modules/zch.py): raw ids are mapped to rows with the trained
        # admission state, as in DlrmHSTU's evaluation (an element-wise lookup: it exports).
        self.zch = model.embedding_collection.zch

    def _embed(self, inputs: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
        table = self.table_of[name]
        ids = inputs[name]
        if table in self.zch:
            ids = self.zch[table].remap(ids)
        # float(): DlrmHSTU reads the lookup's values as float32 whatever the table dtype.
        return F.embedding(ids, self.tables[table]).float()

    def _group_values(self, inputs: Mapping[str, torch.Tensor], group: str) -> torch.Tensor:
        columns = []
        for name in self.groups[group]:
            if self.features[name].kind == "id":
                columns.append(self._embed(inputs, name))
            else:
                columns.append(inputs[name].float().unsqueeze(1))
        return torch.cat(columns, dim=1) if len(columns) > 1 else columns[0]

    def _raw(self, inputs: Mapping[str, torch.Tensor], group: str) -> torch.Tensor | None:
        members = self.groups[group]
        return inputs[members[0]] if members else None

    def encoder_inputs(
        self, inputs: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor | None]:
        """The encoder's keyword inputs (ContextualPreprocessor.forward's) from the program's
        input dict: embedding lookups and the raw groups, in input order (no flip)."""
        contextual = None
        if self.groups["contextual"]:
            contextual = torch.cat(
                [self._embed(inputs, name) for name in self.groups["contextual"]], dim=1
            )
        return {
            "contextual": contextual,
            "uih": self._group_values(inputs, "uih"),
            "uih_lengths": inputs[lengths_key(self.uih_sequence)].to(torch.int64),
            "candidates": self._group_values(inputs, "candidate"),
            "num_targets": inputs[lengths_key(self.candidate_sequence)].to(torch.int64),
            "uih_timestamps": self._raw(inputs, "uih_timestamp").to(torch.int64),
            "candidate_timestamps": self._raw(inputs, "candidate_timestamp").to(torch.int64),
            "uih_actions": self._raw(inputs, "uih_action"),
            "uih_watch_times": self._raw(inputs, "uih_watchtime"),
        }

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        encoder_inputs = self.encoder_inputs(inputs)
        per_task = score_candidates(
            self.encoder, self.item_tower, self.fusion_tower, encoder_inputs,
            ascending=self.ascending,
        )
        return task_outputs(self.tasks, per_task)[1]


# Every batch the program runs on gets one filler row with this many history and candidate tokens
# (see `with_filler_row`).
FILLER_TOKENS = 2


def dynamic_shapes(inputs: list[ServingInput]) -> tuple[dict[str, dict[int, object]]]:
    """torch.export dims: rows, shared by every per-row tensor, and one token count per sequence,
    shared by that sequence's features.

    torch.export specialises sizes 0 and 1 (it assumes a dynamic size is >= 2 wherever a size
    of 1 would change broadcasting or memory layout), and the program asserts that at run
    time. So the declared minimum is 2 of each, and callers add one filler row to every batch
    (`with_filler_row`): then one-row batches, batches of cold-start users with no history
    and batches with a single candidate all run, and the filler's scores are dropped. Rows do
    not see each other in DlrmHSTU, so the filler changes no other row's scores.
    """
    from torch.export import Dim

    dims = {"batch": Dim("batch", min=2, max=(1 << 31) - 1)}
    spec = {}
    for item in inputs:
        if item.dim not in dims:
            dims[item.dim] = Dim(f"{item.dim}_tokens", min=FILLER_TOKENS, max=(1 << 31) - 1)
        spec[item.name] = {0: dims[item.dim]}
    return (spec,)


def with_filler_row(
    inputs: Mapping[str, torch.Tensor], spec: list[ServingInput]
) -> dict[str, torch.Tensor]:
    """`inputs` plus one last row: id 0 for every scalar feature, FILLER_TOKENS zeros for every
    sequence feature (ids, raw values, timestamps). Its scores are the last FILLER_TOKENS of
    every task's output (`without_filler_scores`)."""
    out = {}
    for item in spec:
        value = inputs[item.name]
        if item.name.endswith(LENGTHS_SUFFIX):
            extra = torch.full((1,), FILLER_TOKENS, dtype=value.dtype)
        elif item.dim == "batch":
            extra = torch.zeros(1, dtype=value.dtype)
        else:
            extra = torch.zeros(FILLER_TOKENS, dtype=value.dtype)
        out[item.name] = torch.cat([value, extra.to(value.device)])
    return out


def without_filler_scores(scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {task: value[:-FILLER_TOKENS] for task, value in scores.items()}


def synthetic_inputs(
    features: list[FeatureSpec],
    timestamp_features: set[str],
    uih_sequence: str,
    lengths: dict[str, list[int]],
    *,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Valid random serving inputs with the given per-row lengths of each sequence.

    Used to trace the program and to check it: ids inside their tables, non-negative
    increasing int64 timestamps (candidates after the history), bitmasks in [0, 256).
    """
    rng = np.random.default_rng(seed)
    rows = len(next(iter(lengths.values())))
    start = 1_650_000_000
    inputs: dict[str, torch.Tensor] = {}
    for spec in features:
        size = rows if spec.sequence is None else int(sum(lengths[spec.sequence]))
        if spec.kind == "id":
            values = rng.integers(0, max(int(spec.num_buckets or 1), 1), size=size)
            inputs[spec.name] = torch.from_numpy(values.astype(np.int64))
        elif spec.name in timestamp_features:
            # Timestamps: increasing within each row; candidates after the whole history.
            offset = 0 if spec.sequence == uih_sequence else 100_000
            per_row = [
                start + offset + np.cumsum(rng.integers(1, 600, size=n))
                for n in lengths[spec.sequence]
            ]
            values = np.concatenate(per_row) if per_row else np.zeros(0)
            inputs[spec.name] = torch.from_numpy(values.astype(np.int64))
        elif spec.value_dtype == "int64":
            inputs[spec.name] = torch.from_numpy(rng.integers(0, 256, size=size).astype(np.int64))
        else:
            values = rng.uniform(0.0, 100.0, size=size).astype(np.float32)
            inputs[spec.name] = torch.from_numpy(values)
    for sequence, per_row in lengths.items():
        inputs[lengths_key(sequence)] = torch.tensor(per_row, dtype=torch.int64)
    return inputs
