"""Synthetic data: deterministic for a seed, KuaiRand-shaped, readable by the recipes' specs,
and labels that depend on the history."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from hstu.data import schema
from hstu.data.synthetic import ACTION_RATES, SyntheticOptions, generate, generate_shard, make_world
from hstu.data.validate import validate_table

REPO = Path(__file__).resolve().parents[2]
SMALL = SyntheticOptions(
    users=40,
    median_history=30,
    max_history=120,
    max_candidates=10,
    items=3000,
    clusters=30,
    users_per_shard=16,
    eval_fraction=0.5,
)


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic_small")
    generate(SMALL, out)
    return out


def test_same_seed_same_data_other_seed_other_data(small_dir, tmp_path):
    generate(SMALL, tmp_path / "again", workers=2)  # shards in 2 processes: same files
    for split in ("train", "eval"):
        first = pq.read_table(small_dir / split)
        assert first.equals(pq.read_table(tmp_path / "again" / split))
    other = SyntheticOptions(**{**SMALL.__dict__, "seed": 1})
    generate(other, tmp_path / "other")
    assert not pq.read_table(small_dir / "train").equals(
        pq.read_table(tmp_path / "other" / "train")
    )


def test_shape_and_manifest(small_dir):
    manifest = json.loads((small_dir / "manifest.json").read_text())
    train = pq.read_table(small_dir / "train")
    evaluation = pq.read_table(small_dir / "eval")
    assert train.schema.equals(schema.sample_schema(False))
    assert train.num_rows == 40 == manifest["splits"]["train"]["rows"]
    assert evaluation.num_rows == manifest["splits"]["eval"]["rows"] > 0
    assert len(manifest["splits"]["train"]["files"]) == 3  # 16 + 16 + 8 users
    uih = [len(v) for v in train.column("uih_seq__video_id").to_pylist()]
    cand = [len(v) for v in train.column("cand_seq__video_id").to_pylist()]
    assert 1 <= min(uih) and max(uih) <= 120
    assert 1 <= min(cand) and max(cand) <= 10
    assert sum(uih) + sum(cand) == manifest["splits"]["train"]["tokens"]
    assert (
        len(set(train.column("sample_id").to_pylist() + evaluation.column("sample_id").to_pylist()))
        == train.num_rows + evaluation.num_rows
    )
    # Ids fit the smoke recipe's tables when items and users stay below 1000.
    video_ids = np.concatenate(
        [np.asarray(v) for v in train.column("uih_seq__video_id").to_pylist()]
    )
    assert video_ids.min() >= 1 and video_ids.max() <= 3000
    features, labels = schema.sample_specs(id_buckets=3001)
    validate_table(train, features, labels)  # lengths, increasing timestamps, finite values
    validate_table(evaluation, features, labels)


def test_eval_window_follows_train_window(small_dir):
    train = {r["user_id"]: r for r in pq.read_table(small_dir / "train").to_pylist()}
    for row in pq.read_table(small_dir / "eval").to_pylist():
        before = train[row["user_id"]]
        # The training candidates are now the end of the history.
        assert (
            row["uih_seq__video_id"][-len(before["cand_seq__video_id"]) :]
            == before["cand_seq__video_id"]
        )
        assert row["cand_seq__query_time"][0] > before["cand_seq__query_time"][-1]
        assert row["sample_id"] == row["user_id"] * 2**20 + 1


@pytest.fixture(scope="module")
def rates_shard():
    options = SyntheticOptions(
        users=300,
        median_history=200,
        max_history=1000,
        items=20_000,
        users_per_shard=300,
        mtgr=True,
    )
    return options, generate_shard(options, make_world(options), 0)


def test_action_rates_are_kuairand_like(rates_shard):
    _, tables = rates_shard
    table, _ = tables["train"]
    bits = np.concatenate(
        [np.asarray(v) for v in table.column("cand_seq__action_weight").to_pylist()]
    )
    for name, rate in ACTION_RATES.items():
        observed = ((bits & schema.ACTION_BITS[name]) > 0).mean()
        assert abs(observed - rate) < max(0.35 * rate, 0.003), (name, observed, rate)


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney AUC; tied scores share their average rank."""
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    first_rank = np.cumsum(counts) - counts + 1
    ranks = (first_rank + (counts - 1) / 2.0)[inverse.reshape(-1)]
    positives = labels.sum()
    negatives = len(labels) - positives
    return (ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives)


def test_clicks_depend_on_the_history(rates_shard):
    """Candidates in the cluster of recently clicked history items are clicked more: the
    share of same-cluster clicks in the history ranks clicks with AUC well above 0.5."""
    options, tables = rates_shard
    table, _ = tables["train"]
    world = make_world(options)
    rank_of = np.empty(options.items + 1, dtype=np.int64)
    rank_of[world.item_id] = np.arange(options.items)
    aucs = []
    for row in table.to_pylist():
        history_clusters = rank_of[np.asarray(row["uih_seq__video_id"])] % options.clusters
        clicked = (np.asarray(row["uih_seq__action_weight"]) & 1) > 0
        recent = history_clusters[clicked][-64:]
        cand_clusters = rank_of[np.asarray(row["cand_seq__video_id"])] % options.clusters
        share = np.zeros(len(cand_clusters))
        if len(recent):
            share = (cand_clusters[:, None] == recent[None, :]).mean(axis=1)
        clicks = (np.asarray(row["cand_seq__action_weight"]) & 1) > 0
        aucs.append((clicks, share))
    labels = np.concatenate([a[0] for a in aucs])
    scores = np.concatenate([a[1] for a in aucs])
    assert _auc(labels, scores) > 0.65


def test_mtgr_columns(rates_shard):
    _, tables = rates_shard
    table, _ = tables["train"]
    assert table.schema.equals(schema.sample_schema(True))
    features, labels = schema.sample_specs(mtgr=True)
    validate_table(table, features, labels)  # cate < 1024/4096, cross < 16
    cross = np.concatenate(
        [np.asarray(v) for v in table.column("cand_seq__user_video_cross2").to_pylist()]
    )
    assert cross.min() >= 1 and cross.max() > 2  # users return to tags they saw before


@pytest.mark.parametrize(
    "recipe, mtgr", [("smoke", False), ("kuairand_dlrm_hstu", False), ("kuairand_mtgr", True)]
)
def test_recipes_read_synthetic_files(tmp_path, recipe, mtgr):
    from hstu.config import feature_specs, label_specs, load_config

    cfg = load_config(str(REPO / "recipes" / f"{recipe}.config"))
    # The smoke recipe's tables hold 1000 ids and max_seq_len 256: the sizes docs/data.md gives.
    options = SyntheticOptions(
        users=30,
        median_history=40,
        max_history=200,
        max_candidates=50,
        items=999,
        clusters=100,
        users_per_shard=30,
        mtgr=mtgr,
    )
    generate(options, tmp_path)
    for split in ("train", "eval"):
        validate_table(pq.read_table(tmp_path / split), feature_specs(cfg), label_specs(cfg))
