"""The padding that lets cached scoring replay CUDA graphs (hstu/export/cached_graphs.py): a
wave padded to its bucket keeps the wave's rows first and whole, pads every count to the
bucket's, and waves that differ a little share a bucket. That padded waves score like
unpadded ones is tested in tests/export/test_cached.py (on the CPU, eagerly, and on a GPU
with graphs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hstu.export.cached_graphs import (
    GraphReplays,
    delta_inputs,
    graph_key,
    host_array,
    pad_wave,
)
from hstu.modules.kv_cache import EMPTY_CACHE


class FakeEntry:
    def __init__(self, length):
        self.length = length
        self.history_length = length - 2


def _wave(history, candidates, cached_lengths):
    entries = [None if n is None else FakeEntry(n) for n in cached_lengths]
    history = np.asarray(history, dtype=np.int64)
    candidates = np.asarray(candidates, dtype=np.int64)
    times = torch.arange(int(history.sum() + candidates.sum()), dtype=torch.int64) + 7
    return entries, history, candidates, times


def test_wave_rows_come_first_and_counts_reach_the_bucket():
    entries, history, candidates, times = _wave([5, 0, 40], [3, 1, 2], [None, 100, 300])
    padded = pad_wave(entries, history, candidates, times, contextual_seq_len=2)
    bucket = padded.bucket
    rows = len(padded.entries)
    assert rows == bucket.rows == 16 and padded.padding_rows == 13
    assert padded.entries[:3] == entries
    np.testing.assert_array_equal(padded.history_lengths[:3], history)
    np.testing.assert_array_equal(padded.candidate_counts[:3], candidates)
    assert int(padded.history_lengths.sum()) == bucket.history
    assert int(padded.candidate_counts.sum()) == bucket.candidates
    assert (padded.candidate_counts >= 1).all()
    assert sum(entry is None for entry in padded.entries) == bucket.from_scratch == 8
    assert all(entry is None or entry is EMPTY_CACHE for entry in padded.entries[3:])
    # The wave's times first, unchanged; the padding's are zeros.
    assert isinstance(padded.timestamps, np.ndarray)
    assert (padded.timestamps[:times.numel()] == times.numpy()).all()
    assert padded.timestamps.size == bucket.history + bucket.candidates
    assert not padded.timestamps[times.numel():].any()
    # Bounds: powers of two at least the longest row, delta (contextual tokens of the rows
    # encoded from scratch counted) and cache.
    delta = [5 + 3 + 2, 1, 42]
    assert bucket.max_delta_len == 64 and bucket.max_delta_len >= max(delta)
    assert bucket.max_item_len == 64 and bucket.max_cache_len == 512


def test_nearby_waves_share_a_bucket():
    base = pad_wave(*_wave([10] * 5, [100] * 5, [None, None, 50, 60, 70]), 6).bucket
    # More rows from scratch (within 8), a few more tokens, a longer cache (same power of two).
    other = pad_wave(*_wave([10, 12, 9, 11, 10], [100] * 5, [None, None, None, None, 90]),
                     6).bucket
    assert other == base
    # Nine rows: another bucket.
    assert pad_wave(*_wave([10] * 9, [100] * 9, [50] * 9), 6).bucket.rows == 24
    # No cache anywhere: the bound is 0 (the uncached attention runs), and every padding row
    # is encoded from scratch too (the wave stays one of whole rows).
    new_users = pad_wave(*_wave([10, 7], [3, 2], [None, None]), 6)
    assert new_users.bucket.max_cache_len == 0
    assert all(entry is None for entry in new_users.entries)
    assert new_users.bucket.from_scratch == new_users.bucket.rows
    # Graph keys keep whether there is a cache, not its length (it only picks a launch config).
    longer = pad_wave(*_wave([10] * 5, [100] * 5, [None, None, 50, 60, 3000]), 6).bucket
    assert longer != base and graph_key(longer) == graph_key(base)
    assert graph_key(base).max_cache_len == 1


def test_padding_lengths_never_exceed_the_bounds():
    for seed in range(20):
        rng = np.random.default_rng(seed)
        batch = int(rng.integers(1, 40))
        history = rng.integers(0, 300, batch)
        candidates = rng.integers(1, 120, batch)
        cached = [None if rng.random() < 0.3 else int(rng.integers(1, 5000))
                  for _ in range(batch)]
        padded = pad_wave(*_wave(history, candidates, cached), contextual_seq_len=4)
        bucket = padded.bucket
        items = padded.history_lengths + padded.candidate_counts
        delta = items + np.array([4 if e is None else 0 for e in padded.entries])
        assert items.max() <= bucket.max_item_len and delta.max() <= bucket.max_delta_len
        assert bucket.history >= history.sum() and bucket.candidates > candidates.sum()
        # At most 1/8 padding (beyond the minimum step) in tokens.
        assert bucket.history <= max(64, history.sum() * 9 // 8 + 1)


def _delta(inputs, padded, new_tokens=None, new_lengths=(3, 2)):
    sequence_of = {"h": "H", "w": "H", "b": "H", "c": "C", "u": None, "o": "O"}
    out = delta_inputs(inputs, {name: host_array(inputs[name]) for name in sequence_of},
                       sequence_of=sequence_of, history_sequence="H", candidate_sequence="C",
                       lengths_key=lambda s: f"{s}.lengths", new_tokens=new_tokens,
                       new_lengths=np.array(new_lengths), wave=padded)
    return sequence_of, out


def _request():
    return {
        "h": torch.arange(5) + 1, "w": torch.rand(5), "b": torch.rand(5).bfloat16(),
        "c": torch.tensor([9, 8, 7]), "u": torch.tensor([4, 5]), "o": torch.tensor([1, 1, 1]),
        "H.lengths": torch.tensor([3, 2]), "C.lengths": torch.tensor([1, 2]),
        "O.lengths": torch.tensor([2, 1]),
    }


def test_delta_inputs_append_zeros_and_padding_lengths():
    entries, history, candidates, times = _wave([3, 2], [1, 2], [None, 10])
    padded = pad_wave(entries, history, candidates, times, contextual_seq_len=1)
    inputs = _request()
    sequence_of, out = _delta(inputs, padded)
    assert out["h"].numel() == padded.bucket.history and out["w"].dtype == inputs["w"].dtype
    assert out["b"].dtype == torch.bfloat16
    assert out["c"].numel() == padded.bucket.candidates
    assert out["u"].numel() == padded.bucket.rows and out["o"].numel() == 3
    for name in sequence_of:
        n = inputs[name].numel()
        torch.testing.assert_close(out[name][:n], inputs[name])
        assert not out[name][n:].any()
    torch.testing.assert_close(out["H.lengths"], torch.from_numpy(padded.history_lengths))
    torch.testing.assert_close(out["C.lengths"], torch.from_numpy(padded.candidate_counts))
    assert out["O.lengths"].tolist() == [2, 1] + [0] * padded.padding_rows


def test_delta_inputs_take_the_new_history_tokens_only():
    # Row 0 keeps its last 2 of 3 history tokens, row 1 its last 1 of 2; unpadded (eager).
    inputs = _request()
    sequence_of, out = _delta(inputs, None, new_tokens=np.array([1, 2, 4]), new_lengths=(2, 1))
    for name in ("h", "w", "b"):
        assert torch.equal(out[name], inputs[name][[1, 2, 4]])
    for name in ("c", "u", "o"):
        assert torch.equal(out[name], inputs[name])
    assert out["H.lengths"].tolist() == [2, 1] and out["C.lengths"].tolist() == [1, 2]
    assert out["O.lengths"].tolist() == [2, 1]


def test_eager_replays_run_the_function():
    replays = GraphReplays(capture=False)
    out = replays.run("k", lambda a, b: a + b, [torch.ones(3), torch.arange(3.0)],
                      torch.device("cpu"))
    torch.testing.assert_close(out, torch.tensor([1.0, 2.0, 3.0]))
    assert len(replays) == 0


@pytest.mark.gpu
def test_graph_replays_reuse_buffers_and_drop_the_oldest():
    device = torch.device("cuda")
    replays = GraphReplays(max_graphs=2, capture_after=1)
    calls = []

    def twice(x):
        calls.append(1)
        return x * 2

    for key, size, value in (("a", 4, 1.0), ("a", 4, 3.0), ("b", 5, 2.0), ("c", 6, 1.0)):
        out = replays.run(key, twice, [torch.full((size,), value)], device)
        torch.testing.assert_close(out.cpu(), torch.full((size,), 2 * value))
    # "a" was captured once (2 warm-up calls + the capture), replayed twice; "a" then dropped.
    assert replays.stats["captures"] == 3 and replays.stats["replays"] == 4
    assert replays.stats["dropped"] == 1 and len(replays) == 2 and len(calls) == 9
    with pytest.raises(ValueError, match="does not match its buffer"):
        replays.run("c", twice, [torch.ones(7)], device)


@pytest.mark.gpu
def test_graph_replays_capture_on_the_second_call_and_survive_a_failed_capture():
    device = torch.device("cuda")
    replays = GraphReplays()  # capture_after=2

    def plus_one(x):
        return x + 1

    for value in (1.0, 2.0, 3.0):
        out = replays.run("k", plus_one, [torch.full((3,), value)], device)
        torch.testing.assert_close(out.cpu(), torch.full((3,), value + 1))
    assert replays.stats["eager"] == 1 and replays.stats["captures"] == 1
    assert replays.stats["replays"] == 2

    def syncs(x):
        return x * float(x.sum().item())  # a host sync: cannot be captured

    for _ in range(3):
        out = replays.run("bad", syncs, [torch.ones(2)], device)
        torch.testing.assert_close(out.cpu(), torch.full((2,), 2.0))
    assert replays.stats["failed_captures"] == 1 and "bad" not in replays._graphs
