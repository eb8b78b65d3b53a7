"""Cached HSTU attention in plain PyTorch: the queries are the last rows of each row ("delta"),
the keys are the cached rows before them plus the delta rows themselves.

This is the reference the TRITON cached kernel is tested against, and it is itself tested
against `hstu.ops.pytorch.attention.hstu_mha` on the whole row (tests/ops/test_cached_attention.py):
the delta rows' outputs must be those of the full op. The mask is the full op's, written for
two position ranges instead of one square (`virtual_mask`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hstu.ops.pytorch.dtypes import upcast
from hstu.ops.pytorch.jagged import jagged_to_padded, lengths_from_offsets, padded_to_jagged


def _position_ids(
    positions: torch.Tensor,
    lengths: torch.Tensor,
    num_targets: torch.Tensor | None,
    contextual_seq_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(id of each position [B, N], first target id [B, 1]) as attention_mask defines them:
    contextual tokens share id 0, history token k has id k + 1 (k when c = 0), and every
    candidate has the first target id."""
    c = contextual_seq_len
    lengths = lengths.view(-1, 1)
    if c > 0:
        ids = torch.clamp(positions - c + 1, min=0)
        first_target_id = lengths - c + 1
    else:
        ids = positions
        first_target_id = lengths
    if num_targets is not None:
        first_target_id = first_target_id - num_targets.to(torch.int64).view(-1, 1)
        ids = torch.minimum(ids, first_target_id)
    return ids, first_target_id


def virtual_mask(
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    lengths: torch.Tensor,
    num_targets: torch.Tensor | None,
    contextual_seq_len: int,
    max_attn_len: int,
) -> torch.Tensor:
    """bool [B, Nq, Nk]: may the query at position query_positions[b, i] attend to the key at
    key_positions[b, j], in a row of lengths[b] tokens (positions counted from the row's start)?
    Positions at or past the row's length are masked on both sides. Same rule as
    hstu.ops.pytorch.attention.attention_mask, which is this with both axes 0 .. N-1."""
    lengths = lengths.to(torch.int64)
    query_positions = query_positions.expand(lengths.shape[0], -1)
    key_positions = key_positions.expand(lengths.shape[0], -1)
    q_ids, first_target_id = _position_ids(query_positions, lengths, num_targets,
                                           contextual_seq_len)
    k_ids, _ = _position_ids(key_positions, lengths, num_targets, contextual_seq_len)
    row_ids, col_ids = q_ids.unsqueeze(2), k_ids.unsqueeze(1)
    distance = row_ids - col_ids
    same = query_positions.unsqueeze(2) == key_positions.unsqueeze(1)
    mask = same | (distance > 0)
    if max_attn_len > 0:
        mask = mask & (distance <= max_attn_len)
    if contextual_seq_len > 0:
        mask = mask | ((row_ids == 0) & (col_ids < first_target_id.view(-1, 1, 1)))
    q_valid = query_positions < lengths.view(-1, 1)
    k_valid = key_positions < lengths.view(-1, 1)
    return mask & q_valid.unsqueeze(2) & k_valid.unsqueeze(1)


def _padded(values: torch.Tensor, offsets: torch.Tensor, max_len: int) -> torch.Tensor:
    # One row: a view, not a copy (serving a single user is the common case, and the cached
    # keys of a long history are the biggest tensors here).
    if offsets.numel() == 2:
        return values.unsqueeze(0)
    return jagged_to_padded(values, offsets, max_len)


def hstu_mha_cached(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_offsets: torch.Tensor,
    *,
    max_seq_len: int,
    max_cache_len: int,
    num_targets: torch.Tensor | None = None,
    contextual_seq_len: int = 0,
    max_attn_len: int = 0,
    alpha: float | None = None,
    scaling_seqlen: int,
) -> torch.Tensor:
    """q, k: [sum Q, H, d_qk], v: [sum Q, H, d_v] (the delta rows); k_cache, v_cache:
    [sum P, H, d] (the cached rows); offsets [B+1] each. Returns [sum Q, H, d_v].

    Row b is [P_b cached rows; Q_b delta rows] with num_targets[b] candidates at its end. The
    delta rows' outputs are those of hstu_mha over the whole row: SiLU(alpha q k^T) / S times
    the mask, summed over the cached and the delta keys. Math in the inputs' dtype, SiLU in
    float32 and cast back, as hstu_mha does.
    """
    if alpha is None:
        alpha = q.shape[-1] ** -0.5
    scale = float(scaling_seqlen)
    batch = seq_offsets.numel() - 1
    q_lengths = lengths_from_offsets(seq_offsets)
    p_lengths = lengths_from_offsets(cache_offsets)
    lengths = q_lengths + p_lengths
    if batch == 1:
        max_seq_len, max_cache_len = q.shape[0], k_cache.shape[0]
    device = q.device
    steps_q = torch.arange(max_seq_len, device=device, dtype=torch.int64).view(1, -1)
    steps_p = torch.arange(max_cache_len, device=device, dtype=torch.int64).view(1, -1)
    # Delta rows sit after the cached ones; a delta position past Q_b is padding (masked).
    query_positions = p_lengths.view(-1, 1) + steps_q
    query_positions = torch.where(steps_q < q_lengths.view(-1, 1), query_positions,
                                  lengths.view(-1, 1))
    # Cached positions past P_b are padding too: send them past the row's end.
    cache_positions = torch.where(steps_p < p_lengths.view(-1, 1), steps_p, lengths.view(-1, 1))

    padded_q = _padded(q, seq_offsets, max_seq_len)  # [B, Nq, H, d]
    out = None
    for keys, values, positions, offsets, max_len in (
        (k_cache, v_cache, cache_positions, cache_offsets, max_cache_len),
        (k, v, query_positions, seq_offsets, max_seq_len),
    ):
        if max_len == 0:
            continue
        padded_k = _padded(keys, offsets, max_len)
        padded_v = _padded(values, offsets, max_len)
        scores = torch.einsum("bnhd,bmhd->bhnm", padded_q, padded_k) * alpha
        mask = virtual_mask(query_positions, positions, lengths, num_targets,
                            contextual_seq_len, max_attn_len)
        weights = F.silu(upcast(scores)) / scale
        weights = (weights * mask.unsqueeze(1)).to(v.dtype)
        part = torch.einsum("bhnm,bmhd->bnhd", weights, padded_v)
        out = part if out is None else out + part
    if out is None:
        out = padded_q.new_zeros((batch, max_seq_len, v.shape[1], v.shape[2]))
    if batch == 1:
        return out[0]
    return padded_to_jagged(out, seq_offsets)
