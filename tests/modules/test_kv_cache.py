"""hstu/modules/kv_cache.py helpers: the new tokens' position and time-bucket rows, computed
for the new tokens alone, against the same formulas applied to whole rows."""

from __future__ import annotations

import random
import types

import pytest
import torch

from hstu.modules.kv_cache import _virtual_index_inputs
from hstu.ops.pytorch.position import (
    position_indices,
    positions_at,
    time_bucket_indices,
    time_buckets_at,
)


def _virtual_indices(encoder, cached, num_targets, timestamps, c):
    """The new tokens' (position rows, time-bucket rows or None) from the plan's host arrays
    (kv_cache._virtual_index_inputs), with the PyTorch formulas the device op applies."""
    columns, first_target, seconds = _virtual_index_inputs(encoder, cached, num_targets,
                                                            timestamps, c)
    positions = positions_at(torch.from_numpy(columns), torch.from_numpy(first_target),
                             contextual_seq_len=c,
                             num_position_buckets=encoder.position_table.shape[0],
                             use_time_encoding=encoder.use_time_encoding)
    if seconds is None:
        return positions, None
    return positions, time_buckets_at(
        torch.from_numpy(seconds), time_bucket_fn=encoder.time_bucket_fn,
        time_bucket_increments=encoder.time_bucket_increments,
        num_time_buckets=encoder.num_time_buckets)


class _Entry:
    """A cache entry as far as these tests need one: its cached history's timestamps (the
    whole-row reference reads them; _virtual_index_inputs reads only their count)."""

    def __init__(self, timestamps: torch.Tensor) -> None:
        self.history_timestamps = timestamps

    @property
    def history_length(self) -> int:
        return int(self.history_timestamps.shape[0])


def _whole_rows(encoder, cached, num_targets, timestamps, c):
    """The indices of every token of the whole ("virtual") rows [c contextual (timestamp 0);
    cached history; new history; candidates], kept for the tokens the call computes."""
    rows, keep, start = [], [], 0
    for entry, own in zip(cached, timestamps):
        history = entry.history_timestamps if entry is not None else own[:0]
        row = torch.cat([torch.zeros(c, dtype=torch.int64), history, own])
        first = c + history.numel() if entry is not None else 0
        keep.append(torch.arange(start + first, start + row.numel()))
        rows.append(row)
        start += row.numel()
    lengths = torch.tensor([row.numel() for row in rows])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    index = torch.cat(keep)
    positions = position_indices(
        offsets, torch.tensor(num_targets), start, contextual_seq_len=c,
        num_position_buckets=encoder.position_table.shape[0],
        use_time_encoding=encoder.use_time_encoding)[index]
    if not encoder.use_time_encoding:
        return positions, None
    buckets = time_bucket_indices(
        offsets, torch.cat(rows), time_bucket_fn=encoder.time_bucket_fn,
        time_bucket_increments=encoder.time_bucket_increments,
        num_time_buckets=encoder.num_time_buckets)[index]
    return positions, buckets


@pytest.mark.parametrize("seed", range(4))
def test_new_tokens_get_the_rows_of_a_whole_row_pass(seed):
    rng = random.Random(seed)
    for _ in range(40):
        c = rng.choice([0, 1, 3])
        encoder = types.SimpleNamespace(
            position_table=torch.zeros(rng.choice([2, 9, 300]), 1),
            use_time_encoding=rng.random() < 0.8, time_bucket_fn=rng.choice(["sqrt", "log"]),
            time_bucket_increments=60.0, num_time_buckets=rng.choice([16, 2048]))
        cached, timestamps, num_targets = [], [], []
        for _ in range(rng.randint(1, 5)):
            history = sorted(rng.randint(1_600_000_000, 1_700_000_000)
                             for _ in range(rng.choice([0, 1, 7, 40])))
            new = sorted(rng.randint(1_700_000_000, 1_700_050_000)
                         for _ in range(rng.choice([0, 2, 10])))
            targets = rng.randint(1, 6)
            query = 1_700_100_000 + rng.choice([0, 5, 86_400])
            cached.append(None if rng.random() < 0.3 else _Entry(torch.tensor(history,
                                                                             dtype=torch.int64)))
            # A row without a cache brings its whole history; one with a cache, the new part.
            own_history = new if cached[-1] is not None else history + new
            timestamps.append(torch.tensor(own_history + [query] * targets, dtype=torch.int64))
            num_targets.append(targets)
        got = _virtual_indices(encoder, cached, num_targets, timestamps, c)
        want = _whole_rows(encoder, cached, num_targets, timestamps, c)
        assert torch.equal(got[0], want[0])
        assert (got[1] is None) == (want[1] is None)
        if want[1] is not None:
            assert torch.equal(got[1], want[1])


def test_time_buckets_need_int64_seconds():
    # Epoch-second differences lose whole minutes in float32: the caller must subtract in int64.
    with pytest.raises(TypeError, match="int64"):
        time_buckets_at(torch.tensor([60.0]), time_bucket_fn="sqrt", time_bucket_increments=60.0,
                        num_time_buckets=2048)


def _entry(rows, heads=2, d=8, layers=2, dtype=torch.float32, seed=0):
    from hstu.modules.kv_cache import CacheEntry

    generator = torch.Generator().manual_seed(seed)
    kv = [tuple(torch.randn(rows, heads, d, generator=generator).to(dtype) for _ in range(2))
          for _ in range(layers)]
    return CacheEntry(kv, contextual_seq_len=1, history_timestamps=torch.arange(rows - 1),
                      anchor=0, contextual=None)


def test_write_rows_by_address_equals_the_sliced_copy():
    """kv_cache.write_rows' two paths, the Triton copy through each buffer's address (the GPU
    path, here under the interpreter) and the sliced multi-tensor copy, leave the same
    caches: rows appended after room was made, a buffer that grew, an empty append."""
    from hstu.modules.kv_cache import write_rows

    new_rows = [3, 0, 20]
    generator = torch.Generator().manual_seed(1)
    prefix_kv = [tuple(torch.randn(sum(new_rows), 2, 8, generator=generator) for _ in range(2))
                 for _ in range(2)]
    offsets = [0, 3, 3, 23]
    results = []
    for by_address in (False, True):
        entries = [_entry(5, seed=0), _entry(4, seed=1), _entry(2, seed=2)]
        for entry in entries:
            # Read before the room is made: a buffer that grows must not keep its old address.
            assert entry.buffer_addresses.shape == (4,)
        places = [(entry, entry.make_room(n, torch.arange(n) + 100))
                  for entry, n in zip(entries, new_rows)]
        write_rows(prefix_kv, offsets, torch.tensor(offsets), places, by_address=by_address)
        results.append(entries)
    for sliced, addressed in zip(*results):
        for index in range(2):
            for x, y in zip(sliced.layer(index), addressed.layer(index)):
                assert torch.equal(x, y)
    # The appended rows are the source's, after the entry's own.
    grown = results[1][2]
    assert torch.equal(grown.layer(1)[1][2:], prefix_kv[1][1][3:23])


def test_write_rows_asks_for_vector_copies_only_when_its_table_allows(monkeypatch):
    """write_rows checks its address table on the host: aligned entries and sources get the
    16-byte copy; a source starting off a 16-byte boundary gets the element-wise one."""
    from hstu.modules.kv_cache import write_rows
    from hstu.ops.triton import cached_attention

    asked = []
    real = cached_attention.copy_rows_by_table

    def recording(*args, aligned=False):
        asked.append(aligned)
        real(*args, aligned=aligned)

    monkeypatch.setattr(cached_attention, "copy_rows_by_table", recording)
    generator = torch.Generator().manual_seed(2)
    for shift in (0, 1):
        # Keys and values of 2 layers, 4 new rows of 2 x 8 floats each, side by side in one
        # storage (the way one kernel's outputs can be), `shift` floats in.
        storage = torch.randn(4 * 64 + shift, generator=generator)
        sources = [storage[shift + i * 64: shift + (i + 1) * 64].view(4, 2, 8) for i in range(4)]
        entry = _entry(5)
        places = [(entry, entry.make_room(4, torch.arange(4) + 100))]
        write_rows([(sources[0], sources[1]), (sources[2], sources[3])], [0, 4],
                   torch.tensor([0, 4]), places, by_address=True)
        assert torch.equal(entry.layer(1)[1][5:9], sources[3])
    assert asked == [True, False]


def test_write_rows_refuses_what_would_not_fit():
    from hstu.modules.kv_cache import check_writable, write_rows

    entry = _entry(5)
    with pytest.raises(ValueError, match="do not fit"):
        write_rows([(torch.zeros(4, 2, 8), torch.zeros(4, 2, 8))] * 2, [0, 4],
                   torch.tensor([0, 4]), [(entry, 3)])
    with pytest.raises(ValueError, match="another dtype"):
        check_writable(entry, [(torch.zeros(1, 2, 8, dtype=torch.bfloat16),
                                torch.zeros(1, 2, 8, dtype=torch.bfloat16))] * 2)
    with pytest.raises(ValueError, match="layers"):
        check_writable(entry, [(torch.zeros(1, 2, 8), torch.zeros(1, 2, 8))])
