"""Progress lines and summary tables."""

from __future__ import annotations

import math

import pytest

from hstu.train.progress import (
    ProgressMeter,
    eval_table,
    format_duration,
    format_rate,
    table,
)


def test_durations_and_rates_read_naturally():
    assert format_duration(5.2) == "5s"
    assert format_duration(125) == "2m05s"
    assert format_duration(3 * 3600 + 61) == "3h01m"
    assert format_duration(None) == "?"
    assert format_rate(412.3) == "412"
    assert format_rate(61_800) == "61.8k"
    assert format_rate(2.5e6) == "2.5M"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_progress_line_has_step_rates_losses_and_eta():
    clock = FakeClock()
    meter = ProgressMeter(["is_click", "is_like"], total_steps=40, start_step=0, clock=clock)
    for _ in range(10):
        meter.add(rows=32, tokens=3200, losses={"is_click": 0.6, "is_like": 0.2}, total=0.8)
    clock.now += 10.0
    line, metrics = meter.flush(step=10, epoch=0)
    assert line.startswith("step     10/40  epoch 0")
    assert "32.0 samples/s" in line and "3.2k tokens/s" in line
    assert "is_click 0.6000" in line and "is_like 0.2000" in line
    assert "ETA 30s" in line  # 30 steps left at 1 s per step
    assert metrics["train/samples_per_s"] == pytest.approx(32.0)
    assert metrics["train/loss"] == pytest.approx(0.8)
    assert metrics["train/loss/is_like"] == pytest.approx(0.2)


def test_tables_align_and_show_undefined_metrics_as_dashes():
    text = eval_table(
        {"eval/auc/is_click": 0.7123456, "eval/auc/is_like": math.nan, "eval/loss/is_click": 0.5},
        ["is_click", "is_like"],
    )
    lines = text.splitlines()
    assert lines[0].split() == ["task", "AUC", "loss"]
    assert lines[2].split() == ["is_click", "0.7123", "0.5000"]
    assert lines[3].split() == ["is_like", "-", "-"]
    assert len({len(line) for line in table(["a", "b"], [["x", 1], ["longer", 22]]).splitlines()}) == 1
