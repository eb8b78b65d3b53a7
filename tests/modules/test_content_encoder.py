import pytest
import torch

from hstu.modules.content_encoder import MLPContentEncoder, PadContentEncoder, SliceContentEncoder
from hstu.modules.mlp import MLP

UIH_OFFSETS, CAND_OFFSETS = torch.tensor([0, 2, 3]), torch.tensor([0, 1, 3])


def test_slice_keeps_the_first_uih_dim_candidate_columns():
    uih, cand = torch.randn(3, 2), torch.randn(3, 4)
    values, offsets = SliceContentEncoder(2, 4)(uih, UIH_OFFSETS, cand, CAND_OFFSETS)
    assert values.shape == (6, 2) and offsets.tolist() == [0, 3, 6]
    expected = [uih[0], uih[1], cand[0, :2], uih[2], cand[1, :2], cand[2, :2]]
    assert torch.equal(values, torch.stack(expected))
    with pytest.raises(ValueError, match="candidate dim"):
        SliceContentEncoder(4, 2)


def test_pad_appends_a_learned_vector_to_history_rows():
    uih, cand = torch.randn(3, 2), torch.randn(3, 4)
    encoder = PadContentEncoder(2, 4)
    values, _ = encoder(uih, UIH_OFFSETS, cand, CAND_OFFSETS)
    assert values.shape == (6, 4)
    assert torch.equal(values[0], torch.cat([uih[0], encoder.padding[0]]))
    assert torch.equal(values[2], cand[0])


def test_mlp_encoder_output_widths_must_match():
    encoder = MLPContentEncoder(MLP(2, [5]), MLP(4, [5]))
    values, _ = encoder(torch.randn(3, 2), UIH_OFFSETS, torch.randn(3, 4), CAND_OFFSETS)
    assert values.shape == (6, 5)
    with pytest.raises(ValueError, match="must match"):
        MLPContentEncoder(MLP(2, [5]), MLP(4, [6]))
