"""benchmarks/train_bench.py's several-worker report on CPU: the weak-scaling column, the 1-vs-N
loss and AUC comparison of --split-global, and its argument checks. (The 1-vs-2 gloo run itself
is tests/train/test_equivalence.py; the GPU runs are benchmarks/gpu_scaling.sh.)"""

import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tb(load_benchmark):
    return load_benchmark("train_bench")


def result(workers, tokens_per_s, losses=(1.0,), split=False, evaluation=None, kernel="TRITON"):
    return dict(kernel=kernel, case="rows32", workers=workers, tokens_per_s=tokens_per_s,
                losses=list(losses), split_global=split, evaluation=evaluation)


def test_scaling_efficiency_is_per_worker_throughput_over_one_worker(tb):
    results = [result(1, 1000.0), result(2, 1900.0), result(4, 3000.0),
               result(2, 5000.0, kernel="PYTORCH")]
    assert tb.scaling_efficiency(results[1], results) == pytest.approx(0.95)
    assert tb.scaling_efficiency(results[2], results) == pytest.approx(0.75)
    assert tb.scaling_efficiency(results[0], results) == pytest.approx(1.0)
    # No one-worker run of that kernel, or a split global batch: no weak-scaling figure.
    assert tb.scaling_efficiency(results[3], results) is None
    assert tb.scaling_efficiency(result(2, 1900.0, split=True), results) is None


def test_loss_and_auc_differences_against_the_fewest_workers(tb):
    one = result(1, 0, losses=(6.0, 3.0, 2.0), split=True,
                 evaluation={"eval/auc/click": 0.70, "eval/auc/like": math.nan,
                             "eval/auc/follow": 0.60, "eval/candidates": 500.0})
    two = result(2, 0, losses=(6.0, 3.003, 2.0), split=True,
                 evaluation={"eval/auc/click": 0.7015, "eval/auc/like": math.nan,
                             "eval/auc/follow": 0.60, "eval/candidates": 500.0})
    lines = tb.loss_differences([one, two, result(2, 0)])  # the unsplit run is not compared
    assert len(lines) == 2
    assert "2 workers against 1" in lines[0] and "0.003 (0.1%) over 3 steps" in lines[0]
    assert "0.0015 (click)" in lines[1] and "the 2 tasks with an AUC" in lines[1]


def test_split_global_refuses_what_it_cannot_split():
    def run(*args):
        return subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_bench.py"), *args],
                              capture_output=True, text=True)

    uneven = run("--split-global", "--workers", "1", "3", "--batch-size", "4")
    assert uneven.returncode == 2 and "4 rows do not split evenly over 3 workers" in uneven.stderr
    budget = run("--split-global", "--token-budget", "1000")
    assert budget.returncode == 2 and "splits rows" in budget.stderr
    assert "needs --split-global" in run("--eval-batches", "2").stderr
    assert "expected TABLE=TYPE" in run("--sharding", "video_id_emb").stderr
