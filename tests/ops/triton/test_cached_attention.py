"""TRITON hstu_mha_cached against the PYTORCH one (itself tested against the full hstu_mha).

On the CPU the kernel runs under TRITON_INTERPRET=1 (tests/conftest.py) on tiny rows with
16x16 tiles, so that caches and deltas span several tiles and every loop (contextual tiles,
window skipping, delta keys) runs. The `gpu` test repeats it at serving size."""

from __future__ import annotations

import pytest
import torch

from hstu.ops.cached_attention import CacheRows
from hstu.ops.pytorch.cached_attention import hstu_mha_cached as torch_cached
from hstu.ops.pytorch.jagged import offsets_from_lengths
from hstu.ops.triton import cached_attention as kernel
from hstu.ops.triton._common import Tile, pinned
from hstu.ops.triton.cached_attention import hstu_mha_cached as triton_cached

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _per_row(values, lengths):
    """A jagged tensor as CacheRows: each row its own contiguous tensor, as serving keeps each
    user's cache (an empty row for a row without one)."""
    return CacheRows.of([part.clone() for part in values.split(list(lengths))])


def _run(cache_lengths, delta_lengths, targets, *, contextual=0, window=0, heads=2, d_qk=16,
         d_v=16, dtype=torch.float32, seed=0, paged=False):
    generator = torch.Generator().manual_seed(seed)

    def rand(rows, d):
        return torch.randn(rows, heads, d, generator=generator).to(dtype).to(DEVICE)

    q, k, v = (rand(sum(delta_lengths), d) for d in (d_qk, d_qk, d_v))
    kc, vc = rand(sum(cache_lengths), d_qk), rand(sum(cache_lengths), d_v)
    args = (q, k, v, offsets_from_lengths(torch.tensor(delta_lengths)).to(DEVICE), kc, vc,
            offsets_from_lengths(torch.tensor(cache_lengths)).to(DEVICE))
    kwargs = dict(max_seq_len=max(delta_lengths), max_cache_len=max(cache_lengths),
                  num_targets=None if targets is None else torch.tensor(targets).to(DEVICE),
                  contextual_seq_len=contextual, max_attn_len=window, alpha=0.25,
                  scaling_seqlen=50)
    expected = torch_cached(*[a.double() if a.is_floating_point() else a for a in args], **kwargs)
    if paged:
        args = (*args[:4], _per_row(kc, cache_lengths), _per_row(vc, cache_lengths), args[6])
    got = triton_cached(*args, **kwargs)
    return got, expected


# (cache lengths, delta lengths, targets, contextual, window)
CASES = {
    "candidates_only": ([3 + 40, 3 + 5], [7, 2], [7, 2], 3, 0),
    "new_history_and_candidates": ([2 + 33, 2 + 17], [10 + 5, 3 + 1], [5, 1], 2, 0),
    "empty_cache_whole_rows": ([0, 0], [2 + 20 + 4, 2 + 3 + 1], [4, 1], 2, 0),
    "mixed_empty_and_cached": ([0, 4 + 30], [4 + 12 + 3, 6 + 2], [3, 2], 4, 0),
    "no_contextual": ([37, 8], [5 + 3, 2], [3, 2], 0, 0),
    "no_history": ([2, 2], [3, 1], [3, 1], 2, 0),
    "one_candidate": ([1 + 35], [1], [1], 1, 0),
    "window_with_contextual": ([3 + 50, 3 + 9], [6 + 4, 3], [4, 3], 3, 7),
    "window_no_contextual": ([45, 20], [4 + 2, 2], [2, 2], 0, 5),
    "window_contextual_in_delta": ([0], [3 + 40 + 3], [3], 3, 9),
    "no_targets": ([20, 3], [6, 9], None, 0, 0),
    # The unmasked loop over whole cached tiles (16 wide under the interpreter): caches of
    # exactly two tiles and one, and one ending inside the contextual tokens (contextual delta
    # queries against cached contextual keys: the pairs the contextual term admits).
    "cache_of_whole_tiles": ([32, 16], [4 + 3, 2], [3, 2], 2, 0),
    "cache_inside_contextual": ([2, 4 + 30], [2 + 20 + 3, 5], [3, 5], 4, 0),
    # Outside what serving sends, but the op's contract: a row shorter than its contextual
    # tokens, and candidates inside the cache (more targets than delta tokens). The mask is
    # not all true on the cached tiles there; the unmasked loop must stop short of them.
    "row_shorter_than_contextual": ([16], [2], [1], 20, 0),
    "candidates_in_the_cache": ([48, 3 + 30], [3, 4], [5, 2], 3, 0),  # 2 in a whole tile
}


@pytest.fixture(params=[None, 64, 4], ids=["whole_cache", "one_tile_splits", "strided_splits"])
def split_keys(request, monkeypatch):
    """The cached key tiles (16 keys under the interpreter) dealt out over several programs
    per query block, as on a GPU with more multiprocessors than programs: with 64
    multiprocessors about one tile a split; with 4, two or three splits of several tiles each
    (the last, partial tile in any of them)."""
    if request.param:
        monkeypatch.setattr(kernel, "_multiprocessors", lambda device: request.param)
        monkeypatch.setattr(kernel, "MIN_SPLIT_TILES", 1)
    return request.param


@pytest.mark.parametrize("paged", [False, True], ids=["one_tensor", "cache_rows"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_triton_cached_matches_the_reference(case, paged, split_keys):
    cache_lengths, delta_lengths, targets, contextual, window = CASES[case]
    with pinned(cached_attn_fwd=Tile(16, 16)):
        got, expected = _run(cache_lengths, delta_lengths, targets, contextual=contextual,
                             window=window, paged=paged)
    torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=1e-4)


def test_a_cache_longer_than_the_bound_is_read_whole(monkeypatch):
    """A CUDA graph keeps only whether max_cache_len is 0, so a replay may pass a bound below
    the real caches: the splits (sized from the bound) must still read every cached tile."""
    monkeypatch.setattr(kernel, "_multiprocessors", lambda device: 64)
    monkeypatch.setattr(kernel, "MIN_SPLIT_TILES", 1)
    # 2 rows x 2 heads x 1 query block, a bound of 2 tiles: 2 splits, caches of 5 and 4 tiles.
    assert kernel.split_plan(4, 32, 16, torch.device(DEVICE), windowed=False) == 2
    generator = torch.Generator().manual_seed(3)
    cache_lengths, delta_lengths, targets = [3 + 70, 3 + 45], [4 + 3, 2], [3, 2]

    def rand(rows):
        return torch.randn(rows, 2, 16, generator=generator).to(DEVICE)

    q, k, v = (rand(sum(delta_lengths)) for _ in range(3))
    kc, vc = rand(sum(cache_lengths)), rand(sum(cache_lengths))
    args = (q, k, v, offsets_from_lengths(torch.tensor(delta_lengths)).to(DEVICE), kc, vc,
            offsets_from_lengths(torch.tensor(cache_lengths)).to(DEVICE))
    kwargs = dict(max_seq_len=max(delta_lengths), num_targets=torch.tensor(targets).to(DEVICE),
                  contextual_seq_len=3, alpha=0.25, scaling_seqlen=50)
    expected = torch_cached(*[a.double() if a.is_floating_point() else a for a in args],
                            max_cache_len=max(cache_lengths), **kwargs)
    with pinned(cached_attn_fwd=Tile(16, 16)):
        got = triton_cached(*args, max_cache_len=32, **kwargs)  # 2 tiles: 2 splits
    torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=1e-4)


def test_the_split_is_sized_by_the_rows_that_read_a_cache(monkeypatch):
    """A graphed serving wave pads one user to 16 rows with empty caches: the split is sized
    by the one row that reads a cache (its programs), not by all 16."""
    asked = []
    real = kernel.split_plan

    def recording(programs, *args, **kwargs):
        asked.append(programs)
        return real(programs, *args, **kwargs)

    monkeypatch.setattr(kernel, "split_plan", recording)
    with pinned(cached_attn_fwd=Tile(16, 16)):
        got, expected = _run([3 + 40, 0, 0, 0], [5 + 3, 2, 1, 1], [3, 1, 1, 1], contextual=3,
                             paged=True)
    torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=1e-4)
    assert asked == [1 * 1 * 2]  # one 16-query block x one row with a cache x 2 heads


def test_split_plan_fills_the_gpu_only_when_the_grid_does_not():
    gpu = torch.device("cuda")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernel, "_multiprocessors", lambda device: 132)
        # One user of 4K history (65 tiles of 64 keys), 8 programs: 33 splits would give 264
        # programs, but a split takes at least 4 tiles: 16 splits.
        assert kernel.split_plan(8, 4102, 64, gpu, windowed=False) == 16
        # 128 users fill the GPU; a window is never split; a short cache has too few tiles.
        assert kernel.split_plan(1024, 4102, 64, gpu, windowed=False) == 1
        assert kernel.split_plan(8, 4102, 64, gpu, windowed=True) == 1
        assert kernel.split_plan(8, 200, 64, gpu, windowed=False) == 1
        assert kernel.split_plan(8, 0, 64, gpu, windowed=False) == 1


def test_bfloat16_within_rounding():
    with pinned(cached_attn_fwd=Tile(16, 16)):
        got, expected = _run([3 + 30], [4 + 3], [3], contextual=3, dtype=torch.bfloat16)
    # bf16 inputs, float32 accumulation: bf16 output rounding dominates (2^-8 relative).
    torch.testing.assert_close(got.double(), expected, atol=2e-2, rtol=2e-2)


def test_head_sizes_below_the_block_width():
    with pinned(cached_attn_fwd=Tile(16, 16)):
        got, expected = _run([2 + 20], [5 + 2], [2], contextual=2, d_qk=8, d_v=12)
    torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("paged", [False, True], ids=["one_tensor", "cache_rows"])
def test_serving_size_on_gpu(paged):
    got, expected = _run([6 + 4000, 6 + 900, 0], [10 + 100, 100, 6 + 30 + 100], [100, 100, 100],
                         contextual=6, heads=4, d_qk=128, d_v=128, paged=paged)
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("programs_per_row", [2, 64])
def test_copy_rows_to_addresses_writes_each_row_where_it_points(monkeypatch, programs_per_row):
    """Rows of a jagged source to the ends of separate buffers (a cache append): every row
    lands at its address, nothing before or after it is touched, empty rows write nothing;
    with 2 programs per row the long row's programs loop over its blocks."""
    from hstu.ops.triton import cached_attention
    from hstu.ops.triton.cached_attention import copy_rows_to_addresses

    monkeypatch.setattr(cached_attention, "COPY_PROGRAMS_PER_ROW", programs_per_row)

    generator = torch.Generator().manual_seed(5)
    lengths, already = [3, 0, 70, 1], [5, 2, 0, 9]  # new rows; rows already in each buffer
    source = torch.randn(sum(lengths), 2, 8, generator=generator).to(DEVICE)
    buffers = [torch.full((a + n + 4, 2, 8), -1.0, device=DEVICE)
               for a, n in zip(already, lengths)]
    before = [buffer.clone() for buffer in buffers]
    addresses = torch.tensor([buffer.data_ptr() + a * buffer[0].numel() * buffer.element_size()
                              for buffer, a in zip(buffers, already)], device=DEVICE)
    offsets = offsets_from_lengths(torch.tensor(lengths)).to(DEVICE)
    copy_rows_to_addresses(source, offsets, addresses, max(lengths))
    for b, (buffer, a, n) in enumerate(zip(buffers, already, lengths)):
        start = sum(lengths[:b])
        assert torch.equal(buffer[a:a + n], source[start:start + n]), b
        assert torch.equal(buffer[:a], before[b][:a]) and torch.equal(buffer[a + n:],
                                                                      before[b][a + n:]), b


@pytest.mark.parametrize("aligned", [False, True], ids=["elements", "vectors"])
def test_copy_rows_by_table_copies_several_sources_of_their_own_widths(aligned):
    """One launch for keys and values of different head dims (d_qk 8, d_v 4): each source's
    rows land at its own targets, with its own row size. Rows of 2 x 8 and 2 x 4 float32 are
    whole 16-byte vectors, so the aligned copy (addresses reached from the first source's)
    applies too."""
    from hstu.ops.triton.cached_attention import copy_rows_by_table

    generator = torch.Generator().manual_seed(6)
    lengths, already = [2, 5], [1, 3]
    sources = [torch.randn(sum(lengths), 2, d, generator=generator).to(DEVICE) for d in (8, 4)]
    buffers = [[torch.zeros(a + n + 2, 2, d, device=DEVICE) for a, n in zip(already, lengths)]
               for d in (8, 4)]
    table = torch.tensor(
        [[buffer.data_ptr() + a * buffer[0].numel() * buffer.element_size()
          for buffer, a in zip(row, already)] + [source.data_ptr(), source[0].numel()]
         for row, source in zip(buffers, sources)], dtype=torch.int64, device=DEVICE)
    offsets = offsets_from_lengths(torch.tensor(lengths)).to(DEVICE)
    with pytest.raises(ValueError, match="contiguous int64"):
        copy_rows_by_table(sources, offsets, table.to(torch.int32), max(lengths))
    copy_rows_by_table(sources, offsets, table, max(lengths), aligned=aligned)
    for source, row in zip(sources, buffers):
        for b, (buffer, a, n) in enumerate(zip(row, already, lengths)):
            start = sum(lengths[:b])
            assert torch.equal(buffer[a:a + n], source[start:start + n])
            assert not buffer[:a].any() and not buffer[a + n:].any()
