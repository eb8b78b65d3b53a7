"""The two halves of an STU layer around the attention: input projection and output mix.

An STU layer (docs/dlrm_hstu_reference.md section 2.7) is

    u, q, k, v = stu_preprocess(x, ...)
    attn       = hstu_mha(q, k, v, ...).flatten(1)
    x_out      = stu_postprocess(attn, u, x, ...)

Recompute flags only decide which intermediates the backward keeps in memory and which it
recomputes; they never change a number (tests check forward and gradients bit for bit).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator

import torch

from hstu.ops.kernel import Kernel, implementation


def stu_preprocess(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    norm_eps: float,
    uvqk_weight: torch.Tensor,
    uvqk_bias: torch.Tensor,
    *,
    num_heads: int,
    attention_dim: int,
    hidden_dim: int,
    kernel: Kernel | str = Kernel.PYTORCH,
    recompute_normed_x: bool = True,
    recompute_uvqk: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm, the fused u/v/q/k projection, SiLU on u only.

    Shapes (H = num_heads, d_v = hidden_dim, d_qk = attention_dim, W = 2*H*(d_v + d_qk)):
      x [L, D]; norm_weight, norm_bias [D]; uvqk_weight [D, W]; uvqk_bias [W].
    Math:
      normed = LayerNorm(x; norm_weight, norm_bias, norm_eps)   float32 inside, cast to x.dtype
      uvqk   = normed @ uvqk_weight + uvqk_bias                  in x.dtype (weights cast to it)
      columns of uvqk, in THIS order: u [H*d_v], v [H*d_v], q [H*d_qk], k [H*d_qk], each
      head-major (column h*d + e is head h, feature e)
      u      = SiLU(u)  (float32 inside, cast back); q, k, v stay linear
    Returns (u [L, H*d_v], q [L, H, d_qk], k [L, H, d_qk], v [L, H, d_v]), all in x.dtype.
    q, k, v may be strided views of one buffer: consumers must honour their strides.
    recompute_normed_x: do not keep `normed` for the backward (recompute it from x).
    recompute_uvqk: do not keep the pre-activation u for the backward (recompute it).
    """
    impl = implementation("stu", "stu_preprocess", kernel)
    return impl(
        x,
        norm_weight,
        norm_bias,
        norm_eps,
        uvqk_weight,
        uvqk_bias,
        num_heads=num_heads,
        attention_dim=attention_dim,
        hidden_dim=hidden_dim,
        recompute_normed_x=recompute_normed_x,
        recompute_uvqk=recompute_uvqk,
    )


def stu_postprocess(
    attn: torch.Tensor,
    u: torch.Tensor,
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    norm_eps: float,
    output_weight: torch.Tensor,
    *,
    num_heads: int,
    dropout_ratio: float,
    training: bool,
    group_norm: bool,
    kernel: Kernel | str = Kernel.PYTORCH,
    recompute_y: bool = True,
) -> torch.Tensor:
    """x + Dropout(concat[u, attn, u * Norm(attn)]) @ output_weight.

    Shapes (H = num_heads, d_v = attn.shape[1] // H):
      attn, u [L, H*d_v] (u already SiLU'd); x [L, D]; output_weight [3*H*d_v, D];
      norm_weight, norm_bias: [H] if group_norm (one scalar affine per head) else [H*d_v].
    Math (Norm in float32, cast to attn.dtype):
      group_norm: each head's d_v values normalised on their own (mean, biased variance,
        1/sqrt(var + norm_eps)), then * norm_weight[h] + norm_bias[h]
      else: LayerNorm over all H*d_v values with vector affine
      y   = concat[u, attn, u * n] along columns -> [L, 3*H*d_v] in x.dtype
      y   = Dropout(y, p=dropout_ratio) if training (one mask over all 3*H*d_v columns;
            the random stream is implementation-specific: compare kernels with p = 0)
      out = x + y @ output_weight   (weight cast to x.dtype; the residual is the raw x)
    Returns [L, D] in x.dtype.
    recompute_y: do not keep y for the backward (recompute it, with the same dropout mask).
    """
    impl = implementation("stu", "stu_postprocess", kernel)
    return impl(
        attn,
        u,
        x,
        norm_weight,
        norm_bias,
        norm_eps,
        output_weight,
        num_heads=num_heads,
        dropout_ratio=dropout_ratio,
        training=training,
        group_norm=group_norm,
        recompute_y=recompute_y,
    )


@dataclasses.dataclass(frozen=True)
class LayerSettings:
    """Everything about an STU layer that is not a tensor (hstu.ops.stu.stu_layer's keywords)."""

    norm_eps: float
    num_heads: int
    attention_dim: int
    hidden_dim: int
    max_seq_len: int
    contextual_seq_len: int
    max_attn_len: int
    alpha: float | None
    scaling_seqlen: int | None
    sort_by_length: bool
    dropout_ratio: float  # 0 outside training
    group_norm: bool
    recompute_normed_x: bool
    recompute_y: bool
    recompute_uvqk: bool = True  # the three-op path only (see stu_layer)

    def split(self, uvqk: torch.Tensor):
        """(u [L, H*d_v], v [L, H, d_v], q [L, H, d_qk], k [L, H, d_qk]): views of the
        u | v | q | k columns (stu_preprocess's layout) of uvqk or of its gradient."""
        length, heads = uvqk.shape[0], self.num_heads
        u_width, qk_width = heads * self.hidden_dim, heads * self.attention_dim
        return (
            uvqk[:, :u_width],
            uvqk[:, u_width:2 * u_width].view(length, heads, self.hidden_dim),
            uvqk[:, 2 * u_width:2 * u_width + qk_width].view(length, heads, self.attention_dim),
            uvqk[:, 2 * u_width + qk_width:].view(length, heads, self.attention_dim),
        )


# Whether TRITON runs an STU layer as the one fused autograd node (default; 2.5 ms faster per
# encoder step than the three ops at 131K tokens on one H100, docs/BENCHMARKS.md "Session 8")
# or as the three separate TRITON ops: HSTU_FUSED_STU_LAYER=0 in the environment, or
# `fused_stu_layer(False)` around a block (benchmarks compare the two in one process).
FUSED_STU_LAYER = os.environ.get("HSTU_FUSED_STU_LAYER", "1") != "0"


@contextlib.contextmanager
def fused_stu_layer(enabled: bool) -> Iterator[None]:
    """Run TRITON STU layers fused (True) or as the three separate ops (False) inside."""
    global FUSED_STU_LAYER
    previous, FUSED_STU_LAYER = FUSED_STU_LAYER, bool(enabled)
    try:
        yield
    finally:
        FUSED_STU_LAYER = previous


def stu_layer(
    x: torch.Tensor,
    seq_offsets: torch.Tensor,
    num_targets: torch.Tensor | None,
    input_norm_weight: torch.Tensor,
    input_norm_bias: torch.Tensor,
    uvqk_weight: torch.Tensor,
    uvqk_bias: torch.Tensor,
    output_norm_weight: torch.Tensor,
    output_norm_bias: torch.Tensor,
    output_weight: torch.Tensor,
    settings: LayerSettings,
    kernel: Kernel | str = Kernel.PYTORCH,
) -> torch.Tensor:
    """One STU layer: stu_preprocess -> hstu_mha -> stu_postprocess (the module docstring).

    x [L, D]; seq_offsets [B+1]; num_targets [B] or None; the weights as the three ops take
    them. TRITON runs the layer as one fused autograd node (hstu/ops/triton/stu.py:
    _StuLayer): same math, fewer passes over the activations; the uvqk projection is kept for
    the backward in any case (the attention needs q, k, v), so recompute_uvqk does not apply.
    PYTORCH and CUTLASS run the three ops in sequence, and so does TRITON when FUSED_STU_LAYER
    is off (HSTU_FUSED_STU_LAYER=0, or inside fused_stu_layer(False)).
    """
    kernel = Kernel.parse(kernel)
    if kernel is Kernel.TRITON and FUSED_STU_LAYER:
        return implementation("stu", "stu_layer", kernel)(
            x, seq_offsets, num_targets, input_norm_weight, input_norm_bias, uvqk_weight,
            uvqk_bias, output_norm_weight, output_norm_bias, output_weight, settings)
    from hstu.ops.attention import hstu_mha

    u, q, k, v = stu_preprocess(
        x, input_norm_weight, input_norm_bias, settings.norm_eps, uvqk_weight, uvqk_bias,
        num_heads=settings.num_heads, attention_dim=settings.attention_dim,
        hidden_dim=settings.hidden_dim, kernel=kernel,
        recompute_normed_x=settings.recompute_normed_x, recompute_uvqk=settings.recompute_uvqk)
    attn = hstu_mha(
        q, k, v, seq_offsets, max_seq_len=settings.max_seq_len, num_targets=num_targets,
        contextual_seq_len=settings.contextual_seq_len, max_attn_len=settings.max_attn_len,
        alpha=settings.alpha, scaling_seqlen=settings.scaling_seqlen,
        sort_by_length=settings.sort_by_length, kernel=kernel)
    return stu_postprocess(
        attn.reshape(attn.shape[0], settings.num_heads * settings.hidden_dim), u, x,
        output_norm_weight, output_norm_bias,
        settings.norm_eps, output_weight, num_heads=settings.num_heads,
        dropout_ratio=settings.dropout_ratio, training=settings.dropout_ratio > 0,
        group_norm=settings.group_norm, kernel=kernel, recompute_y=settings.recompute_y)
