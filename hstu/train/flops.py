"""Model FLOPs of one training step, for MFU (model FLOPs utilisation).

Model FLOPs count what the model must compute, not what the kernels happen to do: no
recomputation in the backward, no padding, a multiply-add is 2 FLOPs, and the backward is
counted as twice the forward (so a training step is 3 x forward). The forward is:

- STU layers, per token: the uvqk projection 2 * D * 2H(d_v + d_qk) and the output projection
  2 * 3H d_v * D (hstu.model.model_summary);
- attention, per row of L tokens and per layer, as TorchEasyRec's attention benchmark counts it
  (reference section 3.5): 2H(d_qk + d_v) * L^2 / 2 (the causal half); L counts the row's
  contextual, history and candidate tokens;
- every other matmul of the dense model (the preprocessor's MLPs and contextual slots, the
  postprocessor, the item and fusion towers): measured by hooks on one real forward pass, so
  that whatever the config builds is counted with the batch's real row counts.

Embedding lookups, norms and elementwise work are memory traffic, not FLOPs, and are not
counted (the usual MFU convention).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from hstu.modules.contextual_preprocessor import ContextualTokens
from hstu.modules.contextualized_mlp import ParameterizedContextualizedMLP


@dataclasses.dataclass
class StepFlops:
    stu_linear: float  # forward
    attention: float  # forward
    other_matmuls: float  # forward

    @property
    def forward(self) -> float:
        return self.stu_linear + self.attention + self.other_matmuls

    @property
    def training_step(self) -> float:
        return 3.0 * self.forward


def stu_shape(dlrm) -> tuple[int, int, int, int, int]:
    """(layers, D, H, d_v, d_qk) of a DlrmHSTU's STU stack."""
    layers = list(dlrm.encoder.stu_stack.layers)
    first = layers[0]
    return (len(layers), int(first.uvqk_weight.shape[0]), int(first.num_heads),
            int(first.hidden_dim), int(first.attention_dim))


def encoder_row_lengths(dlrm, batch) -> torch.Tensor:
    """int64 [B] on the host: tokens per encoder row (contextual + history + candidates)."""
    lengths = sum(lengths.to("cpu", torch.int64) for lengths in batch.seq_lengths.values())
    return lengths + int(dlrm.encoder.preprocessor.contextual_seq_len)


def stu_flops(dlrm, row_lengths: torch.Tensor) -> tuple[float, float]:
    """(STU linear, attention) forward FLOPs for rows of these lengths."""
    layers, d, h, dv, dqk = stu_shape(dlrm)
    lengths = row_lengths.to(torch.float64)
    linear_per_token = 2 * d * 2 * h * (dv + dqk) + 2 * 3 * h * dv * d
    linear = layers * linear_per_token * float(lengths.sum())
    attention = layers * 2 * h * (dqk + dv) * float((lengths * lengths).sum()) / 2
    return linear, attention


def _linear_flops(module: nn.Linear, inputs, output) -> float:
    rows = inputs[0].numel() // module.in_features
    return 2.0 * rows * module.in_features * module.out_features


class _MatmulCounter:
    """Forward hooks on every nn.Linear outside the STU stack, plus the few modules that
    multiply with their own parameters (contextual slots, per-sample contextualized MLPs)."""

    def __init__(self, dlrm) -> None:
        self.total = 0.0
        self.handles = []
        stu_modules = set(map(id, dlrm.encoder.stu_stack.modules()))
        for module in dlrm.modules():
            if id(module) in stu_modules:
                continue
            if isinstance(module, nn.Linear):
                self.handles.append(module.register_forward_hook(self._on_linear))
            elif isinstance(module, ContextualTokens):
                self.handles.append(module.register_forward_hook(self._on_contextual_tokens))
            elif isinstance(module, ParameterizedContextualizedMLP):
                self.handles.append(module.register_forward_hook(self._on_parameterized_mlp))

    def _on_linear(self, module, inputs, output) -> None:
        self.total += _linear_flops(module, inputs, output)

    def _on_contextual_tokens(self, module, inputs, output) -> None:
        rows = inputs[0].shape[0]
        self.total += 2.0 * rows * module.num_slots * module.slot_dim * output.shape[-1]

    def _on_parameterized_mlp(self, module, inputs, output) -> None:
        tokens = inputs[0].shape[0]  # seq_embeddings [sum_len, d_in]
        self.total += 2.0 * tokens * module.in_dim * module.out_dim

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def measure_step_flops(model: nn.Module, dlrm, batch, autocast) -> StepFlops:
    """Runs one forward of `model` (the sharded model, or DlrmHSTU itself) on `batch` with
    counting hooks on `dlrm`; returns the training step's model FLOPs. The forward is extra
    work: call it outside any timed region."""
    counter = _MatmulCounter(dlrm)
    was_training = model.training
    try:
        model.eval()  # no dropout RNG consumed, same matmuls
        with autocast():
            model(batch)
    finally:
        counter.close()
        model.train(was_training)
    linear, attention = stu_flops(dlrm, encoder_row_lengths(dlrm, batch))
    return StepFlops(stu_linear=linear, attention=attention, other_matmuls=counter.total)
