"""Train against serve: the exported program scores the eval set as the trained model does, and
its AUC is the in-training evaluation's; a difference beyond the tolerance fails the export."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hstu.export.train_serve import (
    METRIC_TOLERANCE,
    SCORE_TOLERANCE,
    TrainServeMismatch,
    compare_train_serve,
)


def _in_training_eval(cfg, checkpoint, eval_dir) -> dict:
    """What training's evaluation reports for this checkpoint (one process, evaluate())."""
    from hstu.config import feature_specs, label_specs
    from hstu.data.pipeline import arrow_to_batch
    from hstu.train.checkpoint import load_for_inference
    from hstu.train.evaluation import evaluate

    model = load_for_inference(cfg, checkpoint)
    features, labels = feature_specs(cfg), label_specs(cfg)
    table = pa.concat_tables(pq.read_table(p) for p in sorted(Path(eval_dir).glob("*.parquet")))
    batches = [arrow_to_batch(table.slice(start, 5), features, labels)
               for start in range(0, table.num_rows, 5)]
    return evaluate(model, model, batches, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def matching(smoke_export, samples):
    cfg = smoke_export.config()
    trained = _in_training_eval(cfg, smoke_export.checkpoint, samples["eval"])
    report = compare_train_serve(cfg, str(smoke_export.export_dir), str(smoke_export.checkpoint),
                                 [str(samples["eval"])], trained)
    return cfg, trained, report


def test_the_export_scores_the_eval_set_as_training_does(matching, samples):
    _, trained, report = matching
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in Path(samples["eval"]).glob("*.parquet"))
    assert report.rows == rows == trained["eval/rows"]
    assert report.candidates == trained["eval/candidates"]
    assert len(report.score_diff) == 8
    assert report.max_score_diff <= 1e-5
    compared = [k for k in report.metric_diff if k.startswith("eval/auc/")]
    finite = [k for k, v in trained.items() if k.startswith("eval/auc/") and not math.isnan(v)]
    assert sorted(compared) == sorted(finite) and len(compared) >= 2
    assert report.max_metric_diff <= 1e-6
    report.check()  # within tolerance: no error
    logged = report.mlflow_metrics()
    assert logged["serve/max_score_diff"] == report.max_score_diff
    assert set(logged) >= {f"serve/score_diff/{task}" for task in report.score_diff}
    assert set(logged) >= {f"serve/metric_diff/{k.removeprefix('eval/')}" for k in compared}


def test_an_auc_beyond_the_tolerance_fails_with_the_numbers(matching, smoke_export, samples):
    cfg, trained, _ = matching
    key = next(k for k, v in trained.items() if k.startswith("eval/auc/") and not math.isnan(v))
    shifted = dict(trained, **{key: trained[key] - 2 * METRIC_TOLERANCE})
    report = compare_train_serve(cfg, str(smoke_export.export_dir), str(smoke_export.checkpoint),
                                 [str(samples["eval"])], shifted)
    with pytest.raises(TrainServeMismatch, match=(
            rf"{key} of the exported program's scores is {trained[key]:.4f}, training's "
            rf"evaluation reported {shifted[key]:.4f} \(difference 0.002, tolerance 0.001\)")):
        report.check()


@pytest.fixture(scope="module")
def other_checkpoint(smoke_export, tmp_path_factory):
    """Another model of the same recipe: its scores are not the export's."""
    import torch.distributed.checkpoint as dcp

    from hstu.config import feature_specs, label_specs
    from hstu.model import DlrmHSTU

    cfg = smoke_export.config()
    torch.manual_seed(99)
    model = DlrmHSTU(cfg, feature_specs(cfg), label_specs(cfg))
    directory = tmp_path_factory.mktemp("other") / "checkpoint"
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(directory))
    return directory


def test_scores_beyond_the_tolerance_fail_naming_the_task(smoke_export, samples, other_checkpoint):
    report = compare_train_serve(smoke_export.config(), str(smoke_export.export_dir),
                                 str(other_checkpoint), [str(samples["eval"])], None)
    assert report.max_score_diff > SCORE_TOLERANCE
    assert report.metric_diff == {} and "no in-training evaluation" in report.note
    with pytest.raises(TrainServeMismatch, match=r"the exported program's \w+ scores differ "
                       r"from the trained model's by up to .* \(tolerance 0.0001\)"):
        report.check()


def test_a_run_whose_export_fails_the_check_keeps_it_aside_and_logs_no_model(
        smoke_export, samples, other_checkpoint, tmp_path):
    from hstu.train.trainer import ServeCheck, _check_and_log_export

    export_dir = tmp_path / "export"
    shutil.copytree(smoke_export.export_dir, export_dir)
    check = ServeCheck(smoke_export.config(), [str(samples["eval"])], None, None, None, step=8)
    path, note = _check_and_log_export(export_dir, str(other_checkpoint), check)
    assert path is None
    assert note.startswith("export failed: train vs serve: the exported program's ")
    assert f"moved to {tmp_path / 'export.rejected'}" in note
    assert not export_dir.exists() and (tmp_path / "export.rejected" / "model.pt2").is_file()
