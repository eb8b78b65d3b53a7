import torch
import torch.nn.functional as F

from hstu.modules.contextualized_mlp import ParameterizedContextualizedMLP, SimpleContextualizedMLP


def swish_ln(x, norm):
    return x * torch.sigmoid(F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps))


def test_simple_mlp_formula():
    mlp = SimpleContextualizedMLP(3, 4, 5)
    x = torch.randn(6, 3)
    hidden = swish_ln(mlp.input_linear(x), mlp.hidden_norm)
    norm = mlp.output_norm
    expected = F.layer_norm(mlp.output_linear(hidden), (4,), norm.weight, norm.bias)
    torch.testing.assert_close(mlp(x, torch.tensor([0, 6]), 6, None), expected)


def test_parameterized_mlp_is_a_per_sample_linear_map():
    torch.manual_seed(0)
    mlp = ParameterizedContextualizedMLP(contextual_dim=4, in_dim=3, out_dim=2, hidden_dim=5)
    mlp.eval()  # no contextual dropout
    contextual = torch.randn(2, 4)
    x = torch.randn(5, 3)
    offsets = torch.tensor([0, 2, 5])
    out = mlp(x, offsets, 3, contextual)
    for b, rows in enumerate([range(0, 2), range(2, 5)]):
        s = mlp.contextual_linear(contextual[b])
        w = F.layer_norm(
            mlp.weight_linear(s).view(3, 2), (3, 2), mlp.weight_norm.weight, mlp.weight_norm.bias
        )
        r = mlp.bias_linear(swish_ln(mlp.bias_hidden(s), mlp.bias_norm))
        for i in rows:
            torch.testing.assert_close(out[i], x[i] @ w + r)
