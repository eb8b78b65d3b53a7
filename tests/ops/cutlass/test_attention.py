"""The CUTLASS kernel option, without the kernel: no GPU and no hstu_attn wheel here.

Tested: the missing-package error, the package-version check, the input checks, the arguments
handed to hstu_attn_varlen_func (captured by a stand-in), the Triton fallback (real Triton, in
the interpreter) and the config-load checks. The kernel's numbers are only compared with the
PyTorch reference by the `gpu` test at the end, which needs a GPU and hstu_attn."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

from hstu.ops import Kernel, hstu_mha
from hstu.ops.cutlass import attention as cutlass

HAS_PACKAGE = importlib.util.find_spec("hstu_attn") is not None


def _inputs(dtype=torch.bfloat16, d_qk=32, d_v=32, lengths=(5, 3), heads=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(total, heads, d_qk, generator=generator).to(dtype)
    k = torch.randn(total, heads, d_qk, generator=generator).to(dtype)
    v = torch.randn(total, heads, d_v, generator=generator).to(dtype)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)
    return q, k, v, offsets


@pytest.mark.skipif(HAS_PACKAGE, reason="hstu_attn is installed here")
def test_missing_package_names_it_and_how_to_install():
    q, k, v, offsets = _inputs()
    with pytest.raises(cutlass.CutlassUnavailableError) as raised:
        hstu_mha(q, k, v, offsets, max_seq_len=5, kernel=Kernel.CUTLASS)
    message = str(raised.value)
    assert "fused HSTU attention package 'hstu_attn'" in message
    assert (
        "pip install hstu_attn-0.1.0+bea6b4b.${DEVICE} -f "
        "https://tzrec.oss-accelerate.aliyuncs.com/third_party/hstu/${DEVICE}/repo.html"
    ) in message
    assert "model_config.kernel to TRITON or PYTORCH" in message
    assert isinstance(raised.value, ImportError)


def _stand_in(monkeypatch, function):
    module = types.ModuleType("hstu_attn")
    if function is not None:
        module.hstu_attn_varlen_func = function
    monkeypatch.setitem(sys.modules, "hstu_attn", module)


def test_a_package_without_the_function_or_scaling_seqlen_is_refused(monkeypatch):
    _stand_in(monkeypatch, None)
    with pytest.raises(cutlass.CutlassUnavailableError, match="has no hstu_attn_varlen_func"):
        cutlass.kernel_function()

    def old_release(
        q,
        k,
        v,
        cu_q,
        cu_k,
        max_q,
        max_k,
        num_contexts=None,
        num_targets=None,
        target_group_size=1,
        window_size=(-1, -1),
        alpha=1.0,
        rab=None,
    ):
        raise AssertionError("must not be called")

    _stand_in(monkeypatch, old_release)
    with pytest.raises(cutlass.CutlassUnavailableError, match="no scaling_seqlen argument"):
        cutlass.kernel_function()


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"dtype": torch.float32}, "needs bfloat16 or float16 q/k/v; got torch.float32"),
        (
            {"d_qk": 32, "d_v": 64},
            "needs attention_dim == hidden_dim; got q/k head size 32 and v head size 64",
        ),
        ({"d_qk": 48, "d_v": 48}, "supports head sizes (32, 64, 128, 256); got 48"),
        ({}, "runs on CUDA GPUs only; q is on cpu"),
    ],
)
def test_input_checks_say_what_to_change(kwargs, fragment):
    q, k, v, _ = _inputs(**kwargs)
    with pytest.raises(ValueError) as raised:
        cutlass.check_inputs(q, k, v)
    assert fragment in str(raised.value)


def test_the_kernel_gets_int32_offsets_contexts_targets_and_the_constant_scale(monkeypatch):
    q, k, v, offsets = _inputs(lengths=(6, 4))
    args, kwargs = cutlass.kernel_arguments(
        q,
        k,
        v,
        offsets,
        max_seq_len=6,
        num_targets=torch.tensor([2, 1]),
        contextual_seq_len=2,
        max_attn_len=0,
        alpha=None,
        scaling_seqlen=256,
    )
    assert args == (q, k, v)
    assert kwargs["max_seqlen_q"] == kwargs["max_seqlen_k"] == 6
    cu_seqlens = kwargs["cu_seqlens_q"]
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0, 6, 10]
    assert kwargs["cu_seqlens_k"] is cu_seqlens
    assert kwargs["num_contexts"].dtype == torch.int32 and kwargs["num_contexts"].tolist() == [2, 2]
    assert kwargs["num_targets"].dtype == torch.int32 and kwargs["num_targets"].tolist() == [2, 1]
    assert kwargs["window_size"] == (-1, 0) and kwargs["target_group_size"] == 1
    assert kwargs["alpha"] == pytest.approx(32**-0.5)
    assert kwargs["scaling_seqlen"] == 256
    _, plain = cutlass.kernel_arguments(
        q,
        k,
        v,
        offsets,
        max_seq_len=6,
        num_targets=None,
        contextual_seq_len=0,
        max_attn_len=3,
        alpha=0.5,
        scaling_seqlen=None,
    )
    assert plain["num_contexts"] is None and plain["num_targets"] is None
    assert plain["window_size"] == (3, 0) and plain["alpha"] == 0.5
    assert plain["scaling_seqlen"] == 6


def test_a_window_with_targets_falls_back_to_triton_and_says_so(monkeypatch):
    """The CUTLASS kernel cannot mask a local window together with targets or contextual
    tokens: the call runs the Triton kernel (here in its interpreter), with a warning."""
    from hstu.ops.pytorch.attention import hstu_mha as reference

    monkeypatch.setattr(cutlass, "_fallback_warned", False)
    monkeypatch.setattr(
        cutlass, "kernel_function", lambda: pytest.fail("the CUTLASS package must not be asked for")
    )
    q, k, v, offsets = _inputs(dtype=torch.float32, d_qk=16, d_v=16, lengths=(6, 4), heads=1)
    options = {
        "max_seq_len": 6,
        "num_targets": torch.tensor([2, 1]),
        "contextual_seq_len": 1,
        "max_attn_len": 2,
        "scaling_seqlen": 6,
    }
    with pytest.warns(UserWarning, match="attention runs the TRITON kernel instead"):
        got = hstu_mha(q, k, v, offsets, kernel=Kernel.CUTLASS, **options)
    torch.testing.assert_close(got, reference(q, k, v, offsets, **options), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize(
    "overrides, path, fragment",
    [
        (
            ["model_config.dlrm_hstu.hstu.stu.attention_dim=64"],
            "model_config.dlrm_hstu.hstu.stu.attention_dim",
            "needs attention_dim == hidden_dim",
        ),
        (['train_config.mixed_precision=""'], "train_config.mixed_precision", '"BF16" or "FP16"'),
    ],
)
def test_config_load_checks_cutlass_requirements(overrides, path, fragment):
    from hstu.config import ConfigError, load_config

    recipe = Path(__file__).resolve().parents[3] / "recipes" / "kuairand_dlrm_hstu.config"
    cfg = load_config(recipe, ["model_config.kernel=CUTLASS"])  # 128 == 128, BF16: loads
    assert cfg.model_config.dlrm_hstu.hstu.stu.hidden_dim == 128
    with pytest.raises(ConfigError) as raised:
        load_config(recipe, ["model_config.kernel=CUTLASS", *overrides])
    assert path in str(raised.value) and fragment in str(raised.value)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_PACKAGE, reason="needs the hstu_attn package")
def test_cutlass_matches_the_pytorch_reference_on_gpu():
    """Not run by this project so far (no GPU with hstu_attn was available)."""
    from hstu.ops.pytorch.attention import hstu_mha as reference

    q, k, v, offsets = (t.cuda() for t in _inputs(d_qk=128, d_v=128, lengths=(300, 64, 129)))
    options = {
        "max_seq_len": 300,
        "num_targets": torch.tensor([20, 5, 9]).cuda(),
        "contextual_seq_len": 4,
        "scaling_seqlen": 512,
    }
    got = hstu_mha(q, k, v, offsets, kernel=Kernel.CUTLASS, **options)
    want = reference(q.float(), k.float(), v.float(), offsets, **options)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=1e-2)
