"""hstu_mha: the public HSTU attention op, dispatching on the kernel."""

from __future__ import annotations

import torch

from hstu.ops.kernel import Kernel, implementation


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
    kernel: Kernel | str = Kernel.PYTORCH,
) -> torch.Tensor:
    """Jagged HSTU attention (docs/dlrm_hstu_reference.md section 2.7).

    q, k: [L, H, d_qk]; v: [L, H, d_v]; seq_offsets: [B+1] int64 row offsets into L.
    max_seq_len: an upper bound on every row's length (used for padding / tiling).
    num_targets: [B] int64 candidates at the end of each row (None: plain causal).
    contextual_seq_len: contextual tokens at the start of each row.
    max_attn_len: attention window in the id space (0: unlimited).
    alpha: score scale (default 1/sqrt(d_qk)). scaling_seqlen: the constant divisor S
    (default max_seq_len). Returns [L, H, d_v] in v's dtype.

    out_i = sum_j SiLU(alpha <q_i, k_j>) / S * M_ij * v_j. The SiLU is taken in float32; the
    scores come from a float32-accumulating product (TRITON) or from a matmul in the inputs'
    dtype (PYTORCH: bf16 scores under autocast).
    The mask M is `hstu.ops.pytorch.attention.attention_mask` (causal over the history,
    contextual tokens bidirectional over contextual + history, each candidate sees contextual +
    history + itself only).
    """
    impl = implementation("attention", "hstu_mha", kernel)
    return impl(
        q,
        k,
        v,
        seq_offsets,
        max_seq_len=max_seq_len,
        num_targets=num_targets,
        contextual_seq_len=contextual_seq_len,
        max_attn_len=max_attn_len,
        alpha=alpha,
        scaling_seqlen=scaling_seqlen,
    )
