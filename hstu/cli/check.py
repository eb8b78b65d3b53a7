"""`launch.py check --recipe FILE [--set path=value ...]`: validate a pipeline config, summarize it.

Exit status 0 when the config loads, 1 with one message when it does not:
`launch.py check: file:line:col: field: problem`, the prefix every command's errors carry. Imports no torch/Ray unless the model module exists (for the dense parameter count).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from hstu.cli import add_override_argument
from hstu.config import (
    ConfigError,
    feature_specs,
    ignored_settings,
    label_specs,
    load_config,
    schema,
    sequence_names,
    unused_features,
    unused_labels,
)
from hstu.config.support import reading_notes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", required=True, help="pipeline config (protobuf text format)")
    add_override_argument(
        parser, "override a config field, e.g. --set data_config.batch_size=8 (repeatable)"
    )


def _table(rows: list[list[str]], headers: list[str], indent: str = "  ") -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    lines = [indent + "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append(
            indent + "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        )
    return "\n".join(lines)


def _buckets(spec) -> str:
    """A table's rows; "zch 16,384" when zero-collision hashing maps ids of any value there."""
    return f"zch {spec.num_buckets:,}" if spec.zch else f"{spec.num_buckets:,}"


def _dense_summary(cfg) -> tuple[str, bool]:
    """Dense parameter line from hstu.model.model_summary, if the model module provides it."""
    try:
        model = importlib.import_module("hstu.model")
    except ImportError as error:
        return f"(model not available: {error})", True
    summary_fn = getattr(model, "model_summary", None)
    if summary_fn is None:
        return "(model not available: hstu.model has no model_summary)", True
    try:
        summary = summary_fn(cfg)
    except ConfigError:
        raise
    except Exception as error:  # the model rejected this config: report it, do not hide it
        return f"model_summary failed: {type(error).__name__}: {error}", False
    dense = summary.get("dense_parameters")
    text = f"{dense:,}" if isinstance(dense, int) else "(model_summary gave no dense_parameters)"
    for key in ("stu_parameters", "encoder_flops_per_sample", "encoder_flops_per_token"):
        if key in summary:
            value = summary[key]
            text += f"\n  {key.replace('_', ' ')}: " + (
                f"{value:,.0f}" if isinstance(value, (int, float)) else str(value)
            )
    return text, True


def summarize(cfg, source: str) -> tuple[str, bool]:
    """The printed summary, and False if part of it shows the config cannot be used."""
    dlrm = cfg.model_config.dlrm_hstu
    hstu = dlrm.hstu
    stu = hstu.stu
    content_encoder = hstu.input_preprocessor.contextual_preprocessor.content_encoder
    specs = feature_specs(cfg)
    labels = label_specs(cfg)
    uih_sequence, candidate_sequence = sequence_names(cfg)
    out = [
        f"config: {source}",
        f"model: dlrm_hstu, kernel {schema.enum_name('Kernel', cfg.model_config.kernel)}, "
        f"max_seq_len {dlrm.max_seq_len}",
        f"sequences: history {uih_sequence!r}, candidates {candidate_sequence!r}",
        f"encoder: D={stu.embedding_dim}, {stu.num_heads} heads x (qk {stu.attention_dim}, "
        f"v {stu.hidden_dim}), {hstu.attn_num_layers} layers, "
        f"{content_encoder.WhichOneof('content_encoder')}, "
        f"{hstu.output_postprocessor.WhichOneof('output_postprocessor')}",
        "",
        f"features ({len(specs)}):",
        _table(
            [
                [
                    s.name,
                    s.column,
                    s.kind,
                    s.sequence or "-",
                    s.embedding_name or "-",
                    s.embedding_dim or "-",
                    _buckets(s) if s.num_buckets else "-",
                    s.data_type if s.kind == "id" else s.value_dtype,
                ]
                for s in specs
            ],
            ["name", "column", "kind", "sequence", "table", "dim", "buckets", "dtype"],
        ),
    ]

    tables: dict[str, list] = {}
    for spec in specs:
        if spec.kind == "id":
            tables.setdefault(spec.embedding_name, [spec, []])[1].append(spec.name)
    sparse = sum(spec.num_buckets * spec.embedding_dim for spec, _ in tables.values())
    out += [
        "",
        f"embedding tables ({len(tables)}):",
        _table(
            [
                [
                    name,
                    spec.embedding_dim,
                    _buckets(spec),
                    spec.data_type,
                    f"{spec.num_buckets * spec.embedding_dim:,}",
                    ", ".join(users),
                ]
                for name, (spec, users) in tables.items()
            ],
            ["table", "dim", "buckets", "dtype", "params", "features"],
        ),
        "",
        "feature groups:",
    ]
    for group in cfg.model_config.feature_groups:
        group_type = schema.enum_name("FeatureGroupType", group.group_type)
        out.append(f"  {group.group_name} ({group_type}): {', '.join(group.feature_names)}")

    rows = []
    for task in dlrm.fusion_mtl_tower.task_configs:
        rows.append(
            [
                task.task_name,
                task.label_name,
                task.task_bitmask if task.HasField("task_bitmask") else "-",
                ", ".join(loss.WhichOneof("loss") for loss in task.losses),
                ", ".join(metric.WhichOneof("metric") for metric in task.metrics) or "-",
                f"{task.weight:g}",
            ]
        )
    out += [
        "",
        f"tasks ({len(rows)}):",
        _table(rows, ["task", "label", "bitmask", "losses", "metrics", "weight"]),
        "",
        "labels: " + ", ".join(f"{label.column} ({label.value_dtype})" for label in labels),
    ]

    dense_text, usable = _dense_summary(cfg)
    out += [
        "",
        "parameters:",
        f"  sparse: {sparse:,} (num_buckets x dim summed over {len(tables)} tables)",
        f"  dense: {dense_text}",
    ]

    notes = [
        f"feature {name} is declared but in no feature group: not read"
        for name in unused_features(cfg)
    ]
    notes += [f"label {name} is used by no task: not read" for name in unused_labels(cfg)]
    notes += [f"{path} has no effect here: {why}" for path, why in ignored_settings(cfg)]
    notes += reading_notes(cfg)
    notes += _kernel_notes(cfg)
    if notes:
        out += ["", "notes:"] + [f"  {note}" for note in notes]
    return "\n".join(out), usable


def _kernel_notes(cfg) -> list[str]:
    """What the chosen kernel needs that this machine may lack (the config itself is fine)."""
    kernel = schema.enum_name("Kernel", cfg.model_config.kernel)
    notes = []
    if kernel in ("TRITON", "CUTLASS"):
        notes.append(f"model_config.kernel {kernel} runs on CUDA GPUs: train with --use-gpu")
    if kernel == "CUTLASS":
        from hstu.ops.cutlass.attention import CutlassUnavailableError, kernel_function

        try:
            kernel_function()
        except CutlassUnavailableError as error:
            message = " ".join(line.strip() for line in str(error).splitlines())
            notes.append(f"not on this machine (the GPU workers need it): {message}")
    return notes


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.recipe, args.overrides)
        text, usable = summarize(cfg, args.recipe)
    except ConfigError as error:
        print(f"launch.py check: {error}", file=sys.stderr)
        return 1
    print(text)
    if not usable:
        # The summary above shows the model's objection in place; the last line on stderr says
        # why the exit status is 1, as for the other commands.
        print("launch.py check: the model rejects this config (see the dense line above)",
              file=sys.stderr)
        return 1
    return 0
