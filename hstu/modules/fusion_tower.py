"""FusionMTLTower (reference 2.10): one shared MLP and head over user ⊙ item for all tasks."""

from __future__ import annotations

import torch
from torch import nn

from hstu.modules.init import reset_xavier, xavier_linear
from hstu.modules.mlp import MLP


class FusionMTLTower(nn.Module):
    """f = user ⊙ item -> [MLP] -> Linear(-> sum of task widths), split per task in order."""

    def __init__(self, embedding_dim: int, task_widths: list[int], mlp: MLP | None) -> None:
        super().__init__()
        if not task_widths:
            raise ValueError("fusion_mtl_tower has no task_configs")
        self.mlp = mlp
        if mlp is not None:
            for module in mlp.modules():
                if isinstance(module, nn.Linear):
                    reset_xavier(module)
        self.task_widths = list(task_widths)
        head_in = mlp.output_dim if mlp is not None else embedding_dim
        self.head = xavier_linear(head_in, sum(task_widths))

    def forward(self, user: torch.Tensor, item: torch.Tensor) -> list[torch.Tensor]:
        """user, item [sum t, D] -> one [sum t, width_k] tensor per task."""
        fused = user * item
        if self.mlp is not None:
            fused = self.mlp(fused)
        return list(torch.split(self.head(fused), self.task_widths, dim=1))
