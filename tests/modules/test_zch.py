"""Zero-collision hashing (hstu/modules/zch.py): TorchRec's managed-collision admission and
eviction in front of the embedding lookup, its counters, and a zch model trained, checkpointed
and restored on the path the trainer takes."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from torchrec.modules.mc_modules import _mch_remap
from torchrec.sparse.jagged_tensor import JaggedTensor

from hstu.config import feature_specs, label_specs, load_config
from hstu.config.features import ZchSpec
from hstu.modules.zch import ZeroCollisionRemap, zch_metrics

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "recipes" / "smoke.config"


def ids(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def test_lfu_fills_free_rows_then_evicts_the_least_frequent():
    # 4 rows: 3 for ids, the last shared by ids not admitted.
    remap = ZeroCollisionRemap("video", ZchSpec(4, 1, "lfu")).train()
    first = remap(ids(10, 10, 10, 20, 20, 30))
    assert len(set(first.tolist())) == 3 and max(first.tolist()) < 3  # three own rows
    assert remap.stats() == {"lookups": 6, "collisions": 0, "admissions": 3, "evictions": 0,
                             "rows_used": 3}
    row_of_30 = int(first[-1])
    # 40 four times beats 30's single access: 30 loses its row, 40 gets that row.
    second = remap(ids(40, 40, 40, 40))
    assert second.tolist() == [row_of_30] * 4
    assert remap.stats()["evictions"] == 1 and remap.stats()["admissions"] == 4
    # 30 now shares the last row with every id not admitted: a collision.
    assert remap.remap(ids(10, 20, 30)).tolist() == first[[0, 3]].tolist() + [3]


def test_lru_evicts_the_least_recently_used():
    remap = ZeroCollisionRemap("video", ZchSpec(3, 1, "lru")).train()
    rows = remap(ids(1, 2)).tolist()
    remap(ids(1))  # 2 is now the older
    assert remap(ids(3)).tolist() == [rows[1]]
    assert remap.remap(ids(1, 2)).tolist() == [rows[0], 2]
    assert remap.stats()["evictions"] == 1


def test_distance_lfu_and_an_interval_admit_only_every_interval_steps():
    remap = ZeroCollisionRemap("video", ZchSpec(8, 3, "distance_lfu", 0.5)).train()
    # Steps 1 and 2 only record: the ids share the last row until step 3 admits them.
    assert remap(ids(5, 6)).tolist() == [7, 7]
    assert remap(ids(6)).tolist() == [7]
    third = remap(ids(9))
    assert int(third) != 7 and remap.stats()["admissions"] == 3
    assert remap.stats()["collisions"] == 3  # the three lookups before the round


def test_a_later_larger_batch_is_counted_whole():
    # TorchRec sizes its history buffer from the first batch and would drop the ids of a
    # larger one; every id here must be admitted.
    remap = ZeroCollisionRemap("video", ZchSpec(128, 2, "lfu")).train()
    remap(ids(1, 2))
    remap(torch.arange(100, 160))
    assert remap.stats()["admissions"] == 62
    assert (remap.remap(torch.arange(100, 160)) != 127).all()


def test_remap_agrees_with_torchrecs():
    torch.manual_seed(0)
    remap = ZeroCollisionRemap("video", ZchSpec(64, 1, "lfu")).train()
    for _ in range(5):
        remap(torch.randint(0, 10**12, (40,)) % 200)
    queries = torch.randint(0, 300, (500,))
    theirs = _mch_remap(
        {"f": JaggedTensor(values=queries, lengths=ids(500))},
        remap.mch._mch_sorted_raw_ids,
        remap.mch._mch_remapped_ids_mapping,
        63,
    )["f"].values()
    torch.testing.assert_close(remap.remap(queries), theirs)


def test_evaluation_changes_no_state_and_counts_nothing():
    remap = ZeroCollisionRemap("video", ZchSpec(4, 1, "lfu")).train()
    remap(ids(1, 2))
    before = {name: tensor.clone() for name, tensor in remap.state_dict().items()}
    remap.eval()
    assert remap(ids(1, 2, 99)).tolist()[-1] == 3
    after = remap.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


# ---- a zch model -------------------------------------------------------------------------

ZCH_SMOKE = [
    "feature_configs[uih_seq].sequence_feature.features[video_id].id_feature"
    ".zch={zch_size: 64 eviction_interval: 1 lfu {}}",
    "feature_configs[cand_seq].sequence_feature.features[video_id].id_feature"
    ".zch={zch_size: 64 eviction_interval: 1 lfu {}}",
    "model_config.dlrm_hstu.hstu.input_dropout_ratio=0",
    "model_config.dlrm_hstu.hstu.stu.output_dropout_ratio=0",
]


def zch_batches(cfg, count: int, *, big_ids: bool = True):
    """Synthetic batches in the recipe's layout; video ids pushed above any table size."""
    from hstu.data.layout import apply_layout, plan_layout
    from hstu.data.pipeline import arrow_to_batch
    from hstu.data.synthetic import SyntheticOptions, generate_shard, make_world

    options = SyntheticOptions(users=8 * count, items=50, max_history=12, median_history=6,
                               max_candidates=4, eval_fraction=0.0, users_per_shard=8 * count,
                               clusters=10)
    table, _ = generate_shard(options, make_world(options), 0)["train"]
    layout = plan_layout(cfg, "zch smoke")
    table = apply_layout(table, layout)
    if big_ids:  # raw ids far beyond the 64-row table: zch must map them
        import pyarrow as pa
        import pyarrow.compute as pc

        for column in ("uih_seq__video_id", "cand_seq__video_id"):
            shifted = pc.add(table.column(column).combine_chunks().flatten(), 10**12)
            offsets = table.column(column).combine_chunks().offsets
            table = table.set_column(
                table.schema.get_field_index(column), column,
                pa.ListArray.from_arrays(offsets, shifted),
            )
    features, labels = feature_specs(cfg), label_specs(cfg)
    return [arrow_to_batch(table.slice(8 * i, 8), features, labels) for i in range(count)]


def test_config_reads_zch_and_the_data_keeps_raw_ids():
    cfg = load_config(SMOKE, ZCH_SMOKE)
    video = {spec.name: spec for spec in feature_specs(cfg)}["uih_seq__video_id"]
    assert video.zch == ZchSpec(64, 1, "lfu") and video.num_buckets == 64
    batches = zch_batches(cfg, 1)  # ids of 10**12 pass the data checks
    assert int(batches[0].sparse["uih_seq__video_id"].values().min()) >= 10**12


def test_a_zch_model_trains_and_its_state_survives_state_dict():
    from hstu.model import DlrmHSTU

    cfg = load_config(SMOKE, ZCH_SMOKE)
    features, labels = feature_specs(cfg), label_specs(cfg)
    torch.manual_seed(0)
    model = DlrmHSTU(cfg, features, labels).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    batches = zch_batches(cfg, 3)
    for batch in batches:
        optimizer.zero_grad()
        total, _ = model.compute_losses(model(batch), batch)
        total.backward()
        optimizer.step()
    stats = model.embedding_collection.zch_stats()["video_id_emb"]
    assert stats["admissions"] > 0 and stats["rows_used"] <= 63
    assert set(zch_metrics(model)) == {
        f"zch/video_id_emb/{name}"
        for name in ("lookups", "collisions", "admissions", "evictions", "rows_used")
    }
    model.eval()
    expected = model(batches[0]).probs
    again = DlrmHSTU(cfg, features, labels)
    again.load_state_dict(model.state_dict())
    got = again.eval()(batches[0]).probs
    for task, value in expected.items():
        torch.testing.assert_close(got[task], value)


def sharded_zch_model(cfg):
    """The trainer's path: meta tables, fused sparse optimizer, DistributedModelParallel."""
    from hstu.train.trainable import build_trainable

    trainable = build_trainable(cfg, feature_specs(cfg), label_specs(cfg), torch.device("cpu"),
                                world_size=1, local_world_size=1, batch_size=8)
    return trainable.model, trainable.dense_optimizer


@pytest.mark.slow
def test_sharded_zch_model_checkpoints_and_restores_its_admissions(tmp_path, one_process_group):
    from hstu.train.checkpoint import TrainState, restore, save
    from hstu.train.step import train_step

    cfg = load_config(SMOKE, ZCH_SMOKE)
    torch.manual_seed(0)
    sharded, dense = sharded_zch_model(cfg)
    batches = zch_batches(cfg, 3)
    for batch in batches:
        train_step(sharded, sharded.module, dense, batch, contextlib.nullcontext)
    remap = sharded.module.embedding_collection.zch["video_id_emb"]
    assert remap.stats()["admissions"] > 0
    save(tmp_path / "ckpt", sharded, dense, TrainState(global_step=3), rank=0)

    torch.manual_seed(1)
    fresh, fresh_dense = sharded_zch_model(cfg)
    restore(tmp_path / "ckpt", fresh, fresh_dense, world_size=1)
    restored = fresh.module.embedding_collection.zch["video_id_emb"]
    for name in ("_mch_sorted_raw_ids", "_mch_remapped_ids_mapping", "_mch_counts",
                 "_current_iter_tensor"):
        assert torch.equal(getattr(restored.mch, name), getattr(remap.mch, name)), name
    assert restored.stats() == remap.stats()
    sharded.eval(), fresh.eval()
    with torch.no_grad():
        expected, got = sharded(batches[0]).probs, fresh(batches[0]).probs
    for task, value in expected.items():
        torch.testing.assert_close(got[task], value)


TWO_WORKERS = """
import sys
import torch
import torch.distributed as dist
from hstu.config.features import ZchSpec
from hstu.modules.zch import ZeroCollisionRemap

rank, init_file, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
remap = ZeroCollisionRemap("video", ZchSpec(32, 2, "lfu")).train()
generator = torch.Generator().manual_seed(rank)  # each worker its own ids, its own batch size
for _ in range(6):
    remap(torch.randint(1000 * rank, 1000 * rank + 40, (10 + 5 * rank,), generator=generator))
torch.save({"state": remap.mch.state_dict(), "rows": remap.remap(torch.arange(0, 2000))}, out)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_workers_keep_one_admission_state(tmp_path):
    # Each worker sees other ids; both must admit the same ids into the same rows, or a
    # row-sharded table would mean different things on different workers.
    import os
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(TWO_WORKERS)
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    workers = [
        subprocess.Popen([sys.executable, str(script), str(rank), str(tmp_path / "init"),
                          str(tmp_path / f"rank{rank}.pt")], env=env, stderr=subprocess.PIPE,
                         text=True)
        for rank in (0, 1)
    ]
    for worker in workers:
        _, stderr = worker.communicate(timeout=120)
        assert worker.returncode == 0, stderr
    first, second = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for name, value in first["state"].items():
        assert torch.equal(value, second["state"][name]), name
    torch.testing.assert_close(first["rows"], second["rows"])
    admitted = first["rows"] != 31
    assert admitted[:1000].any() and admitted[1000:].any()  # both workers' ids got rows


def test_serving_and_the_exported_program_map_raw_ids_as_the_model_does():
    # The export scores raw ids (10**12 here) with the trained admission state: the serving
    # module, and the torch.export program made of it, give the model's own eval scores.
    from hstu.export.serving import ServingModule, dynamic_shapes, lengths_key, serving_inputs
    from hstu.model import DlrmHSTU

    cfg = load_config(SMOKE, ZCH_SMOKE)
    features, labels = feature_specs(cfg), label_specs(cfg)
    torch.manual_seed(0)
    model = DlrmHSTU(cfg, features, labels).train()
    batches = zch_batches(cfg, 2)
    for batch in batches:  # admit the ids
        model(batch)
    model.eval()
    batch = batches[0]
    sparse = batch.sparse.to_dict()
    inputs = {f.name: sparse[f.name].values() if f.kind == "id" else batch.raw[f.name]
              for f in features}
    for sequence, lengths in batch.seq_lengths.items():
        inputs[lengths_key(sequence)] = lengths
    serving = ServingModule(model).eval()
    with torch.no_grad():
        expected = model(batch).probs
        eager = serving(inputs)
        program = torch.export.export(
            serving, (inputs,), dynamic_shapes=dynamic_shapes(serving_inputs(features)),
            strict=False,
        )
        exported = program.module()(inputs)
    for task, value in expected.items():
        torch.testing.assert_close(eager[task], value, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(exported[task], value, rtol=1e-5, atol=1e-5)
