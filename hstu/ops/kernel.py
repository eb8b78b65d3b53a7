"""The kernel choice every op dispatches on (config: model_config.kernel)."""

from __future__ import annotations

import enum
import importlib
from typing import Callable


class Kernel(enum.Enum):
    """Which implementation an op runs.

    PYTORCH: plain PyTorch, padded where that is simplest; the reference the others are tested
    against. TRITON: this project's own Triton kernels. CUTLASS: the external fused CUDA HSTU
    attention package (attention only; every other op runs TRITON under CUTLASS, as in
    TorchEasyRec).
    """

    PYTORCH = "PYTORCH"
    TRITON = "TRITON"
    CUTLASS = "CUTLASS"

    @classmethod
    def parse(cls, value: "Kernel | str | int") -> "Kernel":
        if isinstance(value, Kernel):
            return value
        if isinstance(value, int):
            # TorchEasyRec's proto enum numbers: TRITON=0, PYTORCH=1, CUTLASS=2.
            numbers = {0: cls.TRITON, 1: cls.PYTORCH, 2: cls.CUTLASS}
            if value not in numbers:
                raise ValueError(f"unknown kernel number {value}; expected 0, 1 or 2")
            return numbers[value]
        try:
            return cls[str(value).upper()]
        except KeyError:
            valid = ", ".join(k.name for k in cls)
            raise ValueError(f"unknown kernel {value!r}; expected one of {valid}") from None

    def non_attention(self) -> "Kernel":
        """The kernel that ops other than attention use: CUTLASS only provides attention."""
        return Kernel.TRITON if self is Kernel.CUTLASS else self


def implementation(family: str, name: str, kernel: "Kernel | str | int") -> Callable:
    """The function `name` of hstu/ops/<kernel>/<family>.py.

    Imported on first use, so that the PYTORCH path never imports triton (slow to import, and
    absent from some deployments). Every family except "attention" runs TRITON under CUTLASS.
    """
    kernel = Kernel.parse(kernel)
    if family != "attention":
        kernel = kernel.non_attention()
    module_name = f"hstu.ops.{kernel.value.lower()}.{family}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise  # something the module itself imports is missing: show that
        raise NotImplementedError(
            f"kernel {kernel.name} has no {family} ops yet ({module_name.replace('.', '/')}.py "
            "is missing); use kernel: PYTORCH"
        ) from None
    impl = getattr(module, name, None)
    if impl is None:
        raise NotImplementedError(f"kernel {kernel.name} does not implement {family}.{name} yet")
    return impl
