"""HSTU attention in plain PyTorch: pad, build the mask, SiLU(alpha q k^T) / S, back to jagged.

This is the reference the TRITON and CUTLASS kernels are tested against, so it favours being
obviously right (a dense [B, N, N] mask built from the formula in
docs/dlrm_hstu_reference.md section 2.7) over speed or memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hstu.ops.pytorch.dtypes import upcast
from hstu.ops.pytorch.jagged import jagged_to_padded, lengths_from_offsets, padded_to_jagged


def attention_mask(
    lengths: torch.Tensor,
    max_seq_len: int,
    num_targets: torch.Tensor | None = None,
    contextual_seq_len: int = 0,
    max_attn_len: int = 0,
) -> torch.Tensor:
    """Which key j each query i may attend to, per row: bool [B, N, N].

    Causal over the history, contextual tokens bidirectional among themselves and over the
    history, candidates (the last num_targets tokens) see contextual + history + themselves only.
    Padding positions (>= the row's length) are masked out on both axes.
    """
    device = lengths.device
    lengths = lengths.to(torch.int64).view(-1, 1)
    positions = torch.arange(max_seq_len, device=device, dtype=torch.int64).view(1, -1)
    c = contextual_seq_len
    if c > 0:
        # All contextual tokens share id 0; history token k (0-based) gets id k + 1.
        ids = torch.clamp(positions - c + 1, min=0)
        first_target_id = lengths - c + 1
    else:
        ids = positions.expand(lengths.shape[0], -1)
        first_target_id = lengths
    if num_targets is not None:
        first_target_id = first_target_id - num_targets.to(torch.int64).view(-1, 1)
        # All candidates share one id, so none of them sees another.
        ids = torch.minimum(ids, first_target_id)
    ids = ids.expand(lengths.shape[0], -1)
    row_ids = ids.unsqueeze(2)  # query
    col_ids = ids.unsqueeze(1)  # key
    distance = row_ids - col_ids
    eye = torch.eye(max_seq_len, dtype=torch.bool, device=device).unsqueeze(0)
    mask = eye | (distance > 0)
    if max_attn_len > 0:
        mask = mask & (distance <= max_attn_len)
    if c > 0:
        mask = mask | ((row_ids == 0) & (col_ids < first_target_id.view(-1, 1, 1)))
    valid = positions < lengths  # [B, N]
    return mask & valid.unsqueeze(2) & valid.unsqueeze(1)


def hstu_mha(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    *,
    max_seq_len: int,
    num_targets: torch.Tensor | None = None,
    contextual_seq_len: int = 0,
    max_attn_len: int = 0,
    alpha: float | None = None,
    scaling_seqlen: int | None = None,
    sort_by_length: bool = False,
) -> torch.Tensor:
    """q, k: [L, H, d_qk]; v: [L, H, d_v]; seq_offsets: [B+1] int64. Returns [L, H, d_v].
    sort_by_length is accepted and has no effect here (padded batched matmuls have no launch
    order to choose).

    out_i = sum_j SiLU(alpha <q_i, k_j>) / S * M_ij * v_j, with S = scaling_seqlen (defaults to
    max_seq_len) and M the mask of `attention_mask`. Math runs in the inputs' dtype, except that
    the SiLU of the scores is taken in float32 and cast back, as the kernels do.
    """
    if alpha is None:
        alpha = q.shape[-1] ** -0.5
    scale = float(scaling_seqlen if scaling_seqlen is not None else max_seq_len)
    lengths = lengths_from_offsets(seq_offsets)
    padded_q = jagged_to_padded(q, seq_offsets, max_seq_len)  # [B, N, H, d]
    padded_k = jagged_to_padded(k, seq_offsets, max_seq_len)
    padded_v = jagged_to_padded(v, seq_offsets, max_seq_len)
    scores = torch.einsum("bnhd,bmhd->bhnm", padded_q, padded_k) * alpha
    mask = attention_mask(lengths, max_seq_len, num_targets, contextual_seq_len, max_attn_len)
    weights = F.silu(upcast(scores)) / scale
    weights = (weights * mask.unsqueeze(1)).to(v.dtype)
    out = torch.einsum("bhnm,bmhd->bnhd", weights, padded_v)
    return padded_to_jagged(out, seq_offsets)
