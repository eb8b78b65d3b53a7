"""The error bound the Triton kernels are held to, shared by tests and the GPU benchmark.

A kernel in dtype T is compared with a float64 run of the PyTorch reference. Its relative error
||out - ref|| / ||ref|| may be at most FACTOR times the error of the PyTorch path run in the same
dtype T against the same float64 reference (2x in the forward, 5x in the backward). In float32
the PyTorch error can be ~1e-7 or exactly 0, so the PyTorch error is floored at FLOAT32_FLOOR
before the factor applies.

This module imports only torch, so GPU-side scripts can use it.
"""

from __future__ import annotations

import dataclasses

import torch

FORWARD_FACTOR = 2.0
BACKWARD_FACTOR = 5.0
FLOAT32_FLOOR = 1e-6
# Where the float64 reference is exactly zero, errors are measured on this absolute scale.
ZERO_REFERENCE_SCALE = 1.0


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN anywhere gives NaN, which fails every bound)."""
    if out.shape != ref.shape:
        raise ValueError(f"shape {tuple(out.shape)} vs reference {tuple(ref.shape)}")
    diff = (out.double() - ref.double()).norm().item()
    scale = ref.double().norm().item()
    return diff / (scale if scale > 0 else ZERO_REFERENCE_SCALE)


@dataclasses.dataclass
class Comparison:
    name: str
    kernel_error: float
    torch_error: float
    bound: float

    @property
    def ok(self) -> bool:
        # Written so that NaN fails.
        return self.kernel_error <= self.bound

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "FAIL"
        return (
            f"{self.name}: kernel {self.kernel_error:.2e}, pytorch {self.torch_error:.2e}, "
            f"bound {self.bound:.2e} [{verdict}]"
        )


def compare(
    name: str,
    kernel_out: torch.Tensor,
    torch_out: torch.Tensor,
    ref64: torch.Tensor,
    *,
    factor: float,
) -> Comparison:
    """Measure kernel_out and torch_out (same dtype) against the float64 ref64."""
    kernel_error = relative_error(kernel_out, ref64)
    torch_error = relative_error(torch_out, ref64)
    floor = FLOAT32_FLOOR if kernel_out.dtype == torch.float32 else 0.0
    return Comparison(name, kernel_error, torch_error, factor * max(torch_error, floor))


def assert_within_bound(comparisons: list[Comparison]) -> None:
    failed = [str(c) for c in comparisons if not c.ok]
    if failed:
        raise AssertionError("error bound exceeded:\n  " + "\n  ".join(failed))


def compare_op(
    op_kernel,
    op_torch,
    inputs: dict[str, torch.Tensor],
    *,
    dtype: torch.dtype,
    grad_seed: int = 0,
    names: tuple[str, ...] | None = None,
) -> list[Comparison]:
    """Run op_torch in float64 and in `dtype`, op_kernel in `dtype`, on the same inputs.

    inputs: float64 tensors by argument name (those with requires_grad get gradients
    compared); each op is called as op(**inputs) and returns one tensor. The upstream gradient
    is one random float64 tensor, cast to each run's dtype. Returns the forward comparison and
    one per differentiable input.
    """
    grad_names = names or tuple(n for n, t in inputs.items() if t.requires_grad)

    def run(op, run_dtype):
        args = {}
        for name, tensor in inputs.items():
            if tensor.is_floating_point():
                tensor = tensor.detach().to(run_dtype).requires_grad_(name in grad_names)
            args[name] = tensor
        out = op(**args)
        return args, out

    ref_args, ref_out = run(op_torch, torch.float64)
    generator = torch.Generator(device="cpu").manual_seed(grad_seed)
    grad = torch.randn(ref_out.shape, generator=generator, dtype=torch.float64).to(ref_out.device)
    ref_out.backward(grad)
    torch_args, torch_out = run(op_torch, dtype)
    torch_out.backward(grad.to(dtype))
    kernel_args, kernel_out = run(op_kernel, dtype)
    kernel_out.backward(grad.to(dtype))
    result = [compare("forward", kernel_out, torch_out, ref_out, factor=FORWARD_FACTOR)]
    for name in grad_names:
        result.append(
            compare(
                f"d{name}",
                kernel_args[name].grad,
                torch_args[name].grad,
                ref_args[name].grad,
                factor=BACKWARD_FACTOR,
            )
        )
    return result
