"""NormalizedEntropy, Calibration and CalibrationMetrics (hstu/metrics.py) against values
computed by hand from their definitions, merged, and wired into the evaluation
(hstu/train/evaluation.py) and the best-checkpoint rules (hstu/train/best.py). Their sync
across ranks is tested with the other metrics' in tests/test_metrics.py."""

from __future__ import annotations

import math
import types

import pytest
import torch

from hstu.metrics import Calibration, CalibrationMetrics, NormalizedEntropy
from hstu.tasks import TaskSpec

PREDICTIONS = torch.tensor([0.8, 0.3, 0.1, 0.6, 0.45])
LABELS = torch.tensor([1, 0, 0, 1, 0])


def hand_ne(predictions, labels) -> float:
    y = labels.double()
    q = predictions.double()
    cross_entropy = -(y * torch.log(q) + (1 - y) * torch.log(1 - q)).mean()
    p = y.mean()
    base = -(p * torch.log(p) + (1 - p) * torch.log(1 - p))
    return float(cross_entropy / base)


def test_ne_by_hand_and_at_the_base_rate():
    ne = NormalizedEntropy()
    ne.update(PREDICTIONS, LABELS)
    assert ne.compute() == pytest.approx(hand_ne(PREDICTIONS, LABELS), rel=1e-12)
    # Always predicting the base rate (2 positives of 5) scores exactly 1.
    base = NormalizedEntropy()
    base.update(torch.full((5,), 0.4), LABELS)
    assert base.compute() == pytest.approx(1.0, rel=1e-12)
    # A bitmask label (any value > 0) is a positive.
    bits = NormalizedEntropy()
    bits.update(PREDICTIONS, LABELS * 64)
    assert bits.compute() == ne.compute()


def test_ne_merge_equals_one_pass_and_one_class_is_nan():
    first, second = NormalizedEntropy(), NormalizedEntropy()
    first.update(PREDICTIONS[:2], LABELS[:2])
    second.update(PREDICTIONS[2:], LABELS[2:])
    first.merge(second)
    assert first.compute() == pytest.approx(hand_ne(PREDICTIONS, LABELS), rel=1e-12)
    only_negatives = NormalizedEntropy()
    only_negatives.update(torch.tensor([0.2, 0.1]), torch.tensor([0, 0]))
    assert math.isnan(only_negatives.compute())
    # A saturated prediction stays finite (TorchRec's eta clamps it).
    saturated = NormalizedEntropy()
    saturated.update(torch.tensor([1.0, 0.0]), torch.tensor([0, 1]))
    assert math.isfinite(saturated.compute()) and saturated.compute() > 10


def test_calibration_is_predicted_over_actual_positives():
    calibration = Calibration()
    calibration.update(PREDICTIONS, LABELS)
    assert calibration.compute() == pytest.approx(float(PREDICTIONS.double().sum()) / 2)
    other = Calibration()
    other.update(torch.tensor([0.5]), torch.tensor([1]))
    calibration.merge(other)
    assert calibration.compute() == pytest.approx((float(PREDICTIONS.double().sum()) + 0.5) / 3)
    none = Calibration()
    none.update(torch.tensor([0.3]), torch.tensor([0]))
    assert math.isnan(none.compute())


def task(name, num_class=1, losses=(("binary_cross_entropy", 0.0),), metrics=(("auc", 0),)):
    return TaskSpec(name, "label", None, num_class, 1.0, losses, metrics)


def test_which_tasks_get_which_metrics():
    tasks = [
        task("click"),
        task("like2", num_class=2, losses=(("softmax_cross_entropy", 0.0),)),
        task("kind3", num_class=3, losses=(("softmax_cross_entropy", 0.0),)),
        task("watch", losses=(("l2_loss", 0.0),), metrics=()),
        task("stay", losses=(("l2_loss", 0.0),), metrics=(("mean_absolute_error", None),)),
    ]
    assert sorted(CalibrationMetrics(tasks).metrics) == [
        "calibration_click", "calibration_like2", "mae_watch", "ne_click", "ne_like2"]


def test_update_reads_probs_and_task_labels():
    tasks = [task("click"), task("watch", losses=(("l2_loss", 0.0),), metrics=())]
    metrics = CalibrationMetrics(tasks)
    watch = torch.tensor([1.0, 2.5, 0.0, 4.0, 1.0])
    watch_labels = torch.tensor([2.0, 2.0, 1.0, 4.0, 0.0])
    model = types.SimpleNamespace(
        task_labels=lambda batch: {"click": LABELS, "watch": watch_labels})
    output = types.SimpleNamespace(probs={"click": PREDICTIONS, "watch": watch})
    metrics.update(model, output, batch=None)
    metrics.sync()
    values = metrics.compute()
    assert values["ne_click"] == pytest.approx(hand_ne(PREDICTIONS, LABELS), rel=1e-12)
    assert values["calibration_click"] == pytest.approx(float(PREDICTIONS.double().sum()) / 2)
    assert values["mae_watch"] == pytest.approx(float((watch - watch_labels).abs().mean()))


def test_evaluation_keys_and_best_rules():
    from hstu.train.best import better, eval_metric_keys
    from hstu.train.evaluation import metric_key

    assert metric_key("ne_is_click") == "eval/ne/is_click"
    assert metric_key("calibration_is_click") == "eval/calibration/is_click"
    keys = eval_metric_keys([task("is_click")])
    assert {"eval/ne/is_click", "eval/calibration/is_click"} <= set(keys)
    assert better("eval/ne/is_click", 0.8, 0.9)
    assert better("eval/calibration/is_click", 0.95, 1.2)
    assert not better("eval/calibration/is_click", 1.3, 0.9)


def test_evaluate_reports_ne_and_calibration_per_task(tmp_path):
    """evaluate() on the smoke model: eval/ne/<task> and eval/calibration/<task> for every task,
    equal to the metrics computed from the model's own outputs."""
    from pathlib import Path

    import pyarrow.parquet as pq

    from hstu.config import feature_specs, label_specs, load_config
    from hstu.data.pipeline import arrow_to_batch
    from hstu.data.synthetic import SyntheticOptions, generate
    from hstu.model import DlrmHSTU
    from hstu.train.evaluation import evaluate

    generate(SyntheticOptions(users=12, seed=5, max_history=40, median_history=10,
                              max_candidates=8, items=900, eval_fraction=0.5), tmp_path)
    cfg = load_config(Path(__file__).resolve().parents[1] / "recipes" / "smoke.config")
    features, labels = feature_specs(cfg), label_specs(cfg)
    table = pq.read_table(min((tmp_path / "eval").glob("*.parquet")))
    batches = [arrow_to_batch(table.slice(start, 4), features, labels)
               for start in range(0, table.num_rows, 4)]
    torch.manual_seed(0)
    model = DlrmHSTU(cfg, features, labels)
    results = evaluate(model, model, batches, device=torch.device("cpu"))
    model.eval()
    for spec in model.tasks:
        ne, calibration = NormalizedEntropy(), Calibration()
        with torch.no_grad():
            for batch in batches:
                output = model(batch)
                label = model.task_labels(batch)[spec.name]
                ne.update(output.probs[spec.name], label)
                calibration.update(output.probs[spec.name], label)
        for key, metric in ((f"eval/ne/{spec.name}", ne),
                            (f"eval/calibration/{spec.name}", calibration)):
            expected = metric.compute()
            if math.isnan(expected):
                assert math.isnan(results[key]), key
            else:
                assert results[key] == pytest.approx(expected, rel=1e-9), key
    assert any(not math.isnan(results[f"eval/ne/{spec.name}"]) for spec in model.tasks)
