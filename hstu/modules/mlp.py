"""TorchEasyRec's MLP block (config message MLP, reference 4.7).

Each layer: Linear -> [BatchNorm1d | LayerNorm] -> activation -> [Dropout].
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def make_activation(name: str) -> nn.Module:
    """'nn.ReLU', 'nn.SiLU', ... (any argument-free torch.nn module named like the config does)."""
    class_name = name[3:] if name.startswith("nn.") else name
    activation = getattr(nn, class_name, None)
    if not (isinstance(activation, type) and issubclass(activation, nn.Module)):
        raise ValueError(f"MLP.activation {name!r} is not a torch.nn module (e.g. 'nn.ReLU')")
    return activation()


def broadcast_dropout(dropout_ratio: Sequence[float], num_layers: int) -> list[float]:
    """Empty -> no dropout; one value -> every layer; otherwise one per layer."""
    ratios = list(dropout_ratio)
    if not ratios:
        return [0.0] * num_layers
    if len(ratios) == 1:
        return ratios * num_layers
    if len(ratios) != num_layers:
        raise ValueError(
            f"MLP.dropout_ratio has {len(ratios)} values for {num_layers} hidden_units; "
            "give none, one, or one per layer"
        )
    return ratios


class MLP(nn.Module):
    """Stacked Linear -> [norm] -> activation -> [dropout] layers; output dim hidden_units[-1].

    BatchNorm uses batch statistics in training (as TorchEasyRec does); in eval it uses its
    running statistics, so a sample's eval score still does not depend on its batch.
    """

    def __init__(
        self,
        in_features: int,
        hidden_units: Sequence[int],
        *,
        activation: str = "nn.ReLU",
        use_bn: bool = False,
        use_ln: bool = False,
        bias: bool = True,
        dropout_ratio: Sequence[float] = (),
    ) -> None:
        super().__init__()
        if not hidden_units:
            raise ValueError("MLP.hidden_units is empty; give at least one layer width")
        if use_bn and use_ln:
            raise ValueError("MLP.use_bn and MLP.use_ln are mutually exclusive")
        layers: list[nn.Module] = []
        width = in_features
        for units, ratio in zip(hidden_units, broadcast_dropout(dropout_ratio, len(hidden_units))):
            layers.append(nn.Linear(width, units, bias=bias))
            if use_bn:
                layers.append(nn.BatchNorm1d(units))
            elif use_ln:
                layers.append(nn.LayerNorm(units))
            layers.append(make_activation(activation))
            if ratio > 0:
                layers.append(nn.Dropout(ratio))
            width = units
        self.layers = nn.Sequential(*layers)
        self.output_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
