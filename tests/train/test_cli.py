"""`launch.py train` refuses what cannot run with one clear line, before starting Ray."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--set", "train_config.sparse_optimizer={ adam_optimizer { lr: 0.01 } }"],
         "train_config.sparse_optimizer.adam_optimizer: cannot run on CPU"),
        (["--sharding", "item_emb=row_wise"],
         "no embedding table named 'item_emb'; the model's tables are"),
        (["--sharding", "video_id_emb=data_parallel"], "fails on CPU"),
        (["--train", "/no/such/dir"], "train data not found: /no/such/dir"),
        (["--resume"], "--resume: no run with checkpoints under"),
        (["--set", "train_config.num_epochs=x"], "num_epochs"),
        (["--export-best", "auc/is_clik"], "did you mean eval/auc/is_click?"),
        (["--export-best", "auc/is_click", "--no-export"], "contradict each other"),
    ],
)
def test_train_refuses_with_one_clear_line(launch_main, smoke_data, smoke_recipe, tmp_path,
                                           capsys, extra, expected):
    import ray

    ray_was_running = ray.is_initialized()
    argv = ["train", "--recipe", smoke_recipe, "--train", smoke_data["train"], "--eval",
            smoke_data["eval"], "--storage", str(tmp_path), *extra]
    assert launch_main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("launch.py train: ")
    assert expected in err
    assert "Traceback" not in err
    assert ray.is_initialized() == ray_was_running  # refused before Ray was started


def test_eval_needs_a_checkpoint_directory(launch_main, smoke_recipe, tmp_path, capsys):
    assert launch_main(["eval", "--recipe", smoke_recipe, "--checkpoint", str(tmp_path)]) == 1
    assert "not a checkpoint directory" in capsys.readouterr().err


def test_compare_names_a_missing_run(launch_main, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert launch_main(["compare", "no-such-run", "--mlflow-uri", uri]) == 1
    assert "no MLflow run with id or name 'no-such-run'" in capsys.readouterr().err
