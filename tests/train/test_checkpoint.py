"""Checkpoint files: the train state and the errors for directories that are not checkpoints.
(Saving and reloading sharded weights is covered by tests/train/test_trainer.py.)"""

from __future__ import annotations

import json

import pytest

from hstu.train.checkpoint import (
    TRAIN_STATE_FILE,
    CheckpointError,
    TrainState,
    load_model_weights,
    read_state,
)


def test_train_state_reads_back_and_says_where_to_resume(tmp_path):
    payload = {"epoch": 2, "global_step": 40, "samples": 1280, "epoch_done": True,
               "world_size": 2, "restarts": 1, "run_name": "ignored extra"}
    (tmp_path / TRAIN_STATE_FILE).write_text(json.dumps(payload))
    state = read_state(tmp_path)
    assert state == TrainState(epoch=2, global_step=40, samples=1280, epoch_done=True,
                               world_size=2, restarts=1)
    assert state.resume_epoch() == 3
    assert TrainState(epoch=2).resume_epoch() == 2  # mid-epoch: replay it


def test_a_directory_without_state_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        read_state(tmp_path)
    with pytest.raises(CheckpointError, match="no .metadata"):
        load_model_weights(None, tmp_path)


def test_the_rows_left_out_travel_with_the_train_state(tmp_path):
    payload = {"epoch": 1, "global_step": 8, "epoch_done": True, "world_size": 2,
               "skipped_rows": 3, "dropped_rows": 4}
    (tmp_path / TRAIN_STATE_FILE).write_text(json.dumps(payload))
    state = read_state(tmp_path)
    assert (state.skipped_rows, state.dropped_rows) == (3, 4)
    # A checkpoint written before these counters existed reads as 0 of each.
    (tmp_path / TRAIN_STATE_FILE).write_text(json.dumps({"global_step": 8}))
    assert (read_state(tmp_path).skipped_rows, read_state(tmp_path).dropped_rows) == (0, 0)
