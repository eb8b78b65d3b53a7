"""Batches by cost: TorchEasyRec's `data_config.batch_cost_size` and `sample_cost_field`.

With a budget (batch_cost_size; token_budget is this project's earlier name of it) the data
pipeline packs rows in the order they arrive: a batch closes before the summed cost of its rows
would exceed the budget, or when it holds batch_size rows; a row that alone costs more than the
budget gets a batch of its own. Every row is delivered whole, in exactly one batch
(`iter_jagged_batches`, hstu/data/pipeline.py, does the packing).

A row's cost is
- with `sample_cost_field`: the number in that column (a numeric scalar column, >= 0), as in
  TorchEasyRec, which requires the column;
- without it: the row's tokens, contextual + history + candidates, which is what the encoder
  runs over (TorchEasyRec's documentation suggests that count for a DlrmHSTU cost column).

This module holds what the packing needs from the config (`batch_cost_options`) and the
reading and checking of a cost column (`read_cost_column`). docs/data.md, "Batches by cost",
describes the behaviour and how it differs from TorchEasyRec's.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
from google.protobuf.message import Message

from hstu.config.features import CONTEXTUAL
from hstu.data.validate import (
    FOUND_BY_RULE,
    BadRowPolicy,
    BadRowReport,
    DataError,
    Finding,
    resolve_bad_rows,
    row_of_sample_id,
)

SAMPLE_COST_FIELD = "data_config.sample_cost_field"


def contextual_token_count(cfg: Message) -> int:
    """Contextual tokens the model puts in front of every row: one per feature of the
    `contextual` group, or one in all with concat_contextual_features; 0 without the group."""
    for group in cfg.model_config.feature_groups:
        if group.group_name == CONTEXTUAL and len(group.feature_names):
            if cfg.model_config.dlrm_hstu.concat_contextual_features:
                return 1
            return len(group.feature_names)
    return 0


def batch_cost_options(cfg: Message) -> dict:
    """The keyword arguments of iter_jagged_batches that a loaded config's data_config sets:
    `token_budget` (batch_cost_size, None when off), `sample_cost_field` (None: count tokens)
    and `contextual_tokens` (added to each row's history + candidates when counting tokens)."""
    data = cfg.data_config
    # The loader gives batch_cost_size and its alias token_budget the same value.
    budget = int(data.batch_cost_size or data.token_budget)
    return {
        "token_budget": budget or None,
        "sample_cost_field": (data.sample_cost_field or None) if budget else None,
        "contextual_tokens": contextual_token_count(cfg),
    }


def cost_columns(cfg: Message) -> list[str]:
    """Columns the batching reads besides the model's (for read_samples(columns=...))."""
    options = batch_cost_options(cfg)
    return [options["sample_cost_field"]] if options["sample_cost_field"] else []


def _files(table: pa.Table) -> str | None:
    """The files of a table's rows (Ray's `path` column), for messages; None when unknown."""
    if "path" not in table.column_names:
        return None
    names = sorted(set(table.column("path").to_pylist()))
    return ", ".join(str(n) for n in names[:3]) + (
        f" and {len(names) - 3} more" if len(names) > 3 else ""
    )


def _check_type(column_type: pa.DataType, column: str, path: str | None) -> None:
    if pa.types.is_dictionary(column_type):
        column_type = column_type.value_type
    if not (pa.types.is_integer(column_type) or pa.types.is_floating(column_type)):
        raise DataError(
            f"type {column_type}, expected a number per row (an integer or floating type)",
            path=path,
            column=column,
            hint=f"{SAMPLE_COST_FIELD} names the column whose value is each row's cost",
        )


def _cost_findings(array: pa.ChunkedArray | pa.Array, column: str) -> tuple[np.ndarray, list]:
    """(costs as float64 with 0 where bad, the rows breaking a rule): null, NaN or infinite,
    negative."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    findings: list[Finding] = []
    null = array.is_null().to_numpy(zero_copy_only=False)
    costs = array.fill_null(0).to_numpy(zero_copy_only=False).astype(np.float64)
    if null.any():
        findings.append(Finding(column, "no cost (null)", null))
    not_finite = ~np.isfinite(costs)
    if not_finite.any():
        findings.append(Finding(column, "cost is not a finite number", not_finite))
    negative = costs < 0
    if negative.any():
        findings.append(Finding(column, "negative cost", negative))
    return np.where(null | not_finite | negative, 0.0, costs), findings


def _locate_cost_row(column: str):
    """locate(path, finding, sample_id) for resolve_bad_rows: the bad row's row in its file,
    by sample_id, else the file's first row breaking the same rule (one column read)."""

    def locate(path: str, finding: Finding, sample_id: int | None):
        import pyarrow.parquet as pq

        if "://" in path or not os.path.isfile(path):
            return None, f"{path} is not a local file"
        try:
            parquet = pq.ParquetFile(path)
            row = row_of_sample_id(parquet, sample_id)
            if row is not None:
                return row, None
            _, findings = _cost_findings(parquet.read(columns=[column]).column(column), column)
        except (OSError, pa.ArrowException) as error:
            return None, f"reading {path} failed: {error}"
        for candidate in findings:
            if candidate.problem == finding.problem:
                return int(np.argmax(candidate.bad)), FOUND_BY_RULE
        return None, f"no row of {path} breaks this rule when read again"

    return locate


def read_cost_column(
    table: pa.Table,
    column: str,
    *,
    on_bad_rows: BadRowPolicy = "error",
) -> tuple[np.ndarray, np.ndarray | None, BadRowReport]:
    """Each row's cost from `column` of `table`: (costs float64, rows to keep or None, report).

    A missing column, or one that is not numeric (a list, a string), raises DataError naming
    the file(s) and the column. A null, NaN, infinite or negative cost is a bad row: DataError
    naming the file, the row and the column under "error"; dropped and counted under "skip"
    (`keep` then masks the rows to keep, and `report` counts the others by reason).
    """
    if column not in table.column_names:
        raise DataError(
            "missing column",
            path=_files(table),
            column=column,
            hint=f"{SAMPLE_COST_FIELD} names it; the data has {', '.join(table.column_names)}",
        )
    array = table.column(column)
    _check_type(array.type, column, _files(table))
    costs, findings = _cost_findings(array, column)
    paths = None
    if "path" in table.column_names:
        paths = table.column("path").to_numpy(zero_copy_only=False)
    sample_ids = None
    if "sample_id" in table.column_names:
        sample_ids = table.column("sample_id").to_numpy(zero_copy_only=False)
    keep, report = resolve_bad_rows(
        findings,
        table.num_rows,
        on_bad_rows,
        paths=paths,
        sample_ids=sample_ids,
        locate=_locate_cost_row(column),
    )
    return costs, keep, report


def check_cost_column_in_files(paths: Sequence[str], column: str) -> None:
    """Before a run starts: every local parquet file under `paths` has `column`, numeric.
    Reads footers only; remote paths are left to the pipeline's own check."""
    import pyarrow.parquet as pq

    for path in paths:
        if "://" in path:
            continue
        files = [path]
        if os.path.isdir(path):
            files = sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(path)
                for name in names
                if name.endswith(".parquet")
            )
        for file in files:
            schema = pq.read_schema(file)
            if column not in schema.names:
                raise DataError(
                    "missing column",
                    path=file,
                    column=column,
                    hint=f"{SAMPLE_COST_FIELD} names it; the file has {', '.join(schema.names)}",
                )
            _check_type(schema.field(column).type, column, file)
