"""Metrics against independent computations, state merging, and a 2-process sync."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hstu.metrics import (
    AUC,
    Calibration,
    GroupedAUC,
    MeanAbsoluteError,
    NormalizedEntropy,
    exact_auc,
    global_average_scale,
)


def pair_counting_auc(scores, labels):
    """P(score of a positive > score of a negative), ties one half: O(P*N) loops."""
    positives = [s for s, y in zip(scores, labels) if y]
    negatives = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def test_exact_auc_equals_pair_counting_with_ties():
    g = torch.Generator().manual_seed(0)
    scores = (torch.rand(300, generator=g) * 20).round() / 20  # many ties
    labels = torch.rand(300, generator=g) < 0.3
    expected = pair_counting_auc(scores.tolist(), labels.tolist())
    assert exact_auc(scores, labels) == pytest.approx(expected, abs=1e-12)
    metric = AUC(thresholds=0)
    metric.update(scores[:100], labels[:100])
    metric.update(scores[100:], labels[100:])
    assert metric.compute() == pytest.approx(expected, abs=1e-12)


def test_binned_auc_matches_torchmetrics_and_approaches_exact():
    from torchmetrics.functional.classification import binary_auroc

    g = torch.Generator().manual_seed(1)
    labels = torch.rand(2000, generator=g) < 0.4
    scores = torch.sigmoid(torch.randn(2000, generator=g) + labels.float())
    # Some scores sit exactly on thresholds (counted as reaching them, like torchmetrics).
    scores[:50] = torch.linspace(0, 1, 200)[torch.randint(0, 199, (50,), generator=g)]
    metric = AUC(thresholds=200)
    for part in torch.split(torch.arange(2000), 700):
        metric.update(scores[part], labels[part])
    reference = float(binary_auroc(scores, labels.long(), thresholds=200))
    assert metric.compute() == pytest.approx(reference, abs=1e-6)
    assert metric.compute() == pytest.approx(exact_auc(scores, labels), abs=5e-3)


def test_one_class_gives_nan():
    metric = AUC(200)
    metric.update(torch.tensor([0.2, 0.9]), torch.tensor([1, 1]))
    assert math.isnan(metric.compute())


def test_grouped_auc_is_the_mean_over_groups_with_both_classes():
    scores = torch.tensor([0.9, 0.1, 0.4, 0.8, 0.3, 0.7, 0.6])
    labels = torch.tensor([1, 0, 1, 0, 1, 1, 0])
    groups = torch.tensor([7, 7, 3, 3, 3, 5, 9])  # group 5 and 9 have one class only
    metric = GroupedAUC()
    metric.update(scores[:3], labels[:3], groups[:3])
    metric.update(scores[3:], labels[3:], groups[3:])
    group7 = 1.0
    group3 = pair_counting_auc([0.4, 0.8, 0.3], [1, 0, 1])  # 0.0
    assert metric.compute() == pytest.approx((group7 + group3) / 2)


def test_mae_and_merge():
    first, second = MeanAbsoluteError(), MeanAbsoluteError()
    first.update(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0]))
    second.update(torch.tensor([5.0]), torch.tensor([5.5]))
    first.merge(second)
    assert first.compute() == pytest.approx((1 + 2 + 0.5) / 3)
    a, b = AUC(50), AUC(50)
    a.update(torch.tensor([0.1, 0.8]), torch.tensor([0, 1]))
    b.update(torch.tensor([0.6, 0.3]), torch.tensor([0, 1]))
    a.merge(b)
    whole = AUC(50)
    whole.update(torch.tensor([0.1, 0.8, 0.6, 0.3]), torch.tensor([0, 1, 0, 1]))
    assert a.compute() == whole.compute()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics() -> list:
    return [AUC(0), AUC(200), GroupedAUC(), MeanAbsoluteError(), NormalizedEntropy(),
            Calibration()]


def _update(metrics, scores, labels, groups) -> None:
    auc_exact, auc_binned, grouped, mae, ne, calibration = metrics
    auc_exact.update(scores, labels)
    auc_binned.update(scores, labels)
    grouped.update(scores, labels, groups)
    mae.update(scores, labels.float())
    ne.update(scores, labels.float())
    calibration.update(scores, labels.float())


def _sync_worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        g = torch.Generator().manual_seed(10)
        scores, labels = torch.rand(40, generator=g), torch.rand(40, generator=g) < 0.5
        groups = torch.randint(0, 4, (40,), generator=g)
        # Ranks hold different amounts: 15 and 25 items.
        mine = slice(0, 15) if rank == 0 else slice(15, 40)
        metrics = _metrics()
        _update(metrics, scores[mine], labels[mine], groups[mine])
        for metric in metrics:
            metric.sync()
        scale = global_average_scale(torch.tensor([3, 2] if rank == 0 else [1]))
        results[rank] = [m.compute() for m in metrics] + [float(scale)]
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sync_across_two_gloo_processes():
    results = mp.Manager().dict()
    mp.spawn(_sync_worker, args=(_free_port(), results), nprocs=2, join=True)
    g = torch.Generator().manual_seed(10)
    scores, labels = torch.rand(40, generator=g), torch.rand(40, generator=g) < 0.5
    groups = torch.randint(0, 4, (40,), generator=g)
    expected = _metrics()
    _update(expected, scores, labels, groups)
    want = [m.compute() for m in expected]
    metrics = len(want)
    for rank in range(2):
        assert results[rank][:metrics] == pytest.approx(want, abs=1e-12)
    # Candidates 5 and 1, mean 3: rank losses are scaled by 5/3 and 1/3.
    assert results[0][metrics] == pytest.approx(5 / 3)
    assert results[1][metrics] == pytest.approx(1 / 3)
