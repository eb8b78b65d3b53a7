"""Sample files -> Ray Data -> one equal shard per training worker -> JaggedBatch.

- `read_samples` opens the parquet files as a Ray Dataset (optionally in shuffled file order).
  The trainer hands it to Ray Train, whose `get_dataset_shard` gives each worker an equal
  split (`streaming_split(n, equal=True)`): every worker sees the same number of rows, so with
  drop_last every worker takes the same number of steps (uneven steps hang TorchRec's
  all_to_all).
- `iter_jagged_batches` turns a worker's shard into JaggedBatches: Ray reads and (optionally)
  shuffles rows within a local buffer and hands over Arrow tables; a background thread checks
  and collates them (`arrow_to_batch`) and keeps `prefetch_batches` batches ready.
- `arrow_to_batch` is the collation itself: list columns go to numpy through their Arrow
  buffers (flat values + lengths) and on to torch without per-row Python objects.
- With a budget (`token_budget`, from data_config.batch_cost_size) rows are packed by cost
  instead of counted: see hstu/data/batch_cost.py.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from hstu.config.features import FeatureSpec, LabelSpec
from hstu.data.batch import JaggedBatch
from hstu.data.batch_cost import read_cost_column
from hstu.data.schema import SAMPLE_ID
from hstu.data.validate import (
    BadRowPolicy,
    BadRowReport,
    Column,
    DataError,
    delimited_element_counts,
    find_bad_rows,
    read_columns,
    requests_for,
    resolve_bad_rows,
    row_count,
)

logger = logging.getLogger(__name__)

# Ray Data's per-row file column when read_samples(include_paths=True); names files in errors.
PATH_COLUMN = "path"
# How long a finished pass waits for its producer thread to notice and exit.
PRODUCER_EXIT_S = 10.0


def arrow_to_batch(
    table: pa.Table | pa.RecordBatch,
    features: Sequence[FeatureSpec],
    labels: Sequence[LabelSpec],
    *,
    source: str | None = None,
    row_offset: int = 0,
    on_bad_rows: BadRowPolicy = "error",
    bad_rows: BadRowReport | None = None,
) -> JaggedBatch:
    """Collate an Arrow table of samples into a JaggedBatch, checking every row.

    source: the file the table was read from (row numbers in errors are then file rows,
        counted from `row_offset`). Without it, a `path` column (Ray's include_paths) names
        each row's file; an error then reads that file once to give the row's row in it (by
        sample_id, or the file's first row breaking the same rule), and the row within this
        batch only when the file cannot be read.
    on_bad_rows: "error" raises DataError for the first bad row; "skip" drops bad rows and
        adds them to `bad_rows` (the batch then has fewer rows, possibly none;
        iter_jagged_batches never hands on an empty one).
    """
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    columns, findings = read_columns(table, requests_for(features, labels), path=source)
    findings += find_bad_rows(columns, features, labels)
    sample_ids = None
    if SAMPLE_ID in table.column_names:
        sample_ids = table.column(SAMPLE_ID).to_numpy()
    if findings:
        paths = _row_paths(table) if source is None else None
        keep, report = resolve_bad_rows(
            findings,
            table.num_rows,
            on_bad_rows,
            path=source,
            row_offset=row_offset,
            paths=paths,
            sample_ids=sample_ids,
            specs=(features, labels),
        )
        for finding in findings:
            logger.warning(
                "skipped %d row(s) of %s: %s",
                int(finding.bad.sum()),
                source or _files_of(paths, finding.bad) or "a batch",
                finding.reason,
            )
        if bad_rows is not None:
            bad_rows.add(report)
        columns = {name: column.take_rows(keep) for name, column in columns.items()}
        if sample_ids is not None:
            sample_ids = sample_ids[keep]
    return _collate(columns, features, labels, sample_ids)


def _row_paths(table: pa.Table) -> np.ndarray | None:
    """Each row's file (Ray's include_paths column), or None when the table has no such column."""
    if PATH_COLUMN not in table.column_names:
        return None
    return table.column(PATH_COLUMN).to_numpy(zero_copy_only=False)


def _files_of(
    paths: np.ndarray | None, rows: np.ndarray | None = None, limit: int = 3
) -> str | None:
    """The files of the given rows (a bool mask; all rows when None), for messages; None when
    the rows' files are not known."""
    if paths is None:
        return None
    names = sorted({str(p) for p in (paths if rows is None else paths[rows])})
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _collate(
    columns: dict[str, Column],
    features: Sequence[FeatureSpec],
    labels: Sequence[LabelSpec],
    sample_ids: np.ndarray | None,
) -> JaggedBatch:
    batch_size = row_count(columns)
    ones = np.ones(batch_size, dtype=np.int64)
    keys: list[str] = []
    id_values: list[np.ndarray] = []
    id_lengths: list[np.ndarray] = []
    raw: dict[str, torch.Tensor] = {}
    seq_lengths: dict[str, torch.Tensor] = {}
    for spec in features:
        column = columns[spec.column]
        if spec.sequence is not None and spec.sequence not in seq_lengths:
            seq_lengths[spec.sequence] = _tensor(column.lengths, np.int64)
        if spec.kind == "id":
            keys.append(spec.name)
            id_values.append(column.values)
            id_lengths.append(ones if column.lengths is None else column.lengths)
        else:
            raw[spec.name] = _tensor(column.values, np.dtype(spec.value_dtype))
    label_tensors: dict[str, torch.Tensor] = {}
    for label in labels:
        column = columns[label.column]
        if label.sequence not in seq_lengths:
            seq_lengths[label.sequence] = _tensor(column.lengths, np.int64)
        label_tensors[label.column] = _tensor(column.values, np.dtype(label.value_dtype))
    # The per-key value counts go with the KJT (TorchRec keeps them through pin_memory() and
    # to()), so that the lookup can size its inputs without reading lengths back from a GPU.
    counts = [int(v.size) for v in id_values]
    sparse = KeyedJaggedTensor(
        keys=keys,
        values=torch.from_numpy(_concat(id_values, np.int64)),
        lengths=torch.from_numpy(_concat(id_lengths, np.int64)),
        length_per_key=counts,
        offset_per_key=[0, *np.cumsum(counts, dtype=np.int64).tolist()],
    )
    return JaggedBatch(
        sparse=sparse,
        raw=raw,
        seq_lengths=seq_lengths,
        labels=label_tensors,
        batch_size=batch_size,
        sample_ids=None if sample_ids is None else _tensor(sample_ids, np.int64),
    )


def _tensor(array: np.ndarray, dtype: np.dtype) -> torch.Tensor:
    # Arrow-backed numpy views are read-only; torch needs memory it may own and write.
    array = np.asarray(array, dtype=dtype)
    if not array.flags.writeable or not array.flags.c_contiguous:
        array = array.copy()
    return torch.from_numpy(array)


def _concat(arrays: list[np.ndarray], dtype: type) -> np.ndarray:
    if not arrays:
        return np.zeros(0, dtype=dtype)
    return np.concatenate(arrays).astype(dtype, copy=False)


def expand_input_paths(paths: Sequence[str]) -> tuple[list[str], list[str]]:
    """Sample paths as TorchEasyRec reads input_path: each entry comma-separated, each part a
    file, a directory, a URI (`s3://...`, as given) or a local glob pattern such as
    `data/train/part-*.parquet` (only for names that do not exist: `run[1]/` is a path).

    Returns (paths, missing): local paths absolute, each path once (`dir/a.parquet` named
    twice, or by a name and a pattern, is read once); `missing` lists the names not found.
    """
    import glob

    found: list[str] = []
    missing: list[str] = []
    for entry in paths:
        for part in (p.strip() for p in str(entry).split(",")):
            if not part:
                continue
            if "://" in part:
                found.append(part)
            elif os.path.exists(part):
                found.append(os.path.abspath(os.path.expanduser(part)))
            elif glob.has_magic(part):
                matches = sorted(glob.glob(os.path.expanduser(part)))
                found += [os.path.abspath(m) for m in matches]
                if not matches:
                    missing.append(f"{part} (no match)")
            else:
                missing.append(part)
    return list(dict.fromkeys(found)), missing


# Parquet bytes per block read_samples asks Ray Data for, at least one block per file
# (about 64 MiB in memory for snappy-compressed samples).
BLOCK_FILE_BYTES = 32 * 2**20


def _default_num_blocks(paths: Sequence[str]) -> int | None:
    """Blocks for read_samples: per local parquet file one, plus one per BLOCK_FILE_BYTES
    beyond the first; None (Ray decides) when a path is a URI."""
    if any("://" in p for p in paths):
        return None
    blocks = 0
    for path in paths:
        files = [path] if os.path.isfile(path) else [
            os.path.join(root, name) for root, _, names in os.walk(path)
            for name in names if name.endswith(".parquet")]
        blocks += sum(max(1, -(-os.path.getsize(f) // BLOCK_FILE_BYTES)) for f in files)
    return max(1, blocks)


def read_samples(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    shuffle_files: bool = False,
    seed: int = 0,
    columns: Sequence[str] | None = None,
    include_paths: bool = True,
    override_num_blocks: int | None = None,
    datasource_v2: bool = False,
):
    """Open sample parquet files (files or directories) as a Ray Dataset.

    shuffle_files: read the files in a random order, a new one each epoch (each execution of
        the dataset), reproducible from `seed`. Rows are shuffled further, within a local
        buffer, by iter_jagged_batches(shuffle_buffer=...).
    columns: read only these columns; default all (sample_columns(features, labels) gives
        what a model reads, plus sample_id).
    include_paths: add a `path` column naming each row's file, so that data errors name it.
    override_num_blocks: how many blocks Ray Data reads the files into. Default: one per
        file, more for files over BLOCK_FILE_BYTES (local paths; Ray's own choice for URIs).
        Ray's own choice aims at 200 blocks of at least 1 MiB: 2,000 27K-shaped rows (~50 MB
        of parquet in 8 files) came as ~96 blocks of ~20 rows, and handing blocks over costs
        enough that one consumer then got ~1,600 rows/s on 2 CPUs, against 5,600 with 8
        blocks (docs/BENCHMARKS.md, "Data pipeline").
    datasource_v2: Ray 2.60 reads parquet through its new ListFiles -> ReadFiles chain by
        default. On the 2-CPU machine that chain listed the files in a task that took
        10-20 s and released no batch until every file was read, while the previous reader
        streamed its first batch in 0.4 s (docs/data.md). So the previous one is used
        unless this is True.
    """
    import ray.data

    path_list = (
        [os.fspath(paths)]
        if isinstance(paths, (str, os.PathLike))
        else [os.fspath(p) for p in paths]
    )
    if not path_list:
        raise ValueError("read_samples: no paths given")
    missing = [p for p in path_list if "://" not in p and not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"read_samples: no such file or directory: {', '.join(missing)}")
    shuffle = ray.data.FileShuffleConfig(seed=seed) if shuffle_files else None
    # read_parquet picks its datasource from the current DataContext when called.
    context = ray.data.DataContext.get_current()
    previous = context.use_datasource_v2
    context.use_datasource_v2 = datasource_v2
    try:
        dataset = ray.data.read_parquet(
            path_list,
            columns=list(columns) if columns is not None else None,
            shuffle=shuffle,
            include_paths=include_paths,
            override_num_blocks=(override_num_blocks if override_num_blocks is not None
                                 else _default_num_blocks(path_list)),
        )
    finally:
        context.use_datasource_v2 = previous
    return dataset


def sample_columns(
    features: Sequence[FeatureSpec],
    labels: Sequence[LabelSpec],
    extra: Sequence[str] = (),
) -> list[str]:
    """The columns a model with these specs reads, plus sample_id and the `extra` columns (the
    batching's cost column: hstu.data.batch_cost.cost_columns), for read_samples(columns=)."""
    names = [SAMPLE_ID]
    columns = [f.column for f in features] + [label.column for label in labels] + list(extra)
    for column in columns:
        if column not in names:
            names.append(column)
    return names


@dataclasses.dataclass
class PipelineStats:
    """What one iter_jagged_batches pass delivered, for accounting and benchmarks."""

    rows_read: int = 0
    rows: int = 0
    tokens: int = 0
    batches: int = 0
    # Rows read but not delivered: the last short batch under drop_last.
    dropped_rows: int = 0
    # max_batches reached: the rest of the shard was not read this pass.
    stopped_at_max_batches: bool = False
    skipped: BadRowReport = dataclasses.field(default_factory=BadRowReport)
    # Seconds the consumer waited inside next(): zero when the pipeline keeps up.
    wait_s: float = 0.0

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["skipped"] = {"rows": self.skipped.rows, "by_reason": dict(self.skipped.by_reason)}
        return out


class JaggedBatches:
    """Iterable of JaggedBatch over one Ray shard; each `iter()` is one pass (one epoch).

    `stats` describes the latest pass. Local shuffling is reseeded per pass (seed + pass index).
    """

    def __init__(
        self,
        shard,
        features: Sequence[FeatureSpec],
        labels: Sequence[LabelSpec],
        *,
        batch_size: int,
        drop_last: bool,
        shuffle_buffer: int | None,
        token_budget: int | None,
        sample_cost_field: str | None,
        contextual_tokens: int,
        prefetch_batches: int,
        seed: int,
        on_bad_rows: BadRowPolicy,
        max_batches: int | None,
        read_rows: int,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        if token_budget is not None and token_budget < 1:
            raise ValueError(f"token_budget must be >= 1, not {token_budget}")
        if sample_cost_field is not None and token_budget is None:
            raise ValueError("sample_cost_field needs a token_budget (batch_cost_size)")
        if contextual_tokens < 0:
            raise ValueError(f"contextual_tokens must be >= 0, not {contextual_tokens}")
        self.shard = shard
        self.features = list(features)
        self.labels = list(labels)
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.shuffle_buffer = shuffle_buffer
        self.token_budget = token_budget
        self.sample_cost_field = sample_cost_field
        self.contextual_tokens = contextual_tokens
        self.prefetch_batches = max(1, prefetch_batches)
        self.seed = seed
        self.on_bad_rows = on_bad_rows
        self.max_batches = max_batches
        self.read_rows = read_rows
        self.passes = 0
        self.stats = PipelineStats()
        # One column per sequence is enough to count a row's tokens (with its separator, for
        # string-encoded columns).
        first_of_sequence: dict[str, tuple[str, str]] = {}
        for spec in self.features:
            if spec.sequence is not None:
                first_of_sequence.setdefault(spec.sequence, (spec.column, spec.sequence_delim))
        self._length_columns = dict(first_of_sequence.values())

    def __iter__(self) -> Iterator[JaggedBatch]:
        self.stats = PipelineStats()
        seed = self.seed + self.passes
        self.passes += 1
        return self._consume(seed)

    def _consume(self, seed: int) -> Iterator[JaggedBatch]:
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch_batches)
        stop = threading.Event()
        producer = threading.Thread(
            target=self._produce, args=(seed, ready, stop), name="jagged-batches", daemon=True
        )
        producer.start()
        try:
            while True:
                started = time.perf_counter()
                item = ready.get()
                self.stats.wait_s += time.perf_counter() - started
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                batch, tokens = item
                self.stats.batches += 1
                self.stats.rows += batch.batch_size
                self.stats.tokens += tokens
                yield batch
                if self.max_batches is not None and self.stats.batches >= self.max_batches:
                    self.stats.stopped_at_max_batches = True
                    logger.info(
                        "stopped after max_batches=%d; rest of the shard unread", self.max_batches
                    )
                    return
        finally:
            stop.set()
            # Unblock a producer waiting on a full queue so it sees `stop`. A producer stuck
            # inside Ray's iterator is left behind (a daemon thread) rather than waited on
            # for ever; the next pass starts a fresh one.
            deadline = time.perf_counter() + PRODUCER_EXIT_S
            while producer.is_alive() and time.perf_counter() < deadline:
                try:
                    ready.get(timeout=0.05)
                except queue.Empty:
                    pass
            if producer.is_alive():
                logger.warning(
                    "batch producer still busy %.0f s after the pass ended", PRODUCER_EXIT_S
                )

    def _produce(self, seed: int, ready: queue.Queue, stop: threading.Event) -> None:
        def put(item) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            for table in self._tables(seed):
                if stop.is_set():
                    return
                batch = arrow_to_batch(
                    table,
                    self.features,
                    self.labels,
                    on_bad_rows=self.on_bad_rows,
                    bad_rows=self.stats.skipped,
                )
                if batch.batch_size == 0:
                    # Every row was bad (skipped and counted above). A 0-row batch would
                    # count as a step and fail inside the model's embedding lookup.
                    continue
                tokens = sum(int(lengths.sum()) for lengths in batch.seq_lengths.values())
                if not put((batch, tokens)):
                    return
            put(_END)
        except Exception as error:  # noqa: BLE001 - handed to the consumer, which raises it
            put(error)

    def _tables(self, seed: int) -> Iterator[pa.Table]:
        """Arrow tables, one per output batch (before bad rows are skipped)."""
        rows_per_read = self.batch_size if self.token_budget is None else self.read_rows
        arrow_batches = self.shard.iter_batches(
            batch_size=rows_per_read,
            batch_format="pyarrow",
            drop_last=False,
            prefetch_batches=self.prefetch_batches,
            local_shuffle_buffer_size=self.shuffle_buffer,
            local_shuffle_seed=seed if self.shuffle_buffer else None,
        )
        arrow_batches = self._count_rows(arrow_batches)
        if self.token_budget is None:
            for table in arrow_batches:
                if table.num_rows < self.batch_size and self.drop_last:
                    self.stats.dropped_rows += table.num_rows
                    logger.info("drop_last: dropped the last %d row(s)", table.num_rows)
                    continue
                yield table
            return
        yield from self._pack_by_cost(arrow_batches)

    def _count_rows(self, tables) -> Iterator[pa.Table]:
        for table in tables:
            self.stats.rows_read += table.num_rows
            yield table

    def _row_costs(self, table: pa.Table) -> tuple[pa.Table, np.ndarray]:
        """(table, each row's cost): the sample_cost_field column's values (rows with a bad
        cost skipped and counted under on_bad_rows "skip"), else the row's tokens, contextual
        + history + candidates."""
        if self.sample_cost_field is None:
            tokens = row_tokens(table, self._length_columns) + self.contextual_tokens
            return table, tokens
        costs, keep, report = read_cost_column(
            table, self.sample_cost_field, on_bad_rows=self.on_bad_rows
        )
        if keep is not None:
            for reason, count in report.by_reason.items():
                logger.warning(
                    "skipped %d row(s) of %s: %s",
                    count,
                    _files_of(_row_paths(table), ~keep) or "a batch",
                    reason,
                )
            self.stats.skipped.add(report)
            table, costs = table.filter(pa.array(keep)), costs[keep]
        return table, costs

    def _pack_by_cost(self, arrow_batches) -> Iterator[pa.Table]:
        """Greedy packing in arrival order: a batch closes when the next row would take its
        summed cost over the budget or when it has batch_size rows. A row that alone costs
        more than the budget goes alone. Every row ends up whole in exactly one batch (or,
        for the last rows of a pass under drop_last, counted in stats.dropped_rows)."""
        pending: pa.Table | None = None
        pending_costs = np.zeros(0, dtype=np.float64)
        for table in arrow_batches:
            table, costs = self._row_costs(table)
            if pending is not None and pending.num_rows:
                table = pa.concat_tables([pending, table])
                costs = np.concatenate([pending_costs, costs])
            slices, start = pack_slices(costs, self.token_budget, self.batch_size)
            for first, take in slices:
                yield table.slice(first, take)
            pending, pending_costs = table.slice(start), costs[start:]
        if pending is not None and pending.num_rows:
            if self.drop_last:
                self.stats.dropped_rows += pending.num_rows
                logger.info("drop_last: dropped the last %d row(s)", pending.num_rows)
            else:
                yield pending


_END = object()


def pack_slices(costs: np.ndarray, budget: float, max_rows: int) -> tuple[list, int]:
    """The packing rule of batches by cost over rows in arrival order: a batch closes before
    the next row would take its summed cost over `budget`, or at `max_rows` rows; a row that
    alone costs more than the budget goes alone. Returns ((first row, rows) of every closed
    batch, the first row not packed): the rows from there all fit in one batch that is not
    full yet, so they wait for more rows (or, at the end of a pass, are the last batch)."""
    slices, start = [], 0
    while start < len(costs):
        cumulative = np.cumsum(costs[start:])
        fits = int(np.searchsorted(cumulative, budget, side="right"))
        take = min(max(fits, 1), max_rows)
        if start + take == len(costs) and take < max_rows and fits == take:
            break  # everything left fits: wait for more rows to fill the batch
        slices.append((start, take))
        start += take
    return slices, start


def row_tokens(table: pa.Table, length_columns: Mapping[str, str]) -> np.ndarray:
    """Tokens per row: the sum of the row's sequence lengths. `length_columns` maps one
    column per sequence to its sequence_delim (used when the column is string-encoded)."""
    total = np.zeros(table.num_rows, dtype=np.int64)
    for name, delimiter in length_columns.items():
        if name not in table.column_names:
            raise DataError(
                "missing column",
                path=_files_of(_row_paths(table)),
                column=name,
                hint=f"the data has {', '.join(table.column_names)}",
            )
        column = table.column(name)
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            total += delimited_element_counts(column, delimiter)
        else:
            count = pc.list_value_length(column)
            total += count.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    return total


def iter_jagged_batches(
    shard,
    features: Sequence[FeatureSpec],
    labels: Sequence[LabelSpec],
    *,
    batch_size: int,
    drop_last: bool,
    shuffle_buffer: int | None = None,
    token_budget: int | None = None,
    sample_cost_field: str | None = None,
    contextual_tokens: int = 0,
    prefetch_batches: int = 2,
    seed: int = 0,
    on_bad_rows: BadRowPolicy = "error",
    max_batches: int | None = None,
    read_rows: int = 64,
) -> JaggedBatches:
    """JaggedBatches over a worker's shard (a Ray DataIterator or Dataset).

    batch_size: rows per batch; with token_budget, the most rows a batch may hold.
    drop_last: drop (and count in stats.dropped_rows) a last batch that is not full. Required
        for training and eval over several workers: with equal shards it gives every worker
        the same number of steps.
    shuffle_buffer: rows held by Ray's local shuffle buffer (training); None keeps file order.
    token_budget: the batch cost budget (data_config.batch_cost_size): pack rows so that
        each batch's summed cost stays within it, for long-tailed lengths; a row costing more
        goes alone (hstu/data/batch_cost.py). Batch counts then differ between workers even on
        equal shards: set `max_batches` to a count every worker reaches (see docs/data.md), or
        end the epoch on all ranks when the first runs out.
    sample_cost_field: with token_budget, the column holding each row's cost (a number >= 0
        per row); None counts the row's tokens, `contextual_tokens` + history + candidates.
    contextual_tokens: contextual tokens per row (hstu.data.batch_cost.contextual_token_count).
    prefetch_batches: batches collated ahead in a background thread (and Ray's own prefetch).
    on_bad_rows: "error" stops at the first bad row; "skip" drops it and counts it in
        stats.skipped (a batch may then hold fewer rows).
    max_batches: stop the pass after this many batches.
    read_rows: rows per Arrow table Ray hands over in token-budget mode.
    """
    return JaggedBatches(
        shard,
        features,
        labels,
        batch_size=batch_size,
        drop_last=drop_last,
        shuffle_buffer=shuffle_buffer,
        token_budget=token_budget,
        sample_cost_field=sample_cost_field,
        contextual_tokens=contextual_tokens,
        prefetch_batches=prefetch_batches,
        seed=seed,
        on_bad_rows=on_bad_rows,
        max_batches=max_batches,
        read_rows=read_rows,
    )
