"""stu_preprocess / stu_postprocess: column order, norms, residual, and recompute flags that
change nothing."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from hstu.ops import stu_postprocess, stu_preprocess

H, DV, DQK, D = 2, 3, 4, 5


def preprocess_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, D, generator=g, dtype=dtype)
    width = 2 * H * (DV + DQK)
    return dict(
        x=x,
        norm_weight=torch.randn(D, generator=g, dtype=dtype),
        norm_bias=torch.randn(D, generator=g, dtype=dtype),
        norm_eps=1e-6,
        uvqk_weight=torch.randn(D, width, generator=g, dtype=dtype),
        uvqk_bias=torch.randn(width, generator=g, dtype=dtype),
    )


def test_preprocess_column_order_u_v_q_k():
    a = preprocess_inputs()
    u, q, k, v = stu_preprocess(**a, num_heads=H, attention_dim=DQK, hidden_dim=DV)
    normed = F.layer_norm(a["x"], (D,), a["norm_weight"], a["norm_bias"], 1e-6)
    uvqk = normed @ a["uvqk_weight"] + a["uvqk_bias"]
    u_cols, v_cols = uvqk[:, : H * DV], uvqk[:, H * DV : 2 * H * DV]
    q_cols = uvqk[:, 2 * H * DV : 2 * H * DV + H * DQK]
    k_cols = uvqk[:, 2 * H * DV + H * DQK :]
    torch.testing.assert_close(u, F.silu(u_cols))
    torch.testing.assert_close(v, v_cols.view(6, H, DV))  # linear, head-major
    torch.testing.assert_close(q, q_cols.view(6, H, DQK))
    torch.testing.assert_close(k, k_cols.view(6, H, DQK))


def postprocess_inputs():
    g = torch.Generator().manual_seed(1)
    return dict(
        attn=torch.randn(6, H * DV, generator=g),
        u=torch.randn(6, H * DV, generator=g),
        x=torch.randn(6, D, generator=g),
        output_weight=torch.randn(3 * H * DV, D, generator=g),
    )


def test_postprocess_group_norm_and_layer_norm():
    a = postprocess_inputs()
    gamma, beta = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 0.25])
    out = stu_postprocess(
        a["attn"], a["u"], a["x"], gamma, beta, 1e-6, a["output_weight"],
        num_heads=H, dropout_ratio=0.0, training=False, group_norm=True,
    )
    heads = a["attn"].view(6, H, DV)
    mean = heads.mean(-1, keepdim=True)
    var = heads.var(-1, unbiased=False, keepdim=True)
    normed = ((heads - mean) / torch.sqrt(var + 1e-6) * gamma.view(1, H, 1) + beta.view(1, H, 1))
    y = torch.cat([a["u"], a["attn"], a["u"] * normed.view(6, -1)], dim=1)
    torch.testing.assert_close(out, a["x"] + y @ a["output_weight"])

    w, b = torch.randn(H * DV), torch.randn(H * DV)
    out_ln = stu_postprocess(
        a["attn"], a["u"], a["x"], w, b, 1e-6, a["output_weight"],
        num_heads=H, dropout_ratio=0.0, training=False, group_norm=False,
    )
    normed = F.layer_norm(a["attn"], (H * DV,), w, b, 1e-6)
    y = torch.cat([a["u"], a["attn"], a["u"] * normed], dim=1)
    torch.testing.assert_close(out_ln, a["x"] + y @ a["output_weight"])


def test_postprocess_dropout_one_mask_over_all_columns():
    """Dropout acts on every column of [u, o, u*norm(o)], survivors scaled by 1/(1-p): with an
    identity W_o and x = 0 the output is the dropped-out concat itself."""
    a = postprocess_inputs()
    width = 3 * H * DV
    args = (a["attn"], a["u"], torch.zeros(a["x"].shape[0], width), torch.ones(H),
            torch.zeros(H), 1e-6, torch.eye(width))
    y = stu_postprocess(*args, num_heads=H, dropout_ratio=0.5, training=False, group_norm=True)
    torch.manual_seed(3)
    kept = stu_postprocess(*args, num_heads=H, dropout_ratio=0.5, training=True, group_norm=True)
    survivors = kept != 0
    torch.testing.assert_close(kept[survivors], 2 * y[survivors])
    for block in range(3):  # u, o, u * norm(o): each has dropped and kept entries
        columns = slice(block * H * DV, (block + 1) * H * DV)
        assert bool(((kept[:, columns] == 0) & (y[:, columns] != 0)).any())
        assert bool(survivors[:, columns].any())


@pytest.mark.parametrize("group_norm", [True, False])
def test_recompute_flags_change_no_number(group_norm):
    """Every combination of flags gives bit-identical outputs and gradients (dropout on)."""
    results = []
    for normed_flag, uvqk_flag, y_flag in itertools.product([False, True], repeat=3):
        a = {k: (v.clone().requires_grad_(True) if torch.is_tensor(v) else v)
             for k, v in preprocess_inputs().items()}
        torch.manual_seed(7)
        u, q, k, v = stu_preprocess(
            **a, num_heads=H, attention_dim=DQK, hidden_dim=DV,
            recompute_normed_x=normed_flag, recompute_uvqk=uvqk_flag,
        )
        attn = (q.sum(-1, keepdim=True) * v).flatten(1)  # any differentiable stand-in
        norm_size = H if group_norm else H * DV
        out = stu_postprocess(
            attn, u, a["x"], torch.ones(norm_size), torch.zeros(norm_size), 1e-6,
            torch.ones(3 * H * DV, D), num_heads=H, dropout_ratio=0.3, training=True,
            group_norm=group_norm, recompute_y=y_flag,
        )
        (out * torch.arange(out.numel()).view_as(out)).sum().backward()
        results.append([out.detach()] + [a[n].grad for n in ("x", "uvqk_weight", "norm_weight")])
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            assert torch.equal(got, want)


def test_shape_errors_name_the_argument():
    a = preprocess_inputs()
    a["uvqk_weight"] = a["uvqk_weight"][:, :-1]
    with pytest.raises(ValueError, match="uvqk_weight"):
        stu_preprocess(**a, num_heads=H, attention_dim=DQK, hidden_dim=DV)
    p = postprocess_inputs()
    with pytest.raises(ValueError, match="one per head"):
        stu_postprocess(
            p["attn"], p["u"], p["x"], torch.ones(3), torch.zeros(3), 1e-6, p["output_weight"],
            num_heads=H, dropout_ratio=0.0, training=False, group_norm=True,
        )
