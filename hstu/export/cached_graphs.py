"""Cached scoring's device work replayed from CUDA graphs, one per shape bucket.

Why: a cached call on a GPU runs few tokens (each user's new actions and candidates) through
the encoder, so the GPU finishes its kernels faster than the host can launch them. On one
H100, 128 users with 4K-token caches, 10 new actions and 100 candidates each kept the GPU busy
4.2 ms of an 18.7 ms call (docs/BENCHMARKS.md, "Serving"). A graph replays the call's kernels
(embedding lookups, preprocessor, every STU layer, the towers) with one launch.

A graph replays fixed shapes and fixed launch bounds, so each wave is padded on the host to a
bucket (`pad_wave`) before its sizes and indices are worked out:
- extra rows after the wave's rows (8 to 15 of them), with zeros for every input; their
  tokens and candidates pad the history tokens, the candidates and the number of rows
  encoded from scratch up to the bucket's (`Bucket`); each has at least one candidate;
- a padding row is either encoded from scratch (with contextual tokens) or treated as cached
  with an empty cache (`kv_cache.EMPTY_CACHE`, no contextual tokens), whichever makes the
  wave's count of rows encoded from scratch the bucket's;
- the kernels' bounds (longest row, longest cache) are the bucket's powers of two;
- the wave's rows come first, so their candidates' scores and their new keys and values are
  the first ones out; the padding rows' are dropped (and never enter a cache).
Everything the device part reads comes through the graph's input buffers (request features,
sizes, positions, time buckets and the caches' addresses), so one graph serves every call of
its bucket, whichever users and caches it holds.

`GraphReplays` keeps at most `max_graphs` graphs, least recently used dropped first, each with
its own memory pool. With capture=False the padding runs eagerly: how the CPU tests check that
padding leaves the scores and the caches unchanged.

Verification: the padding is tested on the CPU (tests/export/test_cached_graphs.py); the
capture and replay run only on a GPU: the GPU tests there and in tests/export/test_cached.py
passed on one H100 (sessions 14 and 15; docs/BENCHMARKS.md "Serving").
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch

from hstu.modules.graphed_scoring import bucket_step, round_up
from hstu.modules.kv_cache import EMPTY_CACHE, to_device

logger = logging.getLogger(__name__)

# Rows are padded to a multiple of ROW_STEP, plus ROW_STEP more: 8 to 15 padding rows.
ROW_STEP = 8


def _power_of_two(count: int) -> int:
    return 1 << max(int(count) - 1, 0).bit_length()


@dataclasses.dataclass(frozen=True)
class Bucket:
    """A padded wave's shape: rows, history tokens in the inputs, candidates, rows encoded
    from scratch, and the kernels' bounds (longest history + candidates, longest delta row,
    longest cache; 0: no row has a cache). The cache bound only picks the cached attention's
    launch config (each row's cache length is read on the device), so graph keys keep just
    whether it is 0 (`graph_key`)."""

    rows: int
    history: int
    candidates: int
    from_scratch: int
    max_item_len: int
    max_delta_len: int
    max_cache_len: int


def graph_key(bucket: Bucket) -> Bucket:
    """The part of a bucket that a captured graph depends on: everything but the cache
    bound's size (see Bucket)."""
    return dataclasses.replace(bucket, max_cache_len=int(bucket.max_cache_len > 0))


@dataclasses.dataclass
class PaddedWave:
    """The wave's per-row host arrays with the padding rows appended (see the module
    docstring), and its bucket."""

    bucket: Bucket
    entries: list  # per row: CacheEntry, None (from scratch) or EMPTY_CACHE (padding)
    history_lengths: np.ndarray  # int64 [rows]: history tokens in the inputs
    candidate_counts: np.ndarray  # int64 [rows]
    timestamps: np.ndarray  # int64 [history + candidates]: per row, its history then queries
    padding_rows: int
    padding_history: np.ndarray  # int64 [padding rows]: history tokens each padding row has
    padding_candidates: np.ndarray  # int64 [padding rows]


def _spread(total: int, parts: int, least: int = 0) -> np.ndarray:
    """`total` split into `parts` near-equal int64 counts, each at least `least`."""
    counts = np.full(parts, least + (total - least * parts) // parts, dtype=np.int64)
    counts[: (total - least * parts) % parts] += 1
    return counts


def pad_wave(entries: Sequence, history_lengths: np.ndarray, candidate_counts: np.ndarray,
             timestamps: torch.Tensor, contextual_seq_len: int) -> PaddedWave:
    """The wave padded to its bucket. entries[b]: row b's CacheEntry or None; history_lengths
    and candidate_counts: int64 [B]; timestamps: int64 (numpy or a CPU tensor), per row its
    history tokens' times then its candidates' query times (as kv_cache.cached_encode takes
    them); the padded wave's are numpy."""
    c = contextual_seq_len
    batch = len(entries)
    history = int(history_lengths.sum())
    candidates = int(candidate_counts.sum())
    from_scratch = sum(entry is None for entry in entries)
    rows = round_up(batch, ROW_STEP) + ROW_STEP
    padding_rows = rows - batch
    padded_from_scratch = -(-from_scratch // ROW_STEP) * ROW_STEP  # 0 stays 0
    padded_history = round_up(history, bucket_step(history, 64))
    padded_candidates = round_up(candidates + padding_rows,
                                 bucket_step(candidates + padding_rows, 64))
    padding_history = _spread(padded_history - history, padding_rows)
    padding_candidates = _spread(padded_candidates - candidates, padding_rows, least=1)
    # The first padding rows are encoded from scratch, the others have an empty cache. A wave
    # with no cache at all (new users) is padded with rows from scratch alone, so that it
    # stays a wave of whole rows (kv_cache's whole-row path: the full pass's own kernels).
    if from_scratch == batch:
        padded_from_scratch = rows
    scratch_padding = padded_from_scratch - from_scratch
    padding_entries = [None] * scratch_padding + [EMPTY_CACHE] * (padding_rows - scratch_padding)
    all_history = np.concatenate([history_lengths, padding_history])
    all_candidates = np.concatenate([candidate_counts, padding_candidates])
    entries = list(entries) + padding_entries
    items = all_history + all_candidates
    delta = items + np.array([c if entry is None else 0 for entry in entries], dtype=np.int64)
    cache_lengths = [entry.length for entry in entries if entry is not None]
    longest_cache = max(cache_lengths, default=0)
    bucket = Bucket(
        rows=rows, history=padded_history, candidates=padded_candidates,
        from_scratch=padded_from_scratch, max_item_len=_power_of_two(items.max()),
        max_delta_len=_power_of_two(delta.max()),
        max_cache_len=_power_of_two(max(longest_cache, 16)) if longest_cache else 0)
    times = np.zeros(history + candidates + int(padding_history.sum() + padding_candidates.sum()),
                     dtype=np.int64)
    times[:history + candidates] = np.asarray(timestamps, dtype=np.int64)
    return PaddedWave(
        bucket=bucket, entries=entries, history_lengths=all_history,
        candidate_counts=all_candidates, timestamps=times,
        padding_rows=padding_rows, padding_history=padding_history,
        padding_candidates=padding_candidates)


def delta_inputs(inputs: dict[str, torch.Tensor], arrays: dict[str, np.ndarray], *,
                 sequence_of: dict, history_sequence: str, candidate_sequence: str,
                 lengths_key: Callable[[str], str], new_tokens: np.ndarray | None,
                 new_lengths: np.ndarray, wave: PaddedWave | None) -> dict[str, torch.Tensor]:
    """The serving input dict of what a cached call runs, from the wave's rows' input dict
    `inputs` (CPU) and its features as numpy (`arrays`, see `host_array`): per history
    feature the new tokens (`new_tokens` indexes the rows' history tokens; None: all of them)
    and the history lengths `new_lengths`, every other feature and length as it is; with
    `wave` (a padded wave), the padding rows after the wave's rows: zeros for every value,
    their lengths for the history and candidate sequences, 0 for any other. sequence_of[name]:
    the sequence of feature `name` (None: one value per row). numpy on the host: a torch op
    per feature costs several times more in a call of one user."""
    extra = {}
    if wave is not None:
        extra = {history_sequence: int(wave.padding_history.sum()),
                 candidate_sequence: int(wave.padding_candidates.sum()),
                 None: wave.padding_rows}
    out = {}
    for name, sequence in sequence_of.items():
        array = arrays[name]
        if sequence == history_sequence and new_tokens is not None:
            array = array[new_tokens]
        more = extra.get(sequence, 0)
        if more:
            grown = np.zeros((array.shape[0] + more, *array.shape[1:]), dtype=array.dtype)
            grown[:array.shape[0]] = array
            array = grown
        out[name] = from_host_array(array, inputs[name].dtype)
    for sequence in dict.fromkeys(s for s in sequence_of.values() if s is not None):
        key = lengths_key(sequence)
        lengths = (np.asarray(new_lengths, dtype=np.int64) if sequence == history_sequence
                   else inputs[key].to(torch.int64).numpy())
        if wave is not None:
            lengths = np.concatenate([
                lengths, wave.padding_history if sequence == history_sequence
                else wave.padding_candidates if sequence == candidate_sequence
                else np.zeros(wave.padding_rows, dtype=np.int64)])
        out[key] = torch.from_numpy(np.ascontiguousarray(lengths, dtype=np.int64))
    return out


def host_array(values: torch.Tensor) -> np.ndarray:
    """A CPU tensor as a numpy view; bfloat16 (which numpy lacks) as its int16 bit patterns."""
    if values.requires_grad:
        values = values.detach()
    if values.dtype == torch.bfloat16:
        values = values.view(torch.int16)
    return values.numpy()


def from_host_array(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """host_array's inverse: a tensor of `dtype` over `array`'s memory."""
    tensor = torch.from_numpy(array)
    return tensor.view(dtype) if tensor.dtype != dtype else tensor


class _Staging:
    """A graph's inputs as views of one device buffer, filled from one pinned host buffer of
    the same layout with a single copy (instead of a pinned copy and a copy per input)."""

    ALIGN = 16

    def __init__(self, inputs: Sequence[torch.Tensor], device: torch.device) -> None:
        self.layout, total = [], 0
        for tensor in inputs:
            nbytes = tensor.numel() * tensor.element_size()
            self.layout.append((total, nbytes, tensor.dtype, tuple(tensor.shape)))
            total += -(-nbytes // self.ALIGN) * self.ALIGN
        self.host = torch.empty(max(total, 1), dtype=torch.uint8).pin_memory()
        self.device = torch.empty(max(total, 1), dtype=torch.uint8, device=device)
        # The pinned buffer's parts as numpy views: numpy copies in a few microseconds what
        # a torch copy_ of a small tensor takes several times as long to launch.
        self.host_views = [host_array(view) for view in self._views(self.host)]
        self.inputs = self._views(self.device)
        self.copied: torch.cuda.Event | None = None

    def _views(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        return [buffer[start:start + nbytes].view(dtype).view(shape)
                for start, nbytes, dtype, shape in self.layout]

    def fill(self, inputs: Sequence[torch.Tensor], device: torch.device) -> None:
        for (_, _, dtype, shape), tensor in zip(self.layout, inputs):
            if tensor.shape != shape or tensor.dtype != dtype:
                raise ValueError(f"graph input {tuple(tensor.shape)} {tensor.dtype} does not "
                                 f"match its buffer {shape} {dtype} (a bucket with two "
                                 "shapes)")
        if self.copied is not None:
            # The last call's copy out of the pinned buffer must be done before it is
            # overwritten (a caller that has read its scores has waited for it already).
            self.copied.synchronize()
        for view, tensor in zip(self.host_views, inputs):
            np.copyto(view, host_array(tensor))
        self.device.copy_(self.host, non_blocking=True)
        if self.copied is None:
            self.copied = torch.cuda.Event()
        self.copied.record(torch.cuda.current_stream(device))


class GraphReplays:
    """CUDA graphs of a function of device tensors, one per key, at most `max_graphs` (least
    recently used dropped). `run(key, fn, inputs)` copies `inputs` (host tensors) into the
    key's graph's input buffers (one host-to-device copy) and replays it. A key is captured
    on its `capture_after`-th call (the calls before run fn eagerly): a shape seen once costs
    no capture, and a stream of ever new shapes does not evict the graphs in use. A capture
    runs fn eagerly `warmup` times (on a side stream, as torch.cuda.graphs asks: Triton
    compiles and tunes there), then captures it; if that fails, the key runs eagerly from
    then on (logged once). The outputs of a replay are the graph's own buffers: its next
    replay overwrites them, so copy what must outlive it. capture=False runs fn eagerly.

    One stream and one thread: the graphs, their input buffers and outputs are shared by
    every call. The graphs read the module's parameters where they were at capture: replace
    a parameter (load_state_dict(assign=True), .to()) and the graphs must be dropped
    (`clear()`)."""

    def __init__(self, *, capture: bool = True, max_graphs: int = 8, warmup: int = 2,
                 capture_after: int = 2) -> None:
        self.capture = capture
        self.max_graphs = max_graphs
        self.warmup = warmup
        self.capture_after = capture_after
        self._graphs: collections.OrderedDict = collections.OrderedDict()
        self._seen: collections.Counter = collections.Counter()
        self._failed: set = set()
        self.stats = {"captures": 0, "replays": 0, "dropped": 0, "eager": 0,
                      "failed_captures": 0}

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        self._graphs.clear()
        self._seen.clear()
        self._failed.clear()

    def run(self, key, fn: Callable, inputs: Sequence[torch.Tensor], device: torch.device):
        if not self.capture:
            return fn(*to_device(inputs, device))
        with torch.cuda.device(device):
            found = self._graphs.get(key)
            if found is None:
                self._seen[key] += 1
                if key in self._failed or self._seen[key] < self.capture_after:
                    return self._eager(fn, inputs, device)
                try:
                    found = self._capture(fn, inputs, device)
                except Exception as error:  # noqa: BLE001 - any failure: this key runs eagerly
                    self._failed.add(key)
                    self.stats["failed_captures"] += 1
                    logger.warning("cached scoring: capturing a CUDA graph failed (%s: %s); "
                                   "this shape runs eagerly from now on",
                                   type(error).__name__, error)
                    return self._eager(fn, inputs, device)
                del self._seen[key]
                self._graphs[key] = found
                while len(self._graphs) > self.max_graphs:
                    self._graphs.popitem(last=False)
                    self.stats["dropped"] += 1
            else:
                self._graphs.move_to_end(key)
                found[1].fill(inputs, device)
            graph, _, outputs = found
            graph.replay()
            self.stats["replays"] += 1
            return outputs

    def _eager(self, fn, inputs, device):
        self.stats["eager"] += 1
        return fn(*to_device(inputs, device))

    def _capture(self, fn, inputs, device):
        staging = _Staging(inputs, device)
        staging.fill(inputs, device)
        stream = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                fn(*staging.inputs)
        stream.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = fn(*staging.inputs)
        self.stats["captures"] += 1
        logger.info("cached scoring: captured CUDA graph %d", self.stats["captures"])
        return graph, staging, outputs
