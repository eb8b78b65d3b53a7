"""The compute dtype of the reference ops: float32 for half types, the input's own otherwise
(float64 stays float64, so that gradcheck can run through every op)."""

from __future__ import annotations

import torch


def upcast(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()
