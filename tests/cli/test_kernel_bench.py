"""benchmarks/kernel_bench.py on CPU: the SDPA backend rows, the refusal path and the
TRITON-vs-fastest-SDPA comparison (the GPU timings themselves run only on the GPU machine)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def kb(load_benchmark):
    return load_benchmark("kernel_bench")


FLASH, CUDNN, EFFICIENT = ("flash", "FLASH_ATTENTION"), ("cudnn", "CUDNN_ATTENTION"), (
    "efficient", "EFFICIENT_ATTENTION")


def triton_row(shape, fwd, fwd_bwd):
    return dict(op="hstu_mha", impl="TRITON", shape=shape, fwd_ms=1.0, fwd_bwd_ms=1.0,
                fwd_tflops=fwd, fwd_bwd_tflops=fwd_bwd)


def test_every_fast_backend_is_timed(kb):
    assert [name for name, _ in kb.SDPA_BACKENDS] == ["flash", "cudnn", "efficient"]
    assert kb.sdpa_row(FLASH, "B=1 N=8", 1e9, 2e9, 1.0, 3.0)["op"] == "sdpa_flash_causal"


def test_sdpa_row_uses_the_script_flop_convention(kb):
    fwd_flops, bwd_flops = kb.attention_flops(torch.full((2,), 512))
    row = kb.sdpa_row(CUDNN, "B=2 N=512", fwd_flops, bwd_flops, 0.5, 2.0)
    assert row["backend"] == "cudnn" and row["op"] == "sdpa_cudnn_causal"
    assert row["fwd_tflops"] == pytest.approx(fwd_flops / 0.5 / 1e9)
    assert row["fwd_bwd_tflops"] == pytest.approx((fwd_flops + bwd_flops) / 2.0 / 1e9)
    assert "unavailable" not in row
    refused = kb.sdpa_row(EFFICIENT, "B=2 N=512", fwd_flops, bwd_flops, None, None, "why")
    assert refused["fwd_tflops"] is None and refused["fwd_bwd_tflops"] is None
    assert refused["unavailable"] == "why"
    assert "unavailable: why" in kb._attention_line(refused)


def test_each_direction_is_compared_with_its_own_fastest_backend(kb):
    shape, other = "B=32 N=8192", "B=512 N=512"
    rows = [
        triton_row(shape, 500.0, 400.0),
        kb.sdpa_row(FLASH, shape, 1e12, 1e12, 1e12 / 330e9, 2e12 / 500e9),  # 330 | 500
        kb.sdpa_row(CUDNN, shape, 1e12, 1e12, 1e12 / 600e9, 2e12 / 450e9),  # 600 | 450
        kb.sdpa_row(EFFICIENT, shape, 1e12, 1e12, None, None, "RuntimeError: no kernel"),
        triton_row(other, 180.0, 150.0),
        kb.sdpa_row(FLASH, other, 1e12, 1e12, 1e12 / 200e9, None, "fwd+bwd: RuntimeError: x"),
    ]
    first, second = kb.compare_with_sdpa(rows)
    assert first["shape"] == shape and second["shape"] == other
    assert first["sdpa_fwd_backend"] == "cudnn"
    assert first["sdpa_fwd_tflops"] == pytest.approx(600.0)
    assert first["fwd_ratio"] == pytest.approx(500.0 / 600.0)
    assert first["sdpa_fwd_bwd_backend"] == "flash"
    assert first["fwd_bwd_ratio"] == pytest.approx(400.0 / 500.0)
    assert first["sdpa_unavailable"] == {"efficient": "RuntimeError: no kernel"}
    # Forward ran, backward refused: the forward still counts, fwd+bwd has no reference.
    assert second["sdpa_fwd_backend"] == "flash" and second["fwd_ratio"] == pytest.approx(0.9)
    assert second["sdpa_fwd_bwd_backend"] is None and second["fwd_bwd_ratio"] is None
    lines = kb.comparison_lines([first, second])
    assert any(line.startswith(shape) and "(cudnn)" in line and "0.83x" in line
               and "(flash)" in line and "0.80x" in line for line in lines)
    assert any(line.startswith(other) and "none ran" in line for line in lines)
    assert any("sdpa efficient unavailable: RuntimeError: no kernel" in line for line in lines)


def test_the_comparison_ignores_other_rows(kb):
    rows = [dict(op="stu_layer", impl="TRITON", shape="B=8 N=8192", error="OOM"),
            triton_row("B=1 N=8", 1.0, 1.0),
            dict(op="hstu_mha", impl="PYTORCH", shape="B=1 N=8", fwd_ms=1.0, fwd_bwd_ms=1.0,
                 fwd_tflops=9.0, fwd_bwd_tflops=9.0)]
    (entry,) = kb.compare_with_sdpa(rows)
    assert entry["triton_fwd_tflops"] == 1.0 and entry["sdpa_fwd_tflops"] is None
    assert entry["fwd_ratio"] is None


def test_a_refusing_backend_is_reported_not_raised(kb, monkeypatch):
    # On CPU, torch has no cuDNN or efficient SDPA kernel and refuses as it does on a GPU for
    # an unsupported shape; flash has a CPU kernel. Timing is replaced by one call.
    monkeypatch.setattr(kb, "bench", lambda fn: (fn(), 2.0)[1])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    inputs = tuple(torch.randn(1, 2, 16, 8).requires_grad_() for _ in range(3))
    grad = torch.randn(1, 2, 16, 8)
    assert kb.time_sdpa_backend(FLASH, inputs, grad) == (2.0, 2.0, None)
    fwd_ms, both_ms, reason = kb.time_sdpa_backend(CUDNN, inputs, grad)
    assert fwd_ms is None and both_ms is None and reason.startswith("RuntimeError: ")
    assert kb.time_sdpa_backend(("gone", "NO_SUCH_BACKEND"), inputs, grad)[2].endswith(
        "has no SDPBackend.NO_SUCH_BACKEND")

    def refuse_backward(*args, **kwargs):
        raise RuntimeError("backward refused\nsecond line")

    monkeypatch.setattr(torch.autograd, "grad", refuse_backward)
    assert kb.time_sdpa_backend(FLASH, inputs, grad) == (
        2.0, None, "fwd+bwd: RuntimeError: backward refused")


def test_unavailable_reason_is_one_bounded_line(kb):
    error = RuntimeError("No available kernel. Aborting execution.\ntraceback noise")
    warnings = ["Flash attention kernel not used because:", "Flash attention kernel not used "
                "because:", "Flash attention requires\n  head dim <= 256"]
    reason = kb.unavailable_reason(error, warnings)
    assert reason == ("RuntimeError: No available kernel. Aborting execution.; Flash attention "
                      "kernel not used because:; Flash attention requires head dim <= 256")
    assert len(kb.unavailable_reason(error, ["x" * 1000], limit=100)) == 100


def test_help_runs_on_cpu():
    result = subprocess.run([sys.executable, str(REPO / "launch.py"), "bench", "kernel", "--help"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "--first-tiles-only" in result.stdout
