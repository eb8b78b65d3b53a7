"""hstu_mha_cached (PYTORCH) against hstu_mha over the whole row: the delta rows' outputs must
be the full op's, for every mask case (contextual tokens, candidates, windows, empty caches,
empty histories, one candidate)."""

import pytest
import torch

from hstu.ops import hstu_mha
from hstu.ops.cached_attention import CacheRows, hstu_mha_cached
from hstu.ops.pytorch.attention import attention_mask
from hstu.ops.pytorch.cached_attention import virtual_mask
from hstu.ops.pytorch.jagged import offsets_from_lengths

H, D_QK, D_V = 2, 8, 6


def split_rows(values, lengths, cached):
    """Per row, the first cached[b] tokens (the cache) and the rest (the delta), jagged."""
    cache_parts, delta_parts = [], []
    start = 0
    for length, p in zip(lengths, cached):
        cache_parts.append(values[start:start + p])
        delta_parts.append(values[start + p:start + length])
        start += length
    return torch.cat(cache_parts), torch.cat(delta_parts)


def run_case(lengths, targets, cached, c, max_attn_len, seed=0, kernel="PYTORCH",
             dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(total, H, D_QK, generator=generator).to(dtype)
    k = torch.randn(total, H, D_QK, generator=generator).to(dtype)
    v = torch.randn(total, H, D_V, generator=generator).to(dtype)
    offsets = offsets_from_lengths(torch.tensor(lengths))
    num_targets = torch.tensor(targets)
    scaling = 37
    full = hstu_mha(q.float(), k.float(), v.float(), offsets, max_seq_len=max(lengths),
                    num_targets=num_targets, contextual_seq_len=c, max_attn_len=max_attn_len,
                    alpha=0.3, scaling_seqlen=scaling)
    _, expected = split_rows(full, lengths, cached)
    k_cache, k_delta = split_rows(k, lengths, cached)
    v_cache, v_delta = split_rows(v, lengths, cached)
    _, q_delta = split_rows(q, lengths, cached)
    delta_lengths = [length - p for length, p in zip(lengths, cached)]
    got = hstu_mha_cached(
        q_delta, k_delta, v_delta, offsets_from_lengths(torch.tensor(delta_lengths)),
        k_cache, v_cache, offsets_from_lengths(torch.tensor(cached)),
        max_seq_len=max(delta_lengths), max_cache_len=max(cached), num_targets=num_targets,
        contextual_seq_len=c, max_attn_len=max_attn_len, alpha=0.3, scaling_seqlen=scaling,
        kernel=kernel,
    )
    return got, expected


# (lengths, targets, cached rows, c, max_attn_len): c contextual + history + candidates per row.
CASES = {
    "contextual": ([3 + 7 + 4, 3 + 2 + 1], [4, 1], [3 + 5, 3 + 2], 3, 0),
    "no_contextual": ([9 + 3, 4 + 2], [3, 2], [6, 4], 0, 0),
    "empty_cache": ([2 + 5 + 3, 2 + 1 + 2], [3, 2], [0, 0], 2, 0),
    "contextual_only_cached": ([2 + 5 + 3, 2 + 0 + 2], [3, 2], [2, 2], 2, 0),
    "no_history": ([2 + 0 + 3, 2 + 0 + 1], [3, 1], [2, 2], 2, 0),
    "one_candidate": ([4 + 6 + 1], [1], [4 + 6], 4, 0),
    "window": ([2 + 9 + 3, 2 + 4 + 2], [3, 2], [2 + 6, 2 + 1], 2, 3),
    "window_no_contextual": ([10 + 3, 3 + 2], [3, 2], [8, 2], 0, 2),
    "window_wider_than_row": ([1 + 3 + 2], [2], [1 + 2], 1, 50),
    "candidates_only_delta": ([3 + 8 + 5, 3 + 3 + 2], [5, 2], [3 + 8, 3 + 3], 3, 0),
    "delta_holds_contextual_tail": ([4 + 3 + 2], [2], [2], 4, 0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cached_rows_equal_the_full_op(case):
    lengths, targets, cached, c, window = CASES[case]
    got, expected = run_case(lengths, targets, cached, c, window)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_virtual_mask_is_the_full_mask_on_the_square():
    lengths = torch.tensor([9, 6])
    targets = torch.tensor([3, 2])
    for c, window in ((0, 0), (2, 0), (2, 3), (0, 2)):
        full = attention_mask(lengths, 9, targets, c, window)
        steps = torch.arange(9).view(1, -1)
        got = virtual_mask(steps, steps, lengths, targets, c, window)
        assert torch.equal(got, full), (c, window)


def test_one_row_uses_views_and_still_matches():
    got, expected = run_case([3 + 40 + 5], [5], [3 + 35], 3, 0, seed=4)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_errors_name_the_argument():
    q = torch.zeros(3, H, D_QK)
    v = torch.zeros(3, H, D_V)
    offsets = torch.tensor([0, 3])
    with pytest.raises(ValueError, match="scaling_seqlen"):
        hstu_mha_cached(q, q, v, offsets, q, v, offsets, max_seq_len=3, max_cache_len=3,
                        scaling_seqlen=0)
    with pytest.raises(ValueError, match="cache's heads"):
        hstu_mha_cached(q, q, v, offsets, torch.zeros(3, H + 1, D_QK), v, offsets,
                        max_seq_len=3, max_cache_len=3, scaling_seqlen=4)
    with pytest.raises(ValueError, match="every candidate must be a delta row"):
        hstu_mha_cached(q, q, v, offsets, q, v, offsets, max_seq_len=3, max_cache_len=3,
                        num_targets=torch.tensor([4]), scaling_seqlen=4)
    with pytest.raises(ValueError, match="cache_offsets must run from 0 to 3"):
        hstu_mha_cached(q, q, v, offsets, q, v, torch.tensor([0, 2]), max_seq_len=3,
                        max_cache_len=3, scaling_seqlen=4)


def _cache_rows(values, lengths):
    return CacheRows.of([part.clone() for part in values.split(list(lengths))])


@pytest.mark.parametrize("case", ["contextual", "empty_cache", "window", "one_candidate"])
def test_cache_rows_give_the_one_tensor_result(case):
    """Caches passed as one tensor per row (CacheRows, as serving keeps them) are concatenated
    by the PYTORCH kernel: same result as the jagged tensor."""
    lengths, targets, cached, c, window = CASES[case]
    generator = torch.Generator().manual_seed(3)
    delta = [length - p for length, p in zip(lengths, cached)]
    q, k, v = (torch.randn(sum(delta), H, d, generator=generator) for d in (D_QK, D_QK, D_V))
    kc = torch.randn(sum(cached), H, D_QK, generator=generator)
    vc = torch.randn(sum(cached), H, D_V, generator=generator)
    args = dict(max_seq_len=max(delta), max_cache_len=max(cached),
                num_targets=torch.tensor(targets), contextual_seq_len=c, max_attn_len=window,
                alpha=0.3, scaling_seqlen=37)
    offsets = offsets_from_lengths(torch.tensor(delta))
    cache_offsets = offsets_from_lengths(torch.tensor(cached))
    expected = hstu_mha_cached(q, k, v, offsets, kc, vc, cache_offsets, **args)
    got = hstu_mha_cached(q, k, v, offsets, _cache_rows(kc, cached), _cache_rows(vc, cached),
                          cache_offsets, **args)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_cache_rows_errors_name_the_row():
    rows = [torch.zeros(2, H, D_QK), torch.zeros(3, H + 1, D_QK)]
    with pytest.raises(ValueError, match="row 1"):
        CacheRows.of(rows)
    with pytest.raises(ValueError, match="row 0 is not contiguous"):
        CacheRows.of([torch.zeros(2, D_QK, H).transpose(1, 2)])
    # Rows of whole 16-byte vectors must start on one (the TRITON kernel loads vectors): a
    # view one float past an allocation's start does not; whole-row slices do.
    storage = torch.zeros(1 + 3 * 2 * 4)
    with pytest.raises(ValueError, match="row 1 starts at an address that is not a multiple"):
        CacheRows.of([torch.zeros(3, 2, 4), storage[1:].view(3, 2, 4)])
    CacheRows.of([torch.zeros(3, 2, 4), storage[:-1].view(3, 2, 4)[1:]])
    CacheRows.of([torch.zeros(3, 1, 3), storage[1:10].view(3, 1, 3)])  # 12-byte rows: any start
    q = torch.zeros(3, H, D_QK)
    v = torch.zeros(3, H, D_V)
    offsets = torch.tensor([0, 3])
    one_row = CacheRows.of([torch.zeros(3, H, D_QK)])
    with pytest.raises(ValueError, match="both be tensors or both CacheRows"):
        hstu_mha_cached(q, q, v, offsets, one_row, v, offsets, max_seq_len=3, max_cache_len=3,
                        scaling_seqlen=3)
    with pytest.raises(ValueError, match="for 2 rows"):
        hstu_mha_cached(q, q, v, torch.tensor([0, 1, 3]), one_row,
                        CacheRows.of([torch.zeros(3, H, D_V)]), torch.tensor([0, 1, 3]),
                        max_seq_len=3, max_cache_len=3, scaling_seqlen=3)
