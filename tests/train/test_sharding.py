"""Sharding choices: --sharding parsing and the planner constraints built from it; a two-process
DistributedModelParallel run over tables of two widths."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hstu.train.sharding import (
    ShardingError,
    parse_sharding_overrides,
    sharding_constraints,
)
from tests.train.gloo_batches import assemble

TABLES = ["video_id_emb", "user_id_emb"]


def test_overrides_parse_into_types_per_table():
    parsed = parse_sharding_overrides(
        ["video_id_emb=row_wise", "user_id_emb=table_wise,column_wise"]
    )
    assert parsed == {"video_id_emb": ["row_wise"], "user_id_emb": ["table_wise", "column_wise"]}


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("video_id_emb", "expected TABLE=TYPE"),
        ("video_id_emb=rowwise", "unknown sharding type 'rowwise'"),
        ("=row_wise", "expected TABLE=TYPE"),
    ],
)
def test_bad_overrides_say_what_is_expected(spec, expected):
    with pytest.raises(ShardingError, match=expected):
        parse_sharding_overrides([spec])


def test_a_table_given_twice_is_refused():
    with pytest.raises(ShardingError, match="given twice"):
        parse_sharding_overrides(["video_id_emb=row_wise", "video_id_emb=table_wise"])


def test_unknown_table_lists_the_model_tables():
    with pytest.raises(ShardingError, match="no embedding table named 'item_emb'.*video_id_emb"):
        sharding_constraints(TABLES, {"item_emb": ["row_wise"]}, torch.device("cpu"))


def test_cpu_pins_the_fused_kernel_and_refuses_data_parallel():
    constraints = sharding_constraints(TABLES, {"video_id_emb": ["row_wise"]}, torch.device("cpu"))
    assert constraints["video_id_emb"].sharding_types == ["row_wise"]
    assert "data_parallel" not in constraints["user_id_emb"].sharding_types
    assert "table_wise" in constraints["user_id_emb"].sharding_types
    assert all(c.compute_kernels == ["fused"] for c in constraints.values())
    with pytest.raises(ShardingError, match="data_parallel.*fails on CPU"):
        sharding_constraints(TABLES, {"user_id_emb": ["data_parallel"]}, torch.device("cpu"))


def test_gpu_leaves_unpinned_tables_to_the_planner():
    constraints = sharding_constraints(TABLES, {"video_id_emb": ["row_wise"]}, torch.device("cuda"))
    assert constraints["video_id_emb"].sharding_types == ["row_wise"]
    assert constraints["user_id_emb"].sharding_types is None
    assert constraints["user_id_emb"].compute_kernels is None


# ---- two gloo processes: tables of two widths, sharded, trained, checkpointed ------------------

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "recipes" / "smoke.config"
# One profile table 8 wide, the rest 16: two EmbeddingCollections inside embedding_collection.
MIXED_DIMS = [
    "model_config.dlrm_hstu.concat_contextual_features=true",
    "feature_configs[3].id_feature.embedding_dim=8",
]
# A table of each width pinned row-wise (rows on both ranks), one table-wise.
PINNED = {
    "video_id_emb": ["row_wise"],
    "user_active_degree_emb": ["row_wise"],
    "user_id_emb": ["table_wise"],
}

# Each rank runs this script (a separate interpreter, as under Ray): shard, one training step,
# checkpoint, a second step, restore. It reports per table whether its local shards changed.
WORKER = r"""
import json, sys
import torch
import torch.distributed as dist
from gloo_batches import synthetic_batch

from hstu.config import feature_specs, label_specs, load_config
from hstu.train import checkpoint
from hstu.train.trainable import build_trainable

rank, recipe, root = int(sys.argv[1]), sys.argv[2], sys.argv[3]
overrides, pinned = json.loads(sys.argv[4]), json.loads(sys.argv[5])
CPU = torch.device("cpu")
dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank, world_size=2)
cfg = load_config(recipe, overrides)
features, labels = feature_specs(cfg), label_specs(cfg)
torch.manual_seed(11 + rank)
trainable = build_trainable(cfg, features, labels, CPU, world_size=2,
                            local_world_size=2, batch_size=4, sharding=pinned)
sharded, dmp, dense_optimizer = trainable.sharded, trainable.model, trainable.dense_optimizer
model = trainable.module

def batch(seed):
    # The ranks' histories differ in length, so their lookups (one id per bag,
    # hstu/modules/embeddings.py) have different strides: TorchRec's all-to-all must take it.
    return synthetic_batch(model, features, labels, seed, [3, 5, 2, 4 + 5 * rank])

def local_shards():
    # {table: [(offsets, values)]} of this rank's shards (none for another rank's table).
    out = {}
    for name, tensor in dmp.state_dict().items():
        if name.startswith("embedding_collection."):
            out[name.split(".")[-2]] = [
                (list(s.metadata.shard_offsets), s.tensor.detach().clone())
                for s in tensor.local_shards()]
    return out

def step(seed):
    b = batch(seed + rank)
    dense_optimizer.zero_grad()
    output = dmp(b)
    total, _ = dmp.module.compute_losses(output, b)
    total.backward()
    dense_optimizer.step()
    return output

def all_differ(a, b):
    return {t: all(not torch.equal(x, y) for (_, x), (_, y) in zip(a[t], b[t])) for t in a if a[t]}

initial = local_shards()
output = step(0)
after_one = local_shards()
checkpoint.save(f"{root}/ckpt", dmp, dense_optimizer, checkpoint.TrainState(world_size=2),
                rank=rank)
step(100)
after_two = local_shards()
checkpoint.restore(f"{root}/ckpt", dmp, dense_optimizer, world_size=2)
restored = local_shards()
torch.save(after_one, f"{root}/shards{rank}.pt")
json.dump({
    "collections": sorted(model.embedding_collection.collections),
    "plan": sharded.tables,
    "first_step_changed": all_differ(initial, after_one),
    "second_step_changed": all_differ(after_one, after_two),
    "restored": {t: all(torch.equal(x, y) for (_, x), (_, y) in zip(after_one[t], restored[t]))
                 for t in after_one if after_one[t]},
    "probs_shapes": sorted({tuple(p.shape) for p in output.probs.values()}),
}, open(f"{root}/out{rank}.json", "w"))
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def mixed_dims_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed_dims")
    script = root / "worker.py"
    script.write_text(WORKER)
    shutil.copy(Path(__file__).with_name("gloo_batches.py"), root)
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    workers = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), str(SMOKE), str(root),
             json.dumps(MIXED_DIMS), json.dumps(PINNED)],
            env=env, stderr=subprocess.PIPE, text=True,
        )
        for rank in (0, 1)
    ]
    for worker in workers:
        _, stderr = worker.communicate(timeout=300)
        assert worker.returncode == 0, stderr[-4000:]
    outcomes = [json.loads((root / f"out{rank}.json").read_text()) for rank in (0, 1)]
    return root, outcomes


ALL_TABLES = {
    "video_id_emb", "user_id_emb", "user_active_degree_emb", "follow_user_num_range_emb",
    "fans_user_num_range_emb", "friend_user_num_range_emb", "register_days_range_emb",
}


@pytest.mark.slow
def test_mixed_widths_are_sharded_trained_and_restored(mixed_dims_run):
    _, outcomes = mixed_dims_run
    for outcome in outcomes:
        assert outcome["collections"] == ["dim16", "dim8"]
        assert set(outcome["plan"]) == ALL_TABLES  # the planner placed every table of both
        assert outcome["probs_shapes"] == [[8]]  # 8 candidates per rank's batch
    plan = outcomes[0]["plan"]
    assert plan["video_id_emb"]["sharding_type"] == "row_wise"
    assert plan["user_active_degree_emb"]["sharding_type"] == "row_wise"  # the 8-wide table
    assert plan["user_active_degree_emb"]["ranks"] == [0, 1]
    assert plan["user_id_emb"]["sharding_type"] == "table_wise"
    # Every table has a shard somewhere, and the fused row-wise Adagrad moved every shard of
    # every table in each of the two steps.
    held = set().union(*(outcome["first_step_changed"] for outcome in outcomes))
    assert held == ALL_TABLES
    for outcome in outcomes:
        assert all(outcome["first_step_changed"].values()), outcome["first_step_changed"]
        assert all(outcome["second_step_changed"].values()), outcome["second_step_changed"]
        # Restoring the checkpoint brought back the weights saved after the first step.
        assert all(outcome["restored"].values()) and outcome["restored"].keys() == (
            outcome["first_step_changed"].keys()
        )


@pytest.mark.slow
def test_the_sharded_checkpoint_loads_into_one_unsharded_model(mixed_dims_run):
    """DCP reassembles every table of both widths from the two ranks' shards."""
    from hstu.config import load_config
    from hstu.train.checkpoint import load_for_inference

    root, _ = mixed_dims_run
    model = load_for_inference(load_config(SMOKE, MIXED_DIMS), root / "ckpt")
    tables = model.embedding_collection.embeddings
    assert set(tables) == ALL_TABLES
    covered = {
        name: torch.zeros(table.weight.shape, dtype=torch.bool) for name, table in tables.items()
    }
    for rank in (0, 1):
        for name, shards in torch.load(root / f"shards{rank}.pt").items():
            for (row, column), values in shards:
                rows, columns = values.shape
                loaded = tables[name].weight[row : row + rows, column : column + columns]
                assert torch.equal(loaded, values), name
                covered[name][row : row + rows, column : column + columns] = True
    assert all(bool(mask.all()) for mask in covered.values())
    assert tables["user_active_degree_emb"].weight.shape == (8, 8)


# ---- initialize_tables: the same numbers whatever the shards -------------------------------

class _Shard:
    def __init__(self, offsets, tensor):
        self.metadata = type("Meta", (), {"shard_offsets": offsets})()
        self.tensor = tensor


class _ShardedWeight:
    """A ShardedTensor's local part: pieces of the table at global (row, col) offsets."""

    def __init__(self, pieces):
        self.pieces = pieces

    def local_shards(self):
        return [_Shard(offsets, tensor) for offsets, tensor in self.pieces]


class _Model:
    def __init__(self, configs, weights, copies=False):
        collection = type("EC", (), {"embedding_configs": lambda self: configs})()
        self.module = type("M", (), {"embedding_collection": collection})()
        self.weights, self.copies = weights, copies

    def state_dict(self):
        if self.copies:  # a kernel that hands out copies instead of views
            return {k: _ShardedWeight([(o, t.clone()) for o, t in w.pieces])
                    for k, w in self.weights.items()}
        return self.weights


def _table(rows=10, dim=6, name="video_id_emb"):
    from torchrec.modules.embedding_configs import EmbeddingConfig

    return EmbeddingConfig(name=name, num_embeddings=rows, embedding_dim=dim,
                           feature_names=[name])


def _fill(pieces, monkeypatch, rows=10, dim=6):
    import hstu.train.sharding as sharding

    monkeypatch.setattr(sharding, "INIT_BLOCK_ROWS", 3)  # several blocks in a 10-row table
    key = "embedding_collection.collections.dim6.embeddings.video_id_emb.weight"
    model = _Model([_table(rows, dim)], {key: _ShardedWeight(pieces)})
    sharding.initialize_tables(model, seed=5)
    return assemble(pieces)


def test_tables_get_the_same_numbers_whole_row_wise_or_column_wise(monkeypatch):
    whole = _fill([((0, 0), torch.zeros(10, 6))], monkeypatch)
    rows = _fill([((0, 0), torch.zeros(4, 6)), ((4, 0), torch.zeros(6, 6))], monkeypatch)
    columns = _fill([((0, 0), torch.zeros(10, 2)), ((0, 2), torch.zeros(10, 4))], monkeypatch)
    assert torch.equal(rows, whole) and torch.equal(columns, whole)
    bound = (1 / 10) ** 0.5  # TorchRec's default range for a 10-row table
    assert whole.abs().max() <= bound and whole.std() > bound / 4
    assert not torch.equal(whole[:3], whole[3:6])  # each block its own draw


def test_a_kernel_that_hands_out_copies_is_refused(monkeypatch):
    import hstu.train.sharding as sharding

    key = "embedding_collection.collections.dim6.embeddings.video_id_emb.weight"
    model = _Model([_table()], {key: _ShardedWeight([((0, 0), torch.zeros(10, 6))])},
                   copies=True)
    with pytest.raises(RuntimeError, match="did not take the new values"):
        sharding.initialize_tables(model, seed=5)


def test_any_int_seed_works_and_tables_and_seeds_draw_apart():
    from hstu.train.sharding import _fill_shard, block_seed

    table = _table(rows=10, dim=4)
    for seed in (0, -3, 20261207, 2**70):
        values = torch.zeros(10, 4)
        _fill_shard(values, (0, 0), table, seed)
        assert values.abs().max() > 0
    assert len({block_seed(s, t, b) for s in (0, 1) for t in ("a", "b") for b in (0, 1)}) == 8
    assert all(0 <= block_seed(s, "a", 0) < 2**63 for s in (-(2**80), 0, 2**80))


def test_a_shard_running_past_the_table_end_fills_only_the_real_rows():
    from hstu.train.sharding import _fill_shard

    whole, padded = torch.zeros(10, 4), torch.zeros(8, 4)  # rows 6..13 of a 10-row table
    _fill_shard(whole, (0, 0), _table(rows=10, dim=4), 5)
    _fill_shard(padded, (6, 0), _table(rows=10, dim=4), 5)
    assert torch.equal(padded[:4], whole[6:]) and not padded[4:].any()
    empty = torch.zeros(0, 4)
    _fill_shard(empty, (10, 0), _table(rows=10, dim=4), 5)  # an empty shard at the end
