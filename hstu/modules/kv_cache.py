"""KV-cached incremental encoding for serving: a user's history is encoded once, its keys and
values kept per STU layer, and later requests run only their new tokens (new actions and the
candidates) through the encoder, attending to the cached keys.

What a row looks like (reference 2.4-2.9): [c contextual; n history; t candidates]. What each
token's layer-0 input depends on, and so what may be cached:

- content + action embeddings: the token's own features, and the contextual input
  (parameterized_mlp). Per token; nothing to do with the rest of the row.
- position: counted from the END of the history (pos = c + n - k for history token k, c for
  every candidate, 0..c-1 for contextual tokens) when use_time_encoding is on, as in
  TorchEasyRec. A new action therefore moves EVERY cached history token by one position.
  Without time encoding the positions count from the start and stay put.
- time bucket: of (query time - token time), the query time being the row's last candidate's.
  A later request moves every bucket whose boundary it crosses (recent tokens most often:
  bucket k of the sqrt scheme covers 60(2k+1) seconds).

And what each token's deeper layers see (mask, reference 2.7): history tokens see contextual
tokens, earlier history and themselves; candidates see contextual + history + themselves;
contextual tokens see contextual + the WHOLE history. So a history token's state at layer l
depends on later tokens only through the contextual tokens' states at layers < l, which do
depend on every history token, new ones included.

Hence (`reuse_is_exact`): reusing a cache is exact iff every cached token's layer-0 input is
unchanged (same contextual input, same history, same positions and time buckets) and, when new
tokens are appended, no cached state depends on them (no contextual tokens, or one layer). For
DlrmHSTU as configured in this project's recipes (time encoding, contextual tokens, 2-3 layers)
that means: candidates of a request can be scored against the cache exactly (and in as many
calls as one likes) while the history and every time bucket are unchanged; any new action
changes every cached position and every contextual state, so an exact answer needs the history
re-encoded. hstu/export/cached.py offers both: an exact mode that re-encodes whenever reuse
would not be exact, and an incremental mode that appends new actions to the stale cache, with
a bound on the staleness, whose scores differ from full recomputation (measured, not bounded
analytically: docs/serving.md).

Computing the new tokens exactly as a full pass would, given the cache: the delta rows
(new history tokens and candidates, plus the contextual tokens when nothing is cached) go
through the model's own preprocessor; their positions and time buckets are those of the whole
("virtual") row, computed from index arithmetic over it (cheap: integers, O(row length)); the
STU layers run `STULayer.cached_forward` (queries: the delta rows; keys: cache + delta).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Hashable, Sequence

import numpy as np
import torch
from torch import nn

from hstu.ops.cached_attention import ROW_ALIGNMENT, CacheRows
from hstu.ops.position import add_position_time_at
from hstu.ops.pytorch.position import position_indices, time_bucket_indices


class _GrowingRows:
    """A numpy array [n, ...] that grows at its end into spare room, so that appending a few
    rows to a long history copies those rows, not the history."""

    def __init__(self, values: np.ndarray, growth: float) -> None:
        self._buffer = np.array(values, copy=True)
        self.length = int(self._buffer.shape[0])
        self._growth = growth

    def view(self, length: int | None = None) -> np.ndarray:
        return self._buffer[: self.length if length is None else length]

    def extend(self, more: np.ndarray) -> bool:
        """Append `more`; True when the buffer had to grow (its nbytes changed)."""
        needed = self.length + int(more.shape[0])
        grew = needed > self._buffer.shape[0]
        if grew:
            capacity = max(needed, int(self._buffer.shape[0] * self._growth))
            grown = np.empty((capacity, *self._buffer.shape[1:]), dtype=self._buffer.dtype)
            grown[: self.length] = self._buffer[: self.length]
            self._buffer = grown
        self._buffer[self.length:needed] = more
        self.length = needed
        return grew

    @property
    def nbytes(self) -> int:
        return int(self._buffer.nbytes)


class CacheEntry:
    """One user's cached prefix: per STU layer the keys [P, H, d_qk] and values [P, H, d_v] of
    its c contextual and n history tokens (P = c + n), and what decides whether they can be
    reused: the history's timestamps, the query time they were encoded for, the contextual
    input, and whether they are still exactly what a full pass would compute.

    Keys and values live in buffers with spare room at the end, so that appending a few tokens
    copies those tokens, not the whole history (a 4K-token history of the 27K recipe is
    48 MB of float32 keys and values); so do the host-side timestamps and signature.

    signature: the raw history inputs, one array [n] per input (floats as their bit
    patterns), that recognises a request whose history extends this one
    (hstu/export/cached.py); contextual_bytes: the contextual input's bytes, as int64 [C].
    Both live on the CPU, a few bytes per token, so that comparing them costs no tensor
    ops."""

    GROWTH = 1.5  # buffer capacity factor on append

    def __init__(
        self,
        layers_kv: Sequence[tuple[torch.Tensor, torch.Tensor]],
        *,
        contextual_seq_len: int,
        history_timestamps: torch.Tensor | np.ndarray,
        anchor: int,
        contextual: torch.Tensor | np.ndarray | None,
        signature: Sequence[np.ndarray] = (),
    ) -> None:
        self.keys = [k.contiguous() for k, _ in layers_kv]
        self.values = [v.contiguous() for _, v in layers_kv]
        self.length = int(self.keys[0].shape[0]) if self.keys else 0
        self.contextual_seq_len = contextual_seq_len
        self._timestamps = _GrowingRows(_int64_array(history_timestamps), self.GROWTH)
        # The query time of the last full encode (positions and buckets of the cached tokens
        # are those of that pass until an inexact append).
        self.anchor = int(anchor)
        self.encoded_anchor = int(anchor)
        # What a request's contextual input is compared with (one bytes equality).
        self.contextual_bytes = (None if contextual is None
                                 else _int64_array(contextual).tobytes())
        n = self.history_length
        self._signature = [_GrowingRows(column, self.GROWTH) for column in signature]
        self.exact = True  # equal to a full pass over its history at `anchor`
        self.stale_tokens = 0  # tokens appended inexactly since the last full encode
        for index, (k, v) in enumerate(zip(self.keys, self.values)):
            if k.shape[0] != self.length or v.shape[0] != self.length:
                raise ValueError(f"layer {index}: {k.shape[0]} keys and {v.shape[0]} values "
                                 f"for a cache of {self.length} rows")
        if self.length != self.contextual_seq_len + n:
            raise ValueError(
                f"cache of {self.length} rows for {contextual_seq_len} contextual and "
                f"{n} history tokens"
            )
        for index, column in enumerate(self._signature):
            if column.length != n:
                raise ValueError(f"signature column {index} of {column.length} rows for {n} "
                                 "history tokens")
        self._nbytes = self._count_bytes()
        self._layout = None
        self._addresses = None

    @property
    def layout(self) -> tuple:
        """What rows of its buffers look like: per layer (keys dtype, [H, d_qk], values dtype,
        [H, d_v]), and the device. Buffers keep it when they grow, so it is worked out once
        (a cached call compares it for every row)."""
        if self._layout is None:
            self._layout = kv_layout(list(zip(self.keys, self.values)))
        return self._layout

    @property
    def buffer_addresses(self) -> np.ndarray:
        """int64 [2 * layers]: the addresses of layer 0's key and value buffers, then layer
        1's, ... (what the cached attention and write_rows read rows through). Worked out
        again only when a buffer grows (make_room), not per call and user."""
        if self._addresses is None:
            self._addresses = np.array(
                [t.data_ptr() for pair in zip(self.keys, self.values) for t in pair],
                dtype=np.int64)
        return self._addresses

    @property
    def history_length(self) -> int:
        return self._timestamps.length

    @property
    def history_timestamps(self) -> torch.Tensor:
        """int64 [n] (a CPU view: do not write to it)."""
        return torch.from_numpy(self._timestamps.view())

    def signature(self, length: int | None = None) -> list[np.ndarray]:
        """Per input, the first `length` (default all) history tokens' values."""
        return [column.view(length) for column in self._signature]

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached (keys, values) of layer `index`: views of the first `length` rows."""
        return self.keys[index][: self.length], self.values[index][: self.length]

    def make_room(self, added: int, timestamps: torch.Tensor | np.ndarray,
                  signature: Sequence[np.ndarray] = ()) -> int:
        """Account for `added` new history tokens (their timestamps and signature rows) and
        make room for their keys and values at the end of every buffer; returns the row
        where they go. The caller writes them (write_rows)."""
        timestamps = _int64_array(timestamps)
        if timestamps.shape[0] != added:
            raise ValueError(f"{timestamps.shape[0]} timestamps for {added} new tokens")
        if len(signature) != len(self._signature) or any(
                column.shape[0] != added for column in signature):
            raise ValueError(f"signature of {[c.shape[0] for c in signature]} rows for "
                             f"{len(self._signature)} inputs of {added} new tokens")
        start = self.length
        if added == 0:
            return start
        needed = start + added
        grew = bool(self.keys) and self.keys[0].shape[0] < needed
        if grew:
            capacity = max(needed, int(self.keys[0].shape[0] * self.GROWTH))
            for buffers in (self.keys, self.values):
                for index, buffer in enumerate(buffers):
                    grown = buffer.new_empty((capacity, *buffer.shape[1:]))
                    grown[:start] = buffer[:start]
                    buffers[index] = grown
            self._addresses = None
        self.length = needed
        grew = self._timestamps.extend(timestamps) | grew
        for column, values in zip(self._signature, signature):
            grew = column.extend(values) | grew
        if grew:
            self._nbytes = self._count_bytes()
        return start

    def truncate(self, history_length: int) -> None:
        """Forget the history tokens after the first `history_length` (their keys and values
        stay in the buffers, unused). Exactness flags are the caller's: an entry cut back to
        what an exact encode computed is exact again only if nothing inexact came before."""
        if not 0 <= history_length <= self.history_length:
            raise ValueError(f"cannot cut a cache of {self.history_length} history tokens to "
                             f"{history_length}")
        self.length = self.contextual_seq_len + history_length
        self._timestamps.length = history_length
        for column in self._signature:
            column.length = history_length

    def nbytes(self) -> int:
        """Bytes held: the key and value buffers with their spare room, and the host arrays."""
        return self._nbytes

    def _count_bytes(self) -> int:
        total = sum(t.numel() * t.element_size() for t in self.keys + self.values)
        total += self._timestamps.nbytes + sum(column.nbytes for column in self._signature)
        if self.contextual_bytes is not None:
            total += len(self.contextual_bytes)
        return total


def _int64_array(values: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.int64).reshape(-1)


@dataclasses.dataclass
class CacheStats:
    entries: int = 0
    bytes: int = 0
    evictions: int = 0
    rejected: int = 0  # entries larger than the whole budget: never stored


class KVCacheStore:
    """Cache entries by user key, bounded in bytes (keys + values + the small metadata).

    Eviction: least recently used first. `get` and `put` make an entry the most recent; when a
    `put` takes the total over `max_bytes`, the least recently used OTHER entries go, whole,
    until it fits. An entry larger than the whole budget is not stored (counted in
    stats.rejected); its user is encoded from scratch on every request. Call `put` again after
    growing an entry (make_room), so that its new size counts."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"the cache needs a positive byte budget, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._entries: collections.OrderedDict[Hashable, CacheEntry] = collections.OrderedDict()
        self._sizes: dict[Hashable, int] = {}
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def get(self, key: Hashable) -> CacheEntry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def pop(self, key: Hashable) -> None:
        if key in self._entries:
            del self._entries[key]
            self.stats.bytes -= self._sizes.pop(key)
            self.stats.entries = len(self._entries)

    def put(self, key: Hashable, entry: CacheEntry) -> bool:
        """Store (or re-account) `entry`; False when it is larger than the whole budget."""
        self.pop(key)
        size = entry.nbytes()
        if size > self.max_bytes:
            self.stats.rejected += 1
            return False
        while self.stats.bytes + size > self.max_bytes and self._entries:
            oldest = next(iter(self._entries))
            self.pop(oldest)
            self.stats.evictions += 1
        self._entries[key] = entry
        self._sizes[key] = size
        self.stats.bytes += size
        self.stats.entries = len(self._entries)
        return True


# ----------------------------------------------------------------------------- exactness


def kv_layout(layers_kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple:
    """Per layer (keys dtype, [H, d_qk], values dtype, [H, d_v]), then the device."""
    device = layers_kv[0][0].device if layers_kv else None
    return tuple((k.dtype, tuple(k.shape[1:]), v.dtype, tuple(v.shape[1:]))
                 for k, v in layers_kv) + (device,)


def check_writable(entry: CacheEntry, prefix_kv: Sequence[tuple[torch.Tensor, torch.Tensor]],
                   layout: tuple | None = None) -> None:
    """Raise unless the entry's buffers can take rows of prefix_kv as they are: as many layers,
    the same dtype and [H, d] per layer and tensor (write_rows copies raw rows; an entry
    encoded under another dtype, say float32 beside bf16 autocast, cannot take them).
    layout: kv_layout(prefix_kv), when the caller has it (one comparison per entry)."""
    if entry.layout == (kv_layout(prefix_kv) if layout is None else layout):
        return
    if len(entry.keys) != len(prefix_kv):
        raise ValueError(f"a cache entry of {len(entry.keys)} layers for keys of "
                         f"{len(prefix_kv)} layers")
    for index, (k, v) in enumerate(prefix_kv):
        for name, buffer, new in (("keys", entry.keys[index], k),
                                  ("values", entry.values[index], v)):
            if buffer.dtype != new.dtype or buffer.shape[1:] != new.shape[1:]:
                raise ValueError(
                    f"layer {index} {name}: the cache entry holds {buffer.dtype} "
                    f"{tuple(buffer.shape[1:])}, the new rows are {new.dtype} "
                    f"{tuple(new.shape[1:])}; an entry made under another dtype or model "
                    "cannot be appended to")


def write_rows(prefix_kv: Sequence[tuple[torch.Tensor, torch.Tensor]], offsets: Sequence[int],
               device_offsets: torch.Tensor, places: Sequence[tuple[CacheEntry, int]], *,
               by_address: bool | None = None) -> None:
    """Row b of every layer's new keys and values (prefix_kv, jagged over `offsets` [B+1],
    the same on the device as device_offsets) into places[b] = (entry, row): the entry's
    buffers from that row on, room the caller made (CacheEntry.make_room) in entries that
    check_writable accepts.

    by_address (default: on a GPU): one kernel copies every row of every layer's keys and
    values to its entry's buffers through their addresses
    (hstu.ops.triton.cached_attention.copy_rows_by_table), so the host makes no tensor op
    per row, nor a launch per layer. Otherwise one slice per row, layer and tensor and one
    multi-tensor copy (copy_many)."""
    if not prefix_kv or not places:
        return
    batch = len(places)
    if len(offsets) != batch + 1:
        raise ValueError(f"{len(offsets) - 1} rows of new keys for {batch} places")
    for b, (entry, row) in enumerate(places):
        # Raw addresses must stay inside the buffers: the room made must be there.
        if row + offsets[b + 1] - offsets[b] > min(entry.keys[0].shape[0],
                                                   entry.values[0].shape[0]):
            raise ValueError(f"row {b}: {offsets[b + 1] - offsets[b]} new rows from row {row} "
                             f"do not fit a buffer of {entry.keys[0].shape[0]} rows")
    sources = [t for pair in prefix_kv for t in pair]
    device = sources[0].device
    if by_address is None:
        by_address = device.type == "cuda"
    if not by_address:
        targets, copied = [], []
        for b, (entry, row) in enumerate(places):
            end = row + offsets[b + 1] - offsets[b]
            for index, (k, v) in enumerate(prefix_kv):
                targets += [entry.keys[index][row:end], entry.values[index][row:end]]
                copied += [k[offsets[b]:offsets[b + 1]], v[offsets[b]:offsets[b + 1]]]
        copy_many(targets, copied)
        return
    from hstu.ops.triton.cached_attention import copy_rows_by_table

    # One launch for every layer's keys and values: per tensor, the target address of each
    # row (its buffer's address + first row * row bytes), the source's address and its
    # elements per row, in one int64 table (one host-to-device copy).
    sources = [t.contiguous() for t in sources]
    row_elements = np.array([math.prod(t.shape[1:]) for t in sources], dtype=np.int64)
    row_bytes = row_elements * np.array([t.element_size() for t in sources], dtype=np.int64)
    bases = np.stack([entry.buffer_addresses for entry, _ in places], axis=1)  # [2L, B]
    rows = np.array([row for _, row in places], dtype=np.int64)
    table = np.empty((len(sources), batch + 2), dtype=np.int64)
    table[:, :batch] = bases + row_bytes[:, None] * rows
    table[:, batch] = [t.data_ptr() for t in sources]
    table[:, batch + 1] = row_elements
    # Whole 16-byte vectors when every address and row size allows (checked here, on the
    # host copy of the table: entries' buffers come from the allocator, rows are H * d).
    aligned = bool((table[:, :batch + 1] % ROW_ALIGNMENT == 0).all()
                   and (row_bytes % ROW_ALIGNMENT == 0).all())
    table = to_device([torch.from_numpy(table)], device)[0]
    longest = max(offsets[b + 1] - offsets[b] for b in range(batch))
    if all(t.dtype == sources[0].dtype for t in sources):
        copy_rows_by_table(sources, device_offsets, table, longest, aligned=aligned)
    else:  # keys and values of different dtypes: a launch per tensor
        for index, source in enumerate(sources):
            copy_rows_by_table([source], device_offsets, table[index:index + 1], longest,
                               aligned=aligned)


def copy_many(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]) -> None:
    """targets[i] <- sources[i] for every i, in one multi-tensor launch per device and dtype
    (torch._foreach_copy_) instead of one copy kernel per pair: a wave of 128 users over 3
    layers appends 768 key/value slices."""
    if targets:
        torch._foreach_copy_(list(targets), list(sources))


def _prefix_indices(positional_encoder, contextual_seq_len: int, history_timestamps: torch.Tensor,
                    history_length: int, new_tokens: int, anchor: int):
    """(position index, time bucket or None) of the first c + history_length tokens of a row
    of c contextual, history_length + new_tokens history tokens and one candidate queried at
    `anchor`: what a full pass would give the cached tokens."""
    c = contextual_seq_len
    length = c + history_length + new_tokens + 1
    offsets = torch.tensor([0, length], dtype=torch.int64)
    targets = torch.ones(1, dtype=torch.int64)
    positions = position_indices(
        offsets, targets, length, contextual_seq_len=c,
        num_position_buckets=positional_encoder.position_table.shape[0],
        use_time_encoding=positional_encoder.use_time_encoding,
    )[: c + history_length]
    if not positional_encoder.use_time_encoding:
        return positions, None
    # Only the cached tokens' and the anchor's times matter to their buckets.
    timestamps = torch.cat([
        torch.zeros(c, dtype=torch.int64), history_timestamps[:history_length],
        torch.full((new_tokens + 1,), int(anchor), dtype=torch.int64),
    ])
    buckets = time_bucket_indices(
        offsets, timestamps, time_bucket_fn=positional_encoder.time_bucket_fn,
        time_bucket_increments=positional_encoder.time_bucket_increments,
        num_time_buckets=positional_encoder.num_time_buckets,
    )[: c + history_length]
    return positions, buckets


def reuse_is_exact(encoder: nn.Module, entry: CacheEntry, new_tokens: int, anchor: int, *,
                   bidirectional_tokens: int | None = None, layers: int | None = None) -> bool:
    """Would appending `new_tokens` history tokens and scoring candidates queried at `anchor`
    against `entry` give exactly the scores of a full pass? (The caller has checked that the
    request's contextual input and first history tokens are the cached ones.)

    Yes iff the entry is exact, every cached token keeps its position and time bucket, and
    no cached state depends on the new tokens: contextual tokens attend to the whole history,
    so from the second layer on their state (and every history token's, through them) moves
    with any new token, unless there are no contextual tokens or only one layer.
    bidirectional_tokens: how many leading tokens the attention treats as contextual (default
    the cached contextual tokens; an STU contextual_seq_len set apart from the preprocessor's
    may make it more). layers: the encoder's STU layers, when the caller knows it (it asks
    for every user of every call; reading it off the module costs more than the rest)."""
    if not entry.exact:
        return False
    if layers is None:
        layers = len(encoder.stu_stack.layers)
    if bidirectional_tokens is None:
        bidirectional_tokens = entry.contextual_seq_len
    if new_tokens > 0 and bidirectional_tokens > 0 and layers > 1:
        return False
    if new_tokens == 0 and anchor == entry.anchor:
        return True  # the cached request again: every index below would be the same
    positional = encoder.positional_encoder
    n = entry.history_length
    old_pos, old_buckets = _prefix_indices(positional, entry.contextual_seq_len,
                                           entry.history_timestamps, n, 0, entry.anchor)
    new_pos, new_buckets = _prefix_indices(positional, entry.contextual_seq_len,
                                           entry.history_timestamps, n, new_tokens, anchor)
    if not torch.equal(old_pos, new_pos):
        return False
    return old_buckets is None or torch.equal(old_buckets, new_buckets)


# ----------------------------------------------------------------------------- encoding


@dataclasses.dataclass
class CachedEncoding:
    """What `cached_encode` returns for a batch of B rows."""

    candidates: torch.Tensor  # [sum t, D]: the postprocessed candidate encodings, batch order
    # Per layer (k, v) of the rows to add to each row's cache: the contextual + history tokens
    # of rows encoded from scratch, the new history tokens of rows with a cache; jagged over
    # `prefix_offsets` [B+1] (on the CPU).
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]]
    prefix_offsets: torch.Tensor
    prefix_offsets_device: torch.Tensor  # the same on the keys' device


def to_device(tensors: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Host tensors on `device`; to a GPU through pinned memory, without waiting (sizes that
    the host computed stay on the host: the GPU is never asked for one)."""
    if device.type == "cuda":
        return [tensor.pin_memory().to(device, non_blocking=True) for tensor in tensors]
    return [tensor.to(device) for tensor in tensors]


def offsets_of(lengths: np.ndarray) -> np.ndarray:
    """int64 [B+1] offsets of jagged rows of these lengths (host side)."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def concat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenated ranges [starts[b], starts[b] + lengths[b]), int64, in one pass (the
    host-side gathers of cached scoring, vectorised over rows)."""
    total = int(lengths.sum())
    offsets = offsets_of(lengths)
    within = np.arange(total, dtype=np.int64) - np.repeat(offsets[:-1], lengths)
    return np.repeat(starts, lengths) + within


def _virtual_index_inputs(positional_encoder, cached, num_targets, timestamps,
                          contextual_seq_len, times_per_row=None):
    """Host int64 arrays from which add_position_time_at gives the delta tokens' position and
    time-bucket rows: per delta token its column in its whole ("virtual") row [c contextual;
    cached + new history; candidates], its row's first candidate column, and its seconds
    before the row's query time (None without time encoding). Index arithmetic over the
    delta tokens alone (numpy, vectorised over the rows), so that its cost grows with the new
    tokens, not with the cached history, nor by an op per row; the float part (the time
    buckets' sqrt or log) is left to the device (add_position_time_at), where a full pass
    computes it too.

    timestamps: per row, its new history tokens' times then its candidates' query times:
    a list of int64 tensors, or one flat int64 tensor (or numpy array) with times_per_row[b]
    values per row."""
    c = contextual_seq_len
    if times_per_row is None:
        times_per_row = [row.numel() for row in timestamps]
        timestamps = torch.cat(list(timestamps)) if len(timestamps) else torch.zeros(0)
    times_per_row = np.asarray(times_per_row, dtype=np.int64)
    times = (np.asarray(timestamps, dtype=np.int64) if isinstance(timestamps, np.ndarray)
             else timestamps.to(torch.int64).numpy())
    has_cache = np.array([entry is not None for entry in cached], dtype=bool)
    cached_tokens = np.array([entry.history_length if entry is not None else 0
                              for entry in cached], dtype=np.int64)
    targets = np.asarray(num_targets, dtype=np.int64)
    length = c + cached_tokens + times_per_row
    # The delta starts after the cached tokens (contextual + cached history) or, for a row
    # without a cache, at the row's start (its contextual tokens are computed too).
    first = np.where(has_cache, c + cached_tokens, 0)
    count = length - first
    row = np.repeat(np.arange(len(count)), count)
    columns = concat_ranges(first, count)
    first_target = (length - targets)[row]
    if not positional_encoder.use_time_encoding:
        return columns, first_target, None
    # The row's query time is its last token's (the last candidate's); contextual tokens
    # carry timestamp 0, as in a full pass. Subtracted here in int64: epoch seconds do not
    # survive float32.
    time_offsets = offsets_of(times_per_row)
    query = times[time_offsets[1:] - 1]
    time_index = (columns - first[row]) - np.where(has_cache, 0, c)[row]
    token_times = np.where(time_index >= 0,
                           times[time_offsets[:-1][row] + np.maximum(time_index, 0)], 0)
    return columns, first_target, query[row] - token_times


def _check_alike(entries: Sequence[CacheEntry], layers: int) -> None:
    """The attention reads every entry's buffers as one dtype and shape: entries encoded under
    another dtype (say, float32 next to bf16 autocast) or by another model cannot share a
    call."""
    first = entries[0]
    if len(first.keys) != layers:
        raise ValueError(f"a cache entry of {len(first.keys)} layers for an encoder of {layers}")
    layout = first.layout
    if all(entry.layout == layout for entry in entries):
        return
    kind = (first.keys[0].dtype, first.keys[0].device, first.keys[0].shape[1:],
            first.values[0].shape[1:], len(first.keys))
    for entry in entries[1:]:
        k, v = entry.keys[0], entry.values[0]
        if (k.dtype, k.device, k.shape[1:], v.shape[1:], len(entry.keys)) != kind:
            raise ValueError(
                f"cache entries differ: {k.dtype} {tuple(k.shape[1:])} on {k.device} beside "
                f"{kind[0]} {tuple(kind[2])} on {kind[1]}; entries encoded under another dtype "
                "or model cannot be scored in one call")
    raise ValueError("cache entries differ in a deeper layer's dtype or shape; entries "
                     "encoded under another dtype or model cannot be scored in one call")


class _EmptyCache:
    """A row treated as cached with nothing in its cache: its delta has no contextual tokens.
    The padding rows of a graphed call (hstu/export/cached.py) use it, so that every call of a
    shape bucket has the same number of contextual tokens."""

    length = 0
    history_length = 0


EMPTY_CACHE = _EmptyCache()


# The host arrays the device part reads, in this order at the start of CachedPlan.packed
# (then the cache addresses, then the seconds before the query when time is encoded).
PLAN_PARTS = ("delta_offsets", "prefix_offsets", "cache_offsets", "num_targets", "columns",
              "first_target", "embedding_rows", "candidate_rows", "prefix_rows")


@dataclasses.dataclass
class CachedPlan:
    """The host side of `cached_encode` for B rows: every size and index, worked out on the
    host so that the device part never waits for the device (and can be replayed from a CUDA
    graph: it depends on nothing else of the host than what is here)."""

    cached: list  # per row: CacheEntry, None (encoded from scratch) or EMPTY_CACHE
    num_targets: list[int]
    delta_lengths: list[int]  # per row: the tokens that go through the encoder
    prefix_lengths: list[int]  # per row: those whose keys and values go to its cache
    prefix_offsets: torch.Tensor  # [B+1] host int64
    cache_lengths: list[int]
    max_item_len: int  # bounds for the kernels: at least the batch's longest, at most any
    max_delta_len: int  # bucket's
    max_cache_len: int
    # What the device part reads: PLAN_PARTS (sizes, offsets, gather indices, the delta
    # tokens' columns and their rows' first candidate columns), the cache addresses, the
    # seconds before the query (the device turns columns, first candidate columns and
    # seconds into position and time-bucket rows); int64, as one block (`packed`, one
    # host-to-device copy) and its parts' sizes.
    packed: torch.Tensor
    host_sizes: list[int]
    has_buckets: bool
    # No row has a cache (a wave of new users, or exact mode re-encoding): the delta rows are
    # whole rows, and the model's own positional op runs on them on the device (as in a full
    # pass), instead of indices worked out on the host for every token.
    whole_rows: bool = False
    layers: int = 0
    # Every cache buffer address (and row size) a multiple of ROW_ALIGNMENT bytes: the
    # attention may read the rows in vectors (CacheRows.aligned). Part of a graph's key.
    aligned: bool = False

    @property
    def batch(self) -> int:
        return len(self.cached)

    @property
    def cache_rows(self) -> list[tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]:
        """Per layer: every row's key and value buffers (CacheRows; a row without a cache
        stands in with another row's, reading none of it), when any row has a cache. Only
        what launches the kernels needs them, not a CUDA graph's replay. Read them before any
        entry's buffers grow: the addresses in `packed` were taken at planning (a call grows
        its entries only after its device work, in the store update)."""
        if self.max_cache_len == 0:
            return []
        present = [entry for entry in self.cached if isinstance(entry, CacheEntry)]
        rows = [entry if isinstance(entry, CacheEntry) else present[0] for entry in self.cached]
        return [(tuple(entry.keys[index] for entry in rows),
                 tuple(entry.values[index] for entry in rows)) for index in range(self.layers)]


def plan_cached_encode(
    encoder: nn.Module,
    cached: Sequence[CacheEntry | _EmptyCache | None],
    *,
    history_lengths: Sequence[int],
    candidate_counts: Sequence[int],
    timestamps: torch.Tensor | np.ndarray | Sequence[torch.Tensor] | None,
    max_item_len: int | None = None,
    max_delta_len: int | None = None,
    max_cache_len: int | None = None,
) -> CachedPlan:
    """`cached_encode`'s host half (its arguments; the max_* bounds default to the batch's
    own and may only be larger). `run_cached_encode` is the device half. timestamps may be
    None when no row has a cache: the device then works out every position from the
    preprocessor's inputs, as a full pass does (so a caller with a large re-encode need not
    gather the times on the host)."""
    if encoder.training:
        raise RuntimeError("cached_encode is for inference: call .eval() first")
    batch = len(cached)
    num_targets = list(candidate_counts)
    if not len(history_lengths) == len(num_targets) == batch:
        raise ValueError(f"{batch} cache entries, {len(history_lengths)} history lengths, "
                         f"{len(num_targets)} candidate counts")
    if min(num_targets, default=1) < 1:
        raise ValueError("cached_encode: every row needs at least one candidate")
    # Sizes as numpy int64 arrays (one op each over the rows, not one tensor per size).
    has_cache = np.fromiter((entry is not None for entry in cached), dtype=bool, count=batch)
    targets = np.asarray(num_targets, dtype=np.int64).reshape(batch)
    items = np.asarray(history_lengths, dtype=np.int64).reshape(batch) + targets
    whole_rows = not has_cache.any()
    if timestamps is None:
        if not whole_rows:
            raise ValueError("cached_encode: timestamps are needed when a row has a cache")
    elif isinstance(timestamps, np.ndarray):
        if timestamps.size != int(items.sum()):
            raise ValueError(f"cached_encode: {timestamps.size} timestamps for "
                             f"{int(items.sum())} history tokens and candidates")
    elif not isinstance(timestamps, torch.Tensor):
        if len(timestamps) != batch:
            raise ValueError(f"{batch} cache entries, {len(timestamps)} timestamp rows")
        for b, (n, t, times) in enumerate(zip(history_lengths, num_targets, timestamps)):
            if times.numel() != n + t:
                raise ValueError(f"cached_encode: row {b} has {times.numel()} timestamps for "
                                 f"{n} history tokens and {t} candidates")
        timestamps = torch.cat(list(timestamps)) if batch else torch.zeros(0, dtype=torch.int64)
    elif timestamps.numel() != int(items.sum()):
        raise ValueError(f"cached_encode: {timestamps.numel()} timestamps for {int(items.sum())}"
                         " history tokens and candidates")
    c = encoder.preprocessor.contextual_seq_len
    # A row with a cache drops its contextual tokens: their keys and values are cached.
    starts = np.where(has_cache, c, 0)
    delta_lengths = c + items - starts
    cache_lengths = np.fromiter((entry.length if entry is not None else 0 for entry in cached),
                                dtype=np.int64, count=batch)
    prefix_lengths = delta_lengths - targets
    prefix_offsets = offsets_of(prefix_lengths)
    if whole_rows:
        columns = first_target = np.zeros(0, dtype=np.int64)
        seconds = None
    else:
        columns, first_target, seconds = _virtual_index_inputs(
            encoder.positional_encoder, cached, num_targets, timestamps, c, times_per_row=items)
    layers = len(encoder.stu_stack.layers)
    bounds = {}
    for name, given, array in (("max_item_len", max_item_len, items),
                               ("max_delta_len", max_delta_len, delta_lengths),
                               ("max_cache_len", max_cache_len, cache_lengths)):
        least = int(array.max()) if batch else 0
        if given is not None and given < least:
            raise ValueError(f"cached_encode: {name} {given} is below the batch's {least}")
        bounds[name] = least if given is None else given
    # Each row's cached keys and values, per layer, are read in place by the attention
    # (CacheRows; a row without a cache reads 0 rows of any buffer) through their addresses,
    # which travel to the device with the other host tensors: per layer the key buffers'
    # addresses of every row, then the value buffers'.
    addresses = np.zeros((0, batch), dtype=np.int64)
    aligned = False
    if bounds["max_cache_len"] > 0:
        present = [entry for entry in cached if isinstance(entry, CacheEntry)]
        if not present:
            raise ValueError("cached_encode: max_cache_len > 0 needs a row with a cache")
        _check_alike(present, layers)
        stand_in = present[0].buffer_addresses
        # Entries' buffers are contiguous by construction and _check_alike checked the rest,
        # once per entry instead of once per buffer; their addresses are kept per entry.
        addresses = np.stack([entry.buffer_addresses if isinstance(entry, CacheEntry)
                              else stand_in for entry in cached], axis=1)  # [2L, B]
        first = present[0]
        row_bytes = [t.shape[1:].numel() * t.element_size()
                     for t in (first.keys[0], first.values[0])]
        aligned = bool(all(size % ROW_ALIGNMENT == 0 for size in row_bytes)
                       and (addresses % ROW_ALIGNMENT == 0).all())
    # The rows the device part takes out of jagged tensors, as flat gather indices worked out
    # here (index arithmetic the device would otherwise spend ~11 small kernels on per take;
    # a call takes 2 + 2 * layers times): the delta rows of the preprocessor's rows (c +
    # items long each), the candidates and the prefix of each delta row.
    delta_offsets = offsets_of(delta_lengths)
    embedding_rows = (np.zeros(0, dtype=np.int64) if whole_rows
                      else concat_ranges(offsets_of(c + items)[:-1] + starts, delta_lengths))
    named = {"delta_offsets": delta_offsets, "prefix_offsets": prefix_offsets,
             "cache_offsets": offsets_of(cache_lengths), "num_targets": targets,
             "columns": columns, "first_target": first_target,
             "embedding_rows": embedding_rows,
             "candidate_rows": concat_ranges(delta_offsets[:-1] + prefix_lengths, targets),
             "prefix_rows": concat_ranges(delta_offsets[:-1], prefix_lengths)}
    parts = [named[name] for name in PLAN_PARTS] + [addresses.reshape(-1)]
    sizes = [part.size for part in parts[:-1]] + [batch] * addresses.shape[0]
    if seconds is not None:
        parts.append(seconds)
        sizes.append(seconds.size)
    return CachedPlan(
        cached=list(cached), num_targets=targets.tolist(), delta_lengths=delta_lengths.tolist(),
        prefix_lengths=prefix_lengths.tolist(), prefix_offsets=torch.from_numpy(prefix_offsets),
        cache_lengths=cache_lengths.tolist(),
        packed=torch.from_numpy(np.concatenate(parts).astype(np.int64, copy=False)),
        host_sizes=sizes, has_buckets=seconds is not None, whole_rows=whole_rows,
        layers=layers, aligned=aligned, **bounds)


def run_cached_encode(
    encoder: nn.Module,
    plan: CachedPlan,
    moved: Sequence[torch.Tensor],
    preprocessor_inputs: dict[str, torch.Tensor | None],
) -> CachedEncoding:
    """`cached_encode`'s device half: `moved` holds plan.packed's parts on the model's device
    (int64), preprocessor_inputs the encoder's inputs there. Launches kernels and nothing
    else: no host value depends on the device, so a CUDA graph of it replays any call with
    the same plan sizes and bounds."""
    c = encoder.preprocessor.contextual_seq_len
    encoder_input = encoder.preprocessor(**preprocessor_inputs, max_item_len=plan.max_item_len)
    if encoder_input.contextual_seq_len != c:
        raise ValueError(f"preprocessor gave {encoder_input.contextual_seq_len} contextual "
                         f"tokens, expected {c}")
    part = dict(zip(PLAN_PARTS, moved))
    delta_offsets, num_targets_d = part["delta_offsets"], part["num_targets"]
    first = len(PLAN_PARTS)
    addresses_d = moved[first:first + 2 * plan.layers] if plan.max_cache_len > 0 else []

    if plan.whole_rows:
        x = encoder.positional_encoder(encoder_input, dropout_ratio=0.0)
    else:
        positional = encoder.positional_encoder
        # One op for the positions, time buckets and table rows of the new tokens (TRITON: one
        # kernel where the PyTorch ops take ~20, in a call that is bound by its kernel count).
        x = add_position_time_at(
            encoder_input.embeddings[part["embedding_rows"]], part["columns"],
            part["first_target"], moved[-1] if plan.has_buckets else None,
            positional.position_table, positional.time_table if plan.has_buckets else None,
            alpha=positional.alpha, contextual_seq_len=c,
            time_bucket_fn=positional.time_bucket_fn,
            time_bucket_increments=positional.time_bucket_increments,
            num_time_buckets=positional.num_time_buckets, kernel=positional.kernel)
        x = encoder.input_dropout(x)

    caches = None
    if plan.max_cache_len > 0:
        lengths = tuple(plan.cache_lengths)
        caches = [(CacheRows(keys, lengths, addresses_d[2 * index], aligned=plan.aligned),
                   CacheRows(values, lengths, addresses_d[2 * index + 1], aligned=plan.aligned))
                  for index, (keys, values) in enumerate(plan.cache_rows)]
    x, delta_kv = encoder.stu_stack.cached_forward(
        x, delta_offsets, plan.max_delta_len, num_targets_d, caches,
        part["cache_offsets"] if plan.max_cache_len > 0 else None, plan.max_cache_len,
    )
    candidates = x[part["candidate_rows"]]
    prefix_rows = part["prefix_rows"]
    prefix_kv = [(k[prefix_rows], v[prefix_rows]) for k, v in delta_kv]
    encodings = encoder.postprocessor(candidates, preprocessor_inputs["candidate_timestamps"])
    return CachedEncoding(candidates=encodings, prefix_kv=prefix_kv,
                          prefix_offsets=plan.prefix_offsets,
                          prefix_offsets_device=part["prefix_offsets"])


@torch.no_grad()
def cached_encode(
    encoder: nn.Module,
    cached: Sequence[CacheEntry | None],
    *,
    history_lengths: Sequence[int],
    candidate_counts: Sequence[int],
    timestamps: torch.Tensor | Sequence[torch.Tensor],
    **preprocessor_inputs: torch.Tensor | None,
) -> CachedEncoding:
    """The HSTUTransducer's forward for B rows of which some have a cache.

    preprocessor_inputs: ContextualPreprocessor.forward's keyword inputs, where the history of
    a row with a cache (cached[b] not None) holds only its NEW tokens (those after the cached
    history), and the history of a row without one holds its whole history. The same sizes
    and times on the host: history_lengths[b] (the history tokens in the inputs),
    candidate_counts[b] (every row needs at least one candidate) and timestamps (int64 CPU:
    per row, its history tokens in the inputs, then its candidates' query times; one flat
    tensor of sum(history_lengths + candidate_counts) values, or a list of one per row).
    Everything sized or indexed is worked out from those on the host, so on a GPU the call
    never waits for the device. Returns the candidates' encodings (what
    HSTUTransducer.forward returns) and the keys and values to add to each row's cache.

    Whether the result equals a full pass is the caller's business (`reuse_is_exact`): this
    computes the new tokens exactly as the full pass would given the cached keys and values.
    Inference only: runs without autograd.
    """
    plan = plan_cached_encode(encoder, cached, history_lengths=history_lengths,
                              candidate_counts=candidate_counts, timestamps=timestamps)
    device = encoder.positional_encoder.position_table.device
    moved = to_device([plan.packed], device)[0].split(plan.host_sizes)
    return run_cached_encode(encoder, plan, moved, preprocessor_inputs)
