import torch
from torch import nn

from hstu.modules.action_encoder import SimpleActionEncoder
from hstu.modules.content_encoder import SliceContentEncoder
from hstu.modules.contextual_preprocessor import ContextualPreprocessor, ContextualTokens
from hstu.modules.contextualized_mlp import SimpleContextualizedMLP


class Identity(nn.Module):
    def forward(self, x, offsets, max_len, contextual):
        return x


def test_rows_are_contextual_then_history_then_candidates():
    torch.manual_seed(0)
    pre = ContextualPreprocessor(
        embedding_dim=2, num_contextual_slots=2, contextual_slot_dim=3,
        content_encoder=SliceContentEncoder(2, 2), content_mlp=Identity(),
    )
    uih = torch.tensor([[1.0, 1], [2, 2], [3, 3]])  # row 0: 2 items, row 1: 1 item
    cand = torch.tensor([[10.0, 10], [20, 20], [30, 30]])  # row 0: 1, row 1: 2
    contextual = torch.randn(2, 6)
    out = pre(
        contextual=contextual, uih=uih, uih_lengths=torch.tensor([2, 1]), candidates=cand,
        num_targets=torch.tensor([1, 2]), uih_timestamps=torch.tensor([5, 6, 7]),
        candidate_timestamps=torch.tensor([8, 9, 9]),
    )
    assert out.offsets.tolist() == [0, 5, 10]
    assert out.timestamps.tolist() == [0, 0, 5, 6, 8, 0, 0, 7, 9, 9]
    assert out.contextual_seq_len == 2 and out.max_seq_len == 5
    tokens = pre.contextual_tokens(contextual)  # [2, 2, D]
    expected = torch.cat([
        tokens[0], uih[:2], cand[:1], tokens[1], uih[2:], cand[1:],
    ])
    torch.testing.assert_close(out.embeddings, expected)


def test_contextual_tokens_one_affine_map_per_slot():
    tokens = ContextualTokens(3, 2, 4)
    ctx = torch.randn(5, 6)
    out = tokens(ctx)
    for k in range(3):
        expected = ctx[:, 2 * k : 2 * k + 2] @ tokens.weight[k] + tokens.bias[k]
        torch.testing.assert_close(out[:, k], expected)


def test_action_embedding_is_added_to_content():
    torch.manual_seed(0)
    action_encoder = SimpleActionEncoder(2, [1, 2])
    action_mlp = SimpleContextualizedMLP(4, 3, 5)
    content_mlp = SimpleContextualizedMLP(2, 3, 5)
    pre = ContextualPreprocessor(
        embedding_dim=3, num_contextual_slots=0, contextual_slot_dim=0,
        content_encoder=SliceContentEncoder(2, 2), content_mlp=content_mlp,
        action_encoder=action_encoder, action_mlp=action_mlp,
    )
    uih, cand = torch.randn(2, 2), torch.randn(1, 2)
    actions = torch.tensor([1, 3])
    out = pre(
        contextual=None, uih=uih, uih_lengths=torch.tensor([2]), candidates=cand,
        num_targets=torch.tensor([1]), uih_timestamps=torch.tensor([1, 2]),
        candidate_timestamps=torch.tensor([3]), uih_actions=actions,
    )
    offsets = torch.tensor([0, 3])
    content = content_mlp(torch.cat([uih, cand]), offsets, 3, None)
    acts = action_encoder(actions, None, torch.tensor([0, 2]), torch.tensor([0, 1]))
    torch.testing.assert_close(out.embeddings, content + action_mlp(acts, offsets, 3, None))
