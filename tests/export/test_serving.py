"""ServingModule against DlrmHSTU.forward (eager, no export): the same numbers, both timestamp
orders; the filler row changes no other row's scores."""

from __future__ import annotations

import glob

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch


def _newest_first(table: pa.Table) -> pa.Table:
    """Every row's sequences reversed: the order a newest-first config's data has (the data
    checks reject oldest-first rows there)."""
    for index, name in enumerate(table.column_names):
        column = table.column(name)
        if pa.types.is_list(column.type):
            rows = [None if row is None else row[::-1] for row in column.to_pylist()]
            table = table.set_column(index, name, pa.array(rows, column.type))
    return table


def _model_and_batch(recipe, overrides, samples, newest_first=False):
    from hstu.config import feature_specs, label_specs, load_config
    from hstu.data.pipeline import arrow_to_batch
    from hstu.model import DlrmHSTU

    cfg = load_config(recipe, overrides)
    features, labels = feature_specs(cfg), label_specs(cfg)
    torch.manual_seed(0)
    model = DlrmHSTU(cfg, features, labels).eval()
    table = pq.read_table(min(glob.glob(str(samples["train"] / "*.parquet")))).slice(0, 6)
    if newest_first:
        table = _newest_first(table)
    return model, features, arrow_to_batch(table, features, labels)


def _serving_inputs(batch, features):
    from hstu.export.serving import lengths_key

    sparse = batch.sparse.to_dict()
    inputs = {
        f.name: sparse[f.name].values() if f.kind == "id" else batch.raw[f.name] for f in features
    }
    for sequence, lengths in batch.seq_lengths.items():
        inputs[lengths_key(sequence)] = lengths
    return inputs


@pytest.mark.parametrize("ascending", [True, False])
def test_serving_module_equals_the_model(ascending, samples, recipes):
    from hstu.export.serving import ServingModule

    overrides = (
        [] if ascending else ["model_config.dlrm_hstu.sequence_timestamp_is_ascending=false"]
    )
    model, features, batch = _model_and_batch(
        recipes.smoke, overrides, samples, newest_first=not ascending
    )
    serving = ServingModule(model).eval()
    with torch.no_grad():
        expected = model(batch).probs
        got = serving(_serving_inputs(batch, features))
    assert list(got) == list(expected)
    for task in expected:
        torch.testing.assert_close(got[task], expected[task], rtol=1e-6, atol=1e-6)


def test_the_filler_row_changes_no_other_score(samples, recipes):
    from hstu.export.serving import (
        FILLER_TOKENS,
        ServingModule,
        serving_inputs,
        with_filler_row,
        without_filler_scores,
    )

    model, features, batch = _model_and_batch(recipes.smoke, [], samples)
    serving = ServingModule(model).eval()
    inputs = _serving_inputs(batch, features)
    padded = with_filler_row(inputs, serving_inputs(features))
    assert padded["user_id"].shape[0] == inputs["user_id"].shape[0] + 1
    assert padded["cand_seq.lengths"][-1] == FILLER_TOKENS
    with torch.no_grad():
        plain = serving(inputs)
        filled = serving(padded)
    for task, scores in without_filler_scores(filled).items():
        torch.testing.assert_close(scores, plain[task], rtol=1e-5, atol=1e-6)


# One process writing a checkpoint is intended here.
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_tables_of_three_widths_go_from_checkpoint_to_serving(samples, recipes, tmp_path):
    """A DCP checkpoint of a model whose tables are 4, 8 and 16 wide (one EmbeddingCollection
    each), read back unsharded, serves the model's scores. (The export traces the same
    ServingModule; its flat table dict does not depend on how the collections are grouped.)"""
    import torch.distributed.checkpoint as dcp

    from hstu.config import load_config
    from hstu.export.serving import ServingModule
    from hstu.train.checkpoint import load_for_inference

    overrides = [
        "model_config.dlrm_hstu.concat_contextual_features=true",
        "feature_configs[2].id_feature.embedding_dim=4",
        "feature_configs[3].id_feature.embedding_dim=8",
    ]
    model, features, batch = _model_and_batch(recipes.smoke, overrides, samples)
    assert sorted(model.embedding_collection.collections) == ["dim16", "dim4", "dim8"]
    with torch.no_grad():
        for parameter in model.parameters():  # off the initial values
            parameter.add_(torch.randn_like(parameter) * 0.05)
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(tmp_path / "checkpoint"))
    loaded = load_for_inference(load_config(recipes.smoke, overrides), tmp_path / "checkpoint")
    serving = ServingModule(loaded).eval()
    assert serving.tables["user_id_emb"].shape == (1000, 4)
    assert serving.tables["user_active_degree_emb"].shape == (8, 8)
    with torch.no_grad():
        expected = model(batch).probs
        got = serving(_serving_inputs(batch, features))
    for task in expected:
        torch.testing.assert_close(got[task], expected[task], rtol=1e-6, atol=1e-6)
