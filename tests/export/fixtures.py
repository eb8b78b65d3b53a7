"""Helpers and constants for the export tests (conftest.py turns them into fixtures)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa

SMOKE_RECIPE = "recipes/smoke.config"
MTGR_RECIPE = "recipes/kuairand_mtgr.config"
# The MTGR recipe at smoke size on CPU: small id tables (the synthetic ids stay below 1000)
# and the PYTORCH kernel (Triton only runs in its slow interpreter on CPU). Everything else,
# side info, cross features, mlp_content_encoder, FP16 tables, is the recipe's own.
MTGR_SMOKE_OVERRIDES = (
    "model_config.kernel=PYTORCH",
    "feature_configs[uih_seq].sequence_feature.features[video_id].id_feature.num_buckets=1000",
    "feature_configs[cand_seq].sequence_feature.features[video_id].id_feature.num_buckets=1000",
    "feature_configs[user_id].id_feature.num_buckets=1000",
)
# Tests trace one STU layer instead of three: tracing costs ~6 s per layer on a 2-core machine,
# and the layers are identical blocks.
MTGR_TEST_OVERRIDES = MTGR_SMOKE_OVERRIDES + ("model_config.dlrm_hstu.hstu.attn_num_layers=1",)
EXTRA_EXPORT_CONFIG = {"cand_seq_pk": "cand_seq", "INPUT_TILE": "2", "owner": {"team": "rank"}}


@dataclasses.dataclass
class Exported:
    recipe: str
    overrides: tuple[str, ...]
    checkpoint: Path
    export_dir: Path

    def config(self):
        from hstu.config import load_config

        return load_config(self.recipe, self.overrides)


def edge_rows(table: pa.Table) -> pa.Table:
    """Row 0 loses its history; row 1 keeps only its first candidate."""
    columns = {}
    for name in table.column_names:
        values = table.column(name).to_pylist()
        if name.startswith("uih_seq__"):
            values[0] = []
        elif name.startswith("cand_seq__"):
            values[1] = values[1][:1]
        columns[name] = pa.array(values, type=table.schema.field(name).type)
    return pa.table(columns)


def save_random_checkpoint(recipe: str, overrides, directory: Path, seed: int) -> Path:
    import torch
    import torch.distributed.checkpoint as dcp

    from hstu.config import feature_specs, label_specs, load_config
    from hstu.model import DlrmHSTU

    cfg = load_config(recipe, overrides)
    torch.manual_seed(seed)
    model = DlrmHSTU(cfg, feature_specs(cfg), label_specs(cfg))
    with torch.no_grad():
        # Move every parameter off its initial value (norms start at exactly 1 and 0).
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter.float()).to(parameter.dtype) * 0.05)
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(directory))
    return directory


def flat_scores(table: pa.Table, column: str) -> np.ndarray:
    return np.asarray(table.column(column).combine_chunks().flatten(), dtype=np.float32)
