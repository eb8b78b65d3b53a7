"""build_trainable: the model as the trainer, train_bench and the tests hold it."""

from __future__ import annotations

import torch

from hstu.config import feature_specs, label_specs, load_config
from hstu.model import DlrmHSTU


def test_tables_are_sharded_with_the_fused_optimizer_and_the_rest_gets_the_dense_one(
        smoke_recipe, one_process_group):
    from hstu.train.trainable import build_trainable

    cfg = load_config(smoke_recipe)
    trainable = build_trainable(cfg, feature_specs(cfg), label_specs(cfg), torch.device("cpu"),
                                world_size=1, local_world_size=1, batch_size=4,
                                sharding={"video_id_emb": ["row_wise"]})
    assert isinstance(trainable.module, DlrmHSTU)
    assert trainable.sharded.tables["video_id_emb"]["sharding_type"] == "row_wise"
    # Every table is updated inside the backward by the config's sparse optimizer...
    assert trainable.model.fused_optimizer.params
    assert trainable.sparse_spec.lr == cfg.train_config.sparse_optimizer.rowwise_adagrad_optimizer.lr
    # ... and the dense optimizer holds every other parameter, no table.
    dense = {id(p) for group in trainable.dense_optimizer.param_groups for p in group["params"]}
    tables = {id(p) for p in trainable.module.embedding_collection.parameters()}
    others = {id(p) for name, p in trainable.model.named_parameters()
              if "embedding_collection" not in name}
    assert dense and not dense & tables
    assert dense == others
