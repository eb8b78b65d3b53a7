import pytest
import torch

from hstu.modules.action_encoder import SimpleActionEncoder


def test_action_bits_with_watch_time_thresholds_are_concatenated_slots():
    torch.manual_seed(0)
    encoder = SimpleActionEncoder(
        3, [1, 2, 4], watchtime_to_action_thresholds=[60, 300],
        watchtime_to_action_weights=[8, 16],
    )
    actions = torch.tensor([0, 1, 6, 5])  # none, click, like+comment, click+comment
    watch = torch.tensor([10.0, 60.0, 500.0, 299.0])  # bits: -, 8, 8+16, 8
    expected_bits = [
        [0, 0, 0, 0, 0],
        [1, 0, 0, 1, 0],
        [0, 1, 1, 1, 1],
        [1, 0, 1, 1, 0],
    ]
    assert encoder.action_bits(actions, watch).int().tolist() == expected_bits
    uih_offsets, cand_offsets = torch.tensor([0, 3, 4]), torch.tensor([0, 1, 3])
    out = encoder(actions, watch, uih_offsets, cand_offsets)
    assert out.shape == (7, 5 * 3)
    # Output rows: [h0, h1, h2, c0, h3, c1, c2].
    history_rows = [0, 1, 2, 4]
    for history, row in enumerate(history_rows):
        for slot in range(5):
            got = out[row, 3 * slot : 3 * slot + 3]
            want = encoder.action_table[slot] if expected_bits[history][slot] else torch.zeros(3)
            assert torch.equal(got, want), (history, slot)
    for row in (3, 5, 6):
        assert torch.equal(out[row], encoder.target_embedding[0])


def test_thresholds_without_watch_times_is_an_error():
    encoder = SimpleActionEncoder(2, [1], [60], [2])
    with pytest.raises(ValueError, match="uih_watchtime"):
        encoder.action_bits(torch.tensor([1]), None)
    with pytest.raises(ValueError, match="pair up"):
        SimpleActionEncoder(2, [1], [60, 120], [2])
