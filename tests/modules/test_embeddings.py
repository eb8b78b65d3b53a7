"""MultiDimEmbeddingCollection: one TorchRec EmbeddingCollection per width, one lookup call."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchrec.modules.embedding_configs import DataType, EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from hstu.modules.embeddings import MultiDimEmbeddingCollection, one_bag_per_value


def tables(video_dim=16, user_dim=8, level_dim=16):
    # Fresh configs each time: TorchRec fills feature_names / init_fn on the objects it gets.
    return [
        EmbeddingConfig(name="video_emb", num_embeddings=30, embedding_dim=video_dim,
                        feature_names=["uih_video", "cand_video"]),
        EmbeddingConfig(name="user_emb", num_embeddings=20, embedding_dim=user_dim,
                        feature_names=["user_id"]),
        EmbeddingConfig(name="level_emb", num_embeddings=5, embedding_dim=level_dim,
                        data_type=DataType.FP16, feature_names=["level"]),
    ]


def kjt(keys_and_rows: dict[str, list[list[int]]]) -> KeyedJaggedTensor:
    keys = list(keys_and_rows)
    rows = [row for key in keys for row in keys_and_rows[key]]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys,
        values=torch.tensor([v for row in rows for v in row], dtype=torch.int64),
        lengths=torch.tensor([len(row) for row in rows], dtype=torch.int64),
    )


BATCH = {  # 2 rows each
    "uih_video": [[1, 29, 3], [4]],
    "cand_video": [[7], [0, 8]],
    "user_id": [[19], [2]],
    "level": [[4], [0]],
}


def test_mixed_widths_get_one_collection_each_and_look_up_their_own_table():
    torch.manual_seed(0)
    module = MultiDimEmbeddingCollection(tables(), device=torch.device("cpu"))
    assert list(module.collections) == ["dim16", "dim8"]
    assert [t.name for t in module.embedding_configs()] == ["video_emb", "user_emb", "level_emb"]
    assert set(module.embeddings) == {"video_emb", "user_emb", "level_emb"}
    assert module.embeddings["level_emb"].weight.dtype == torch.float16
    # Keys in another order than the collections hold them, plus one the module does not
    # look up (it is left out, not an error).
    features = dict(reversed(list(BATCH.items())), other=[[1], [2]])
    out = module(kjt(features))
    assert set(out) == set(BATCH)
    for name, rows in BATCH.items():
        table = module.embeddings[module.table_of(name)].weight
        ids = torch.tensor([v for row in rows for v in row])
        assert out[name].lengths().tolist() == [len(row) for row in rows]
        assert out[name].values().shape == (len(ids), table.shape[1])
        torch.testing.assert_close(out[name].values(), F.embedding(ids, table).float())


def test_gradients_reach_the_tables_of_every_width():
    module = MultiDimEmbeddingCollection(tables(), device=torch.device("cpu"))
    out = module(kjt(BATCH))
    sum(jagged.values().sum() for jagged in out.values()).backward()
    for name, table in module.embeddings.items():
        assert table.weight.grad is not None and bool(table.weight.grad.abs().sum() > 0), name


def test_one_width_is_a_plain_embedding_collection():
    """Same seed -> the same table values and lookups as TorchRec's EmbeddingCollection."""
    torch.manual_seed(3)
    plain = EmbeddingCollection(tables(8, 8, 8), device=torch.device("cpu"))
    torch.manual_seed(3)
    module = MultiDimEmbeddingCollection(tables(8, 8, 8), device=torch.device("cpu"))
    assert list(module.collections) == ["dim8"]
    for name, embedding in plain.embeddings.items():
        assert torch.equal(module.embeddings[name].weight, embedding.weight)
    features = kjt(BATCH)
    expected, got = plain(features), module(features)
    assert set(got) == set(expected)
    for name in expected:
        assert torch.equal(got[name].values(), expected[name].values())


def test_a_missing_feature_is_named():
    module = MultiDimEmbeddingCollection(tables(), device=torch.device("cpu"))
    partial = {k: v for k, v in BATCH.items() if k != "user_id"}
    with pytest.raises(KeyError, match="lack 'user_id' \\(table 'user_emb'\\)"):
        module(kjt(partial))


def test_bad_table_lists_are_refused():
    twice = tables() + [EmbeddingConfig(name="user_emb", num_embeddings=3, embedding_dim=4,
                                        feature_names=["x"])]
    with pytest.raises(ValueError, match="table 'user_emb' is declared twice"):
        MultiDimEmbeddingCollection(twice, device=torch.device("meta"))
    clash = tables() + [EmbeddingConfig(name="other_emb", num_embeddings=3, embedding_dim=4,
                                        feature_names=["user_id"])]
    with pytest.raises(ValueError, match="'user_id' is looked up in two tables"):
        MultiDimEmbeddingCollection(clash, device=torch.device("meta"))


def test_one_bag_per_value_keeps_keys_and_values_and_gives_each_value_its_own_bag():
    features = kjt(BATCH)
    bagged = one_bag_per_value(features)
    assert bagged.keys() == features.keys()
    assert torch.equal(bagged.values(), features.values())
    # Stride = the most values of any key (uih_video: 4); each key: its values' bags of one,
    # then empty bags.
    assert bagged.stride() == 4
    assert bagged.lengths().tolist() == [1, 1, 1, 1] + [1, 1, 1, 0] + [1, 1, 0, 0] + [1, 1, 0, 0]
    assert bagged.length_per_key() == features.length_per_key()
    for key in features.keys():
        assert torch.equal(bagged[key].values(), features[key].values())


def test_one_bag_per_value_leaves_one_value_per_row_alone():
    features = kjt({"user_id": [[19], [2]], "level": [[4], [0]]})
    assert one_bag_per_value(features) is features


def test_lookup_by_single_value_bags_equals_lookup_by_rows():
    # The embeddings of a plain EmbeddingCollection over the rows' own bags are what the
    # module returns (it looks up single-value bags and puts the rows' lengths back).
    torch.manual_seed(0)
    module = MultiDimEmbeddingCollection(tables(user_dim=16), device=torch.device("cpu"))
    plain = module.collections["dim16"]
    features = kjt(BATCH)
    expected = plain(features)
    out = module(features)
    for key in BATCH:
        assert torch.equal(out[key].values(), expected[key].values())
        assert torch.equal(out[key].lengths(), expected[key].lengths())
