"""Which samples went into the model: the optional per-step sample-id log, and its audit.

With `launch.py train --sample-log DIR` every rank appends one JSON line per trained step to
DIR/rank<r>.jsonl: {"restarts", "pid", "epoch", "step", "ids"}. A worker group that restarts
after a failure rolls the model back to its last checkpoint, so the steps the failed group ran
after that checkpoint no longer count. `audit()` replays the log with that rule and reports, per
epoch, the samples never trained (lost) and those trained more than once (duplicated).

The guarantee (docs/training.md): after a restart the epoch in progress is replayed from its
first batch, so a sample may be trained on twice (once before the failure, once in the replay)
and none is lost. Rows Ray's equal split or drop_last hold back are outside the guarantee
(both drop fewer rows than workers x batch size per epoch; the test data avoids them).
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Step:
    rank: int
    attempt: int  # 0 for the first worker group, 1 after the first restart, ...
    epoch: int
    step: int
    ids: tuple[int, ...]


def read_log(directory: str | Path) -> list[Step]:
    """All logged steps; attempts are told apart by the worker process id."""
    steps = []
    files = sorted(Path(directory).glob("rank*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no rank*.jsonl sample logs in {directory}")
    for path in files:
        rank = int(path.stem.removeprefix("rank"))
        attempt, last_pid = -1, None
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not a JSON line ({error})") from None
            if entry["pid"] != last_pid:
                attempt, last_pid = attempt + 1, entry["pid"]
            steps.append(
                Step(rank, attempt, int(entry["epoch"]), int(entry["step"]), tuple(entry["ids"]))
            )
    return steps


def append_step(directory: str | Path, rank: int, *, restarts: int, pid: int, epoch: int,
                step: int, ids: list[int]) -> None:
    line = {"restarts": restarts, "pid": pid, "epoch": epoch, "step": step, "ids": ids}
    with (Path(directory) / f"rank{rank}.jsonl").open("a") as out:
        out.write(json.dumps(line) + "\n")


def effective_steps(steps: Iterable[Step]) -> list[Step]:
    """The steps whose updates the final model holds. An attempt that starts at step s resumed
    from the checkpoint of step s - 1, so every earlier attempt's steps from s on are gone."""
    steps = list(steps)
    first_step: dict[int, int] = {}
    for s in steps:
        first_step[s.attempt] = min(first_step.get(s.attempt, s.step), s.step)
    cutoff = {
        attempt: min((first_step[later] for later in first_step if later > attempt),
                     default=float("inf"))
        for attempt in first_step
    }
    return [s for s in steps if s.step < cutoff[s.attempt]]


@dataclasses.dataclass
class EpochDelivery:
    epoch: int
    trained: int  # sample trainings counted (with repeats)
    lost: set[int]
    duplicated: dict[int, int]  # id -> times trained


def audit(steps: Iterable[Step], expected_ids: Iterable[int]) -> dict[int, EpochDelivery]:
    """Per epoch: which expected samples the final model never trained on, which twice."""
    expected = set(expected_ids)
    by_epoch: dict[int, Counter] = {}
    for s in effective_steps(steps):
        by_epoch.setdefault(s.epoch, Counter()).update(s.ids)
    return {
        epoch: EpochDelivery(
            epoch=epoch,
            trained=sum(counts.values()),
            lost=expected - set(counts),
            duplicated={i: n for i, n in counts.items() if n > 1},
        )
        for epoch, counts in sorted(by_epoch.items())
    }
