"""Shared, session-scoped fixtures: small synthetic samples (with the MTGR columns), a randomly
initialised checkpoint per recipe written with torch.distributed.checkpoint exactly as the
trainer lays it out ({"model": state_dict}), and one export per recipe (tracing takes ~20 s,
so every test reuses them). Tests get constants through the `recipes` and
`extra_export_config` fixtures (pytest runs in importlib mode: no helper imports)."""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SMOKE_RECIPE = str(REPO_ROOT / "recipes" / "smoke.config")
MTGR_RECIPE = str(REPO_ROOT / "recipes" / "kuairand_mtgr.config")
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


@pytest.fixture(scope="session")
def samples(tmp_path_factory) -> dict[str, Path]:
    """train/ and eval/ parquet (MTGR columns included), plus edge.parquet: three eval rows, the
    first with an empty history, the second with a single candidate."""
    from hstu.data.synthetic import SyntheticOptions, generate

    root = tmp_path_factory.mktemp("samples")
    generate(
        SyntheticOptions(
            users=24,
            seed=3,
            max_history=30,
            median_history=10,
            max_candidates=6,
            items=900,
            clusters=50,
            eval_fraction=0.5,
            mtgr=True,
            users_per_shard=12,
        ),
        root,
    )
    table = pq.read_table(min((root / "eval").glob("*.parquet"))).slice(0, 3)
    pq.write_table(edge_rows(table), root / "edge.parquet")
    return {"train": root / "train", "eval": root / "eval", "edge": root / "edge.parquet"}


def _export(tmp_path_factory, name: str, recipe: str, overrides, seed: int) -> Exported:
    from hstu.export.exporter import export_checkpoint

    root = tmp_path_factory.mktemp(name)
    checkpoint = save_random_checkpoint(recipe, overrides, root / "checkpoint", seed)
    export_dir = export_checkpoint(
        recipe=recipe,
        overrides=list(overrides),
        checkpoint=str(checkpoint),
        export_dir=str(root / "export"),
        additional_export_config=EXTRA_EXPORT_CONFIG,
        aoti="off",
        mlflow_run=None,
    )
    return Exported(recipe, tuple(overrides), checkpoint, Path(export_dir))


@pytest.fixture(scope="session")
def smoke_export(tmp_path_factory) -> Exported:
    return _export(tmp_path_factory, "smoke", SMOKE_RECIPE, (), seed=0)


@pytest.fixture(scope="session")
def mtgr_export(tmp_path_factory) -> Exported:
    return _export(tmp_path_factory, "mtgr", MTGR_RECIPE, MTGR_TEST_OVERRIDES, seed=1)


@pytest.fixture(scope="session")
def smoke_predictor(smoke_export):
    from hstu.export.predict import Predictor

    return Predictor(smoke_export.export_dir)


@pytest.fixture(scope="session")
def mtgr_predictor(mtgr_export):
    from hstu.export.predict import Predictor

    return Predictor(mtgr_export.export_dir)


@pytest.fixture
def reuse_smoke_predictor(monkeypatch, smoke_predictor):
    """Predictor(dir) for a byte-identical copy of the smoke export returns the already loaded
    smoke Predictor: torch.export.load takes ~10 s on CPU, and the load itself is covered by
    the smoke_predictor fixture. The copy's manifest and sha256 are still checked, so a wrong
    or damaged directory still fails."""
    from hstu.export import artifacts, predict

    def cached(export_dir):
        manifest = artifacts.read_manifest(export_dir)
        artifacts.verify_files(export_dir, manifest)
        assert manifest["files"] == smoke_predictor.manifest["files"], "not the smoke export"
        return smoke_predictor

    monkeypatch.setattr(predict, "Predictor", cached)


@pytest.fixture(scope="session")
def recipes():
    return types.SimpleNamespace(
        smoke=SMOKE_RECIPE, mtgr=MTGR_RECIPE, mtgr_overrides=MTGR_SMOKE_OVERRIDES, root=REPO_ROOT
    )


@pytest.fixture(scope="session")
def extra_export_config():
    return dict(EXTRA_EXPORT_CONFIG)
