"""Progress a person can read: one line every N steps, and tables at the end.

    step   40/120  epoch 1  |  412 samples/s  61.8k tokens/s  |  loss 2.914  is_click 0.652
    is_like 0.098 ...  |  elapsed 1m02s  ETA 2m04s

Throughput is measured over the interval since the previous line, wall clock, including time
spent waiting for data, and counts every worker's rows (the global rate).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence

import torch


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_rate(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


class ProgressMeter:
    """Accumulates per-step figures and turns each interval into a line and a metrics dict."""

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        total_steps: int | None,
        start_step: int = 0,
        clock=time.perf_counter,
    ) -> None:
        self.tasks = list(tasks)
        self.total_steps = total_steps
        self.clock = clock
        self.started = clock()
        self.start_step = start_step
        self._reset(start_step)

    def _reset(self, step: int) -> None:
        self.interval_start = self.clock()
        self.interval_first_step = step
        self.rows = 0
        self.tokens = 0
        # Sums over the interval of [total loss, *task losses] as one float64 tensor (on the
        # training device when the losses are tensors); None before the first step.
        self._loss_sums: torch.Tensor | None = None
        self.steps = 0

    def add(self, rows: int, tokens: int, losses: Mapping[str, float | torch.Tensor],
            total: float | torch.Tensor) -> None:
        """One step. The losses are all floats or all 0-d tensors of one device. Tensors stay
        on their device (a stack and an add per step) and are read back once per progress
        line: reading them every step (`.item()`) would make the host wait for the GPU to
        finish each step before it could queue the next one."""
        self.rows += rows
        self.tokens += tokens
        self.steps += 1
        values = [total] + [losses[task] for task in self.tasks]
        tensors = sum(isinstance(value, torch.Tensor) for value in values)
        if tensors == len(values):
            step = torch.stack([value.detach() for value in values]).to(torch.float64)
        elif tensors == 0:
            step = torch.tensor(values, dtype=torch.float64)
        else:
            raise TypeError("ProgressMeter.add: the total and the task losses must be all "
                            "floats or all tensors")
        self._loss_sums = step if self._loss_sums is None else self._loss_sums + step

    def loss_sums(self) -> list[float]:
        """The interval's sums of [total loss, *task losses] (one device read if on a GPU)."""
        if self._loss_sums is None:
            return [0.0] * (1 + len(self.tasks))
        return self._loss_sums.tolist()

    def eta_seconds(self, step: int) -> float | None:
        if not self.total_steps or step <= self.start_step:
            return None
        per_step = (self.clock() - self.started) / (step - self.start_step)
        return max(self.total_steps - step, 0) * per_step

    def flush(self, step: int, epoch: int, extra: Mapping[str, float] = {},
              loss_sums: Sequence[float] | None = None) -> tuple[str, dict]:
        """(line, metrics) for the interval that ends at `step`; starts the next interval.
        `loss_sums` replaces this meter's own [total, *tasks] sums (e.g. averaged over ranks)."""
        seconds = max(self.clock() - self.interval_start, 1e-9)
        steps = max(self.steps, 1)
        samples_per_s = self.rows / seconds
        tokens_per_s = self.tokens / seconds
        sums = list(self.loss_sums() if loss_sums is None else loss_sums)
        if len(sums) != 1 + len(self.tasks):
            raise ValueError(f"loss_sums has {len(sums)} values; expected total + "
                             f"{len(self.tasks)} tasks")
        total_loss = sums[0] / steps
        losses = {task: value / steps for task, value in zip(self.tasks, sums[1:])}
        metrics = {
            "train/loss": total_loss,
            "train/samples_per_s": samples_per_s,
            "train/tokens_per_s": tokens_per_s,
            "train/epoch": float(epoch),
            **{f"train/loss/{task}": value for task, value in losses.items()},
            **extra,
        }
        of_total = f"/{self.total_steps}" if self.total_steps else ""
        task_text = "  ".join(f"{task} {value:.4f}" for task, value in losses.items())
        line = (
            f"step {step:>6}{of_total}  epoch {epoch}  |  "
            f"{format_rate(samples_per_s)} samples/s  {format_rate(tokens_per_s)} tokens/s  |  "
            f"loss {total_loss:.4f}  {task_text}  |  "
            f"elapsed {format_duration(self.clock() - self.started)}  "
            f"ETA {format_duration(self.eta_seconds(step))}"
        )
        self._reset(step)
        return line, metrics


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain aligned text table (first column left-aligned, the others right-aligned)."""
    cells = [[str(c) for c in header]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def render(row: Sequence[str]) -> str:
        parts = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([render(cells[0]), rule] + [render(r) for r in cells[1:]])


def _cell(value: object) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        return f"{value:.4f}"
    return str(value)


EVAL_COLUMNS = (("auc", "AUC"), ("grouped_auc", "grouped AUC"), ("mae", "MAE"), ("ne", "NE"),
                ("calibration", "calibration"), ("loss", "loss"))


def eval_table(metrics: Mapping[str, float], tasks: Sequence[str]) -> str:
    """Per-task table from eval metrics keyed eval/<metric>/<task>."""
    present = [
        (key, title)
        for key, title in EVAL_COLUMNS
        if any(f"eval/{key}/{task}" in metrics for task in tasks)
    ]
    rows = [
        [task] + [metrics.get(f"eval/{key}/{task}", float("nan")) for key, _ in present]
        for task in tasks
    ]
    return table(["task"] + [title for _, title in present], rows)


def final_eval_table(metrics: Mapping[str, float], tasks: Sequence[str],
                     best: Mapping[str, object] | None = None) -> str:
    """The summary's table: the evaluation at the run's last step, named as such, and, when
    `best` ({eval key: best.Best}) has them, each task's best value of the first metric
    (AUC when there is one) over all the run's evaluations and the step it came from."""
    present = [
        (key, title)
        for key, title in EVAL_COLUMNS
        if any(f"eval/{key}/{task}" in metrics for task in tasks)
    ]
    header = ["task"] + [title for _, title in present]
    rows = [
        [task] + [metrics.get(f"eval/{key}/{task}", float("nan")) for key, _ in present]
        for task in tasks
    ]
    step = metrics.get("global_step", "?")
    title = f"eval at step {step} (the last)"
    headline = present[0] if present else None
    if best and headline and any(f"eval/{headline[0]}/{task}" in best for task in tasks):
        header += [f"best {headline[1]}", "at step"]
        for row, task in zip(rows, tasks):
            found = best.get(f"eval/{headline[0]}/{task}")
            row += [found.value, found.step] if found is not None else [float("nan"), "-"]
        title += f"; best {headline[1]} over all the run's evaluations"
    return title + "\n" + table(header, rows)
