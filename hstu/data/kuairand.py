"""Raw KuaiRand logs -> user-window samples (parquet shards + manifest.json).

Two passes, each over bounded pieces, so the full KuaiRand-27K logs (hundreds of millions of
rows) convert without holding them in memory, and each pass can run as parallel Ray tasks:

1. Partition (one task per log file): stream the CSV in blocks; check each row; turn its
   event columns into the action bitmask, time_ms into seconds, play_time_ms into the watch
   time; append the row to the bucket file of its user (user_id % buckets).
2. Build (one task per bucket): load the bucket (all interactions of its users), sort by
   (user, time, input order), cut each user's timeline into windows (hstu.data.windows), join
   the user profile (and video side info for the MTGR columns) and write parquet shards.

Sample layout per user, interactions sorted by time:
- interactions before the split time are training candidates, the others eval candidates;
  each period is cut into consecutive windows of at most `max_candidates`, from its start;
- a window's history (UIH) is every earlier interaction of the user, the most recent
  `max_seq_len - contextual - max_candidates` of them (eval windows see the training period);
- a candidate's query time is the time of its window's first interaction (the request that
  opened the window), shared by the window's candidates; `candidate_query_time="own"` keeps each
  candidate's own time instead (hstu.data.windows.CANDIDATE_QUERY_TIMES says why and when).
"""

from __future__ import annotations

import dataclasses
import datetime
import glob
import json
import logging
import math
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
from pyarrow import ipc

from hstu.data import schema
from hstu.data.layout import RecipeLayout, apply_layout, layout_schema
from hstu.data.validate import BAD_ROW_POLICIES, INT_PATTERN, DataError, validate_table
from hstu.data.windows import (
    Windows,
    cross_codes,
    histogram_labels,
    length_histogram,
    plan_windows,
    windows_to_table,
)

logger = logging.getLogger(__name__)

EVENT_COLUMNS = tuple(schema.ACTION_BITS)
# Raw log columns the converter needs (after --column-map), in KuaiRand's names.
LOG_COLUMNS = ("user_id", "video_id", "time_ms", "play_time_ms") + EVENT_COLUMNS
# Columns that must not be negative.
NON_NEGATIVE = ("user_id", "video_id", "time_ms", "play_time_ms")
# Raw video columns behind the MTGR side info.
VIDEO_CATE1_SOURCE = "upload_type"
VIDEO_CATE2_SOURCE = "tag"  # the first tag of a comma-separated list
VIDEO_AUTHOR_SOURCE = "author_id"
PROGRESS_SECONDS = 5.0
# Samples per parquet write: bounds the memory of one write (tokens across the chunk's rows).
CHUNK_TOKENS = 4_000_000


@dataclasses.dataclass(frozen=True)
class ColumnExpr:
    """How a log column is computed from the file's columns (--column-map TARGET=EXPR):
    EXPR is a column name, `1-NAME` (complement of a 0/1 column) or an integer constant."""

    source: str | None
    complement: bool = False
    constant: int | None = None

    @staticmethod
    def parse(text: str) -> ColumnExpr:
        text = text.strip()
        if re.fullmatch(r"[+-]?\d+", text):
            return ColumnExpr(None, constant=int(text))
        match = re.fullmatch(r"1\s*-\s*(\S+)", text)
        if match:
            return ColumnExpr(match.group(1), complement=True)
        if not text:
            raise ValueError("empty column expression")
        return ColumnExpr(text)

    def describe(self) -> str:
        if self.constant is not None:
            return str(self.constant)
        return f"1-{self.source}" if self.complement else str(self.source)


def parse_column_map(items: Sequence[str]) -> dict[str, ColumnExpr]:
    """['is_like=label', 'is_hate=1-label'] -> {target: expression}."""
    mapping: dict[str, ColumnExpr] = {}
    for item in items:
        target, sep, expr = item.partition("=")
        target = target.strip()
        if not sep or not target:
            raise ValueError(f"--column-map {item!r}: expected TARGET=EXPR, e.g. is_like=label")
        if target not in LOG_COLUMNS:
            raise ValueError(
                f"--column-map {item!r}: {target!r} is not a log column ({', '.join(LOG_COLUMNS)})"
            )
        try:
            mapping[target] = ColumnExpr.parse(expr)
        except ValueError as error:
            raise ValueError(f"--column-map {item!r}: {error}") from None
    return mapping


@dataclasses.dataclass(frozen=True)
class KuaiRandOptions:
    logs: tuple[str, ...]
    user_features: str
    out: str
    video_features: str | None = None
    max_candidates: int = 100
    max_seq_len: int = 8000
    contextual: int = 6
    min_history: int = 0
    # Interactions at or after split_time (int64 seconds) are eval candidates. Without it,
    # split_time is the time after which eval_fraction of all valid interactions lie.
    split_time: int | None = None
    eval_fraction: float = 0.1
    column_map: tuple[tuple[str, str], ...] = ()
    on_bad_rows: str = "error"
    buckets: int | None = None  # default: about one bucket per 128 MB of logs
    # Video ids are taken modulo this (Meta's and TorchEasyRec's "hashed" 27K tables use 10M,
    # the recipes' table size); 0 keeps them as they are. Side info joins on the raw id.
    video_id_buckets: int = 10_000_000
    workers: int = 1
    block_size: int = 16 << 20
    overwrite: bool = False
    keep_buckets: bool = False
    candidate_query_time: str = "window_start"  # or "own": see windows.CANDIDATE_QUERY_TIMES
    # Write the columns a recipe reads instead of the sample schema (hstu/data/layout.py).
    layout: RecipeLayout | None = None

    @property
    def max_history(self) -> int:
        return self.max_seq_len - self.contextual - self.max_candidates

    def check(self) -> None:
        if not self.logs:
            raise ValueError("no --log files given")
        for path in (*self.logs, self.user_features, self.video_features):
            if path is not None and not os.path.isfile(path):
                raise FileNotFoundError(f"no such file: {path}")
        if self.max_candidates < 1:
            raise ValueError("--max-candidates must be >= 1")
        if self.contextual < 0 or self.min_history < 0:
            raise ValueError("--contextual and --min-history must be >= 0")
        if self.max_history < 1:
            raise ValueError(
                f"--max-seq-len {self.max_seq_len} leaves no room for history: it must exceed "
                f"--contextual {self.contextual} + --max-candidates {self.max_candidates}"
            )
        if self.split_time is None and not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError("--eval-fraction must be in [0, 1)")
        if self.on_bad_rows not in BAD_ROW_POLICIES:
            raise ValueError(f"--on-bad-rows must be one of {BAD_ROW_POLICIES}")
        if self.buckets is not None and not 1 <= self.buckets <= 4096:
            raise ValueError("--buckets must be in [1, 4096]")
        if self.video_id_buckets < 0:
            raise ValueError("--video-id-buckets must be >= 0")
        if self.layout is not None and self.layout.needs_side_info and not self.video_features:
            raise ValueError(
                f"{self.layout.recipe} reads item side info (video_cate1/2, user_video_cross1/2):"
                " pass --video-features"
            )
        parse_column_map([f"{k}={v}" for k, v in self.column_map])


# ---------------------------------------------------------------------------------------------
# Side tables: user profiles and video side info (small: one row per user / video).


@dataclasses.dataclass
class CodedTable:
    """Rows keyed by a sorted int64 id, with int64 code columns (0 = unknown id)."""

    ids: np.ndarray
    columns: dict[str, np.ndarray]
    # Per coded column: raw value -> code, saved beside the output.
    mappings: dict[str, dict[str, int]]

    def lookup(self, ids: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Codes for `ids` (0 where unknown) and the mask of known ids."""
        position = np.searchsorted(self.ids, ids)
        clipped = np.minimum(position, max(len(self.ids) - 1, 0))
        known = (position < len(self.ids)) & (self.ids[clipped] == ids if len(self.ids) else False)
        return {
            name: np.where(known, values[clipped], 0) for name, values in self.columns.items()
        }, known


def _read_side_csv(
    path: str, needed: Sequence[str], id_column: str
) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """(table in file order, its ids, the permutation that sorts them). Values are strings."""
    delimiter = _sniff_delimiter(path)
    header = _header(path, delimiter)
    missing = [c for c in needed if c not in header]
    if missing:
        raise DataError(
            f"missing column(s) {', '.join(missing)}",
            path=path,
            hint=f"the file has {', '.join(header)}",
        )
    table = pcsv.read_csv(
        path,
        parse_options=pcsv.ParseOptions(delimiter=delimiter),
        convert_options=pcsv.ConvertOptions(
            include_columns=list(needed),
            column_types={c: pa.string() for c in needed},
            strings_can_be_null=False,
        ),
    )
    ids, bad = _parse_int(table.column(id_column))
    if bad is not None:
        row = int(np.argmax(bad))
        raise DataError(
            "id is missing or not a whole number",
            path=path,
            line=row + 2,  # 1-based, after the header line
            column=id_column,
        )
    order = np.argsort(ids, kind="stable")
    duplicate = np.flatnonzero(ids[order][1:] == ids[order][:-1])
    if len(duplicate):
        row = int(order[duplicate[0] + 1])
        raise DataError(
            f"duplicate id {ids[row]}",
            path=path,
            line=row + 2,
            column=id_column,
        )
    return table, ids, order


def _dense_codes(values: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, dict[str, int]]:
    """Dense 1-based codes in order of first appearance (0 stays free for 'unknown')."""
    encoded = pc.dictionary_encode(values)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks()
    codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64) + 1
    mapping = {str(v): i + 1 for i, v in enumerate(encoded.dictionary.to_pylist())}
    return codes, mapping


def load_user_profiles(path: str) -> CodedTable:
    """user_features CSV -> profile codes per user_id, in order of first appearance."""
    table, ids, order = _read_side_csv(
        path, (schema.USER_ID, *schema.PROFILE_COLUMNS), schema.USER_ID
    )
    columns, mappings = {}, {}
    for name in schema.PROFILE_COLUMNS:
        codes, mappings[name] = _dense_codes(table.column(name))
        columns[name] = codes[order]
    return CodedTable(ids[order], columns, mappings)


def load_video_features(path: str) -> CodedTable:
    """video features CSV -> cate1 (upload_type code), cate2 (first tag code), author id."""
    table, ids, order = _read_side_csv(
        path,
        ("video_id", VIDEO_AUTHOR_SOURCE, VIDEO_CATE1_SOURCE, VIDEO_CATE2_SOURCE),
        "video_id",
    )
    cate1, cate1_map = _dense_codes(table.column(VIDEO_CATE1_SOURCE))
    first_tag = pc.utf8_trim_whitespace(
        pc.list_element(pc.split_pattern(table.column(VIDEO_CATE2_SOURCE), ","), 0)
    )
    cate2, cate2_map = _dense_codes(first_tag)
    # An empty tag is "no tag": cate2 0, like an unknown video, and it never matches in cross2.
    if "" in cate2_map:
        cate2 = np.where(cate2 == cate2_map.pop(""), 0, cate2)
    authors, bad = _parse_int(table.column(VIDEO_AUTHOR_SOURCE))
    # Author key for cross1: author_id + 1, so that 0 is free for "unknown".
    author_key = np.where(bad, 0, authors + 1) if bad is not None else authors + 1
    return CodedTable(
        ids[order],
        {"video_cate1": cate1[order], "video_cate2": cate2[order], "author": author_key[order]},
        {"video_cate1": cate1_map, "video_cate2": cate2_map},
    )


# ---------------------------------------------------------------------------------------------
# Pass 1: partition the logs by user.


def _sniff_delimiter(path: str) -> str:
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        first = f.readline()
    return "\t" if first.count("\t") > first.count(",") else ","


def _header(path: str, delimiter: str) -> list[str]:
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        return [name.strip().strip('"') for name in f.readline().rstrip("\r\n").split(delimiter)]


def _parse_int(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray | None]:
    """Strings -> int64, and the mask of values that are empty or not whole numbers (None
    when all parse). The fast path is one Arrow cast; the regex runs only if it fails."""
    try:
        return pc.cast(column, pa.int64()).to_numpy(zero_copy_only=False), None
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    trimmed = pc.utf8_trim_whitespace(column)
    ok = pc.match_substring_regex(trimmed, INT_PATTERN)
    values = pc.cast(pc.if_else(ok, trimmed, "0"), pa.int64()).to_numpy(zero_copy_only=False)
    return values, ~ok.to_numpy(zero_copy_only=False)


def log_columns(path: str, options: KuaiRandOptions) -> tuple[dict[str, ColumnExpr], str, list]:
    """(log column -> expression, delimiter, file columns to read); DataError naming the file
    when a needed column is not in its header."""
    mapping = parse_column_map([f"{k}={v}" for k, v in options.column_map])
    exprs = {name: mapping.get(name, ColumnExpr(name)) for name in LOG_COLUMNS}
    delimiter = _sniff_delimiter(path)
    header = _header(path, delimiter)
    sources = sorted({e.source for e in exprs.values() if e.source is not None})
    missing = [s for s in sources if s not in header]
    if missing:
        raise DataError(
            f"missing column(s) {', '.join(missing)}",
            path=path,
            hint=f"the file has {', '.join(header)}; map columns with --column-map, "
            "e.g. is_like=label is_hate=1-label",
        )
    return exprs, delimiter, sources


@dataclasses.dataclass
class PartitionResult:
    path: str
    rows: int = 0
    malformed_lines: int = 0
    bad_rows: Counter = dataclasses.field(default_factory=Counter)
    skipped_rows: int = 0
    minutes: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    minute_counts: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))


def partition_log(
    file_index: int,
    path: str,
    options: KuaiRandOptions,
    bucket_dir: str,
    num_buckets: int,
) -> PartitionResult:
    """Pass 1 for one log file (see the module docstring). Raises DataError for a bad row
    under on_bad_rows='error'."""
    result = PartitionResult(path)
    exprs, delimiter, sources = log_columns(path, options)

    malformed: list[str] = []

    def on_malformed(row) -> str:
        malformed.append(row.text[:200])
        if options.on_bad_rows == "error":
            return "error"
        return "skip"

    def unreadable(error: pa.ArrowInvalid) -> DataError:
        if malformed:
            return DataError(
                f"malformed line (wrong number of fields): {malformed[-1]!r}",
                path=path,
                hint="pass --on-bad-rows skip to skip and count such lines",
            )
        return DataError(f"unreadable CSV: {error}", path=path)

    try:
        reader = pcsv.open_csv(
            path,
            read_options=pcsv.ReadOptions(block_size=options.block_size),
            parse_options=pcsv.ParseOptions(delimiter=delimiter, invalid_row_handler=on_malformed),
            convert_options=pcsv.ConvertOptions(
                include_columns=sources,
                column_types={s: pa.string() for s in sources},
                strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid as error:
        raise unreadable(error) from None
    writers: dict[int, ipc.RecordBatchFileWriter] = {}
    minutes: list[np.ndarray] = []
    last_report = time.perf_counter()
    try:
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            except pa.ArrowInvalid as error:
                raise unreadable(error) from None
            first_row = result.rows
            result.rows += batch.num_rows
            rows = _log_rows(batch, exprs, path, first_row, len(malformed), options, result)
            if rows is None:
                continue
            minute, count = np.unique(rows["timestamp"] // 60, return_counts=True)
            minutes.append(np.stack([minute, count]))
            _write_buckets(rows, file_index, num_buckets, bucket_dir, writers)
            now = time.perf_counter()
            if now - last_report > PROGRESS_SECONDS:
                logger.info(
                    "prepare kuairand: %s: %d rows read", os.path.basename(path), result.rows
                )
                last_report = now
    finally:
        for writer in writers.values():
            writer.close()
    result.malformed_lines = len(malformed)
    if malformed:
        result.bad_rows["malformed line (wrong number of fields)"] += len(malformed)
        result.skipped_rows += len(malformed)
        logger.warning(
            "%s: skipped %d malformed line(s), e.g. %r", path, len(malformed), malformed[0]
        )
    if minutes:
        merged = np.concatenate(minutes, axis=1)
        result.minutes, inverse = np.unique(merged[0], return_inverse=True)
        result.minute_counts = np.bincount(inverse.reshape(-1), weights=merged[1]).astype(np.int64)
    logger.info(
        "prepare kuairand: %s: %d rows read, %d skipped",
        os.path.basename(path),
        result.rows + result.malformed_lines,
        result.skipped_rows,
    )
    return result


def _log_rows(
    batch: pa.RecordBatch,
    exprs: dict[str, ColumnExpr],
    path: str,
    first_row: int,
    malformed_before: int,
    options: KuaiRandOptions,
    result: PartitionResult,
) -> dict[str, np.ndarray] | None:
    """Checked, derived columns of one CSV block; bad rows raise or are skipped and counted."""
    num_rows = batch.num_rows
    parsed: dict[str, np.ndarray] = {}
    problems: list[tuple[str, str, np.ndarray]] = []  # (file column, problem, bad mask)
    source_values: dict[str, np.ndarray] = {}
    for source in {e.source for e in exprs.values() if e.source is not None}:
        values, bad = _parse_int(batch.column(source))
        source_values[source] = values
        if bad is not None:
            problems.append((source, "missing or not a whole number", bad))
    for name, expr in exprs.items():
        if expr.constant is not None:
            parsed[name] = np.full(num_rows, expr.constant, dtype=np.int64)
        elif expr.complement:
            parsed[name] = 1 - source_values[expr.source]
        else:
            parsed[name] = source_values[expr.source]
    for name in EVENT_COLUMNS:
        not_flag = (parsed[name] != 0) & (parsed[name] != 1)
        if not_flag.any():
            problems.append((exprs[name].describe(), f"{name} is not 0 or 1", not_flag))
    for name in NON_NEGATIVE:
        negative = parsed[name] < 0
        if negative.any():
            problems.append((exprs[name].describe(), f"negative {name}", negative))

    keep = None
    if problems:
        if options.on_bad_rows == "error":
            column, problem, bad = min(problems, key=lambda p: int(np.argmax(p[2])))
            row = first_row + int(np.argmax(bad))
            raise DataError(
                problem,
                path=path,
                line=row + 2 + malformed_before,
                column=column,
                hint="pass --on-bad-rows skip to skip and count such rows",
            )
        bad_any = np.zeros(num_rows, dtype=bool)
        for column, problem, bad in problems:
            bad_any |= bad
            result.bad_rows[f"{column}: {problem}"] += int(bad.sum())
        result.skipped_rows += int(bad_any.sum())
        keep = ~bad_any
        if not keep.any():
            return None

    action_weight = np.zeros(num_rows, dtype=np.int64)
    for name, bit in schema.ACTION_BITS.items():
        action_weight |= parsed[name] * bit
    rows = {
        "user_id": parsed["user_id"],
        "video_id": parsed["video_id"],
        "time_ms": parsed["time_ms"],
        "timestamp": parsed["time_ms"] // 1000,
        "action_weight": action_weight,
        "watch_time": parsed["play_time_ms"].astype(np.float32),
        # Input order breaks ties between equal times: stable and reproducible.
        "order": np.arange(first_row, first_row + num_rows, dtype=np.int64),
    }
    if keep is not None:
        rows = {k: v[keep] for k, v in rows.items()}
    return rows


_BUCKET_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("video_id", pa.int64()),
        ("time_ms", pa.int64()),
        ("timestamp", pa.int64()),
        ("action_weight", pa.int64()),
        ("watch_time", pa.float32()),
        ("order", pa.int64()),
        ("file", pa.int32()),
    ]
)


def _write_buckets(
    rows: dict[str, np.ndarray],
    file_index: int,
    num_buckets: int,
    bucket_dir: str,
    writers: dict[int, ipc.RecordBatchFileWriter],
) -> None:
    bucket = rows["user_id"] % num_buckets
    order = np.argsort(bucket, kind="stable")
    bounds = np.searchsorted(bucket[order], np.arange(num_buckets + 1))
    columns = {k: v[order] for k, v in rows.items()}
    columns["file"] = np.full(len(order), file_index, dtype=np.int32)
    batch = pa.RecordBatch.from_pydict(columns, schema=_BUCKET_SCHEMA)
    for b in np.flatnonzero(np.diff(bounds)):
        writer = writers.get(b)
        if writer is None:
            directory = os.path.join(bucket_dir, f"bucket-{b:05d}")
            os.makedirs(directory, exist_ok=True)
            target = os.path.join(directory, f"log-{file_index:05d}.arrow")
            writer = writers[b] = ipc.new_file(target, _BUCKET_SCHEMA)
        writer.write_batch(batch.slice(bounds[b], bounds[b + 1] - bounds[b]))


# ---------------------------------------------------------------------------------------------
# Pass 2: build each bucket's windows.


@dataclasses.dataclass
class BucketResult:
    users: int = 0
    users_without_profile: int = 0
    interactions: int = 0
    as_candidate: int = 0
    history_only: int = 0
    unknown_videos: int = 0
    splits: dict = dataclasses.field(default_factory=dict)
    max_values: dict = dataclasses.field(default_factory=dict)
    time_range: tuple[int, int] | None = None


def _empty_split() -> dict[str, Any]:
    bins = len(histogram_labels())
    return {
        "rows": 0,
        "uih_tokens": 0,
        "candidate_tokens": 0,
        "files": [],
        "uih_hist": np.zeros(bins, np.int64),
        "cand_hist": np.zeros(bins, np.int64),
    }


def build_bucket(
    bucket: int,
    options: KuaiRandOptions,
    bucket_dir: str,
    split_time: int,
    profiles: CodedTable,
    videos: CodedTable | None,
) -> BucketResult:
    """Pass 2 for one bucket (see the module docstring)."""
    result = BucketResult(splits={"train": _empty_split(), "eval": _empty_split()})
    parts = sorted(glob.glob(os.path.join(bucket_dir, f"bucket-{bucket:05d}", "*.arrow")))
    if not parts:
        return result
    tables = []
    for part in parts:
        with pa.memory_map(part) as source:
            tables.append(ipc.open_file(source).read_all())
    table = pa.concat_tables(tables)
    data = {name: table.column(name).to_numpy() for name in table.column_names}
    order = np.lexsort((data["order"], data["file"], data["time_ms"], data["user_id"]))
    tokens = {name: values[order] for name, values in data.items()}
    num_tokens = len(order)

    user_ids, user_starts, user_counts = np.unique(
        tokens["user_id"], return_index=True, return_counts=True
    )
    user_ends = user_starts + user_counts
    token_user = np.repeat(np.arange(len(user_ids)), user_counts)
    train_per_user = np.bincount(
        token_user, weights=tokens["timestamp"] < split_time, minlength=len(user_ids)
    ).astype(np.int64)
    windows, history_only = plan_windows(
        user_starts,
        user_ends,
        user_starts + train_per_user,
        max_candidates=options.max_candidates,
        max_history=options.max_history,
        min_history=options.min_history,
    )

    profile_codes, known_user = profiles.lookup(user_ids)
    users = {schema.USER_ID: user_ids, **profile_codes}
    if videos is not None:
        side, known_video = videos.lookup(tokens["video_id"])
        tokens["video_cate1"] = side["video_cate1"]
        tokens["video_cate2"] = side["video_cate2"]
        tokens["user_video_cross1"] = cross_codes(token_user, side["author"], windows)
        tokens["user_video_cross2"] = cross_codes(token_user, side["video_cate2"], windows)
        result.unknown_videos = int((~known_video).sum())
    if options.video_id_buckets:
        tokens["video_id"] = tokens["video_id"] % options.video_id_buckets

    result.users = len(user_ids)
    result.users_without_profile = int((~known_user).sum())
    result.interactions = num_tokens
    result.history_only = int(history_only.sum())
    result.as_candidate = int(windows.cand_lengths.sum())
    result.time_range = (int(tokens["timestamp"].min()), int(tokens["timestamp"].max()))
    result.max_values = {
        schema.USER_ID: int(user_ids.max()),
        "video_id": int(tokens["video_id"].max()),
        **{name: int(codes.max()) for name, codes in profile_codes.items()},
    }
    if videos is not None:
        for name in ("video_cate1", "video_cate2", "user_video_cross1", "user_video_cross2"):
            result.max_values[name] = int(tokens[name].max())

    check_features, check_labels = schema.sample_specs(
        videos is not None,
        id_buckets=None,
        profile_buckets={},
        cate_buckets=(None, None),
        cross_buckets=None,
    )
    for chunk_index, chunk in enumerate(_chunks(windows, CHUNK_TOKENS)):
        for split, is_eval in (("train", False), ("eval", True)):
            selected = chunk.select(chunk.is_eval == is_eval)
            if len(selected) == 0:
                continue
            samples = windows_to_table(
                selected,
                tokens,
                users,
                mtgr=videos is not None,
                candidate_query_time=options.candidate_query_time,
            )
            if options.layout is not None:
                # The recipe's columns, checked as its training reads them (ids against its
                # tables: an id too large for one is an error naming column and table).
                samples = apply_layout(samples, options.layout)
                validate_table(
                    samples, list(options.layout.features), list(options.layout.labels)
                )
            else:
                # What we write must read back cleanly: a failure here is a converter bug.
                validate_table(samples, check_features, check_labels)
            name = f"{split}/part-{bucket:05d}-{chunk_index:04d}.parquet"
            pq.write_table(samples, os.path.join(options.out, name), row_group_size=256)
            total = result.splits[split]
            total["rows"] += len(selected)
            total["uih_tokens"] += int(selected.uih_lengths.sum())
            total["candidate_tokens"] += int(selected.cand_lengths.sum())
            total["files"].append(name)
            total["uih_hist"] += length_histogram(selected.uih_lengths)
            total["cand_hist"] += length_histogram(selected.cand_lengths)
    return result


def _chunks(windows: Windows, max_tokens: int):
    """Consecutive groups of windows holding about max_tokens tokens each (at least one)."""
    cumulative = np.cumsum(windows.uih_lengths + windows.cand_lengths)
    start = 0
    while start < len(windows):
        base = cumulative[start - 1] if start else 0
        end = int(np.searchsorted(cumulative, base + max_tokens, side="right"))
        end = max(end, start + 1)
        yield windows.select(slice(start, end))
        start = end


# ---------------------------------------------------------------------------------------------
# Driver.


def _run_tasks(
    fn: Callable,
    calls: list[tuple],
    workers: int,
    what: str,
    progress: Callable[[Any], str] = lambda result: "",
) -> list:
    """fn(*call) for every call: in this process, or as Ray tasks when workers > 1.
    Logs each completion with `progress(result)` (a running total, say)."""
    if workers <= 1 or len(calls) <= 1:
        results = []
        for i, call in enumerate(calls):
            results.append(fn(*call))
            logger.info(
                "prepare kuairand: %s %d/%d done%s", what, i + 1, len(calls), progress(results[-1])
            )
        return results
    import ray

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):  # a cluster (docs/data.md): its CPUs, not ours
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        else:  # a Ray of our own, never a stale or unrelated `ray start` cluster
            ray.init(address="local", num_cpus=workers, include_dashboard=False,
                     log_to_driver=True)
    # Large shared arguments (the side tables) go to the object store once, not per task.
    shared: dict[int, Any] = {}
    for call in calls:
        for arg in call:
            if isinstance(arg, CodedTable) and id(arg) not in shared:
                shared[id(arg)] = ray.put(arg)
    remote = ray.remote(num_cpus=1)(fn)
    pending = {
        remote.remote(*[shared.get(id(arg), arg) for arg in call]): i
        for i, call in enumerate(calls)
    }
    results: list = [None] * len(calls)
    done_count = 0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        index = pending.pop(ready[0])
        try:
            results[index] = ray.get(ready[0])
        except ray.exceptions.RayTaskError as error:
            cause = getattr(error, "cause", None)
            raise (cause if isinstance(cause, DataError) else error) from None
        done_count += 1
        logger.info(
            "prepare kuairand: %s %d/%d done%s",
            what,
            done_count,
            len(calls),
            progress(results[index]),
        )
    return results


def _split_time_for_fraction(results: list[PartitionResult], eval_fraction: float) -> int:
    """The minute boundary after which about eval_fraction of the interactions lie."""
    minutes = np.concatenate([r.minutes for r in results])
    counts = np.concatenate([r.minute_counts for r in results])
    if len(minutes) == 0:
        return 0
    unique, inverse = np.unique(minutes, return_inverse=True)
    per_minute = np.bincount(inverse.reshape(-1), weights=counts)
    if eval_fraction <= 0:
        return int(unique[-1] + 1) * 60
    later = np.cumsum(per_minute[::-1])[::-1]  # interactions in this minute or later
    target = eval_fraction * per_minute.sum()
    # The last minute from which at least `target` interactions remain.
    index = int(np.flatnonzero(later >= target)[-1])
    return int(unique[index]) * 60


# Where a run writes its splits until it has succeeded (inside OUT, so that moving them into
# place is a rename on the same file system, also on a cluster's shared storage).
STAGING_DIR = "_incomplete"
# What a previous run left in OUT that a new one replaces (only with --overwrite for the first
# three).
OUTPUTS = ("train", "eval", "manifest.json", "profile_codes.json", "video_codes.json")


def _check_out_dir(options: KuaiRandOptions) -> None:
    """Refuse an output directory that holds a previous run's output, unless --overwrite.
    Empty train/ and eval/ directories (left by a failed run of an earlier version) do not
    count. Nothing is created or removed here: the previous output stays until this run has
    succeeded (_publish)."""
    targets = [os.path.join(options.out, n) for n in ("train", "eval", "manifest.json")]
    existing = [
        t for t in targets if os.path.exists(t) and not (os.path.isdir(t) and not os.listdir(t))
    ]
    if existing and not options.overwrite:
        raise FileExistsError(
            f"{options.out} already holds {', '.join(existing)}; pass --overwrite to replace"
        )


def _check_splits(manifest: dict, options: KuaiRandOptions) -> list[str]:
    """An empty train split is an error, and so is an empty eval split unless it was asked for
    (--eval-fraction 0, no --split-time); that one is a warning (returned, for the manifest).
    The messages say what to change."""
    train, evaluation = (manifest["splits"][s]["rows"] for s in ("train", "eval"))
    split_time = manifest["split_time"]
    time_range = manifest["time_range"]

    def utc(seconds: int) -> str:
        return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat()

    where = f"split time {split_time} ({utc(split_time)})"
    if time_range is not None:
        where += (
            f"; the interactions run from {time_range[0]} ({utc(time_range[0])}) "
            f"to {time_range[1]} ({utc(time_range[1])})"
        )
    if options.split_time is None:
        how = (
            f"--eval-fraction {options.eval_fraction} put it at a minute boundary "
            "(the default split is whole minutes)"
        )
    else:
        how = "set by --split-time"
    if train == 0 and evaluation == 0:
        counts = manifest["input"]
        raise ValueError(
            f"no samples: of {counts['rows']} input rows, {counts['skipped']} were skipped as "
            f"bad and {counts['history_only']} are history only (--min-history "
            f"{options.min_history}); nothing is left to train or evaluate on"
        )
    if train == 0:
        raise ValueError(
            f"the train split is empty: all {evaluation} windows are at or after the {where}; "
            f"{how}. Pass an earlier --split-time (epoch seconds or an ISO time inside that "
            "range) or a lower --eval-fraction; a log that spans less than two minutes needs "
            "--split-time"
        )
    if evaluation > 0:
        return []
    if options.split_time is None and options.eval_fraction == 0:
        warning = (
            "the eval split is empty (--eval-fraction 0): train and evaluate need eval data "
            "from elsewhere; pass --eval-fraction > 0 or --split-time for an eval split"
        )
        logger.warning("prepare kuairand: %s", warning)
        return [warning]
    raise ValueError(
        f"the eval split is empty: no window starts at or after the {where}; {how}. Pass an "
        "earlier --split-time or a higher --eval-fraction (with --min-history, eval "
        "interactions that are among a user's first ones are history only), or "
        "--eval-fraction 0 without --split-time to make no eval split on purpose"
    )


def _publish(
    options: KuaiRandOptions,
    staging: str,
    manifest: dict,
    profiles: CodedTable,
    videos: CodedTable | None,
) -> None:
    """Move a successful run's output from the staging directory into OUT, replacing a
    previous output (--overwrite, checked before the run); manifest.json goes last.

    The previous output is renamed aside (into the staging directory) before the new one
    moves in and deleted only after: renames are cheap, so no moment leaves OUT with neither.
    """
    previous = os.path.join(staging, "_previous")
    os.makedirs(previous, exist_ok=True)
    for name in OUTPUTS:
        target = os.path.join(options.out, name)
        if os.path.lexists(target):
            os.replace(target, os.path.join(previous, name))
    for split in ("train", "eval"):
        os.replace(os.path.join(staging, split), os.path.join(options.out, split))
    shutil.rmtree(staging)
    with open(os.path.join(options.out, "profile_codes.json"), "w") as f:
        json.dump(profiles.mappings, f, indent=2, ensure_ascii=False)
    if videos is not None:
        with open(os.path.join(options.out, "video_codes.json"), "w") as f:
            json.dump(videos.mappings, f, indent=2, ensure_ascii=False)
    with open(os.path.join(options.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)


def convert_kuairand(options: KuaiRandOptions) -> dict:
    """Run both passes and write manifest.json; returns the manifest.

    The splits are written to OUT/_incomplete and moved into OUT only when the run has
    succeeded: a failed run (bad input, an empty split, an interrupt) leaves OUT as it was,
    so that it can be re-run without --overwrite, and an --overwrite run keeps the previous
    output until the new one is complete."""
    options.check()
    for path in options.logs:
        log_columns(path, options)  # a missing column stops the run before anything is written
    _check_out_dir(options)
    started = time.perf_counter()
    created_out = not os.path.exists(options.out)
    staging = os.path.join(options.out, STAGING_DIR)
    if os.path.exists(staging):
        shutil.rmtree(staging)  # left by a run that was killed
    for split in ("train", "eval"):
        os.makedirs(os.path.join(staging, split))
    staged = dataclasses.replace(options, out=staging)
    try:
        manifest = _convert(options, staged, started)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created_out:
            try:
                os.rmdir(options.out)  # only if this run left nothing else in it
            except OSError:
                pass
        raise
    return manifest


def _convert(options: KuaiRandOptions, staged: KuaiRandOptions, started: float) -> dict:
    """The passes of convert_kuairand; the samples go to staged.out."""
    profiles = load_user_profiles(options.user_features)
    videos = load_video_features(options.video_features) if options.video_features else None
    input_bytes = sum(os.path.getsize(p) for p in options.logs)
    num_buckets = options.buckets or max(1, min(256, math.ceil(input_bytes / (128 << 20))))
    bucket_dir = os.path.join(options.out, "_buckets")
    if os.path.exists(bucket_dir):
        shutil.rmtree(bucket_dir)
    os.makedirs(bucket_dir)

    try:
        logger.info(
            "prepare kuairand: pass 1: partition %d file(s), %.1f MB, into %d bucket(s)",
            len(options.logs),
            input_bytes / 1e6,
            num_buckets,
        )
        partitions: list[PartitionResult] = _run_tasks(
            partition_log,
            [(i, path, options, bucket_dir, num_buckets) for i, path in enumerate(options.logs)],
            options.workers,
            "log file",
            progress=lambda result: f", {result.rows:,} rows read, {result.skipped_rows:,} skipped",
        )
        pass1_s = time.perf_counter() - started
        split_time = options.split_time
        if split_time is None:
            split_time = _split_time_for_fraction(partitions, options.eval_fraction)

        logger.info("prepare kuairand: pass 2: build windows of %d bucket(s)", num_buckets)
        users_done = [0]

        def count_users(result: BucketResult) -> str:
            users_done[0] += result.users
            return f", {users_done[0]:,} users done"

        buckets: list[BucketResult] = _run_tasks(
            build_bucket,
            [(b, staged, bucket_dir, split_time, profiles, videos) for b in range(num_buckets)],
            options.workers,
            "bucket",
            progress=count_users,
        )
    finally:
        if not options.keep_buckets:
            shutil.rmtree(bucket_dir, ignore_errors=True)

    manifest = _manifest(
        options,
        partitions,
        buckets,
        split_time,
        num_buckets,
        pass1_s,
        time.perf_counter() - started,
    )
    manifest["warnings"] = _check_splits(manifest, options)
    _publish(options, staged.out, manifest, profiles, videos)
    return manifest


def _manifest(
    options: KuaiRandOptions,
    partitions: list[PartitionResult],
    buckets: list[BucketResult],
    split_time: int,
    num_buckets: int,
    pass1_s: float,
    total_s: float,
) -> dict:
    bad_rows: Counter = Counter()
    for p in partitions:
        bad_rows.update(p.bad_rows)
    splits = {}
    for split in ("train", "eval"):
        merged = _empty_split()
        for b in buckets:
            part = b.splits[split]
            for key in ("rows", "uih_tokens", "candidate_tokens"):
                merged[key] += part[key]
            merged["files"] += part["files"]
            merged["uih_hist"] += part["uih_hist"]
            merged["cand_hist"] += part["cand_hist"]
        splits[split] = {
            "rows": merged["rows"],
            "uih_tokens": merged["uih_tokens"],
            "candidate_tokens": merged["candidate_tokens"],
            "tokens": merged["uih_tokens"] + merged["candidate_tokens"],
            "files": sorted(merged["files"]),
            "length_histogram": {
                "bins": histogram_labels(),
                "uih": merged["uih_hist"].tolist(),
                "candidates": merged["cand_hist"].tolist(),
            },
        }
    max_values: dict[str, int] = {}
    for b in buckets:
        for name, value in b.max_values.items():
            max_values[name] = max(max_values.get(name, value), value)
    ranges = [b.time_range for b in buckets if b.time_range is not None]
    options_dict = dataclasses.asdict(dataclasses.replace(options, layout=None))
    options_dict["layout"] = None if options.layout is None else options.layout.describe()
    options_dict["column_map"] = {k: v for k, v in options.column_map}
    options_dict["max_history"] = options.max_history
    return {
        "format": "hstu-samples/1",
        "source": "kuairand",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "mtgr": options.video_features is not None,
        "options": options_dict,
        "schema": (
            {f.name: str(f.type) for f in schema.sample_schema(options.video_features is not None)}
            if options.layout is None
            else dict(layout_schema(options.layout))
        ),
        "layout": None if options.layout is None else options.layout.describe(),
        "split_time": split_time,
        "split_time_utc": datetime.datetime.fromtimestamp(split_time, datetime.UTC).isoformat(),
        "time_range": [min(r[0] for r in ranges), max(r[1] for r in ranges)] if ranges else None,
        "splits": splits,
        "input": {
            "files": [p.path for p in partitions],
            # Every input line is a candidate, history only, or skipped as bad.
            "rows": sum(p.rows + p.malformed_lines for p in partitions),
            "as_candidate": sum(b.as_candidate for b in buckets),
            "history_only": sum(b.history_only for b in buckets),
            "skipped": sum(p.skipped_rows for p in partitions),
        },
        "bad_rows": {"rows": sum(p.skipped_rows for p in partitions), "by_reason": dict(bad_rows)},
        "users": {
            "total": sum(b.users for b in buckets),
            "without_profile": sum(b.users_without_profile for b in buckets),
        },
        "unknown_video_interactions": sum(b.unknown_videos for b in buckets)
        if options.video_features
        else None,
        # Largest value per id column: a table needs num_buckets > this.
        "max_values": max_values,
        "buckets": num_buckets,
        "seconds": {"partition": round(pass1_s, 2), "total": round(total_s, 2)},
    }
