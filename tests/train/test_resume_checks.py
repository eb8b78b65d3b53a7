"""--resume is checked in the driver, before Ray starts or the MLflow run is reopened."""

import json
from pathlib import Path

import pytest

from hstu.train.trainer import SNAPSHOT_FILE, TrainOptions, TrainSetupError, resolve_run


def make_run(storage, name, world_size):
    """A run whose latest checkpoint closed epoch 1 (two epochs done) at step 4."""
    run = storage / name
    (run / "checkpoint_00000004").mkdir(parents=True)
    (run / SNAPSHOT_FILE).write_text("{}")
    state = {"epoch": 1, "epoch_done": True, "global_step": 4, "world_size": world_size}
    (run / "checkpoint_00000004" / "train_state.json").write_text(json.dumps(state))


def test_resume_with_another_worker_count_is_accepted(tmp_path):
    # The checkpoint is resharded for the new count (tests/train/test_reshard.py).
    make_run(tmp_path, "r1", world_size=2)
    for workers in (1, 2, 3):
        options = TrainOptions(recipe="x.config", resume=True, run_name="r1", workers=workers)
        assert resolve_run(options, str(tmp_path), "x") == ("r1", True)


def test_resuming_a_complete_run_says_how_to_train_further(tmp_path):
    from hstu.config.loader import load_config

    make_run(tmp_path, "r1", world_size=1)
    smoke = str(Path(__file__).resolve().parents[2] / "recipes" / "smoke.config")
    options = TrainOptions(recipe=smoke, resume=True, run_name="r1")
    two_epochs = load_config(smoke, ["train_config.num_epochs=2"]).train_config
    with pytest.raises(TrainSetupError, match="already complete.*num_epochs"):
        resolve_run(options, str(tmp_path), "x", two_epochs)
    three_epochs = load_config(smoke, ["train_config.num_epochs=3"]).train_config
    assert resolve_run(options, str(tmp_path), "x", three_epochs) == ("r1", True)
    five_steps = load_config(smoke, ["train_config.num_steps=5"]).train_config
    assert resolve_run(options, str(tmp_path), "x", five_steps) == ("r1", True)
