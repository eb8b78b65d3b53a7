"""ContextualPreprocessor: builds the encoder's input sequence (reference 2.4, no interleaving).

Row b becomes [c contextual tokens; n_b history tokens; t_b candidate tokens], each D wide:
content MLP(content encoder(history, candidates)) + action MLP(action encoder(history bits)),
with per-slot affine maps turning the c contextual embeddings into tokens.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from hstu.modules.action_encoder import SimpleActionEncoder
from hstu.ops import Kernel, concat_2d_jagged
from hstu.ops.pytorch.jagged import offsets_from_lengths


@dataclasses.dataclass
class EncoderInput:
    """The sequence the STU stack reads. L_b = c + n_b + t_b."""

    embeddings: torch.Tensor  # [sum L, D]
    offsets: torch.Tensor  # [B+1] int64
    timestamps: torch.Tensor  # [sum L] int64 seconds; contextual tokens carry 0
    num_targets: torch.Tensor  # [B] int64
    max_seq_len: int  # max_b L_b of this batch (for padding / tiling)
    contextual_seq_len: int  # c


class ContextualTokens(nn.Module):
    """ctx [B, c * d_ctx] -> [B, c, D]; slot k has its own affine map (batched over slots)."""

    def __init__(self, num_slots: int, slot_dim: int, embedding_dim: int) -> None:
        super().__init__()
        std = math.sqrt(2.0 / (slot_dim + embedding_dim))
        self.num_slots = num_slots
        self.slot_dim = slot_dim
        self.weight = nn.Parameter(torch.empty(num_slots, slot_dim, embedding_dim).normal_(0, std))
        self.bias = nn.Parameter(torch.zeros(num_slots, 1, embedding_dim))

    def forward(self, contextual: torch.Tensor) -> torch.Tensor:
        slots = contextual.view(-1, self.num_slots, self.slot_dim).transpose(0, 1)  # [c, B, d]
        tokens = torch.baddbmm(self.bias, slots, self.weight)  # [c, B, D]
        return tokens.transpose(0, 1)


class ContextualPreprocessor(nn.Module):
    def __init__(
        self,
        *,
        embedding_dim: int,
        num_contextual_slots: int,
        contextual_slot_dim: int,
        content_encoder: nn.Module,
        content_mlp: nn.Module,
        action_encoder: SimpleActionEncoder | None = None,
        action_mlp: nn.Module | None = None,
        kernel: Kernel = Kernel.PYTORCH,
    ) -> None:
        super().__init__()
        if (action_encoder is None) != (action_mlp is None):
            raise ValueError("contextual_preprocessor: action_encoder and action_mlp go together")
        self.embedding_dim = embedding_dim
        self.contextual_seq_len = num_contextual_slots
        self.contextual_tokens = (
            ContextualTokens(num_contextual_slots, contextual_slot_dim, embedding_dim)
            if num_contextual_slots > 0
            else None
        )
        self.content_encoder = content_encoder
        self.content_mlp = content_mlp
        self.action_encoder = action_encoder
        self.action_mlp = action_mlp
        self.kernel = kernel

    def forward(
        self,
        *,
        contextual: torch.Tensor | None,
        uih: torch.Tensor,
        uih_lengths: torch.Tensor,
        candidates: torch.Tensor,
        num_targets: torch.Tensor,
        uih_timestamps: torch.Tensor,
        candidate_timestamps: torch.Tensor,
        uih_actions: torch.Tensor | None = None,
        uih_watch_times: torch.Tensor | None = None,
        max_item_len: int | None = None,
    ) -> EncoderInput:
        """contextual [B, c * d_ctx] (None when c = 0); uih [sum n, d_uih]; candidates
        [sum t, d_cand]; timestamps int64 seconds; uih_actions int64 bitmasks [sum n].

        max_item_len: the longest history + candidates of a row, when the caller knows it on
        the host (DlrmHSTU does, from the batch). Otherwise it is read from the GPU, which
        makes the host wait for the GPU to catch up before it can queue more kernels."""
        uih_offsets = offsets_from_lengths(uih_lengths)
        candidate_offsets = offsets_from_lengths(num_targets)
        content, item_offsets = self.content_encoder(
            uih, uih_offsets, candidates, candidate_offsets
        )
        if max_item_len is None:
            item_lengths = uih_lengths + num_targets
            # .item(), not int(): traceable by torch.export (hstu/export).
            max_item_len = item_lengths.max().item() if item_lengths.numel() else 0
        x = self.content_mlp(content, item_offsets, max_item_len, contextual)
        if self.action_encoder is not None:
            if uih_actions is None:
                raise ValueError("the action encoder needs the uih_action feature group")
            actions = self.action_encoder(
                uih_actions, uih_watch_times, uih_offsets, candidate_offsets, dtype=uih.dtype,
                num_candidates=candidates.shape[0],
            )
            x = x + self.action_mlp(actions, item_offsets, max_item_len, contextual)
        # Timestamps are int64 and need no gradient; the concat is a copy in any dtype (the
        # Triton one is one launch, where the PyTorch one is a dozen small index kernels).
        timestamps, _ = concat_2d_jagged(
            uih_timestamps.unsqueeze(1),
            uih_offsets,
            candidate_timestamps.unsqueeze(1),
            candidate_offsets,
            kernel=self.kernel,
        )
        timestamps = timestamps.squeeze(1)

        c = self.contextual_seq_len
        if c > 0:
            if contextual is None:
                raise ValueError("contextual_preprocessor: the contextual group is missing")
            batch = num_targets.shape[0]
            tokens = self.contextual_tokens(contextual).reshape(batch * c, -1).to(x.dtype)
            token_offsets = torch.arange(batch + 1, device=x.device, dtype=torch.int64) * c
            x, offsets = concat_2d_jagged(tokens, token_offsets, x, item_offsets, kernel=self.kernel)
            zeros = timestamps.new_zeros(batch * c, 1)
            timestamps, _ = concat_2d_jagged(
                zeros, token_offsets, timestamps.unsqueeze(1), item_offsets, kernel=self.kernel
            )
            timestamps = timestamps.squeeze(1)
        else:
            offsets = item_offsets
        return EncoderInput(
            embeddings=x,
            offsets=offsets,
            timestamps=timestamps,
            num_targets=num_targets,
            max_seq_len=max_item_len + c,
            contextual_seq_len=c,
        )
