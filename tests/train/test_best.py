"""The best evaluation per metric, and the checkpoint --export-best picks."""

from __future__ import annotations

import math
import types

import pytest

from hstu.train.best import (
    Best,
    MetricNameError,
    best_checkpoint,
    best_per_metric,
    lower_is_better,
    resolve_metric,
)

KEYS = ["eval/auc/is_click", "eval/auc/is_like", "eval/loss/is_click", "eval/loss/is_like"]


def test_metric_names_resolve_with_or_without_the_eval_prefix():
    assert resolve_metric("auc/is_click", KEYS) == "eval/auc/is_click"
    assert resolve_metric("eval/loss/is_like", KEYS) == "eval/loss/is_like"
    with pytest.raises(MetricNameError, match=r"auc/is_clik: .*did you mean eval/auc/is_click"):
        resolve_metric("auc/is_clik", KEYS)
    assert lower_is_better("eval/loss/is_like") and not lower_is_better("eval/auc/is_like")


def test_best_per_metric_maximises_aucs_minimises_losses_and_skips_nan():
    history = {
        "eval/auc/is_click": [(2, 0.55, 1), (4, 0.61, 2), (6, 0.58, 3)],
        "eval/loss/is_click": [(2, 0.70, 1), (4, 0.66, 2), (6, 0.64, 3)],
        "eval/auc/is_like": [(2, math.nan, 1), (4, math.nan, 2)],  # no positive label
    }
    assert best_per_metric(history) == {
        "eval/auc/is_click": Best(4, 0.61), "eval/loss/is_click": Best(6, 0.64)}


def test_a_replayed_step_counts_with_its_latest_value():
    # Step 6 was evaluated by the attempt that then failed, and again after the restart (the
    # first attempt's weights at step 6 are gone): only the second value describes a model
    # that still exists.
    history = {"eval/auc/is_click": [(4, 0.60, 1), (6, 0.70, 2), (6, 0.59, 5)]}
    assert best_per_metric(history) == {"eval/auc/is_click": Best(4, 0.60)}


def test_best_checkpoint_skips_checkpoints_without_an_evaluation_and_keeps_the_earlier_tie():
    pairs = [
        ("ckpt_8", {"global_step": 8, "eval/auc/is_click": 0.62}),
        ("ckpt_2", {"global_step": 2, "eval/auc/is_click": 0.55}),
        ("ckpt_4", {"global_step": 4, "eval/auc/is_click": 0.62}),
        ("ckpt_6", {"global_step": 6}),  # saved without evaluating
    ]
    assert best_checkpoint(pairs, "eval/auc/is_click") == ("ckpt_4", Best(4, 0.62))
    assert best_checkpoint(pairs, "eval/loss/is_click") is None


def test_export_best_picks_among_the_checkpoints_ray_reports():
    from hstu.train.trainer import _checkpoint_to_export

    def checkpoint(step):
        return types.SimpleNamespace(path=f"/runs/r/checkpoint_{step:08d}")

    result = types.SimpleNamespace(best_checkpoints=[
        (checkpoint(2), {"global_step": 2, "eval/loss/is_like": 0.30}),
        (checkpoint(4), {"global_step": 4, "eval/loss/is_like": 0.21}),
        (checkpoint(6), {"global_step": 6, "eval/loss/is_like": 0.25}),
    ])
    last, final = "/runs/r/checkpoint_00000006", {"global_step": 6, "eval/loss/is_like": 0.25}
    assert _checkpoint_to_export(result, last, None, final) == (
        last, "the last checkpoint", final)
    # The chosen checkpoint comes with its own evaluation (the train-vs-serve check needs it).
    assert _checkpoint_to_export(result, last, "eval/loss/is_like", final) == (
        "/runs/r/checkpoint_00000004", "best eval/loss/is_like 0.2100 at step 4",
        {"global_step": 4, "eval/loss/is_like": 0.21})
    assert _checkpoint_to_export(result, last, "eval/auc/is_like", final) == (
        last, "the last checkpoint: no checkpoint was evaluated for eval/auc/is_like", final)


def test_the_final_table_names_its_step_and_the_best_step():
    from hstu.train.progress import final_eval_table

    metrics = {"global_step": 100, "eval/auc/is_click": 0.60, "eval/loss/is_click": 0.66,
               "eval/auc/is_hate": math.nan, "eval/loss/is_hate": 0.02}
    text = final_eval_table(metrics, ["is_click", "is_hate"],
                            {"eval/auc/is_click": Best(50, 0.62)})
    lines = text.splitlines()
    assert lines[0] == "eval at step 100 (the last); best AUC over all the run's evaluations"
    assert lines[1].split() == ["task", "AUC", "loss", "best", "AUC", "at", "step"]
    assert lines[3].split() == ["is_click", "0.6000", "0.6600", "0.6200", "50"]
    assert lines[4].split() == ["is_hate", "-", "0.0200", "-", "-"]
