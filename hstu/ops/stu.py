"""The two halves of an STU layer around the attention: input projection and output mix.

An STU layer (docs/dlrm_hstu_reference.md section 2.7) is

    u, q, k, v = stu_preprocess(x, ...)
    attn       = hstu_mha(q, k, v, ...).flatten(1)
    x_out      = stu_postprocess(attn, u, x, ...)

Recompute flags only decide which intermediates the backward keeps in memory and which it
recomputes; they never change a number (tests check forward and gradients bit for bit).
"""

from __future__ import annotations

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
