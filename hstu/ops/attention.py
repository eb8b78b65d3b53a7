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
    sort_by_length: bool = False,
) -> torch.Tensor:
    """Jagged HSTU attention (docs/dlrm_hstu_reference.md section 2.7).

    q, k: [L, H, d_qk]; v: [L, H, d_v]; seq_offsets: [B+1] int64 row offsets into L.
    max_seq_len: an upper bound on every row's length (used for padding / tiling).
    num_targets: [B] int64 candidates at the end of each row (None: plain causal).
    contextual_seq_len: contextual tokens at the start of each row.
    max_attn_len: attention window in the id space (0: unlimited).
    alpha: score scale (default 1/sqrt(d_qk)). scaling_seqlen: the constant divisor S
    (default max_seq_len). sort_by_length: the kernel launches the longest rows' work first
    (TRITON; scheduling only, the numbers are the same). Returns [L, H, d_v] in v's dtype.

    out_i = sum_j SiLU(alpha <q_i, k_j>) / S * M_ij * v_j. The SiLU is taken in float32; the
    scores come from a float32-accumulating product (TRITON) or from a matmul in the inputs'
    dtype (PYTORCH: bf16 scores under autocast).
    The mask M is `hstu.ops.pytorch.attention.attention_mask` (causal over the history,
    contextual tokens bidirectional over contextual + history, each candidate sees contextual +
    history + itself only).
    """
    _check_inputs(q, k, v, seq_offsets, max_seq_len, num_targets)
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
        sort_by_length=sort_by_length,
    )


def _check_inputs(q, k, v, seq_offsets, max_seq_len, num_targets) -> None:
    """Errors that name the argument, instead of an IndexError deep inside a kernel.

    Shapes are checked always (metadata only, safe under torch.compile/export). The values of
    seq_offsets (total length, longest row) are checked only for CPU tensors in eager mode: on
    a GPU that would cost a host sync per layer (the TRITON kernel asserts on the device).
    """
    check_qkv_shapes("hstu_mha", q, k, v)
    if seq_offsets.dim() != 1 or seq_offsets.numel() < 1 or seq_offsets.dtype not in (
            torch.int32, torch.int64):
        raise ValueError("hstu_mha: seq_offsets must be a 1-D integer tensor [B+1], got "
                         f"{seq_offsets.dtype} of shape {tuple(seq_offsets.shape)}")
    batch = seq_offsets.numel() - 1
    if num_targets is not None and tuple(num_targets.shape) != (batch,):
        raise ValueError(f"hstu_mha: num_targets must be [B] = [{batch}] (one per row of "
                         f"seq_offsets), got shape {tuple(num_targets.shape)}")
    if seq_offsets.device.type != "cpu" or torch.compiler.is_compiling() or (
            torch.compiler.is_exporting()):
        return
    total = int(seq_offsets[-1])
    if total != q.shape[0] or int(seq_offsets[0]) != 0:
        raise ValueError(f"hstu_mha: seq_offsets must run from 0 to L = {q.shape[0]} (q's "
                         f"length), got {int(seq_offsets[0])} .. {total}")
    if batch:
        lengths = seq_offsets[1:] - seq_offsets[:-1]
        longest = int(lengths.max())
        if int(lengths.min()) < 0:
            raise ValueError("hstu_mha: seq_offsets must not decrease")
        if longest > max_seq_len:
            row = int(lengths.argmax())
            raise ValueError(f"hstu_mha: row {row} has {longest} tokens, more than "
                             f"max_seq_len = {max_seq_len}")


def check_qkv_shapes(op: str, q, k, v, **other_3d: torch.Tensor) -> None:
    """q, k [L, H, d_qk] and v [L, H, d_v], else a ValueError naming the argument; `op` starts
    the message. hstu_mha and hstu_mha_cached share it so that their errors read alike.
    other_3d: more [L', H, d] tensors (the cache) whose rank is checked with q, k, v's."""
    for name, tensor in (("q", q), ("k", k), ("v", v), *other_3d.items()):
        if tensor.dim() != 3:
            raise ValueError(f"{op}: {name} must be [L, H, d], got shape {tuple(tensor.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"{op}: q and k must have one shape, got {tuple(q.shape)} "
                         f"and {tuple(k.shape)}")
    if v.shape[:2] != q.shape[:2]:
        raise ValueError(f"{op}: v must be [L, H, d_v] with q's L and H {tuple(q.shape[:2])}, "
                         f"got {tuple(v.shape)}")
