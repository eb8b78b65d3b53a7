"""Fixtures for the training tests: one local Ray for the session, tiny synthetic data."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TRAIN_ROWS = 64  # one training window per synthetic user


@pytest.fixture(scope="session")
def smoke_recipe() -> str:
    return str(REPO / "recipes" / "smoke.config")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every test that trains (starting Ray costs seconds)."""
    import ray
    import ray.data

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    yield ray
    if started_here:
        ray.shutdown()


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory) -> dict:
    """64 training rows (64 users) and their eval windows, sized for recipes/smoke.config."""
    from hstu.cli.smoke import SMOKE_DATA
    from hstu.data.synthetic import SyntheticOptions, generate

    out = tmp_path_factory.mktemp("smoke_data")
    options = dict(SMOKE_DATA, users_per_shard=32, eval_fraction=0.5)
    manifest = generate(SyntheticOptions(users=TRAIN_ROWS, seed=3, **options), out)
    assert manifest["splits"]["train"]["rows"] == TRAIN_ROWS
    return {"train": str(out / "train"), "eval": str(out / "eval"), "rows": TRAIN_ROWS,
            "manifest": manifest}


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory) -> str:
    """One sqlite tracking store for the session (creating one costs seconds of migrations)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
