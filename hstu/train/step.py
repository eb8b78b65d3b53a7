"""One training step, the code that both the Ray Train loop (loop.py) and the step benchmark
(benchmarks/train_bench.py) run, so that the benchmark times what users train with.

Forward under the run's autocast, the multi-task loss, backward (the fused sparse optimizer
updates the looked-up embedding rows inside backward), the dense optimizer step. Nothing here
reads a value back from the GPU: the losses stay on the device (the progress meter reads them
once per progress line).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch


def train_step(
    model: torch.nn.Module,
    dlrm: torch.nn.Module,
    dense_optimizer: torch.optim.Optimizer,
    batch,
    autocast: Callable[[], AbstractContextManager],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """model: the sharded (DistributedModelParallel) model; dlrm: the DlrmHSTU inside it, whose
    compute_losses turns the output into (total, {task: loss}). Returns those, on the device."""
    with autocast():
        output = model(batch)
        total, losses = dlrm.compute_losses(output, batch)
    dense_optimizer.zero_grad(set_to_none=True)
    total.backward()
    dense_optimizer.step()
    return total.detach(), {name: loss.detach() for name, loss in losses.items()}
