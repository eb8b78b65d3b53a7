"""Content encoders: merge history and candidate item embeddings into one jagged sequence per
row, candidates after the history (reference 2.4 b)."""

from __future__ import annotations

import torch
from torch import nn

from hstu.modules.mlp import MLP
from hstu.ops import Kernel, concat_2d_jagged


class SliceContentEncoder(nn.Module):
    """Candidates keep their first uih_dim columns (their extra side-info columns are dropped)."""

    def __init__(self, uih_dim: int, candidate_dim: int, kernel: Kernel = Kernel.PYTORCH) -> None:
        super().__init__()
        if candidate_dim < uih_dim:
            raise ValueError(
                f"slice_content_encoder needs candidate dim ({candidate_dim}) >= uih dim "
                f"({uih_dim})"
            )
        self.uih_dim = uih_dim
        self.output_dim = uih_dim
        self.kernel = kernel

    def forward(self, uih, uih_offsets, candidates, candidate_offsets):
        return concat_2d_jagged(
            uih, uih_offsets, candidates[:, : self.uih_dim], candidate_offsets, kernel=self.kernel
        )


class PadContentEncoder(nn.Module):
    """History rows get a learned vector appended up to the candidate width."""

    def __init__(self, uih_dim: int, candidate_dim: int, kernel: Kernel = Kernel.PYTORCH) -> None:
        super().__init__()
        if candidate_dim <= uih_dim:
            raise ValueError(
                f"pad_content_encoder needs candidate dim ({candidate_dim}) > uih dim ({uih_dim})"
            )
        self.padding = nn.Parameter(torch.empty(1, candidate_dim - uih_dim).normal_(0.0, 0.1))
        self.output_dim = candidate_dim
        self.kernel = kernel

    def forward(self, uih, uih_offsets, candidates, candidate_offsets):
        padding = self.padding.to(uih.dtype).expand(uih.shape[0], -1)
        padded = torch.cat([uih, padding], dim=1)
        return concat_2d_jagged(
            padded, uih_offsets, candidates, candidate_offsets, kernel=self.kernel
        )


class MLPContentEncoder(nn.Module):
    """History and candidates through their own MLPs into one space (MTGR style)."""

    def __init__(self, uih_mlp: MLP, target_mlp: MLP, kernel: Kernel = Kernel.PYTORCH) -> None:
        super().__init__()
        if uih_mlp.output_dim != target_mlp.output_dim:
            raise ValueError(
                f"mlp_content_encoder: uih_mlp outputs {uih_mlp.output_dim} but target_mlp "
                f"outputs {target_mlp.output_dim}; their last hidden_units must match"
            )
        self.uih_mlp = uih_mlp
        self.target_mlp = target_mlp
        self.output_dim = uih_mlp.output_dim
        self.kernel = kernel

    def forward(self, uih, uih_offsets, candidates, candidate_offsets):
        return concat_2d_jagged(
            self.uih_mlp(uih),
            uih_offsets,
            self.target_mlp(candidates),
            candidate_offsets,
            kernel=self.kernel,
        )
