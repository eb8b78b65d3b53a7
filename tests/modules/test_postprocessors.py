import math

import torch
import torch.nn.functional as F

from hstu.modules.postprocessors import (
    L2NormPostprocessor,
    LayerNormPostprocessor,
    TimestampLayerNormPostprocessor,
)


def test_l2_and_layer_norm_values():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    out = L2NormPostprocessor()(x, torch.zeros(2, dtype=torch.int64))
    torch.testing.assert_close(out, torch.tensor([[0.6, 0.8], [0.0, 0.0]]))
    ln = LayerNormPostprocessor(2)(torch.tensor([[1.0, 3.0]]), torch.zeros(1, dtype=torch.int64))
    torch.testing.assert_close(ln, torch.tensor([[-1.0, 1.0]]), atol=1e-4, rtol=0)


def test_hour_and_weekday_features_use_the_literal_3_14():
    post = TimestampLayerNormPostprocessor(4, [3600, 86400], [24, 7])
    # 2024-01-02 05:30:00 UTC = day 19724 since epoch, hour 5.
    ts = torch.tensor([19724 * 86400 + 5 * 3600 + 1800])
    features = post.time_features(ts)[0]
    hour_angle = 5 / 24 * 2 * 3.14
    day_angle = (19724 % 7) / 7 * 2 * 3.14
    expected = [
        math.cos(hour_angle), math.sin(hour_angle), math.cos(day_angle), math.sin(day_angle)
    ]
    torch.testing.assert_close(features, torch.tensor(expected))
    emb = torch.randn(1, 4)
    out = post(emb, ts)
    linear = post.linear(torch.cat([emb, features.view(1, 4)], dim=1))
    torch.testing.assert_close(out, F.layer_norm(linear, (4,), post.norm.weight, post.norm.bias))
