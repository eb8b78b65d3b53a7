import pytest
import torch
from torch import nn

from hstu.modules.mlp import MLP


def test_layer_order_linear_norm_activation_dropout():
    mlp = MLP(4, [8, 3], activation="nn.SiLU", use_ln=True, dropout_ratio=[0.1])
    kinds = [type(m) for m in mlp.layers]
    assert kinds == [nn.Linear, nn.LayerNorm, nn.SiLU, nn.Dropout] * 2
    assert mlp(torch.randn(5, 4)).shape == (5, 3)


def test_bad_mlp_configs_are_named():
    with pytest.raises(ValueError, match="activation"):
        MLP(4, [8], activation="nn.Nope")
    with pytest.raises(ValueError, match="dropout_ratio"):
        MLP(4, [8, 8, 8], dropout_ratio=[0.1, 0.2])
    with pytest.raises(ValueError, match="mutually exclusive"):
        MLP(4, [8], use_bn=True, use_ln=True)
