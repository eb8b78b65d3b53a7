"""HSTUPositionalEncoder: x * sqrt(D) + position embedding + time-gap embedding (reference 2.5)."""

from __future__ import annotations

import math

import torch
from torch import nn

from hstu.modules.contextual_preprocessor import EncoderInput
from hstu.ops import Kernel, add_timestamp_positional_embeddings


class HSTUPositionalEncoder(nn.Module):
    def __init__(
        self,
        *,
        embedding_dim: int,
        num_position_buckets: int,
        num_time_buckets: int = 0,
        use_time_encoding: bool = False,
        time_bucket_fn: str = "sqrt",
        time_bucket_increments: float = 60.0,
        kernel: Kernel = Kernel.PYTORCH,
    ) -> None:
        super().__init__()
        if num_position_buckets <= 0:
            raise ValueError("positional_encoder.num_position_buckets must be > 0")
        if use_time_encoding and num_time_buckets <= 0:
            raise ValueError(
                "positional_encoder.use_time_encoding needs num_time_buckets > 0"
            )
        if time_bucket_fn not in ("sqrt", "log"):
            raise ValueError(
                f"positional_encoder.time_bucket_fn {time_bucket_fn!r}; expected 'sqrt' or 'log'"
            )
        bound = math.sqrt(1.0 / num_position_buckets)
        self.position_table = nn.Parameter(
            torch.empty(num_position_buckets, embedding_dim).uniform_(-bound, bound)
        )
        if use_time_encoding:
            bound = math.sqrt(1.0 / num_time_buckets)
            self.time_table = nn.Parameter(
                torch.empty(num_time_buckets + 1, embedding_dim).uniform_(-bound, bound)
            )
        else:
            self.register_parameter("time_table", None)
        self.alpha = embedding_dim**0.5
        self.num_time_buckets = num_time_buckets
        self.use_time_encoding = use_time_encoding
        self.time_bucket_fn = time_bucket_fn
        self.time_bucket_increments = time_bucket_increments
        self.kernel = kernel

    def forward(self, encoder_input: EncoderInput, dropout_ratio: float = 0.0) -> torch.Tensor:
        """dropout_ratio: the encoder's input dropout, applied in the same op (TRITON fuses
        it)."""
        # The op always takes a time table; it reads it only when use_time_encoding is set.
        time_table = self.time_table if self.time_table is not None else self.position_table
        return add_timestamp_positional_embeddings(
            encoder_input.embeddings,
            encoder_input.offsets,
            encoder_input.timestamps,
            encoder_input.num_targets,
            self.position_table,
            time_table,
            alpha=self.alpha,
            contextual_seq_len=encoder_input.contextual_seq_len,
            time_bucket_fn=self.time_bucket_fn,
            time_bucket_increments=self.time_bucket_increments,
            num_time_buckets=self.num_time_buckets,
            use_time_encoding=self.use_time_encoding,
            dropout_ratio=dropout_ratio,
            kernel=self.kernel,
        )
