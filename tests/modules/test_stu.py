"""STU layer: gradients (gradcheck, float64), candidates isolated, rows independent."""

import torch
from torch.func import functional_call

from hstu.modules.stu import STULayer, STUStack


def make_stack(layers=2, group_norm=True, dtype=torch.float64, contextual=2):
    torch.manual_seed(0)
    stack = STUStack([
        STULayer(
            embedding_dim=6, num_heads=2, hidden_dim=3, attention_dim=4, scaling_seqlen=16,
            output_dropout_ratio=0.0, use_group_norm=group_norm, contextual_seq_len=contextual,
        )
        for _ in range(layers)
    ]).to(dtype)
    for layer in stack.layers:  # non-trivial norm affines, so their gradients matter
        with torch.no_grad():
            layer.input_norm_weight.uniform_(0.5, 1.5)
            layer.output_norm_bias.uniform_(-0.5, 0.5)
    return stack.eval()


def test_tiny_stu_layer_passes_gradcheck():
    torch.manual_seed(0)
    layer = STULayer(
        embedding_dim=4, num_heads=2, hidden_dim=2, attention_dim=2, scaling_seqlen=8,
        output_dropout_ratio=0.0, use_group_norm=True, contextual_seq_len=1,
    ).double()
    offsets = torch.tensor([0, 4, 7])
    num_targets = torch.tensor([2, 1])
    x = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    names = ["uvqk_weight", "uvqk_bias", "input_norm_weight", "input_norm_bias",
             "output_weight", "output_norm_weight", "output_norm_bias"]
    params = [
        (getattr(layer, n).detach() + 0.1 * torch.randn_like(getattr(layer, n))).requires_grad_()
        for n in names
    ]

    def run(x, *weights):
        return functional_call(layer, dict(zip(names, weights)), (x, offsets, 4, num_targets))

    # fast_mode checks the Jacobian along random directions: same failure power, far fewer runs.
    assert torch.autograd.gradcheck(run, (x, *params), eps=1e-6, atol=1e-6, fast_mode=True)


def encode(stack, rows, num_targets):
    """rows: list of [L_b, D] tensors -> list of outputs per row."""
    lengths = torch.tensor([r.shape[0] for r in rows])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    out = stack(torch.cat(rows), offsets, int(lengths.max()), torch.tensor(num_targets))
    return list(torch.split(out, lengths.tolist()))


def test_candidates_are_isolated():
    stack = make_stack()
    prefix = torch.randn(5, 6, dtype=torch.float64)  # 2 contextual + 3 history
    candidates = torch.randn(3, 6, dtype=torch.float64)
    (base,) = encode(stack, [torch.cat([prefix, candidates])], [3])
    # Permuting candidates permutes their outputs, and leaves the prefix alone.
    order = [2, 0, 1]
    (permuted,) = encode(stack, [torch.cat([prefix, candidates[order]])], [3])
    torch.testing.assert_close(permuted[5:], base[5:][order])
    torch.testing.assert_close(permuted[:5], base[:5])
    # One more candidate changes nothing for the others.
    extra = torch.randn(1, 6, dtype=torch.float64)
    (grown,) = encode(stack, [torch.cat([prefix, candidates, extra])], [4])
    torch.testing.assert_close(grown[:8], base)


def test_rows_do_not_depend_on_their_batch():
    stack = make_stack(group_norm=False)
    row = torch.randn(7, 6, dtype=torch.float64)
    (alone,) = encode(stack, [row], [2])
    others = [torch.randn(11, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)]
    batched = encode(stack, [others[0], row, others[1]], [5, 2, 1])
    torch.testing.assert_close(batched[1], alone)
