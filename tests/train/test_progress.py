"""Progress lines and summary tables."""

from __future__ import annotations

import math

import pytest
import torch

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


def test_tensor_losses_give_the_same_line_as_floats_and_are_read_once_per_line(monkeypatch):
    tasks = ["is_click", "is_like"]
    steps = [(0.9, {"is_click": 0.7, "is_like": 0.2}), (0.5, {"is_click": 0.4, "is_like": 0.1})]
    reads = []
    for name in ("item", "tolist", "__float__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    lines = []
    for as_tensor in (False, True):
        reads.clear()
        clock = FakeClock()
        meter = ProgressMeter(tasks, total_steps=None, clock=clock)
        for total, losses in steps:
            if as_tensor:
                total = torch.tensor(total, requires_grad=True) * 1.0  # a loss with a graph
                losses = {task: torch.tensor(value) for task, value in losses.items()}
            meter.add(rows=4, tokens=40, losses=losses, total=total)
        assert reads == []  # nothing read back while the steps ran
        clock.now += 1.0
        lines.append(meter.flush(step=2, epoch=0))
        assert reads == ["tolist"]  # one read for the whole line
    assert lines[0][0] == lines[1][0]
    assert lines[1][1]["train/loss"] == pytest.approx(0.7)
    assert lines[1][1]["train/loss/is_like"] == pytest.approx(0.15)


def test_floats_and_tensors_do_not_mix_within_one_step():
    meter = ProgressMeter(["is_click"], total_steps=None, clock=FakeClock())
    with pytest.raises(TypeError, match="all floats or all tensors"):
        meter.add(rows=1, tokens=1, losses={"is_click": 0.5}, total=torch.tensor(0.5))
    with pytest.raises(TypeError, match="all floats or all tensors"):
        meter.add(rows=1, tokens=1, losses={"is_click": torch.tensor(0.5)}, total=0.5)


def test_flush_takes_sums_reduced_elsewhere_and_checks_their_length():
    meter = ProgressMeter(["is_click"], total_steps=None, clock=FakeClock())
    meter.add(rows=1, tokens=1, losses={"is_click": 0.5}, total=0.5)
    _, metrics = meter.flush(step=1, epoch=0, loss_sums=[0.25, 0.25])
    assert metrics["train/loss"] == pytest.approx(0.25)
    meter.add(rows=1, tokens=1, losses={"is_click": 0.5}, total=0.5)
    with pytest.raises(ValueError, match="loss_sums has 1 values; expected total \\+ 1 tasks"):
        meter.flush(step=2, epoch=0, loss_sums=[0.5])


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


def test_the_progress_line_shows_the_mean_over_ranks(monkeypatch):
    """Worker._log_progress sums each rank's interval sums over the ranks (one collective) and
    divides by the world size, so the line shows the global mean loss."""
    from hstu.train import loop
    from hstu.train.checkpoint import TrainState

    class Log:
        def metrics(self, metrics, step):
            logged.append((metrics, step))

    logged, lines = [], []
    # Two ranks: this rank's sums [0.4, 0.4] plus the other's [0.8, 0.8].
    monkeypatch.setattr(loop, "all_reduce_sum",
                        lambda values: [value + 0.8 for value in values])
    monkeypatch.setattr(loop, "console", lines.append)
    worker = object.__new__(loop.Worker)
    worker.world, worker.rank, worker.tasks, worker.log = 2, 0, ["is_click"], Log()
    worker.module = torch.nn.Module()  # a model without zch tables: no zch/* metrics
    meter = ProgressMeter(["is_click"], total_steps=None, clock=FakeClock())
    meter.add(rows=2, tokens=20, losses={"is_click": torch.tensor(0.4)},
              total=torch.tensor(0.4))
    worker._log_progress(meter, TrainState(global_step=1), lrs={})
    assert logged[0][0]["train/loss"] == pytest.approx(0.6)
    assert "loss 0.6000" in lines[0]
