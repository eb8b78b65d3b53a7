"""HSTU attention reference: the mask of the worked example, and the math against a per-row loop."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from hstu.ops import hstu_mha
from hstu.ops.pytorch.attention import attention_mask


def test_worked_example_mask_element_by_element():
    # Reference 2.7: c=2, n=3, t=2 (L=7): 0-1 contextual, 2-4 history, 5-6 candidates.
    mask = attention_mask(torch.tensor([7]), 7, torch.tensor([2]), contextual_seq_len=2)[0]
    allowed = {
        0: {0, 1, 2, 3, 4},
        1: {0, 1, 2, 3, 4},
        2: {0, 1, 2},
        3: {0, 1, 2, 3},
        4: {0, 1, 2, 3, 4},
        5: {0, 1, 2, 3, 4, 5},
        6: {0, 1, 2, 3, 4, 6},
    }
    for i in range(7):
        for j in range(7):
            assert bool(mask[i, j]) == (j in allowed[i]), (i, j)


def test_mask_padding_and_plain_causal():
    mask = attention_mask(torch.tensor([3, 1]), 3)
    expected_row0 = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask[0], expected_row0)
    assert mask[1].sum() == 1 and mask[1, 0, 0]


def test_max_attn_len_window_in_id_space():
    mask = attention_mask(torch.tensor([5]), 5, max_attn_len=2)[0]
    for i in range(5):
        for j in range(5):
            assert bool(mask[i, j]) == (i == j or 0 < i - j <= 2), (i, j)


def naive_attention(q, k, v, offsets, num_targets, c, alpha, scale):
    """Row by row, token by token, from the rules in words (not from attention_mask)."""
    out = torch.zeros_like(v)
    for b in range(offsets.numel() - 1):
        start, end = int(offsets[b]), int(offsets[b + 1])
        n = end - start
        first_target = n - int(num_targets[b])
        for i in range(n):
            for j in range(n):
                if i < c:  # contextual: all contextual + history
                    ok = j < first_target
                elif i >= first_target:  # candidate: contextual + history + itself
                    ok = j < first_target or j == i
                else:  # history: contextual, earlier history, itself
                    ok = j < c or j <= i
                if ok:
                    score = alpha * (q[start + i] * k[start + j]).sum(-1)  # [H]
                    weight = F.silu(score) / scale
                    out[start + i] += weight.unsqueeze(-1) * v[start + j]
    return out


@pytest.mark.parametrize("contextual", [0, 2])
def test_hstu_mha_matches_per_token_loop(contextual):
    torch.manual_seed(0)
    lengths = torch.tensor([contextual + 3 + 2, contextual + 1 + 3])
    num_targets = torch.tensor([2, 3])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    total, heads = int(offsets[-1]), 2
    q = torch.randn(total, heads, 4, dtype=torch.float64)
    k = torch.randn(total, heads, 4, dtype=torch.float64)
    v = torch.randn(total, heads, 3, dtype=torch.float64)
    out = hstu_mha(
        q, k, v, offsets, max_seq_len=8, num_targets=num_targets,
        contextual_seq_len=contextual, scaling_seqlen=50,
    )
    expected = naive_attention(q, k, v, offsets, num_targets, contextual, 0.5, 50.0)
    torch.testing.assert_close(out, expected)
    # Default alpha 1/sqrt(d_qk) and S = max_seq_len.
    out_default = hstu_mha(
        q, k, v, offsets, max_seq_len=8, num_targets=num_targets, contextual_seq_len=contextual
    )
    expected_default = naive_attention(
        q, k, v, offsets, num_targets, contextual, 1 / math.sqrt(4), 8.0
    )
    torch.testing.assert_close(out_default, expected_default)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(max_seq_len=4), "row 1 has 5 tokens, more than max_seq_len = 4"),
        (dict(v=torch.zeros(7, 2, 8)), "v must be [L, H, d_v] with q's L and H (8, 2)"),
        (dict(k=torch.zeros(8, 2, 4)), "q and k must have one shape"),
        (dict(seq_offsets=torch.tensor([0, 3, 7])), "seq_offsets must run from 0 to L = 8"),
        (dict(seq_offsets=torch.tensor([0.0, 3.0, 8.0])), "seq_offsets must be a 1-D integer"),
        (dict(seq_offsets=torch.tensor([False, True, True])), "seq_offsets must be a 1-D integer"),
        (dict(num_targets=torch.tensor([1, 1, 1])), "num_targets must be [B] = [2]"),
        (dict(q=torch.zeros(8, 8)), "q must be [L, H, d]"),
    ],
)
def test_bad_arguments_are_named(change, message):
    args = dict(q=torch.zeros(8, 2, 8), k=torch.zeros(8, 2, 8), v=torch.zeros(8, 2, 8),
                seq_offsets=torch.tensor([0, 3, 8]), max_seq_len=5,
                num_targets=torch.tensor([1, 2]))
    args.update(change)
    with pytest.raises(ValueError, match=re.escape(message)):
        hstu_mha(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("seq_offsets"), **args)
    # The unchanged arguments are fine: the check is the one that fires, not something else.
    hstu_mha(torch.zeros(8, 2, 8), torch.zeros(8, 2, 8), torch.zeros(8, 2, 8),
             torch.tensor([0, 3, 8]), max_seq_len=5, num_targets=torch.tensor([1, 2]))
