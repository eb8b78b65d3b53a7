"""HSTUTransducer: preprocessor -> positional/time encoder -> dropout -> STU stack ->
candidate rows -> postprocessor (reference 2.4-2.9). What the `hstu` config block builds."""

from __future__ import annotations

import torch
from torch import nn

from hstu.modules.candidates import extract_candidates
from hstu.modules.contextual_preprocessor import ContextualPreprocessor
from hstu.modules.positional_encoder import HSTUPositionalEncoder
from hstu.modules.stu import STUStack
from hstu.ops import Kernel


class HSTUTransducer(nn.Module):
    def __init__(
        self,
        *,
        preprocessor: ContextualPreprocessor,
        positional_encoder: HSTUPositionalEncoder,
        stu_stack: STUStack,
        postprocessor: nn.Module,
        input_dropout_ratio: float = 0.2,
        kernel: Kernel = Kernel.PYTORCH,
    ) -> None:
        super().__init__()
        self.preprocessor = preprocessor
        self.positional_encoder = positional_encoder
        self.input_dropout = nn.Dropout(input_dropout_ratio)
        self.stu_stack = stu_stack
        self.postprocessor = postprocessor
        self.kernel = kernel

    def forward(self, **preprocessor_inputs: torch.Tensor) -> torch.Tensor:
        """Keyword inputs of ContextualPreprocessor.forward. Returns the candidates' encodings
        [sum t, D], in the order of the candidates in the batch."""
        encoder_input = self.preprocessor(**preprocessor_inputs)
        # The input dropout runs inside the positional op (one pass over x on TRITON).
        x = self.positional_encoder(
            encoder_input, dropout_ratio=self.input_dropout.p if self.training else 0.0)
        x = self.stu_stack(
            x, encoder_input.offsets, encoder_input.max_seq_len, encoder_input.num_targets
        )
        candidates = extract_candidates(
            x,
            encoder_input.offsets,
            encoder_input.num_targets,
            preprocessor_inputs["candidates"].shape[0],
            kernel=self.kernel,
        )
        # The candidates' timestamps are the input's own, in the same order (the encoder's
        # timestamps are [contextual zeros; history; candidates] per row).
        return self.postprocessor(candidates, preprocessor_inputs["candidate_timestamps"])
