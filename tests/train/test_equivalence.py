"""One worker and two workers train the same model on the same global batches: gloo processes,
the smoke recipe with dropout off, float32 on CPU, without Ray.

Each run starts from the same weights whatever its plan (hstu.train.sharding.initialize_tables
for the tables; the dense weights are rank 0's, broadcast by DDP) and takes the same global
batches of 4 rows, which the two-worker runs split 2 + 2. The global loss (the workers' mean of
their globally-scaled losses) must match step for step, and after the steps every table and
dense weight must match: the sparse gradients (divided by the world size in TorchRec's
all-to-all backward), the dense all-reduce, the loss scaling by candidates and both optimizers
together give the one-worker update. Two 2-worker plans: row-wise + table-wise, and column-wise
+ row-wise.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.train.gloo_batches import assemble
from tests.train.gloo_workers import run_ranks

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "recipes" / "smoke.config"
STEPS = 3
ROWS = 4
PLANS = {
    "one": (1, {}),
    "two_rw": (2, {"video_id_emb": ["row_wise"], "user_id_emb": ["table_wise"]}),
    "two_cw": (2, {"video_id_emb": ["column_wise"], "user_id_emb": ["row_wise"]}),
}

WORKER = r"""
import json, sys
import torch
import torch.distributed as dist

from hstu.config import feature_specs, label_specs, load_config
from hstu.data.pipeline import arrow_to_batch
from hstu.data.synthetic import SyntheticOptions, generate_shard, make_world
from hstu.train.step import train_step
from hstu.train.trainable import build_trainable
from gloo_batches import local_pieces

name, rank, world, root, recipe = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
pinned, steps, rows = json.loads(sys.argv[6]), int(sys.argv[7]), int(sys.argv[8])
CPU = torch.device("cpu")
dist.init_process_group("gloo", init_method=f"file://{root}/pg-{name}", rank=rank, world_size=world)
cfg = load_config(recipe, ["model_config.dlrm_hstu.hstu.input_dropout_ratio=0",
                           "model_config.dlrm_hstu.hstu.stu.output_dropout_ratio=0"])
features, labels = feature_specs(cfg), label_specs(cfg)
# As the training loop seeds: per rank (rank 0's dense weights are what DDP broadcasts).
torch.manual_seed(11 + 7919 * rank)
trainable = build_trainable(cfg, features, labels, CPU, world_size=world, local_world_size=world,
                            batch_size=rows // world, sharding=pinned, table_seed=11)
dmp, dense = trainable.model, trainable.dense_optimizer

options = SyntheticOptions(users=steps * rows, seed=3, max_history=40, median_history=12,
                           max_candidates=5, items=900, eval_fraction=0.0,
                           users_per_shard=steps * rows)
table, _ = generate_shard(options, make_world(options), 0)["train"]
share = rows // world

def snapshot():
    return {k: local_pieces(v) for k, v in dmp.state_dict().items()}

torch.save(snapshot(), f"{root}/{name}-start-{rank}.pt")
losses = []
dmp.train()
for step in range(steps):
    part = table.slice(step * rows + rank * share, share)
    total, _ = train_step(dmp, trainable.module, dense, arrow_to_batch(part, features, labels),
                          lambda: torch.autocast("cpu", enabled=False))
    summed = total.detach().clone()
    dist.all_reduce(summed)
    losses.append(float(summed) / world)
torch.save(snapshot(), f"{root}/{name}-end-{rank}.pt")
json.dump({"losses": losses, "plan": trainable.sharded.tables}, open(f"{root}/{name}-{rank}.json", "w"))
dist.destroy_process_group()
"""


def _run(root: Path, name: str) -> None:
    world, pinned = PLANS[name]
    run_ranks(root / "worker.py", name, world,
              lambda rank: [name, str(rank), str(world), str(root), str(SMOKE),
                            json.dumps(pinned), str(STEPS), str(ROWS)])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("equivalence")
    (root / "worker.py").write_text(WORKER)
    shutil.copy(Path(__file__).with_name("gloo_batches.py"), root)
    for name in PLANS:
        _run(root, name)
    return root


def _whole(root: Path, name: str, when: str) -> dict[str, torch.Tensor]:
    """Every state_dict entry reassembled from the ranks' pieces (replicated entries: rank 0's)."""
    world = PLANS[name][0]
    pieces: dict[str, list] = {}
    for rank in range(world):
        for key, parts in torch.load(root / f"{name}-{when}-{rank}.pt").items():
            if rank == 0 or "embeddings" in key:
                pieces.setdefault(key, []).extend(parts)
    return {key: assemble(parts) for key, parts in pieces.items()}


def test_the_plans_differ(runs):
    plans = {name: json.loads((runs / f"{name}-0.json").read_text())["plan"] for name in PLANS}
    assert plans["one"]["video_id_emb"]["ranks"] == [0]
    assert plans["two_rw"]["video_id_emb"]["sharding_type"] == "row_wise"
    assert plans["two_rw"]["video_id_emb"]["ranks"] == [0, 1]
    assert plans["two_cw"]["video_id_emb"]["sharding_type"] == "column_wise"
    assert plans["two_cw"]["user_id_emb"]["sharding_type"] == "row_wise"


@pytest.mark.parametrize("name", ["two_rw", "two_cw"])
def test_every_plan_starts_from_the_same_weights(runs, name):
    one, other = _whole(runs, "one", "start"), _whole(runs, name, "start")
    assert one.keys() == other.keys()
    tables = [key for key in one if "embeddings" in key]
    assert len(tables) == 7
    for key in one:
        assert torch.equal(one[key], other[key]), key
    # Same numbers under every plan (above), and in the table's init range.
    video = one[next(key for key in tables if "video_id_emb" in key)]
    assert video.abs().max() <= (1 / 1000) ** 0.5 and video.std() > 0.01


@pytest.mark.parametrize("name", ["two_rw", "two_cw"])
def test_two_workers_take_the_one_worker_steps(runs, name):
    one = json.loads((runs / "one-0.json").read_text())["losses"]
    two = json.loads((runs / f"{name}-0.json").read_text())["losses"]
    assert len(one) == len(two) == STEPS
    assert one[0] != one[-1]  # the model trained: the losses moved
    assert two == pytest.approx(one, rel=1e-6, abs=1e-6)  # measured: 1.2e-7 at most
    start, end, other = (_whole(runs, "one", "start"), _whole(runs, "one", "end"),
                         _whole(runs, name, "end"))
    moved = [key for key in end if not torch.equal(end[key], start[key])]
    assert any("video_id_emb" in key for key in moved) and len(moved) > 20
    for key in end:
        torch.testing.assert_close(other[key], end[key], rtol=1e-4, atol=1e-6, msg=key)
