"""STU input projection and output mix in plain PyTorch.

Recompute flags are honoured with activation checkpointing (torch.utils.checkpoint, non
reentrant): the checkpointed piece keeps only its inputs and reruns in the backward. The RNG
state is restored for the rerun, so a recomputed dropout draws the same mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from hstu.ops.pytorch.dtypes import upcast


def _maybe_checkpoint(enabled: bool, fn, *args):
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _normalize(x, weight, bias, eps):
    normed = F.layer_norm(upcast(x), (x.shape[-1],), upcast(weight), upcast(bias), eps)
    return normed.to(x.dtype)


def _project(normed, weight, bias):
    return torch.addmm(bias.to(normed.dtype), normed, weight.to(normed.dtype))


def _silu_u(uvqk, u_width):
    u = uvqk[:, :u_width]
    return F.silu(upcast(u)).to(uvqk.dtype)


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
    recompute_normed_x: bool = True,
    recompute_uvqk: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    expected = 2 * num_heads * (hidden_dim + attention_dim)
    if uvqk_weight.shape != (x.shape[1], expected):
        raise ValueError(
            f"uvqk_weight has shape {tuple(uvqk_weight.shape)}; expected ({x.shape[1]}, "
            f"{expected}) = (D, 2 * num_heads * (hidden_dim + attention_dim))"
        )
    u_width = num_heads * hidden_dim

    def norm_and_project(x, w_norm, b_norm, w, b):
        return _project(_normalize(x, w_norm, b_norm, norm_eps), w, b)

    # Four placements of the checkpoint, one per flag combination (the numbers are the same).
    if recompute_normed_x and recompute_uvqk:
        # Keep only x: LN, matmul and SiLU all rerun in the backward.
        def everything(x, w_norm, b_norm, w, b):
            uvqk = norm_and_project(x, w_norm, b_norm, w, b)
            return uvqk, _silu_u(uvqk, u_width)

        uvqk, u = _maybe_checkpoint(
            True, everything, x, norm_weight, norm_bias, uvqk_weight, uvqk_bias
        )
    elif recompute_normed_x:
        uvqk = _maybe_checkpoint(
            True, norm_and_project, x, norm_weight, norm_bias, uvqk_weight, uvqk_bias
        )
        u = _silu_u(uvqk, u_width)
    elif recompute_uvqk:
        normed = _normalize(x, norm_weight, norm_bias, norm_eps)

        def project_and_activate(normed, w, b):
            uvqk = _project(normed, w, b)
            return uvqk, _silu_u(uvqk, u_width)

        uvqk, u = _maybe_checkpoint(True, project_and_activate, normed, uvqk_weight, uvqk_bias)
    else:
        uvqk = norm_and_project(x, norm_weight, norm_bias, uvqk_weight, uvqk_bias)
        u = _silu_u(uvqk, u_width)

    length = x.shape[0]
    qk_width = num_heads * attention_dim
    _, v, q, k = torch.split(uvqk, [u_width, u_width, qk_width, qk_width], dim=1)
    return (
        u,
        q.view(length, num_heads, attention_dim),
        k.view(length, num_heads, attention_dim),
        v.view(length, num_heads, hidden_dim),
    )


def _output_norm(attn, weight, bias, eps, num_heads, group_norm):
    if group_norm:
        length, width = attn.shape
        per_head = upcast(attn).view(length, num_heads, width // num_heads)
        normed = F.layer_norm(per_head, (per_head.shape[-1],), eps=eps)
        normed = normed * upcast(weight).view(1, -1, 1) + upcast(bias).view(1, -1, 1)
        return normed.view(length, width).to(attn.dtype)
    return _normalize(attn, weight, bias, eps)


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
    recompute_y: bool = True,
) -> torch.Tensor:
    width = attn.shape[1]
    if width % num_heads:
        raise ValueError(f"attn width {width} is not a multiple of num_heads {num_heads}")
    expected_norm = num_heads if group_norm else width
    if norm_weight.numel() != expected_norm or norm_bias.numel() != expected_norm:
        raise ValueError(
            f"output norm affine has {norm_weight.numel()}/{norm_bias.numel()} values; expected "
            f"{expected_norm} ({'one per head' if group_norm else 'H * d_v'})"
        )
    if output_weight.shape != (3 * width, x.shape[1]):
        raise ValueError(
            f"output_weight has shape {tuple(output_weight.shape)}; expected "
            f"({3 * width}, {x.shape[1]}) = (3 * H * d_v, D)"
        )

    def mix(attn, u, w_norm, b_norm):
        normed = _output_norm(attn, w_norm, b_norm, norm_eps, num_heads, group_norm)
        y = torch.cat([u, attn, u * normed], dim=1).to(x.dtype)
        return F.dropout(y, p=dropout_ratio, training=training)

    y = _maybe_checkpoint(recompute_y, mix, attn, u, norm_weight, norm_bias)
    return torch.addmm(x, y, output_weight.to(x.dtype))
