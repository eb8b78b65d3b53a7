"""Model FLOPs of a training step (hstu.train.flops), checked against the smoke recipe's
dimensions worked out by hand."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from hstu.config import feature_specs, label_specs, load_config
from hstu.model import DlrmHSTU
from hstu.train.flops import encoder_row_lengths, measure_step_flops, stu_flops
from tests.test_model import make_batch

REPO = Path(__file__).resolve().parents[2]


def smoke_model() -> DlrmHSTU:
    cfg = load_config(REPO / "recipes" / "smoke.config")
    torch.manual_seed(0)
    return DlrmHSTU(cfg, feature_specs(cfg), label_specs(cfg))


def test_step_flops_match_the_smoke_recipe_by_hand():
    model = smoke_model()
    history, targets = [5, 0, 11], [3, 1, 2]
    batch = make_batch(model, history, targets)
    flops = measure_step_flops(model, model, batch, contextlib.nullcontext)

    # Smoke recipe: D=32, 2 heads, d_v = d_qk = 16, 2 STU layers, 6 contextual tokens.
    lengths = [6 + n + t for n, t in zip(history, targets)]  # 14, 7, 19
    per_token = 2 * 32 * 2 * 2 * (16 + 16) + 2 * 3 * 2 * 16 * 32  # uvqk + output projection
    assert flops.stu_linear == 2 * per_token * sum(lengths)
    assert flops.attention == 2 * 2 * 2 * (16 + 16) * sum(n * n for n in lengths) / 2

    items, candidates, rows = sum(history) + sum(targets), sum(targets), len(history)
    other = (
        rows * 2 * 6 * 16 * 32  # contextual slots: 6 affine maps 16 -> 32 per row
        + items * 2 * (16 * 32 + 32 * 32)  # content MLP 16 -> 32 -> 32
        + items * 2 * (32 * 32 + 32 * 32)  # action MLP 32 -> 32 -> 32
        + candidates * 2 * 36 * 32  # timestamp postprocessor 36 -> 32
        + candidates * 2 * (16 * 512 + 512 * 32)  # item tower 16 -> 512 -> 32
        + candidates * 2 * (32 * 32 + 32 * 8)  # fusion tower MLP and 8-task head
    )
    assert flops.other_matmuls == other
    assert flops.training_step == 3 * (flops.stu_linear + flops.attention + other)


def test_counting_leaves_no_hooks_and_keeps_training_mode():
    model = smoke_model()
    model.train()
    batch = make_batch(model, [4, 2], [2, 2])
    measure_step_flops(model, model, batch, contextlib.nullcontext)
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())


def test_row_lengths_add_the_contextual_tokens():
    model = smoke_model()
    batch = make_batch(model, [4, 0], [2, 1])
    assert encoder_row_lengths(model, batch).tolist() == [12, 7]
    linear, attention = stu_flops(model, torch.tensor([0, 0]))
    assert linear == 0 and attention == 0
