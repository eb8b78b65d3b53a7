"""A few console lines when Ray Train restarts the workers after a failure.

Without this, a worker lost mid-run shows as ~110 lines of Ray's worker-death reports and
tracebacks (now in the run's log, console.py). `RestartReporter` runs inside Ray Train's
controller, which sees every failure and every registered checkpoint, and prints what a person
needs to follow the run:

    worker 1 died (its process exited or was killed; Ray's report is in the log)
    restarting the workers from checkpoint_00000004 (step 4): attempt 2 of 2

The restarted workers then print where they resumed (loop.py). The controller's stdout reaches
the driver's console with its `(TrainController pid=...)` prefix. A failure with no restart
left prints nothing here: the CLI ends with that error as its one line.
"""

from __future__ import annotations

import sys
from pathlib import PurePosixPath

from ray.train import UserCallback


def restart_lines(failure: str, failures: int, max_failures: int,
                  checkpoint: tuple[str, int | None] | None) -> list[str]:
    """The lines for the `failures`-th failure (1-based); none when the run stops there."""
    if failures > max_failures:
        return []
    if checkpoint is None:
        where = "from the start (no checkpoint registered yet)"
    else:
        name = PurePosixPath(checkpoint[0]).name
        where = f"from {name}" + (f" (step {checkpoint[1]})" if checkpoint[1] is not None else "")
    return [failure,
            f"restarting the workers {where}: attempt {failures + 1} of {max_failures + 1}"]


class RestartReporter(UserCallback):
    """Ray Train controller callback: remembers the latest registered checkpoint (the one a
    restart starts from) and prints the restart lines on each worker-group failure."""

    def __init__(self, max_failures: int,
                 latest: tuple[str, int | None] | None = None) -> None:
        self.max_failures = max_failures
        self.failures = 0
        # (path, step) of the checkpoint a restart would start from; a resumed run starts
        # with its run's latest one.
        self.latest = latest

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if checkpoint is None:
            return
        step = (metrics[0] if metrics else {}).get("global_step")
        self.latest = (checkpoint.path, int(step) if step is not None else None)

    def after_exception(self, run_context, worker_exceptions) -> None:
        from hstu.train.errors import worker_failure_line

        self.failures += 1
        lines = restart_lines(worker_failure_line(worker_exceptions), self.failures,
                              self.max_failures, self.latest)
        if lines:
            sys.stdout.write("\n".join(lines) + "\n")
            sys.stdout.flush()
