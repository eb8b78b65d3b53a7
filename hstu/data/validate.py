"""Reading sample columns into numpy and finding bad rows, vectorised (it runs on every batch).

Two kinds of bad input:

- A column that is missing or has the wrong type is wrong for every row: it always raises
  `DataError`, whatever the bad-row policy, because there is no row to skip.
- A bad row (sequences of one row with different lengths, no candidates, a negative
  timestamp or one out of time order, an id outside its table, a negative label, a NaN or
  infinite float, a null, an unparsable element of a string-encoded sequence) raises
  `DataError` naming file, row and column under policy "error" (the default); under "skip"
  the row is dropped and counted by reason.

Nothing here loops over rows in Python: every check is a numpy expression over the flat values
of a column, and bad elements are mapped to their rows with a binary search on the offsets.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hstu.config.features import FeatureSpec, LabelSpec
from hstu.data.schema import SAMPLE_ID

BadRowPolicy = Literal["error", "skip"]
BAD_ROW_POLICIES: tuple[str, ...] = ("error", "skip")

# A whole number written as text. At most 18 digits, so that every match fits int64.
INT_PATTERN = r"^[+-]?[0-9]{1,18}$"
# A decimal number, or nan / inf / infinity in any case (the NaN check reports those).
_FLOAT_PATTERN = (
    r"^[+-]?(([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?"
    r"|[nN][aA][nN]|[iI][nN][fF]([iI][nN][iI][tT][yY])?)$"
)


class DataError(ValueError):
    """Bad input data. The message names the file, the row and the column where known.

    `row` is a 0-based row of a table (parquet files, batches); `line` is a 1-based line of a
    text file (CSV logs, the header being line 1). The message says which it is.
    """

    def __init__(
        self,
        problem: str,
        *,
        path: str | None = None,
        row: int | None = None,
        line: int | None = None,
        column: str | None = None,
        sample_id: int | None = None,
        hint: str | None = None,
    ):
        self.problem = problem
        self.path = path
        self.row = row
        self.line = line
        self.column = column
        self.sample_id = sample_id
        where = []
        if path is not None:
            where.append(f"file {path}")
        if row is not None:
            where.append(f"row {row} (0-based)")
        if line is not None:
            where.append(f"line {line}")
        if sample_id is not None:
            where.append(f"sample_id {sample_id}")
        if column is not None:
            where.append(f"column {column!r}")
        message = (", ".join(where) + ": " if where else "") + problem
        if hint:
            message += f" ({hint})"
        super().__init__(message)


@dataclasses.dataclass
class Column:
    """One column of a batch as numpy: flat `values`, plus int64 `lengths` [B] for a list column
    (None for a scalar column, which has exactly one value per row)."""

    values: np.ndarray
    lengths: np.ndarray | None = None
    _offsets: np.ndarray | None = dataclasses.field(default=None, repr=False)

    @property
    def offsets(self) -> np.ndarray:
        if self._offsets is None:
            assert self.lengths is not None
            offsets = np.zeros(len(self.lengths) + 1, dtype=np.int64)
            np.cumsum(self.lengths, out=offsets[1:])
            self._offsets = offsets
        return self._offsets

    def rows_of(self, element_indices: np.ndarray) -> np.ndarray:
        """Row index of each flat element index."""
        if self.lengths is None:
            return element_indices
        return np.searchsorted(self.offsets, element_indices, side="right") - 1

    def take_rows(self, keep: np.ndarray) -> Column:
        if self.lengths is None:
            return Column(self.values[keep])
        return Column(self.values[np.repeat(keep, self.lengths)], self.lengths[keep])


@dataclasses.dataclass
class Finding:
    """Rows (bool mask [B]) that break one rule in one column."""

    column: str
    problem: str
    bad: np.ndarray

    @property
    def reason(self) -> str:
        return f"{self.column}: {self.problem}"


@dataclasses.dataclass
class ColumnRequest:
    """What the reader expects of a column: list or scalar, int64 or float32 values, and for a
    list stored as a string, the separator of its elements."""

    column: str
    is_list: bool
    value_dtype: Literal["int64", "float32"]
    delimiter: str = ";"


def requests_for(
    features: Sequence[FeatureSpec], labels: Sequence[LabelSpec]
) -> list[ColumnRequest]:
    """One request per distinct column the specs read (features sharing a column read it once)."""
    requests: dict[str, ColumnRequest] = {}
    for spec in features:
        dtype = "int64" if spec.kind == "id" else spec.value_dtype
        is_list = spec.sequence is not None
        delimiter = spec.sequence_delim if is_list else ";"
        _add_request(requests, ColumnRequest(spec.column, is_list, dtype, delimiter))
    for label in labels:
        request = ColumnRequest(label.column, True, label.value_dtype, label.sequence_delim)
        _add_request(requests, request)
    return list(requests.values())


def _add_request(requests: dict[str, ColumnRequest], request: ColumnRequest) -> None:
    seen = requests.get(request.column)
    if seen is not None and seen != request:
        raise ValueError(
            f"column {request.column!r} is read twice with different types: {seen} and {request}"
        )
    requests[request.column] = request


def read_columns(
    table: pa.Table | pa.RecordBatch,
    requests: Sequence[ColumnRequest],
    *,
    path: str | None = None,
) -> tuple[dict[str, Column], list[Finding]]:
    """Arrow -> numpy for every requested column, plus the rows found bad while decoding
    (nulls, unparsable elements of string-encoded sequences). Raises DataError for a missing
    or mistyped column, or one whose values do not convert to int64 / float32."""
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    columns: dict[str, Column] = {}
    findings: list[Finding] = []
    for request in requests:
        if request.column not in table.column_names:
            raise DataError(
                "missing column",
                path=path,
                column=request.column,
                hint=f"the file has {', '.join(table.column_names)}",
            )
        chunks = table.column(request.column).chunks or [
            pa.array([], type=table.schema.field(request.column).type)
        ]
        parts = [_read_chunk(chunk, request, path) for chunk in chunks]
        values = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        lengths = None
        if request.is_list:
            lengths = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
        columns[request.column] = Column(values, lengths)
        for problem in {problem for part in parts for problem in part[2]}:
            bad = np.concatenate([p[2].get(problem, np.zeros(p[3], bool)) for p in parts])
            findings.append(Finding(request.column, problem, bad))
    return columns, findings


def _read_chunk(
    array: pa.Array, request: ColumnRequest, path: str | None
) -> tuple[np.ndarray, np.ndarray | None, dict[str, np.ndarray], int]:
    """(values, lengths, {problem: bad-row mask}, number of rows) for one Arrow chunk."""
    num_rows = len(array)
    problems: dict[str, np.ndarray] = {}
    array_type = array.type
    if pa.types.is_dictionary(array_type):
        array = array.dictionary_decode()
        array_type = array.type

    if not request.is_list:
        if not pa.types.is_integer(array_type):
            raise _mistyped(request, array_type, path)
        if array.null_count:
            problems["null value"] = array.is_null().to_numpy(zero_copy_only=False)
            array = array.fill_null(0)
        values = _cast(array, request, path).to_numpy(zero_copy_only=False)
        return values, None, problems, num_rows

    if pa.types.is_string(array_type) or pa.types.is_large_string(array_type):
        array, problems = _decode_delimited(array, request, path)
        array_type = array.type
    if not (pa.types.is_list(array_type) or pa.types.is_large_list(array_type)):
        raise _mistyped(request, array_type, path)
    value_type = array_type.value_type
    value_ok = pa.types.is_integer(value_type) or (
        request.value_dtype == "float32" and pa.types.is_floating(value_type)
    )
    if not value_ok:
        raise _mistyped(request, array_type, path)

    if array.null_count:
        problems["null list"] = array.is_null().to_numpy(zero_copy_only=False)
    lengths = pc.list_value_length(array).fill_null(0).to_numpy(zero_copy_only=False)
    lengths = lengths.astype(np.int64, copy=False)
    flat = pc.list_flatten(array)
    if flat.null_count:
        null_elements = np.flatnonzero(flat.is_null().to_numpy(zero_copy_only=False))
        bad = np.zeros(num_rows, dtype=bool)
        bad[Column(np.empty(0), lengths).rows_of(null_elements)] = True
        problems["null element"] = bad
        flat = flat.fill_null(0)
    values = _cast(flat, request, path).to_numpy(zero_copy_only=False)
    return values, lengths, problems, num_rows


def _cast(array: pa.Array, request: ColumnRequest, path: str | None) -> pa.Array:
    """Values -> int64 or float32. Float features take any number: an integer above 2**24
    (e.g. a watch time of 20,000,000 ms) or a double rounds to the nearest float32, and a
    double beyond float32's range becomes inf, which the NaN/inf check reports per row. A
    conversion that still fails (an unsigned id above 2**63) names the file and column."""
    is_float = request.value_dtype == "float32"
    target = pa.float32() if is_float else pa.int64()
    try:
        return array.cast(target, safe=not is_float)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
        raise DataError(
            f"values of type {array.type} do not convert to {target} ({error})",
            path=path,
            column=request.column,
        ) from None


def delimited_element_counts(array: pa.Array | pa.ChunkedArray, delimiter: str) -> np.ndarray:
    """Elements per string-encoded sequence: separators + 1, and 0 for "" or a null."""
    count = pc.add(pc.count_substring(array, delimiter), 1)
    count = pc.if_else(pc.equal(array, ""), 0, count)
    return count.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)


def _decode_delimited(
    array: pa.Array, request: ColumnRequest, path: str | None
) -> tuple[pa.Array, dict[str, np.ndarray]]:
    """'12|884|93' strings (split at request.delimiter) -> list<int64> / list<float32>, with
    the rows whose elements do not parse. An empty string is an empty sequence; a null string
    stays null."""
    problems: dict[str, np.ndarray] = {}
    parts = pc.split_pattern(array, request.delimiter)
    lengths = pc.list_value_length(parts).fill_null(0).to_numpy(zero_copy_only=False)
    elements = pc.utf8_trim_whitespace(pc.list_flatten(parts))
    # "" splits into one empty element; it means an empty sequence.
    empty_row = pc.equal(array, "").fill_null(False).to_numpy(zero_copy_only=False)
    if empty_row.any():
        keep = ~np.repeat(empty_row, lengths)
        elements = elements.filter(pa.array(keep))
        lengths = np.where(empty_row, 0, lengths)
    is_int = request.value_dtype == "int64"
    pattern = INT_PATTERN if is_int else _FLOAT_PATTERN
    parsable = pc.match_substring_regex(elements, pattern).to_numpy(zero_copy_only=False)
    if not parsable.all():
        column = Column(np.empty(0), lengths.astype(np.int64))
        bad = np.zeros(len(array), dtype=bool)
        bad[column.rows_of(np.flatnonzero(~parsable))] = True
        # The separator is part of the message: data split at the wrong one reads as
        # "12;884" elements, and the config's sequence_delim is then what to check.
        number = "whole number" if is_int else "number"
        problems[f"element not a {number} (split at {request.delimiter!r})"] = bad
        elements = pc.if_else(pa.array(parsable), elements, "0")
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    mask = array.is_null() if array.null_count else None
    values = _cast(elements, request, path)
    decoded = pa.ListArray.from_arrays(pa.array(offsets), values, mask=mask)
    return decoded, problems


def _mistyped(request: ColumnRequest, actual: pa.DataType, path: str | None) -> DataError:
    element = "int64" if request.value_dtype == "int64" else "float32 (or an integer type)"
    expected = f"list<{element}>" if request.is_list else "an integer type"
    if request.is_list:
        expected += f" or a {request.delimiter!r}-delimited string"
    hint = None
    if request.value_dtype == "int64" and request.is_list:
        hint = "ids, bitmasks and timestamps must be integers; timestamps are int64 seconds"
    return DataError(
        f"type {actual}, expected {expected}", path=path, column=request.column, hint=hint
    )


def find_bad_rows(
    columns: dict[str, Column],
    features: Sequence[FeatureSpec],
    labels: Sequence[LabelSpec],
) -> list[Finding]:
    """Every rule a row can break, checked on whole columns at once."""
    findings: list[Finding] = []
    rows = row_count(columns)

    def flag(column: str, problem: str, element_indices: np.ndarray) -> None:
        if len(element_indices):
            bad = np.zeros(rows, dtype=bool)
            bad[columns[column].rows_of(element_indices)] = True
            findings.append(Finding(column, problem, bad))

    # Every column of one sequence has the same length in a row.
    by_sequence: dict[str, list[str]] = {}
    for spec in features:
        if spec.sequence is not None:
            _append_once(by_sequence.setdefault(spec.sequence, []), spec.column)
    for label in labels:
        _append_once(by_sequence.setdefault(label.sequence, []), label.column)
    for sequence, names in by_sequence.items():
        reference = columns[names[0]].lengths
        for name in names[1:]:
            differs = columns[name].lengths != reference
            if differs.any():
                findings.append(
                    Finding(name, f"length differs from {names[0]!r} in the same sequence", differs)
                )

    # A row must have something to score: the sequence its labels are aligned with is not empty.
    for sequence in dict.fromkeys(label.sequence for label in labels):
        if sequence in by_sequence:
            name = by_sequence[sequence][0]
            empty = columns[name].lengths == 0
            if empty.any():
                findings.append(Finding(name, f"no candidates (empty {sequence})", empty))

    for spec in features:
        column = columns[spec.column]
        if spec.kind == "id":
            flag(spec.column, "negative id", np.flatnonzero(column.values < 0))
            # A zch feature's ids may be any value: the model maps them to its rows.
            if spec.num_buckets is not None and spec.zch is None:
                too_big = np.flatnonzero(column.values >= spec.num_buckets)
                flag(spec.column, f"id >= num_buckets {spec.num_buckets}", too_big)
        elif spec.is_timestamp:
            flag(spec.column, "negative timestamp", np.flatnonzero(column.values < 0))
            if spec.timestamps_ascending:
                flag(spec.column, "decreasing timestamp", _out_of_order(column, ascending=True))
            else:
                flag(
                    spec.column,
                    "increasing timestamp (sequence_timestamp_is_ascending is false: "
                    "newest first)",
                    _out_of_order(column, ascending=False),
                )
    for label in labels:
        # A bitmask label is tested with `& task_bitmask`: -1 would be positive for every task.
        if label.value_dtype == "int64":
            values = columns[label.column].values
            flag(label.column, "negative label", np.flatnonzero(values < 0))
    for name, column in columns.items():
        if column.values.dtype.kind == "f":
            flag(name, "NaN or infinite value", np.flatnonzero(~np.isfinite(column.values)))
    return findings


def _append_once(names: list[str], name: str) -> None:
    if name not in names:
        names.append(name)


def _out_of_order(column: Column, *, ascending: bool) -> np.ndarray:
    """Flat indices of elements smaller (ascending) or larger (descending) than the element
    before them in the same row. Equal neighbours are in order either way."""
    steps = np.diff(column.values)
    drops = np.flatnonzero(steps < 0 if ascending else steps > 0) + 1
    if len(drops) == 0 or column.lengths is None:
        return drops
    # A step into the first element of a row compares two different rows: not out of order.
    row_starts = column.offsets[column.rows_of(drops)]
    return drops[drops != row_starts]


def row_count(columns: dict[str, Column]) -> int:
    """Rows of a batch read by read_columns (0 when no column was read)."""
    for column in columns.values():
        return len(column.lengths) if column.lengths is not None else len(column.values)
    return 0


@dataclasses.dataclass
class BadRowReport:
    """Rows dropped under policy 'skip', by reason ('column: problem'). A row that breaks
    several rules counts once in `rows` and once under each reason."""

    rows: int = 0
    by_reason: Counter = dataclasses.field(default_factory=Counter)

    def add(self, other: BadRowReport) -> None:
        self.rows += other.rows
        self.by_reason.update(other.by_reason)


def resolve_bad_rows(
    findings: list[Finding],
    num_rows: int,
    policy: BadRowPolicy,
    *,
    path: str | None = None,
    row_offset: int = 0,
    paths: np.ndarray | None = None,
    sample_ids: np.ndarray | None = None,
    specs: tuple[Sequence[FeatureSpec], Sequence[LabelSpec]] | None = None,
    locate: Callable[[str, Finding, int | None], tuple[int | None, str | None]] | None = None,
) -> tuple[np.ndarray | None, BadRowReport]:
    """Apply the policy: raise for the first bad row, or return the mask of rows to keep.

    `paths` (per row) overrides `path` when rows come from several files (a Ray Data batch);
    `row_offset` is added to the row index when `path` is one file read from its first row.
    `specs` (features, labels): with `paths`, the error finds the bad row's row in its file
    (locate_row_in_file); without them, or when the file cannot be read, it gives the row of
    the batch. `locate(path, finding, sample_id)` replaces locate_row_in_file for rules that
    are not the specs' (it returns the same pair).
    """
    if policy not in BAD_ROW_POLICIES:
        raise ValueError(f"on_bad_rows must be one of {BAD_ROW_POLICIES}, not {policy!r}")
    report = BadRowReport()
    if not findings:
        return None, report
    if policy == "error":
        first = min(findings, key=lambda f: int(np.argmax(f.bad)))
        row = int(np.argmax(first.bad))
        sample_id = None if sample_ids is None else int(sample_ids[row])
        if paths is not None:
            # Rows from several files (a Ray batch): find the row in its file (this is the
            # error path, so reading the file once is affordable); the batch row otherwise.
            row_path, file_row, problem = str(paths[row]), None, first.problem
            if locate is not None:
                file_row, why_not = locate(row_path, first, sample_id)
            elif specs is not None:
                file_row, why_not = locate_row_in_file(
                    row_path, first, *specs, sample_id=sample_id
                )
            else:
                why_not = "no specs given to find it"
            if file_row is None:
                problem += (
                    f" (row {row} of the batch, 0-based; its row in the file is not known: "
                    f"{why_not})"
                )
            elif why_not == FOUND_BY_RULE:
                # Maybe another row than the batch's (two rows breaking one rule): say how it
                # was found, and drop the batch row's sample_id, which may not be this row's.
                problem += f" ({FOUND_BY_RULE})"
                sample_id = None
        else:
            # One file read from row_offset on, or a table with no file behind it.
            row_path, file_row, problem = path, row + row_offset, first.problem
        raise DataError(
            problem,
            path=row_path,
            row=file_row,
            column=first.column,
            sample_id=sample_id,
            hint="to skip and count such rows instead: data_config.on_bad_rows: SKIP in training "
            "(--set data_config.on_bad_rows=SKIP), --on-bad-rows skip for prepare and predict",
        )
    bad = np.zeros(num_rows, dtype=bool)
    for finding in findings:
        bad |= finding.bad
        report.by_reason[finding.reason] += int(finding.bad.sum())
    report.rows = int(bad.sum())
    return ~bad, report


# Rows per read when a file is searched for a bad row.
LOCATE_READ_ROWS = 8192
# locate_row_in_file's note for a row found by re-checking the file rather than by sample_id.
FOUND_BY_RULE = "the file's first row breaking this rule"


def locate_row_in_file(
    path: str,
    finding: Finding,
    features: Sequence[FeatureSpec],
    labels: Sequence[LabelSpec],
    *,
    sample_id: int | None = None,
) -> tuple[int | None, str | None]:
    """The 0-based row of `path` behind a bad row found in a batch of rows from several files:
    (row, None) when found by its sample_id, (row, FOUND_BY_RULE) when found by re-checking
    the file, or (None, why not) when the file cannot be read.

    With the row's sample_id and a sample_id column in the file, the row holding that id (one
    column read). Otherwise the file is checked with the same rules as the batch, a block of
    rows at a time, and the first row that breaks the same rule (column and problem) is
    returned. Only the error path calls this: it reads the file once at most.
    """
    import pyarrow.parquet as pq

    if "://" in path or not os.path.isfile(path):
        return None, f"{path} is not a local file"
    try:
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
        row = row_of_sample_id(parquet, sample_id)
        if row is not None:
            return row, None
        requests = requests_for(features, labels)
        columns = [r.column for r in requests if r.column in names]
        offset = 0
        for batch in parquet.iter_batches(batch_size=LOCATE_READ_ROWS, columns=columns):
            found, findings = read_columns(batch, requests, path=path)
            findings += find_bad_rows(found, features, labels)
            for candidate in findings:
                if (candidate.column, candidate.problem) == (finding.column, finding.problem):
                    return offset + int(np.argmax(candidate.bad)), FOUND_BY_RULE
            offset += batch.num_rows
    except (OSError, pa.ArrowException, DataError) as error:
        return None, f"reading {path} failed: {error}"
    return None, f"no row of {path} breaks this rule when read again"


def row_of_sample_id(parquet, sample_id: int | None) -> int | None:
    """The 0-based row of an open pyarrow ParquetFile that holds `sample_id`, or None (no id
    given, no sample_id column, one of another type, or no such row)."""
    if sample_id is None or SAMPLE_ID not in parquet.schema_arrow.names:
        return None
    ids = parquet.read(columns=[SAMPLE_ID]).column(SAMPLE_ID)
    try:
        same = pc.equal(ids, sample_id).fill_null(False)
    except pa.ArrowException:  # a sample_id column of another type: the caller uses its rules
        return None
    matches = np.flatnonzero(same.to_numpy(zero_copy_only=False))
    return int(matches[0]) if len(matches) else None


def validate_table(
    table: pa.Table,
    features: Sequence[FeatureSpec],
    labels: Sequence[LabelSpec],
    *,
    path: str | None = None,
    row_offset: int = 0,
    on_bad_rows: BadRowPolicy = "error",
) -> BadRowReport:
    """Check a whole table (e.g. one sample file) against the specs; see the module docstring."""
    columns, findings = read_columns(table, requests_for(features, labels), path=path)
    findings += find_bad_rows(columns, features, labels)
    sample_ids = table.column(SAMPLE_ID).to_numpy() if SAMPLE_ID in table.column_names else None
    _, report = resolve_bad_rows(
        findings,
        table.num_rows,
        on_bad_rows,
        path=path,
        row_offset=row_offset,
        sample_ids=sample_ids,
    )
    return report
