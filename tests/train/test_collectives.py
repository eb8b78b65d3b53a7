"""Lockstep over two real gloo processes: unequal batch counts must neither hang nor lose rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]


# Each rank runs this script (a separate interpreter, as under Ray): rank 0 holds three
# batches, rank 1 one for training and none for evaluation.
WORKER = r"""
import dataclasses, json, sys
from types import SimpleNamespace
import torch.distributed as dist
from hstu.train.collectives import LockstepStats, lockstep, lockstep_padded
from hstu.train.evaluation import rows_left_out

@dataclasses.dataclass
class FakeBatch:
    batch_size: int
    tag: str

rank, init_file, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
held = {
    "train": [[FakeBatch(4, "a0"), FakeBatch(4, "a1"), FakeBatch(2, "a2")], [FakeBatch(4, "b0")]],
    "eval": [[FakeBatch(4, "a0"), FakeBatch(4, "a1"), FakeBatch(2, "a2")], []],
}
dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
tokens = lambda batch: 10 * batch.batch_size
stats, padded = LockstepStats(), LockstepStats()
trained = [b.tag for b in lockstep(held["train"][rank], stats, tokens)]
scored = [[b.tag, real] for b, real in lockstep_padded(held["eval"][rank], padded, tokens)]
# A pass's pipeline stats: rank 0 skipped 3 bad rows and dropped 1, rank 1 dropped 2.
pass_stats = [SimpleNamespace(skipped=SimpleNamespace(rows=3), dropped_rows=1),
              SimpleNamespace(skipped=SimpleNamespace(rows=0), dropped_rows=2)][rank]
left_out = rows_left_out(SimpleNamespace(stats=pass_stats))
dist.destroy_process_group()
json.dump({"trained": trained, "stats": dataclasses.asdict(stats), "scored": scored,
           "padded": dataclasses.asdict(padded), "left_out": dataclasses.asdict(left_out)},
          open(out, "w"))
"""


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    root = tmp_path_factory.mktemp("gloo")
    script = root / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    workers = [
        subprocess.Popen([sys.executable, str(script), str(rank), str(root / "init"),
                          str(root / f"out{rank}.json")], env=env, stderr=subprocess.PIPE,
                         text=True)
        for rank in (0, 1)
    ]
    for worker in workers:
        _, stderr = worker.communicate(timeout=120)
        assert worker.returncode == 0, stderr
    return [json.loads((root / f"out{rank}.json").read_text()) for rank in (0, 1)]


def test_training_stops_on_every_rank_when_one_runs_out(outcomes):
    assert outcomes[0]["trained"] == ["a0"] and outcomes[1]["trained"] == ["b0"]
    for stats in (outcomes[0]["stats"], outcomes[1]["stats"]):
        assert stats["steps"] == 1
        assert stats["rows"] == 8 and stats["tokens"] == 80  # global totals of the step
        assert stats["unused_batches"] == 1  # rank 0's next batch, counted not dropped
        assert stats["is_last"]


def test_eval_pads_the_rank_that_ran_out_so_every_row_is_scored(outcomes):
    assert outcomes[0]["scored"] == [["a0", True], ["a1", True], ["a2", True]]
    # Rank 1 had no batch at all: it borrowed rank 0's first one and never counts it.
    assert outcomes[1]["scored"] == [["a0", False], ["a0", False], ["a0", False]]
    for stats in (outcomes[0]["padded"], outcomes[1]["padded"]):
        assert stats["steps"] == 3 and stats["rows"] == 10 and stats["unused_batches"] == 0


def test_rows_left_out_are_summed_over_ranks(outcomes):
    # Every rank sees the totals, so any rank may report them (rank 0 does).
    for outcome in outcomes:
        assert outcome["left_out"] == {"skipped": 3, "dropped": 3}


def test_single_process_lockstep_yields_everything():
    from types import SimpleNamespace

    from hstu.train.collectives import LockstepStats, lockstep, lockstep_padded

    assert not (dist.is_available() and dist.is_initialized())
    batches = [SimpleNamespace(batch_size=n) for n in (4, 4, 2)]
    stats = LockstepStats()
    yielded, last_flags = [], []
    for batch in lockstep(batches, stats, lambda b: 1):
        yielded.append(batch)
        last_flags.append(stats.is_last)  # known before the step runs (one-step lookahead)
    assert yielded == batches and last_flags == [False, False, True]
    assert stats.rows == 10 and stats.tokens == 3
    assert [real for _, real in lockstep_padded(batches, LockstepStats(), lambda b: 1)] == [True] * 3
