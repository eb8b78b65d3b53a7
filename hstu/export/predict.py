"""Scoring sample rows: with an export directory (`Predictor`) or a training checkpoint
(`CheckpointScorer`), one parquet file or directory in, one parquet file out (`predict_files`).

Output: one row per input row, in input order, with the input's reserved columns (sample_id,
user_id and the candidate ids, e.g. cand_seq__video_id, when present) and one list<float32>
column `probs_<task>` per task, holding one score per candidate, aligned with the candidate
ids. A row with no candidates gets empty lists.

Input rows are checked as in training (hstu.data.validate): a missing or mistyped column, ids
outside their table, decreasing timestamps, sequences of unequal length... raise DataError
naming file, row and column, or are dropped and counted with on_bad_rows="skip" (they are then
absent from the output).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hstu.data.validate import (
    BadRowReport,
    DataError,
    find_bad_rows,
    read_columns,
    requests_for,
    resolve_bad_rows,
)
from hstu.export import artifacts
from hstu.export.serving import (
    lengths_key,
    serving_inputs,
    with_filler_row,
    without_filler_scores,
)

SCORE_PREFIX = "probs_"


def score_column(task: str) -> str:
    return SCORE_PREFIX + task


class _RowScorer:
    """Shared by both scorers: check rows, call `_score`, regroup per row, keep columns."""

    features: list
    tasks: list[str]
    reserved: list[str]
    candidate_sequence: str

    def needed_columns(self) -> list[str]:
        names = list(dict.fromkeys(spec.column for spec in self.features))
        return names + [c for c in self.reserved if c not in names]

    def predict_table(
        self,
        table: pa.Table,
        *,
        source: str | None = None,
        row_offset: int = 0,
        on_bad_rows: str = "error",
        bad_rows: BadRowReport | None = None,
    ) -> pa.Table:
        """Scores for every row of `table` (see the module docstring)."""
        columns, findings = read_columns(table, requests_for(self.features, []), path=source)
        findings += find_bad_rows(columns, self.features, [])
        keep, report = resolve_bad_rows(
            findings,
            table.num_rows,
            on_bad_rows,  # type: ignore[arg-type]
            path=source,
            row_offset=row_offset,
            sample_ids=_sample_ids(table),
        )
        if bad_rows is not None:
            bad_rows.add(report)
        if keep is not None:
            columns = {name: column.take_rows(keep) for name, column in columns.items()}
            table = table.filter(pa.array(keep))
        candidate_lengths = self._candidate_lengths(columns)
        total = int(candidate_lengths.sum())
        if total:
            scores = self._score(table, columns)
        else:
            scores = {task: np.zeros(0, dtype=np.float32) for task in self.tasks}
        offsets = np.zeros(len(candidate_lengths) + 1, dtype=np.int32)
        np.cumsum(candidate_lengths, out=offsets[1:])
        output = {name: table.column(name) for name in self.reserved if name in table.column_names}
        for task in self.tasks:
            values = pa.array(np.asarray(scores[task], dtype=np.float32))
            output[score_column(task)] = pa.ListArray.from_arrays(pa.array(offsets), values)
        return pa.table(output)

    def _candidate_lengths(self, columns) -> np.ndarray:
        for spec in self.features:
            if spec.sequence == self.candidate_sequence:
                return columns[spec.column].lengths
        raise AssertionError("no candidate feature")  # the model requires one

    def _score(self, table: pa.Table, columns) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _input_tensors(self, columns) -> dict:
        """The exported model's inputs: each feature's values under its name, and each
        sequence's lengths once, under lengths_key, taken from that sequence's first feature."""
        tensors = {}
        for spec in self.features:
            column = columns[spec.column]
            tensors[spec.name] = _tensor(column.values)
            if spec.sequence is not None and lengths_key(spec.sequence) not in tensors:
                tensors[lengths_key(spec.sequence)] = _tensor(column.lengths.astype(np.int64))
        return tensors


def _sample_ids(table: pa.Table) -> np.ndarray | None:
    if "sample_id" in table.column_names:
        return table.column("sample_id").to_numpy()
    return None


class Predictor(_RowScorer):
    """Scores rows with the torch.export program of an export directory (CPU)."""

    def __init__(self, export_dir: str | os.PathLike) -> None:
        import torch

        from hstu.config.features import feature_specs
        from hstu.config.loader import load_config_text

        self.export_dir = Path(export_dir)
        manifest, program = artifacts.open_export_dir(self.export_dir)
        config_path = self.export_dir / artifacts.CONFIG_FILE
        cfg = load_config_text(config_path.read_text(encoding="utf-8"), str(config_path))
        self.features = feature_specs(cfg)
        self.spec = serving_inputs(self.features)
        expected = [dataclasses.asdict(item) for item in self.spec]
        if expected != manifest["inputs"]:
            raise artifacts.ExportDirError(
                f"{self.export_dir}: {artifacts.CONFIG_FILE} does not match the program's inputs "
                f"in {artifacts.MANIFEST_FILE} (edited by hand?); re-export"
            )
        self.manifest = manifest
        self.tasks = [task["name"] for task in manifest["tasks"]]
        self.reserved = list(manifest.get("reserved_columns", []))
        self.candidate_sequence = manifest["candidate_sequence"]
        self.module = program.module()
        self._torch = torch

    def _score(self, table: pa.Table, columns) -> dict[str, np.ndarray]:
        torch = self._torch
        inputs = with_filler_row(self._input_tensors(columns), self.spec)
        with torch.no_grad():
            scores = without_filler_scores(self.module(inputs))
        return {task: scores[task].numpy() for task in self.tasks}


class CheckpointScorer(_RowScorer):
    """Scores rows with the training model read from a DCP checkpoint (for comparing with an
    export, or scoring without one), on CPU, with the PYTORCH kernel unless `kernel` is given
    (the Triton kernels only run in the slow interpreter on CPU)."""

    def __init__(self, cfg, checkpoint: str | os.PathLike, *, kernel="PYTORCH") -> None:
        import torch

        from hstu.config.features import feature_specs
        from hstu.export.exporter import reserved_columns
        from hstu.train.checkpoint import load_for_inference

        self.model = load_for_inference(cfg, checkpoint, device="cpu")
        self.model.set_kernel(kernel)
        self.features = feature_specs(cfg)
        self.tasks = [task.name for task in self.model.tasks]
        self.reserved = reserved_columns(self.model)
        self.candidate_sequence = self.model.features[self.model.groups["candidate"][0]].sequence
        self._torch = torch

    def _score(self, table: pa.Table, columns) -> dict[str, np.ndarray]:
        from hstu.data.pipeline import arrow_to_batch

        batch = arrow_to_batch(table, self.features, [])
        with self._torch.no_grad():
            output = self.model(batch)
        return {task: output.probs[task].float().numpy() for task in self.tasks}


class CachedPredictor(_RowScorer):
    """Scores rows as Predictor does, keeping each user's history keys and values between rows
    (hstu/export/cached.py): for streams of requests where a user's history grows by a few
    actions from one row to the next. Rows of one user must come in the order of their
    requests (file order; within a batch, row order) for the cache to be used; any order gives
    correct scores in exact mode.

    Built from an export directory (the modules rebuilt from its pipeline.config with the
    program's weights: needs TorchRec importable) or from a ServingModule (`serving=`).
    key_column: the input column naming the user (default user_id)."""

    def __init__(
        self,
        export_dir: str | os.PathLike | None = None,
        *,
        policy=None,
        key_column: str = "user_id",
        serving=None,
        reserved: Sequence[str] | None = None,
    ) -> None:
        import torch

        from hstu.export.cached import CachedServing, load_serving_module

        if (export_dir is None) == (serving is None):
            raise ValueError("CachedPredictor needs an export directory or a ServingModule")
        if serving is None:
            try:
                serving = load_serving_module(export_dir)
            except ModuleNotFoundError as error:
                raise artifacts.ExportDirError(
                    f"cached scoring rebuilds the model's modules with hstu.model, which needs "
                    f"{error.name} (pip install torchrec, the version in requirements/); the "
                    "uncached mode needs only torch"
                ) from None
            manifest = artifacts.read_manifest(export_dir)
            reserved = list(manifest.get("reserved_columns", []))
        self.features = list(serving.features.values())
        self.spec = serving_inputs(self.features)
        self.tasks = list(serving.task_names)
        self.reserved = list(reserved or [])
        self.candidate_sequence = serving.candidate_sequence
        self.key_column = key_column
        if key_column not in self.reserved:
            self.reserved.append(key_column)  # read with the rows, so the key is there
        self.cached = CachedServing(serving, policy)
        self._torch = torch

    def cache_summary(self) -> dict:
        return self.cached.summary()

    def _score(self, table: pa.Table, columns) -> dict[str, np.ndarray]:
        if self.key_column not in table.column_names:
            raise DataError(
                "missing column",
                column=self.key_column,
                hint="cached scoring keys its cache by this column (--cache-key)",
            )
        # Rows without candidates have nothing to score (and cached scoring needs one).
        lengths = self._candidate_lengths(columns)
        keep = lengths > 0
        if not keep.all():
            columns = {name: column.take_rows(keep) for name, column in columns.items()}
            table = table.filter(pa.array(keep))
        inputs = self._input_tensors(columns)
        keys = table.column(self.key_column).to_pylist()
        scores = self.cached.score(inputs, keys)
        return {task: scores[task].float().numpy() for task in self.tasks}


def _tensor(array: np.ndarray):
    import torch

    # Arrow-backed numpy arrays are read-only; torch wants memory it may write.
    if not array.flags.writeable or not array.flags.c_contiguous:
        array = np.array(array)
    return torch.from_numpy(array)


def parquet_files(data: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Parquet files of the given files / directories (a directory: its *.parquet, sorted),
    with commas and glob patterns read as training reads them (expand_input_paths)."""
    from hstu.data.pipeline import expand_input_paths

    items = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    paths, missing = expand_input_paths([str(item) for item in items])
    if missing:
        raise FileNotFoundError(f"--data {missing[0]}: no such file or directory")
    files: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.parquet") if p.is_file())
            if not found:
                raise FileNotFoundError(f"--data {path}: no .parquet files in this directory")
            files += found
        else:
            files.append(path)
    return list(dict.fromkeys(files))  # a file named twice is scored once


def _batches(files: list[Path], columns: list[str], batch_size: int) -> Iterator:
    """(file, first row of the batch in that file, table) for every batch of every file."""
    for path in files:
        try:
            parquet = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as error:
            raise DataError(f"not a readable parquet file ({error})", path=str(path)) from None
        present = [name for name in columns if name in parquet.schema_arrow.names]
        row = 0
        for record_batch in parquet.iter_batches(batch_size=batch_size, columns=present):
            table = pa.Table.from_batches([record_batch])
            yield path, row, table
            row += table.num_rows


@dataclasses.dataclass
class PredictSummary:
    rows_in: int
    rows_out: int
    candidates: int
    files: int
    seconds: float
    bad_rows: BadRowReport
    out: str
    cache: dict | None = None  # CachedPredictor's counters (hstu.export.cached.CachedServing)


def predict_files(
    scorer: _RowScorer,
    data: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    batch_size: int = 256,
    on_bad_rows: str = "error",
    progress: bool = True,
) -> PredictSummary:
    """Score every row of the parquet `data` into the parquet file `out` (written to a
    temporary name, renamed when complete), printing progress to stderr."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    files = parquet_files(data)
    total_rows = sum(pq.ParquetFile(path).metadata.num_rows for path in files)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    started = last_report = time.perf_counter()
    rows_in = rows_out = candidates = 0
    bad_rows = BadRowReport()
    writer = None
    try:
        for path, row, table in _batches(files, scorer.needed_columns(), batch_size):
            result = scorer.predict_table(
                table,
                source=str(path),
                row_offset=row,
                on_bad_rows=on_bad_rows,
                bad_rows=bad_rows,
            )
            if writer is None:
                writer = pq.ParquetWriter(partial, result.schema)
            writer.write_table(result)
            rows_in += table.num_rows
            rows_out += result.num_rows
            candidates += _num_values(result, scorer.tasks[0])
            now = time.perf_counter()
            if progress and (now - last_report > 5.0 or rows_in == total_rows):
                last_report = now
                rate = rows_in / max(now - started, 1e-9)
                print(
                    f"predict: {rows_in:,}/{total_rows:,} rows ({100.0 * rows_in / max(total_rows, 1):.0f}%), "
                    f"{candidates:,} candidates, {rate:,.0f} rows/s",
                    file=sys.stderr,
                    flush=True,
                )
        if writer is None:
            raise DataError("no rows to score", path=", ".join(map(str, files)))
        writer.close()
        writer = None
        partial.replace(out)
    finally:
        if writer is not None:
            writer.close()
        if partial.exists():
            partial.unlink()
    return PredictSummary(
        rows_in=rows_in,
        rows_out=rows_out,
        candidates=candidates,
        files=len(files),
        seconds=time.perf_counter() - started,
        bad_rows=bad_rows,
        out=str(out),
        cache=scorer.cache_summary() if hasattr(scorer, "cache_summary") else None,
    )


def _num_values(table: pa.Table, task: str) -> int:
    return int(pc.sum(pc.list_value_length(table.column(score_column(task)))).as_py() or 0)


def dataframe_to_table(frame, scorer: _RowScorer) -> pa.Table:
    """A pandas DataFrame of sample rows -> an Arrow table with the column types the model reads
    (list columns may hold lists or numpy arrays; extra columns are ignored)."""
    columns = {}
    for request in requests_for(scorer.features, []):
        if request.column not in frame.columns:
            raise DataError(
                "missing column",
                path="model_input",
                column=request.column,
                hint=f"the DataFrame has {', '.join(map(str, frame.columns))}",
            )
        value_type = pa.int64() if request.value_dtype == "int64" else pa.float32()
        arrow_type = pa.list_(value_type) if request.is_list else value_type
        values = frame[request.column].tolist()
        if request.is_list:
            values = [None if v is None else list(v) for v in values]
        try:
            columns[request.column] = pa.array(values, type=arrow_type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as error:
            raise DataError(
                f"cannot be read as {arrow_type} ({error})",
                path="model_input",
                column=request.column,
            ) from None
    for name in scorer.reserved:
        if name not in columns and name in frame.columns:
            columns[name] = pa.array(frame[name].tolist())
    return pa.table(columns)
