"""A checkpoint written by N workers resumes with M: 2 -> 1 -> 2 with gloo processes, compared
exactly (weights, the fused sparse optimizer's per-row state, the dense optimizer's state and the
train state), without Ray. The Ray-level resume with another worker count is in test_trainer.py.

Phase A: two ranks, video_id_emb row-wise (half the rows on each) and user_id_emb table-wise
(one rank holds it), one training step, checkpoint A. Phase B: one rank (every table whole on
it) restores A and saves checkpoint B. Phase C: two ranks with A's plan restore B. B must hold
A's tensors reassembled, and C must hold exactly what each rank of A held.
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
PINNED = {"video_id_emb": ["row_wise"], "user_id_emb": ["table_wise"]}

WORKER = r"""
import json, sys
import torch
import torch.distributed as dist
from gloo_batches import local_pieces as shards, synthetic_batch

from hstu.config import feature_specs, label_specs, load_config
from hstu.train import checkpoint
from hstu.train.trainable import build_trainable

phase, rank, world, root = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
pinned = json.loads(sys.argv[5]) if world > 1 else {}
CPU = torch.device("cpu")
dist.init_process_group("gloo", init_method=f"file://{root}/pg-{phase}", rank=rank,
                        world_size=world)
cfg = load_config(sys.argv[6], [])
features, labels = feature_specs(cfg), label_specs(cfg)
torch.manual_seed(5 + rank)
trainable = build_trainable(cfg, features, labels, CPU, world_size=world,
                            local_world_size=world, batch_size=4, sharding=pinned)
sharded, dmp, dense_optimizer = trainable.sharded, trainable.model, trainable.dense_optimizer
model = trainable.module

def batch(seed):
    return synthetic_batch(model, features, labels, seed, [3, 5, 2, 4])

def snapshot():
    weights = {k: shards(v) for k, v in dmp.state_dict().items()}
    sparse_state = {f"{p}/{k}": shards(v)
                    for p, state in dmp.fused_optimizer.state_dict()["state"].items()
                    for k, v in state.items() if isinstance(v, torch.Tensor)}
    dense_state = {f"{p}/{k}": shards(v)
                   for p, state in dense_optimizer.state_dict()["state"].items()
                   for k, v in state.items() if isinstance(v, torch.Tensor)}
    return {"weights": weights, "sparse": sparse_state, "dense": dense_state}

if phase == "A":
    b = batch(rank)
    dense_optimizer.zero_grad()
    total, _ = dmp.module.compute_losses(dmp(b), b)
    total.backward()
    dense_optimizer.step()
    state = checkpoint.TrainState(epoch=0, global_step=1, samples=8, world_size=world,
                                  skipped_rows=1, dropped_rows=2)
    checkpoint.save(f"{root}/ckpt-A", dmp, dense_optimizer, state, rank=rank)
else:
    source = {"B": "A", "C": "B"}[phase]
    state = checkpoint.restore(f"{root}/ckpt-{source}", dmp, dense_optimizer, world_size=world)
    json.dump(vars(state), open(f"{root}/state-{phase}{rank}.json", "w"))
    if phase == "B":
        state.world_size = world
        checkpoint.save(f"{root}/ckpt-B", dmp, dense_optimizer, state, rank=rank)
torch.save(snapshot(), f"{root}/{phase}{rank}.pt")
json.dump(sharded.tables, open(f"{root}/plan-{phase}{rank}.json", "w"))
dist.destroy_process_group()
"""


def _phase(root: Path, phase: str, world: int) -> None:
    run_ranks(root / "worker.py", f"phase {phase}", world,
              lambda rank: [phase, str(rank), str(world), str(root), json.dumps(PINNED),
                            str(SMOKE)])


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    (root / "worker.py").write_text(WORKER)
    shutil.copy(Path(__file__).with_name("gloo_batches.py"), root)
    _phase(root, "A", 2)
    _phase(root, "B", 1)
    _phase(root, "C", 2)
    return root


def _load(root: Path, name: str) -> dict:
    return torch.load(root / f"{name}.pt")


def test_the_layouts_differ_between_the_worker_counts(round_trip):
    plan_a = json.loads((round_trip / "plan-A0.json").read_text())
    plan_b = json.loads((round_trip / "plan-B0.json").read_text())
    assert plan_a["video_id_emb"]["sharding_type"] == "row_wise"
    assert plan_a["video_id_emb"]["ranks"] == [0, 1]
    assert plan_a["user_id_emb"]["sharding_type"] == "table_wise"
    assert plan_b["video_id_emb"]["ranks"] == [0]  # one worker holds every row


def test_two_workers_to_one_reassembles_every_tensor(round_trip):
    """B (one worker) holds, whole, what A's two workers held in parts: every table's rows,
    the fused optimizer's per-row state, the dense weights and the dense optimizer state."""
    a = [_load(round_trip, f"A{rank}") for rank in (0, 1)]
    b = _load(round_trip, "B0")
    for kind in ("weights", "sparse", "dense"):
        assert set(b[kind]) == set(a[0][kind]) | set(a[1][kind]), kind
        for key, b_parts in b[kind].items():
            a_parts = a[0][kind].get(key, []) + a[1][kind].get(key, [])
            if not any(isinstance(v, torch.Tensor) and v.dim() and offset != [0] * v.dim()
                       for offset, v in a_parts):
                a_parts = a_parts[:len(b_parts)]  # a replicated tensor: rank 0's copy
            expected = assemble(a_parts)
            got = assemble(b_parts)
            assert torch.equal(got, expected), f"{kind} {key}"
    # The momentum of row-wise Adagrad moved in the training step (so the test compares state
    # that matters), and is compared above.
    momentum = [k for k in b["sparse"] if k.endswith("video_id_emb.momentum1")]
    assert momentum and assemble(b["sparse"][momentum[0]]).abs().sum() > 0


def test_one_worker_to_two_gives_each_rank_its_shards_back(round_trip):
    """C (two workers, A's plan) restored from B (one worker) holds exactly what A held."""
    for rank in (0, 1):
        a, c = _load(round_trip, f"A{rank}"), _load(round_trip, f"C{rank}")
        for kind in ("weights", "sparse", "dense"):
            assert set(c[kind]) == set(a[kind]), (kind, rank)
            for key, a_parts in a[kind].items():
                c_parts = c[kind][key]
                assert [o for o, _ in c_parts] == [o for o, _ in a_parts], (kind, key)
                for (_, x), (_, y) in zip(a_parts, c_parts):
                    assert torch.equal(x, y), (kind, key, rank)


def test_the_train_state_comes_through_both_reshardings(round_trip):
    b = json.loads((round_trip / "state-B0.json").read_text())
    c = json.loads((round_trip / "state-C1.json").read_text())
    assert b["world_size"] == 2 and c["world_size"] == 1  # the writer's count, for the log
    for state in (b, c):
        assert (state["global_step"], state["samples"]) == (1, 8)
        assert (state["skipped_rows"], state["dropped_rows"]) == (1, 2)
