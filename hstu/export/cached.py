"""Cached scoring for request streams: each user's history keys and values are kept between
requests (hstu/modules/kv_cache.py), so a request runs only its new actions and candidates
through the encoder.

    scorer = CachedServing(serving_module, CachePolicy(mode="exact", max_bytes=2 << 30))
    probs = scorer.score(inputs, keys=[user ids...])   # inputs: the program's input dict

A request is one row in the serving format (hstu/export/serving.py): the user's contextual
features, their WHOLE current history and the candidates. The scorer recognises that a row's
history extends the cached one (same contextual features, the cached history tokens
unchanged at its start, every history input compared) and then runs only the tokens after
it; any other change (a history cut at the front by a length cap, an edited action, new
contextual features) re-encodes the user from scratch. Rows of one user in one call are
scored in order, each against the cache the previous one left.

Modes (CachePolicy.mode):
- "exact": the cache is used only when `kv_cache.reuse_is_exact` says the scores equal a full
  pass: same history, same contextual features, and every cached token in the same position
  and time bucket (appending new actions is exact only without contextual tokens or with one
  layer, and without time encoding: not for this project's recipes). Otherwise the user is
  re-encoded (a full pass over the history) and the new cache replaces the old. Scores equal
  ServingModule's within float rounding, always.
- "incremental": new actions are appended to the cache without touching the cached tokens,
  which keep the positions, time buckets and contextual-token states of the pass that computed
  them. Scores differ from a full pass; the difference grows with the tokens appended and the
  time elapsed since the last full encode, so the cache is re-encoded once more than
  max_stale_tokens tokens were appended or the query time moved more than max_stale_seconds
  from it. docs/serving.md has the measured differences.

Memory: the store (kv_cache.KVCacheStore) is bounded by max_bytes, least recently used users
evicted first (their next request re-encodes them).

Devices: the keys and values live where the serving module's parameters are. Everything else
(splitting the request into rows, recognising a cached history, the sizes and position/time
indices of the new tokens) is worked out on a CPU copy of the request, and only the new tokens'
inputs travel to the device: on a GPU a request does not wait for the device until its scores
are read.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from hstu.export.cached_graphs import (
    GraphReplays,
    delta_inputs,
    graph_key,
    host_array,
    pad_wave,
)
from hstu.export.serving import ServingModule, lengths_key
from hstu.modules.kv_cache import (
    CacheEntry,
    KVCacheStore,
    concat_ranges,
    check_writable,
    kv_layout,
    offsets_of,
    plan_cached_encode,
    reuse_is_exact,
    run_cached_encode,
    to_device,
    write_rows,
)
from hstu.modules.scoring import task_outputs
from hstu.ops import Kernel

MODES = ("exact", "incremental")
HISTORY_CHECKS = ("full", "ends")


@dataclasses.dataclass(frozen=True)
class CachePolicy:
    mode: str = "exact"
    max_bytes: int = 1 << 30
    # incremental mode: re-encode once more than this many tokens were appended since the
    # last full encode, or the query time moved more than this from that encode's.
    max_stale_tokens: int = 64
    max_stale_seconds: int = 3600
    # On a GPU with TRITON kernels, replay each wave's device work from a CUDA graph of its
    # shape bucket (hstu/export/cached_graphs.py), keeping at most max_graphs graphs. Waves
    # of more tokens than graph_max_tokens run eagerly: the GPU, not the host, bounds them,
    # and their graphs would hold that much activation memory each.
    cuda_graphs: bool = True
    max_graphs: int = 8
    graph_max_tokens: int = 65_536
    # How a request's history is recognised as the cached one plus new tokens at its end:
    # "full" compares every cached token of every history input (the default: a request whose
    # history was edited anywhere is re-encoded, so exact mode is exact for any request);
    # "ends" compares the first and the last cached token of each input and the lengths, for
    # streams whose histories only ever grow at their end (what KV caches that key on the
    # user and the cached length assume, with no check at all). With "ends", a history cut at
    # its front is told apart by its first token (whose timestamp moved: histories are in
    # time order), and an edit strictly inside the cached tokens goes unseen and is scored
    # against the old tokens. "full" reads every history token of the request and of the
    # cache on the host: at 128 users of 4K tokens, 29 MB and about half of a cached call's
    # host time.
    history_check: str = "full"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"cache mode {self.mode!r}; expected one of {', '.join(MODES)}")
        if self.history_check not in HISTORY_CHECKS:
            raise ValueError(f"cache history_check {self.history_check!r}; expected one of "
                             f"{', '.join(HISTORY_CHECKS)}")
        if self.max_bytes <= 0:
            raise ValueError(f"cache max_bytes must be > 0, got {self.max_bytes}")
        if self.max_stale_tokens < 0 or self.max_stale_seconds < 0:
            raise ValueError("cache max_stale_tokens and max_stale_seconds must be >= 0")
        if self.max_graphs < 1 or self.graph_max_tokens < 1:
            raise ValueError(f"cache max_graphs and graph_max_tokens must be >= 1, got "
                             f"{self.max_graphs} and {self.graph_max_tokens}")


@dataclasses.dataclass
class CacheCounters:
    """What happened to each request (row) scored so far."""

    rows: int = 0
    encoded: int = 0  # full pass over the history (no entry, or reuse not allowed)
    reused_exact: int = 0  # cache used, scores equal a full pass
    reused_stale: int = 0  # cache used in incremental mode, scores approximate
    appended_tokens: int = 0  # history tokens run against a cache (not re-encoded)
    # why rows were encoded
    no_entry: int = 0
    history_changed: int = 0
    not_exact: int = 0
    too_stale: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class _Wave:
    """The rows of one call that go through the encoder together (distinct users), columnar
    on the host: per sequence its offsets, and the arrays the bookkeeping compares."""

    inputs: dict[str, torch.Tensor]  # ServingModule's input dict for these rows (CPU)
    arrays: dict[str, np.ndarray]  # the features of `inputs` as numpy (host_array)
    keys: list[Hashable]
    history_offsets: np.ndarray  # [B+1] over the history tokens
    candidate_counts: np.ndarray  # [B], each >= 1
    timestamps: np.ndarray  # int64 [sum n]: the history tokens' times
    query_times: np.ndarray  # int64 [sum t]: the candidates' query times
    anchors: np.ndarray  # int64 [B]: each row's last candidate's query time
    signature: list[np.ndarray]  # per history input [sum n], floats as their bit patterns
    contextual: np.ndarray | None  # int64 [B, C]: the contextual features' ids

    def history(self, b: int) -> tuple[int, int]:
        return int(self.history_offsets[b]), int(self.history_offsets[b + 1])


class CachedServing:
    """Scores rows like ServingModule, with a per-user KV cache (see the module docstring).

    The host work per call is vectorised over the rows (numpy index arithmetic, one gather
    per feature); what is left per row is the cache lookup, two array comparisons and the
    entry's update. On a GPU the host work is most of a cached call, so it counts."""

    def __init__(self, serving: ServingModule, policy: CachePolicy | None = None, *,
                 graphs: GraphReplays | None | str = "auto") -> None:
        """graphs: "auto" replays the device work from CUDA graphs when policy.cuda_graphs is
        on, the model is on a GPU and runs TRITON kernels everywhere (the other kernels read
        sizes back from the GPU, which a graph cannot); None never does; a GraphReplays is
        used as given (GraphReplays(capture=False) pads the waves as for graphs and runs them
        eagerly: how the CPU tests check the padding)."""
        self.serving = serving.eval()
        # Where the model (and so the keys and values) lives: the new tokens go there.
        self.device = next(serving.parameters()).device
        self.policy = policy or CachePolicy()
        self.store = KVCacheStore(self.policy.max_bytes)
        self.counters = CacheCounters()
        groups = serving.groups
        if not groups["uih_timestamp"] or not groups["candidate_timestamp"]:
            raise ValueError(
                "cached scoring needs the uih_timestamp and candidate_timestamp groups")
        self.uih_features = [name for name, spec in serving.features.items()
                             if spec.sequence == serving.uih_sequence]
        self.sequences = sorted({spec.sequence for spec in serving.features.values()
                                 if spec.sequence is not None})
        self.timestamp_feature = groups["uih_timestamp"][0]
        self.query_time_feature = groups["candidate_timestamp"][0]
        encoder = serving.encoder
        self.contextual_seq_len = encoder.preprocessor.contextual_seq_len
        # Tokens the attention treats as contextual (they see the whole history): the STU's
        # contextual_seq_len may be set apart from the preprocessor's token count.
        self.bidirectional_tokens = max(
            [self.contextual_seq_len]
            + [layer.contextual_seq_len for layer in encoder.stu_stack.layers])
        self._layers = len(encoder.stu_stack.layers)
        if graphs == "auto":
            graphs = (GraphReplays(max_graphs=self.policy.max_graphs)
                      if self.policy.cuda_graphs and self.device.type == "cuda"
                      and _all_triton(serving) else None)
        elif graphs is not None and graphs.capture and not (
                self.device.type == "cuda" and _all_triton(serving)):
            raise ValueError("CUDA graphs of cached scoring need the model on a GPU with "
                             "TRITON kernels everywhere (the others read sizes back from "
                             "the GPU, or concatenate the capture's own caches)")
        self.graphs: GraphReplays | None = graphs
        # Host seconds per phase of the calls so far, when set to a dict (benchmarks: where a
        # cached call's host time goes; no device synchronisation is added).
        self.phase_seconds: dict[str, float] | None = None
        self._sequence_of = {name: spec.sequence for name, spec in serving.features.items()}

    # ---- public --------------------------------------------------------------------------

    @torch.no_grad()
    def score(
        self, inputs: Mapping[str, torch.Tensor], keys: Sequence[Hashable]
    ) -> dict[str, torch.Tensor]:
        """{task: [sum of candidates]} for the rows of `inputs` (ServingModule's input dict),
        `keys[b]` naming row b's user. Every row needs at least one candidate."""
        serving = self.serving
        candidate_lengths = lengths_key(serving.candidate_sequence)
        batch = int(inputs[candidate_lengths].shape[0])
        if len(keys) != batch:
            raise ValueError(f"{len(keys)} keys for {batch} rows")
        if batch == 0:
            raise ValueError("cached scoring got no rows")
        # The bookkeeping reads the request on the host (a copy, when it came on a GPU).
        inputs = {name: value.cpu() for name, value in inputs.items()}
        keys = list(keys)
        empty = np.flatnonzero(inputs[candidate_lengths].numpy() < 1)
        if empty.size:
            b = int(empty[0])
            raise ValueError(f"row {b} (key {keys[b]!r}) has no candidates; cached scoring "
                             "needs at least one")
        if not serving.ascending:
            # Newest-first rows: reversing every tensor makes them oldest-first and reverses
            # the row order (as score_candidates does); the outputs are flipped back below.
            inputs = {name: value.flip(0) for name, value in inputs.items()}
            keys = keys[::-1]
        counts = inputs[candidate_lengths].to(torch.int64).numpy()
        # Rows of one user are scored in order: the k-th row of every user goes in wave k.
        seen: dict[Hashable, int] = {}
        waves: list[list[int]] = []
        for index, key in enumerate(keys):
            wave = seen.get(key, 0)
            seen[key] = wave + 1
            if wave == len(waves):
                waves.append([])
            waves[wave].append(index)
        if len(waves) == 1:
            out = self._score_wave(self._wave(inputs, keys))
        else:
            # Each wave's scores in its rows' order; one gather per task puts every candidate
            # back in its place (the order is worked out on the host).
            candidate_offsets = offsets_of(counts)
            parts, order = [], []
            for rows in waves:
                rows = np.asarray(rows, dtype=np.int64)
                parts.append(self._score_wave(self._wave(self._select_rows(inputs, rows),
                                                         [keys[i] for i in rows])))
                order.append(concat_ranges(candidate_offsets[:-1][rows], counts[rows]))
            inverse = np.empty(int(candidate_offsets[-1]), dtype=np.int64)
            inverse[np.concatenate(order)] = np.arange(inverse.size)
            inverse = torch.from_numpy(inverse)
            out = {}
            for task in parts[0]:
                joined = torch.cat([part[task] for part in parts])
                out[task] = joined[to_device([inverse], joined.device)[0]]
        if not serving.ascending:
            out = {task: value.flip(0) for task, value in out.items()}
        return out

    def summary(self) -> dict[str, object]:
        return {
            "mode": self.policy.mode,
            **self.counters.as_dict(),
            "cache_entries": self.store.stats.entries,
            "cache_bytes": self.store.stats.bytes,
            "cache_max_bytes": self.store.max_bytes,
            "evictions": self.store.stats.evictions,
            "rejected_entries": self.store.stats.rejected,
            **({f"graph_{name}": count for name, count in self.graphs.stats.items()}
               if self.graphs is not None else {}),
        }

    # ---- rows ----------------------------------------------------------------------------

    def _select_rows(self, inputs: Mapping[str, torch.Tensor],
                     rows: np.ndarray) -> dict[str, torch.Tensor]:
        """The input dict of rows `rows` (in that order) of `inputs`."""
        serving = self.serving
        gathers = {}
        for sequence in self.sequences:
            lengths = inputs[lengths_key(sequence)].to(torch.int64).numpy()
            offsets = offsets_of(lengths)
            gathers[sequence] = torch.from_numpy(concat_ranges(offsets[:-1][rows], lengths[rows]))
        index = torch.from_numpy(rows)
        out = {}
        for name, spec in serving.features.items():
            out[name] = inputs[name][index if spec.sequence is None else gathers[spec.sequence]]
        for sequence in self.sequences:
            out[lengths_key(sequence)] = inputs[lengths_key(sequence)][index]
        return out

    def _wave(self, inputs: dict[str, torch.Tensor], keys: list[Hashable]) -> _Wave:
        # numpy from here on: a torch op on these small tensors costs several numpy ones.
        serving = self.serving
        arrays = {name: host_array(inputs[name]) for name in self._sequence_of}

        def int64(name: str) -> np.ndarray:
            return np.asarray(host_array(inputs[name]), dtype=np.int64)

        history_offsets = offsets_of(int64(lengths_key(serving.uih_sequence)))
        counts = int64(lengths_key(serving.candidate_sequence))
        query_times = int64(self.query_time_feature)
        contextual_names = serving.groups["contextual"]
        contextual = (np.stack([_bits(arrays[name]) for name in contextual_names], axis=1)
                      if contextual_names else None)
        return _Wave(
            inputs=inputs, arrays=arrays, keys=keys, history_offsets=history_offsets,
            candidate_counts=counts, timestamps=int64(self.timestamp_feature),
            query_times=query_times, anchors=query_times[np.cumsum(counts) - 1],
            signature=[_bits(arrays[name]) for name in self.uih_features],
            contextual=contextual,
        )

    def _decide_all(self, wave: _Wave) -> tuple[list[CacheEntry | None], set[int]]:
        """Per row, the entry to score it against, or None to encode it from scratch; and the
        rows whose entries become stale (marked so by the store update, once the call's
        device work succeeded). One loop over the rows with what each needs read out
        beforehand: this runs for every user of every call, on the host, before the GPU gets
        any work."""
        counters, policy, encoder = self.counters, self.policy, self.serving.encoder
        offsets = wave.history_offsets.tolist()
        anchors = wave.anchors.tolist()
        # As int64, the dtype CacheEntry keeps them in, so that equal values have equal bytes.
        contextual = (None if wave.contextual is None
                      else [row.tobytes() for row in wave.contextual.astype(np.int64, copy=False)])
        entries, stale = [], set()
        extends = self._extends if policy.history_check == "full" else self._extends_at_ends
        for b, key in enumerate(wave.keys):
            entry = self.store.get(key)
            if entry is None:
                counters.no_entry += 1
                entries.append(None)
                continue
            start, end = offsets[b], offsets[b + 1]
            n = entry.history_length
            if not extends(entry, wave, start, end, n,
                           None if contextual is None else contextual[b]):
                counters.history_changed += 1
                entries.append(None)
                continue
            new_tokens = end - start - n
            anchor = anchors[b]
            exact = reuse_is_exact(encoder, entry, new_tokens, anchor,
                                   bidirectional_tokens=self.bidirectional_tokens,
                                   layers=self._layers)
            if exact:
                counters.reused_exact += 1
            elif policy.mode == "exact":
                counters.not_exact += 1
                entry = None
            elif (entry.stale_tokens + new_tokens > policy.max_stale_tokens
                  or abs(anchor - entry.encoded_anchor) > policy.max_stale_seconds):
                counters.too_stale += 1
                entry = None
            else:
                counters.reused_stale += 1
                stale.add(b)
            entries.append(entry)
        return entries, stale

    @staticmethod
    def _extends(entry: CacheEntry, wave: _Wave, start: int, end: int, n: int,
                 contextual: bytes | None) -> bool:
        """Is the row's history (wave tokens [start, end)) the cached one (n tokens) plus
        tokens at its end, with the same contextual features (their bytes)?"""
        if end - start < n or entry.contextual_bytes != contextual:
            return False
        # One comparison per input: views of the request, no copies (both n long).
        for cached, column in zip(entry.signature(n), wave.signature):
            if not (cached == column[start:start + n]).all():
                return False
        return True

    @staticmethod
    def _extends_at_ends(entry: CacheEntry, wave: _Wave, start: int, end: int, n: int,
                         contextual: bytes | None) -> bool:
        """_extends for CachePolicy.history_check "ends": the first and the last of the n
        cached tokens compared, per input, instead of all of them."""
        if end - start < n or entry.contextual_bytes != contextual:
            return False
        if n == 0:
            return True
        last = start + n - 1
        for cached, column in zip(entry.signature(n), wave.signature):
            if cached[0] != column[start] or cached[n - 1] != column[last]:
                return False
        return True

    # ---- one wave: distinct users ---------------------------------------------------------

    def _phase(self, name: str, since: float) -> float:
        now = time.perf_counter()
        if self.phase_seconds is not None:
            self.phase_seconds[name] = self.phase_seconds.get(name, 0.0) + now - since
        return now

    def _score_wave(self, wave: _Wave) -> dict[str, torch.Tensor]:
        serving = self.serving
        batch = len(wave.keys)
        clock = time.perf_counter()
        entries, stale = self._decide_all(wave)
        clock = self._phase("decide", clock)
        starts = np.array([0 if entry is None else entry.history_length for entry in entries],
                          dtype=np.int64)
        history_lengths = np.diff(wave.history_offsets)
        new_lengths = history_lengths - starts
        from_scratch = sum(entry is None for entry in entries)
        self.counters.rows += batch
        self.counters.encoded += from_scratch
        self.counters.appended_tokens += int(sum(
            new_lengths[b] for b, entry in enumerate(entries) if entry is not None))

        rows, counts = entries, wave.candidate_counts
        history_lengths, bounds = new_lengths, {}
        tokens = int(new_lengths.sum() + counts.sum()) + self.contextual_seq_len * from_scratch
        graphs = self.graphs if tokens <= self.policy.graph_max_tokens else None
        # Per row: its new history tokens' times, then its candidates' query times (the
        # plan's position and time-bucket rows come from them). An eager wave with no cached
        # row needs none: the device computes them as in a full pass.
        timestamps = None
        if from_scratch < batch or graphs is not None:
            timestamps = _interleave(
                wave.timestamps, wave.history_offsets[:-1] + starts, new_lengths,
                wave.query_times, wave.candidate_counts)
        padded = None
        if graphs is not None:
            padded = pad_wave(entries, new_lengths, counts, timestamps, self.contextual_seq_len)
            rows, counts, timestamps = padded.entries, padded.candidate_counts, padded.timestamps
            history_lengths = padded.history_lengths
            bucket = padded.bucket
            bounds = dict(max_item_len=bucket.max_item_len, max_delta_len=bucket.max_delta_len,
                          max_cache_len=bucket.max_cache_len)
        # The new tokens' inputs (and the padding rows' zeros), one numpy gather per feature.
        new_tokens = (concat_ranges(wave.history_offsets[:-1] + starts, new_lengths)
                      if starts.any() else None)
        delta = delta_inputs(wave.inputs, wave.arrays, sequence_of=self._sequence_of,
                             history_sequence=serving.uih_sequence,
                             candidate_sequence=serving.candidate_sequence,
                             lengths_key=lengths_key, new_tokens=new_tokens,
                             new_lengths=new_lengths, wave=padded)
        clock = self._phase("gather", clock)
        plan = plan_cached_encode(serving.encoder, rows, history_lengths=history_lengths.tolist(),
                                  candidate_counts=counts.tolist(), timestamps=timestamps,
                                  **bounds)
        names = list(delta)
        # The plan's small host tensors travel as one int64 block (split on the device).
        sizes, packed = plan.host_sizes, plan.packed

        def device_part(*tensors):
            encoder_inputs = serving.encoder_inputs(dict(zip(names, tensors)))
            encoding = run_cached_encode(serving.encoder, plan, tensors[-1].split(sizes),
                                         encoder_inputs)
            item = serving.item_tower(encoder_inputs["candidates"])
            per_task = serving.fusion_tower(encoding.candidates, item)
            probs = task_outputs(serving.tasks, per_task)[1]
            return probs, encoding.prefix_kv, encoding.prefix_offsets_device

        inputs = [delta[name] for name in names] + [packed]
        clock = self._phase("plan", clock)
        if graphs is not None:
            # Everything of the host that the captured kernels depend on: the bucket fixes the
            # sizes and bounds; the rest is said here so that a new case captures anew.
            key = (graph_key(padded.bucket), tuple(sizes), plan.whole_rows, plan.has_buckets,
                   plan.aligned,
                   tuple((name, delta[name].dtype) for name in names),
                   torch.is_autocast_enabled(self.device.type),
                   torch.get_autocast_dtype(self.device.type))
            probs, prefix_kv, prefix_offsets = graphs.run(key, device_part, inputs, self.device)
            # The wave's rows come first: their candidates are the first ones out. A graph's
            # outputs are overwritten by its next replay, hence the copies.
            real = int(wave.candidate_counts.sum())
            probs = {task: value[:real].clone() for task, value in probs.items()}
            prefix_offsets = prefix_offsets[:batch + 1]
        else:
            probs, prefix_kv, prefix_offsets = device_part(*to_device(inputs, self.device))
        clock = self._phase("device launch", clock)
        self._update_store(wave, entries, stale, starts, prefix_kv,
                           plan.prefix_offsets[:batch + 1].tolist(), prefix_offsets,
                           graphed=graphs is not None)
        self._phase("store update", clock)
        return probs

    def _update_store(self, wave: _Wave, entries, stale, starts, prefix_kv, offsets,
                      device_offsets, *, graphed: bool) -> None:
        """Each row's new keys and values (prefix_kv, jagged over offsets [B+1], the same on
        the device as device_offsets; padding rows after them are left out) into its entry."""
        # One user encoded eagerly: its new entry keeps slices of the batch tensors (nothing
        # else shares them). Otherwise every row's keys and values go to its entry's buffers
        # (room made here, the rows written together by kv_cache.write_rows), and entries
        # enter the store only after that.
        keep_slices = len(entries) == 1 and entries[0] is None and not graphed
        layout = kv_layout(prefix_kv)
        places, updated = [], []
        try:
            for b, entry in enumerate(entries):
                lo, hi = offsets[b], offsets[b + 1]
                first, end = wave.history(b)
                if entry is None:
                    if keep_slices:
                        kv = [(k[lo:hi], v[lo:hi]) for k, v in prefix_kv]
                    else:
                        kv = [tuple(t.new_empty((hi - lo, *t.shape[1:])) for t in pair)
                              for pair in prefix_kv]
                    entry = CacheEntry(
                        kv,
                        contextual_seq_len=self.contextual_seq_len,
                        history_timestamps=wave.timestamps[first:end],
                        anchor=int(wave.anchors[b]),
                        contextual=None if wave.contextual is None else wave.contextual[b],
                        signature=[column[first:end] for column in wave.signature],
                    )
                    row = 0
                else:
                    check_writable(entry, prefix_kv, layout)
                    if b in stale:
                        entry.exact = False
                    start = first + int(starts[b])
                    row = entry.make_room(end - start, wave.timestamps[start:end],
                                          [column[start:end] for column in wave.signature])
                    if entry.exact:
                        entry.anchor = int(wave.anchors[b])
                    else:
                        entry.stale_tokens += end - start
                places.append((entry, row))
                updated.append((wave.keys[b], entry))
            if not keep_slices:
                write_rows(prefix_kv, offsets, device_offsets, places)
        except BaseException:
            # Some entries may now claim rows that were never written: forget this wave's
            # users (their next request encodes them afresh) rather than serve them wrong.
            for key in wave.keys:
                self.store.pop(key)
            raise
        for key, entry in updated:
            self.store.put(key, entry)


def _all_triton(serving: ServingModule) -> bool:
    """Does every module with a kernel setting run TRITON (graphs need it, see __init__)?"""
    return all(Kernel.parse(module.kernel) is Kernel.TRITON
               for module in serving.modules() if getattr(module, "kernel", None) is not None)


def _bits(values: np.ndarray) -> np.ndarray:
    """[n]: the values (integers, host_array of an input) or their bit patterns (floats, as
    integers of their width), a view where possible, so that an integer comparison tells
    whether two inputs are the same (bit for bit: a float that moved by one ulp differs)."""
    values = values.reshape(-1)
    if values.dtype.kind == "f":
        values = values.view(f"i{values.itemsize}")
    return values


def _interleave(first: np.ndarray, first_starts: np.ndarray, first_lengths: np.ndarray,
                second: np.ndarray, second_lengths: np.ndarray) -> np.ndarray:
    """Per row b: first[first_starts[b] : + first_lengths[b]], then row b's values of the
    jagged `second` (second_lengths per row), all rows concatenated. Costs what it returns,
    not the size of `first` (a whole batch of histories)."""
    row_offsets = offsets_of(first_lengths + second_lengths)
    out = np.empty(int(row_offsets[-1]), dtype=np.result_type(first, second))
    out[concat_ranges(row_offsets[:-1], first_lengths)] = first[
        concat_ranges(first_starts, first_lengths)]
    out[concat_ranges(row_offsets[:-1] + first_lengths, second_lengths)] = second
    return out


def load_serving_module(export_dir: str | Path) -> ServingModule:
    """The ServingModule of an export directory, rebuilt from its pipeline.config with the
    weights of its program (checked like Predictor checks them: manifest, sha256, no pickle).

    Cached scoring needs the model's modules, not only the traced program: the modules are
    built with hstu.model.DlrmHSTU (which imports TorchRec; its tables are made on the meta
    device, never allocated) and every parameter and buffer is taken from the program, by
    name; a name missing on either side is an error (a program exported by other code)."""
    from hstu.config.features import feature_specs, label_specs
    from hstu.config.loader import load_config_text
    from hstu.export import artifacts
    from hstu.model import DlrmHSTU
    from hstu.ops import Kernel

    export_dir = Path(export_dir)
    _, program = artifacts.open_export_dir(export_dir)
    config_path = export_dir / artifacts.CONFIG_FILE
    cfg = load_config_text(config_path.read_text(encoding="utf-8"), str(config_path))
    model = DlrmHSTU(cfg, feature_specs(cfg), label_specs(cfg),
                     embedding_device=torch.device("meta"))
    model.set_kernel(Kernel.PYTORCH)
    serving = ServingModule(model)
    state = program.state_dict
    expected = serving.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise artifacts.ExportDirError(
            f"{export_dir}: the program's weights do not fit the model its pipeline.config "
            f"builds (missing {missing[:5]}, unexpected {unexpected[:5]}); re-export with this "
            "version of the code")
    serving.load_state_dict(dict(state), strict=True, assign=True)
    serving.eval()
    _check_against_program(serving, program, export_dir)
    return serving


# Rows (history, candidates) the rebuilt modules are checked on against the program.
CHECK_LENGTHS = {"history": [5, 0, 9], "candidates": [2, 3, 1]}
CHECK_ATOL, CHECK_RTOL = 1e-5, 1e-4


def _check_against_program(serving: ServingModule, program, export_dir: Path) -> None:
    """The rebuilt modules must score like the exported program: the modules run this
    checkout's code, the program the code of export time, and the two may have drifted."""
    from hstu.export import artifacts
    from hstu.export.serving import (
        serving_inputs,
        synthetic_inputs,
        with_filler_row,
        without_filler_scores,
    )

    features = list(serving.features.values())
    timestamps = set(serving.groups["uih_timestamp"] + serving.groups["candidate_timestamp"])
    lengths = {serving.uih_sequence: CHECK_LENGTHS["history"],
               serving.candidate_sequence: CHECK_LENGTHS["candidates"]}
    inputs = synthetic_inputs(features, timestamps, serving.uih_sequence, lengths, seed=7)
    with torch.no_grad():
        expected = without_filler_scores(
            program.module()(with_filler_row(inputs, serving_inputs(features))))
        got = serving(inputs)
    for task, value in expected.items():
        if not torch.allclose(got[task], value, atol=CHECK_ATOL, rtol=CHECK_RTOL):
            worst = float((got[task] - value).abs().max())
            raise artifacts.ExportDirError(
                f"{export_dir}: the modules rebuilt from this checkout's code score task "
                f"{task!r} differently from the exported program (max difference {worst:.3g}); "
                "the model code changed since the export: re-export, or score uncached")
