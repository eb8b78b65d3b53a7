"""Export: numbers equal to the checkpoint's, model_acc.json, the cand_seq_pk rule, layout."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest


def flat_scores(table: pa.Table, column: str) -> np.ndarray:
    return np.asarray(table.column(column).combine_chunks().flatten(), dtype=np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smoke", "mtgr"])
def test_export_then_predict_equals_checkpoint_scoring(name, request, samples, tmp_path):
    """Scores from the export directory equal the training model's, read from the same DCP
    checkpoint, on the eval samples and on the edge rows (empty history, one candidate)."""
    from hstu.export.predict import CheckpointScorer, predict_files

    exported = request.getfixturevalue(f"{name}_export")
    predictor = request.getfixturevalue(f"{name}_predictor")
    reference_scorer = CheckpointScorer(exported.config(), exported.checkpoint)
    tasks = predictor.tasks
    for data, batch_size in ((samples["eval"], 5), (samples["edge"], 1)):
        predict_files(
            predictor, data, tmp_path / "ours.parquet", batch_size=batch_size, progress=False
        )
        predict_files(
            reference_scorer,
            data,
            tmp_path / "reference.parquet",
            batch_size=batch_size + 2,
            progress=False,
        )
        ours = pq.read_table(tmp_path / "ours.parquet")
        reference = pq.read_table(tmp_path / "reference.parquet")
        files = [data] if data.is_file() else sorted(data.glob("*.parquet"))
        assert (
            ours.num_rows == reference.num_rows == sum(pq.read_metadata(f).num_rows for f in files)
        )
        assert ours.column("sample_id").to_pylist() == reference.column("sample_id").to_pylist()
        for task in tasks:
            got, want = flat_scores(ours, f"probs_{task}"), flat_scores(reference, f"probs_{task}")
            assert got.shape == want.shape and got.size > 0
            np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4, err_msg=task)
        # Scores differ between candidates: the comparison is not between constants.
        assert np.ptp(flat_scores(ours, f"probs_{tasks[0]}")) > 1e-3


def test_mtgr_export_reads_side_info_and_cross_features(mtgr_export):
    schema = json.loads((mtgr_export.export_dir / "sample_schema.json").read_text())
    columns = {c["name"]: c for c in schema["columns"]}
    for name in (
        "uih_seq__video_cate1",
        "cand_seq__video_cate2",
        "cand_seq__user_video_cross1",
        "cand_seq__user_video_cross2",
    ):
        assert columns[name]["type"] == "list<int64>" and columns[name]["kind"] == "id"
    manifest = json.loads((mtgr_export.export_dir / "export_manifest.json").read_text())
    assert "cand_seq__user_video_cross2" in [i["name"] for i in manifest["inputs"]]


def test_model_acc_json_holds_the_merged_keys(smoke_export, extra_export_config):
    model_acc = json.loads((smoke_export.export_dir / "model_acc.json").read_text())
    for key, value in extra_export_config.items():
        assert model_acc[key] == value
    assert model_acc["SPARSE_INT64"] == "1"
    assert model_acc["KERNEL"] == "PYTORCH"
    assert model_acc["MAX_SEQ_LEN"] == "256"
    assert "AOTI_PACKAGE" not in model_acc  # exported with --aoti off / no GPU


def test_export_dir_layout_and_manifest(smoke_export):
    from hstu.export.artifacts import sha256_of

    directory = smoke_export.export_dir
    manifest = json.loads((directory / "export_manifest.json").read_text())
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        [
            "export_manifest.json",
            "model.pt2",
            "model_acc.json",
            "pipeline.config",
            "sample_schema.json",
        ]
    )
    for name, record in manifest["files"].items():
        assert record["sha256"] == sha256_of(directory / name)
    assert manifest["candidate_sequence"] == "cand_seq"
    assert manifest["reserved_columns"] == ["sample_id", "user_id", "cand_seq__video_id"]
    schema = json.loads((directory / "sample_schema.json").read_text())
    assert [a["name"] for a in schema["prediction"]["adds"]][:2] == [
        "probs_is_click",
        "probs_is_like",
    ]
    # The config written is the resolved one: it loads as it is.
    from hstu.config import load_config

    assert load_config(directory / "pipeline.config").model_config.dlrm_hstu.max_seq_len == 256


def test_missing_cand_seq_pk_shows_the_command(tmp_path, recipes):
    from hstu.export.exporter import ExportError, export_checkpoint

    with pytest.raises(ExportError) as raised:
        export_checkpoint(
            recipe=recipes.smoke,
            checkpoint=str(tmp_path / "ckpt"),
            export_dir=str(tmp_path / "out"),
            additional_export_config='{"other": 1}',
            overrides=["data_config.batch_size=4"],
        )
    message = str(raised.value)
    assert "cand_seq_pk" in message
    assert (
        f"python launch.py export --recipe {recipes.smoke} --set data_config.batch_size=4 "
        f"--checkpoint {tmp_path / 'ckpt'} --export_dir {tmp_path / 'out'} "
        """--additional_export_config '{"other": 1, "cand_seq_pk": "cand_seq"}'"""
    ) in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "given, fragment",
    [
        ('{"cand_seq_pk": "uih_seq"}', "'uih_seq' is the history sequence"),
        ('{"cand_seq_pk": "items"}', "'items' is no sequence of the config"),
        ('{"cand_seq_pk": "cand_seq"', "not valid JSON (column 27"),
        ('["cand_seq"]', "must be a JSON object"),
    ],
)
def test_bad_additional_export_config(given, fragment, tmp_path, recipes):
    from hstu.export.exporter import ExportError, export_checkpoint

    with pytest.raises(ExportError, match="additional_export_config") as raised:
        export_checkpoint(
            recipe=recipes.smoke,
            checkpoint=str(tmp_path),
            export_dir=str(tmp_path / "o"),
            additional_export_config=given,
        )
    assert fragment in str(raised.value)


def test_refuses_a_checkpoint_of_another_recipe(mtgr_export, tmp_path, recipes):
    from hstu.export.exporter import ExportError, export_checkpoint

    # The tables differ in width (256 vs 16), so the smoke model's 16-wide collection has no
    # counterpart in the checkpoint: its first table is the key DCP misses.
    with pytest.raises(
        ExportError,
        match="does not fit .*smoke.config .*Missing key .*collections.dim16.embeddings.video_id",
    ):
        export_checkpoint(
            recipe=recipes.smoke,
            checkpoint=str(mtgr_export.checkpoint),
            export_dir=str(tmp_path / "o"),
            additional_export_config={"cand_seq_pk": "cand_seq"},
        )


def test_refuses_a_non_checkpoint_and_a_non_empty_export_dir(smoke_export, tmp_path, recipes):
    from hstu.export.exporter import ExportError, export_checkpoint

    args = {"recipe": recipes.smoke, "additional_export_config": {"cand_seq_pk": "cand_seq"}}
    with pytest.raises(ExportError, match="not a checkpoint directory"):
        export_checkpoint(checkpoint=str(tmp_path), export_dir=str(tmp_path / "o"), **args)
    with pytest.raises(ExportError, match="exists and is not an empty directory"):
        export_checkpoint(
            checkpoint=str(smoke_export.checkpoint), export_dir=str(smoke_export.export_dir), **args
        )
