"""TRITON stu_preprocess / stu_postprocess against the PyTorch reference, every gradient."""

from __future__ import annotations

import pytest
import torch

from hstu.ops.pytorch import stu as torch_ops
from hstu.ops.triton import stu as triton_ops
from hstu.ops.triton.testing import assert_within_bound, compare_op

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 only on the GPU: the interpreter truncates float32 -> bfloat16 conversions.
CPU_DTYPES = [torch.float32, torch.float16]


def _rand(generator, *shape, scale=1.0, shift=0.0):
    value = torch.randn(*shape, generator=generator, dtype=torch.float64) * scale + shift
    return value.to(DEVICE).requires_grad_()


def _pre_inputs(rows, dim, width, seed):
    g = torch.Generator().manual_seed(seed)
    return dict(x=_rand(g, rows, dim), norm_weight=_rand(g, dim, scale=0.1, shift=1.0),
                norm_bias=_rand(g, dim, scale=0.1),
                uvqk_weight=_rand(g, dim, width, scale=dim ** -0.5),
                uvqk_bias=_rand(g, width, scale=0.1))


def _pre(module, heads, d_qk, d_v, recompute_normed_x, recompute_uvqk):
    def run(x, norm_weight, norm_bias, uvqk_weight, uvqk_bias):
        u, q, k, v = module.stu_preprocess(
            x, norm_weight, norm_bias, 1e-6, uvqk_weight, uvqk_bias, num_heads=heads,
            attention_dim=d_qk, hidden_dim=d_v, recompute_normed_x=recompute_normed_x,
            recompute_uvqk=recompute_uvqk)
        # Distinct weights per output so that every gradient path is checked.
        return torch.cat([u, 1.5 * q.flatten(1), -0.7 * k.flatten(1), 1.2 * v.flatten(1)], 1)

    return run


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("recompute", [(True, True), (False, False), (True, False)],
                         ids=["recompute-both", "keep-both", "recompute-normed-x"])
def test_preprocess_matches_pytorch(dtype, recompute):
    heads, d_qk, d_v = 2, 8, 16
    results = compare_op(_pre(triton_ops, heads, d_qk, d_v, *recompute),
                         _pre(torch_ops, heads, d_qk, d_v, *recompute),
                         _pre_inputs(29, 32, 2 * heads * (d_qk + d_v), seed=1), dtype=dtype)
    assert_within_bound(results)


def _layer_inputs(rows, dim, heads, d_qk, d_v, group_norm, seed):
    g = torch.Generator().manual_seed(seed)
    width = heads * d_v
    affine = heads if group_norm else width
    return dict(x=_rand(g, rows, dim), input_norm_weight=_rand(g, dim, scale=0.1, shift=1.0),
                input_norm_bias=_rand(g, dim, scale=0.1),
                uvqk_weight=_rand(g, dim, 2 * heads * (d_qk + d_v), scale=dim ** -0.5),
                uvqk_bias=_rand(g, 2 * heads * (d_qk + d_v), scale=0.1),
                output_norm_weight=_rand(g, affine, scale=0.1, shift=1.0),
                output_norm_bias=_rand(g, affine, scale=0.1),
                output_weight=_rand(g, 3 * width, dim, scale=(3 * width) ** -0.5))


def _layer(kernel, settings, offsets, num_targets):
    from hstu.ops import stu_layer

    def run(**weights):
        return stu_layer(weights.pop("x"), offsets, num_targets, settings=settings,
                         kernel=kernel, **weights)

    return run


def _settings(heads, d_qk, d_v, **changes):
    from hstu.ops import LayerSettings

    base = dict(norm_eps=1e-6, num_heads=heads, attention_dim=d_qk, hidden_dim=d_v,
                max_seq_len=15, contextual_seq_len=2, max_attn_len=0, alpha=None,
                scaling_seqlen=20, sort_by_length=True, dropout_ratio=0.0, group_norm=True,
                recompute_normed_x=False, recompute_y=False)
    base.update(changes)
    return LayerSettings(**base)


LAYER_CASES = {
    "contextual-targets-group-norm": {},
    "layer-norm-recompute": dict(group_norm=False, recompute_normed_x=True, recompute_y=True),
    "window-no-context": dict(contextual_seq_len=0, max_attn_len=4, sort_by_length=False),
}


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("case", list(LAYER_CASES), ids=list(LAYER_CASES))
def test_fused_layer_matches_pytorch_ops(dtype, case):
    # The fused TRITON layer against stu_preprocess -> hstu_mha -> stu_postprocess in PyTorch:
    # every weight's gradient and x's (through both the norm and the residual).
    heads, d_qk, d_v = 2, 8, 16
    settings = _settings(heads, d_qk, d_v, **LAYER_CASES[case])
    offsets = torch.tensor([0, 9, 9 + 15, 24 + 5], device=DEVICE)
    targets = torch.tensor([2, 4, 1], device=DEVICE)
    results = compare_op(_layer("TRITON", settings, offsets, targets),
                         _layer("PYTORCH", settings, offsets, targets),
                         _layer_inputs(29, 32, heads, d_qk, d_v, settings.group_norm, seed=3),
                         dtype=dtype)
    assert_within_bound(results)


@pytest.mark.parametrize("recompute", [False, True], ids=["keep", "recompute"])
def test_fused_layer_equals_the_three_triton_ops_with_dropout(recompute):
    # Same seed, dropout on: the fused layer draws the same mask as the separate TRITON ops
    # and rounds where they store, so outputs and gradients agree bit for bit.
    heads, d_qk, d_v = 2, 8, 16
    offsets = torch.tensor([0, 9, 24, 29], device=DEVICE)
    targets = torch.tensor([2, 4, 1], device=DEVICE)
    inputs = _layer_inputs(29, 32, heads, d_qk, d_v, True, seed=5)
    runs = []
    for fused in (True, False):
        settings = _settings(heads, d_qk, d_v, dropout_ratio=0.3, recompute_normed_x=recompute,
                             recompute_y=recompute)
        args = {name: t.detach().float().requires_grad_() for name, t in inputs.items()}
        torch.manual_seed(11)
        if fused:
            out = _layer("TRITON", settings, offsets, targets)(**args)
        else:
            from hstu.ops.triton.attention import hstu_mha

            u, q, k, v = triton_ops.stu_preprocess(
                args["x"], args["input_norm_weight"], args["input_norm_bias"], 1e-6,
                args["uvqk_weight"], args["uvqk_bias"], num_heads=heads, attention_dim=d_qk,
                hidden_dim=d_v)
            attn = hstu_mha(q, k, v, offsets, max_seq_len=15, num_targets=targets,
                            contextual_seq_len=2, scaling_seqlen=20, sort_by_length=True)
            out = triton_ops.stu_postprocess(
                attn.flatten(1), u, args["x"], args["output_norm_weight"],
                args["output_norm_bias"], 1e-6, args["output_weight"], num_heads=heads,
                dropout_ratio=0.3, training=True, group_norm=True)
        out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape).to(DEVICE))
        runs.append([out.detach()] + [args[name].grad for name in args])
    no_dropout = _layer("TRITON", _settings(heads, d_qk, d_v), offsets, targets)(
        **{name: t.detach().float() for name, t in inputs.items()})
    assert not torch.allclose(runs[0][0], no_dropout), "dropout did not change the output"
    for name, fused, separate in zip(["out", *inputs], *runs):
        assert torch.equal(fused, separate), name


def test_the_fused_layer_can_be_switched_off(monkeypatch):
    # HSTU_FUSED_STU_LAYER=0 / fused_stu_layer(False): stu_layer under TRITON runs the three
    # separate ops (no fused node), with the same numbers (dropout on, same seed).
    from hstu.ops import stu as stu_ops

    heads, d_qk, d_v = 2, 8, 16
    offsets = torch.tensor([0, 9, 24, 29], device=DEVICE)
    targets = torch.tensor([2, 4, 1], device=DEVICE)
    settings = _settings(heads, d_qk, d_v, dropout_ratio=0.3)
    inputs = _layer_inputs(29, 32, heads, d_qk, d_v, True, seed=5)
    default = stu_ops.FUSED_STU_LAYER
    runs = []
    for fused in (True, False):
        args = {name: t.detach().float().requires_grad_() for name, t in inputs.items()}
        torch.manual_seed(11)
        with stu_ops.fused_stu_layer(fused):
            if not fused:
                monkeypatch.setattr(triton_ops._StuLayer, "apply", None)  # must not be called
            out = _layer("TRITON", settings, offsets, targets)(**args)
        out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape).to(DEVICE))
        runs.append([out.detach()] + [args[name].grad for name in args])
    assert stu_ops.FUSED_STU_LAYER == default  # restored on the way out
    for name, fused, separate in zip(["out", *inputs], *runs):
        assert torch.equal(fused, separate), name


def _post_inputs(rows, dim, heads, d_v, group_norm, seed):
    g = torch.Generator().manual_seed(seed)
    width = heads * d_v
    affine = heads if group_norm else width
    return dict(attn=_rand(g, rows, width), u=_rand(g, rows, width), x=_rand(g, rows, dim),
                norm_weight=_rand(g, affine, scale=0.1, shift=1.0),
                norm_bias=_rand(g, affine, scale=0.1),
                output_weight=_rand(g, 3 * width, dim, scale=(3 * width) ** -0.5))


def _post(module, heads, group_norm, recompute_y, dropout_ratio=0.0, training=False):
    def run(attn, u, x, norm_weight, norm_bias, output_weight):
        return module.stu_postprocess(
            attn, u, x, norm_weight, norm_bias, 1e-6, output_weight, num_heads=heads,
            dropout_ratio=dropout_ratio, training=training, group_norm=group_norm,
            recompute_y=recompute_y)

    return run


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("group_norm", [True, False], ids=["group-norm", "layer-norm"])
def test_postprocess_matches_pytorch(dtype, group_norm):
    heads = 2
    results = compare_op(_post(triton_ops, heads, group_norm, recompute_y=True),
                         _post(torch_ops, heads, group_norm, recompute_y=True),
                         _post_inputs(29, 24, heads, 16, group_norm, seed=2), dtype=dtype)
    assert_within_bound(results)


def test_postprocess_dropout_mask_and_its_gradient():
    """With x = 0 and W_o = identity the output is y itself: each entry is dropped (0) or
    scaled by 1/(1-p); the gradients must equal PyTorch's with that same mask applied."""
    heads, d_v, p = 2, 16, 0.3
    width = heads * d_v
    inputs = _post_inputs(64, 3 * width, heads, d_v, True, seed=3)
    with torch.no_grad():
        inputs["x"].zero_()
        inputs["output_weight"].copy_(torch.eye(3 * width, dtype=torch.float64))
    args = {name: t.detach().float().requires_grad_() for name, t in inputs.items()}
    torch.manual_seed(0)
    out = _post(triton_ops, heads, True, recompute_y=True, dropout_ratio=p, training=True)(**args)
    plain = _post(torch_ops, heads, True, recompute_y=False)(
        **{name: t.detach() for name, t in args.items()})
    kept = out != 0
    assert abs(1.0 - kept.float().mean().item() - p) < 0.05
    torch.testing.assert_close(out[kept], plain[kept] / (1 - p), rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    reference = {name: t.detach().float().requires_grad_() for name, t in inputs.items()}

    def masked(attn, u, x, norm_weight, norm_bias, output_weight):
        y = torch_ops.stu_postprocess(attn, u, torch.zeros_like(x), norm_weight, norm_bias,
                                      1e-6, torch.eye(3 * width), num_heads=heads,
                                      dropout_ratio=0.0, training=False, group_norm=True)
        return x + (y * kept / (1 - p)) @ output_weight

    masked(**reference).backward(grad)
    for name in args:
        torch.testing.assert_close(args[name].grad, reference[name].grad, rtol=1e-4,
                                   atol=1e-5, msg=name)


def test_recompute_flags_change_no_number():
    heads = 2
    inputs = _post_inputs(40, 24, heads, 16, True, seed=4)
    grads = []
    for recompute_y in (True, False):
        args = {name: t.detach().float().requires_grad_() for name, t in inputs.items()}
        torch.manual_seed(5)
        out = _post(triton_ops, heads, True, recompute_y, dropout_ratio=0.2,
                    training=True)(**args)
        out.backward(torch.ones_like(out))
        grads.append([out.detach()] + [args[name].grad for name in args])
    for first, second in zip(*grads):
        assert torch.equal(first, second)
    pre_inputs = _pre_inputs(21, 32, 2 * heads * 24, seed=6)
    results = []
    for flags in ((True, True), (False, False)):
        args = {name: t.detach().float().requires_grad_() for name, t in pre_inputs.items()}
        out = _pre(triton_ops, heads, 8, 16, *flags)(**args)
        out.backward(torch.ones_like(out))
        results.append([out.detach()] + [args[name].grad for name in args])
    for first, second in zip(*results):
        assert torch.equal(first, second)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="uvqk_weight has shape"):
        triton_ops.stu_preprocess(torch.zeros(3, 8, device=DEVICE), torch.ones(8, device=DEVICE),
                                  torch.zeros(8, device=DEVICE), 1e-6,
                                  torch.zeros(8, 10, device=DEVICE), torch.zeros(10, device=DEVICE),
                                  num_heads=1, attention_dim=4, hidden_dim=4)
    with pytest.raises(ValueError, match="expected 2 \\(one per head\\)"):
        triton_ops.stu_postprocess(
            torch.zeros(3, 8, device=DEVICE), torch.zeros(3, 8, device=DEVICE),
            torch.zeros(3, 4, device=DEVICE), torch.ones(8, device=DEVICE),
            torch.zeros(8, device=DEVICE), 1e-6, torch.zeros(24, 4, device=DEVICE),
            num_heads=2, dropout_ratio=0.0, training=False, group_norm=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_full_size_on_gpu(dtype):
    heads, d = 4, 128
    results = compare_op(_pre(triton_ops, heads, d, d, True, True),
                         _pre(torch_ops, heads, d, d, True, True),
                         _pre_inputs(4000, 512, 2 * heads * 2 * d, seed=7), dtype=dtype)
    results += compare_op(_post(triton_ops, heads, True, True),
                          _post(torch_ops, heads, True, True),
                          _post_inputs(4000, 512, heads, d, True, seed=8), dtype=dtype)
    assert_within_bound(results)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_layer_full_size_on_gpu(dtype):
    heads, d = 4, 128
    settings = _settings(heads, d, d, max_seq_len=1300, contextual_seq_len=6,
                         scaling_seqlen=8000)
    offsets = torch.tensor([0, 1300, 1300 + 700, 2000 + 1250, 3250 + 750], device=DEVICE)
    targets = torch.tensor([100, 30, 1, 100], device=DEVICE)
    results = compare_op(_layer("TRITON", settings, offsets, targets),
                         _layer("PYTORCH", settings, offsets, targets),
                         _layer_inputs(4000, 512, heads, d, d, True, seed=9), dtype=dtype)
    assert_within_bound(results)


def test_fused_layer_on_an_empty_batch():
    # No tokens (rows of length 0): an empty output and zero weight gradients, no error.
    heads, d_qk, d_v = 2, 8, 16
    settings = _settings(heads, d_qk, d_v)
    inputs = _layer_inputs(0, 32, heads, d_qk, d_v, True, seed=6)
    args = {name: t.detach().float().requires_grad_() for name, t in inputs.items()}
    offsets = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    out = _layer("TRITON", settings, offsets, torch.zeros(2, dtype=torch.int64,
                                                          device=DEVICE))(**args)
    assert out.shape == (0, 32)
    out.sum().backward()
    assert all(torch.count_nonzero(args[name].grad) == 0 for name in args)
