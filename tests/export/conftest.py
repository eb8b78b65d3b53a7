"""Shared, session-scoped fixtures: small synthetic samples (with the MTGR columns), a randomly
initialised checkpoint per recipe written with torch.distributed.checkpoint exactly as the
trainer lays it out ({"model": state_dict}), and one export per recipe (tracing takes ~20 s,
so every test reuses them)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from export.fixtures import (
    EXTRA_EXPORT_CONFIG,
    MTGR_RECIPE,
    MTGR_TEST_OVERRIDES,
    SMOKE_RECIPE,
    Exported,
    edge_rows,
    save_random_checkpoint,
)


@pytest.fixture(scope="session")
def samples(tmp_path_factory) -> dict[str, Path]:
    """train/ and eval/ parquet (MTGR columns included), plus edge.parquet: three eval rows, the
    first with an empty history, the second with a single candidate."""
    from hstu.data.synthetic import SyntheticOptions, generate

    root = tmp_path_factory.mktemp("samples")
    generate(
        SyntheticOptions(users=24, seed=3, max_history=30, median_history=10, max_candidates=6,
                         items=900, clusters=50, eval_fraction=0.5, mtgr=True,
                         users_per_shard=12),
        root,
    )
    table = pq.read_table(sorted((root / "eval").glob("*.parquet"))[0]).slice(0, 3)
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


