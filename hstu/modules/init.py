"""Initialisations the reference prescribes, in one place."""

from __future__ import annotations

from torch import nn


def xavier_linear(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    """nn.Linear with a xavier-uniform weight and a zero bias (every Linear of the GR blocks)."""
    linear = nn.Linear(in_features, out_features, bias=bias)
    reset_xavier(linear)
    return linear


def reset_xavier(linear: nn.Linear) -> None:
    nn.init.xavier_uniform_(linear.weight)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
