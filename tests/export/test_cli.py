"""`launch.py export` and `launch.py predict` as a user calls them."""

from __future__ import annotations

import json

import pyarrow.parquet as pq


def test_export_without_cand_seq_pk_prints_the_command(tmp_path, capsys, launch_main, recipes):
    code = launch_main(
        [
            "export",
            "--recipe",
            recipes.smoke,
            "--checkpoint",
            str(tmp_path / "ckpt"),
            "--export_dir",
            str(tmp_path / "out"),
        ]
    )
    assert code == 1
    error = capsys.readouterr().err
    assert error.startswith("launch.py export: DLRM-HSTU exports need cand_seq_pk")
    assert (
        f"--export_dir {tmp_path / 'out'} --additional_export_config "
        """'{"cand_seq_pk": "cand_seq"}'"""
    ) in error


def test_predict_writes_scores_and_a_summary(
    smoke_export, samples, tmp_path, capsys, reuse_smoke_predictor, launch_main
):
    out = tmp_path / "scores.parquet"
    code = launch_main(
        [
            "predict",
            "--export_dir",
            str(smoke_export.export_dir),
            "--data",
            str(samples["edge"]),
            "--out",
            str(out),
            "--batch-size",
            "2",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["rows_in"] == summary["rows_out"] == 3
    assert "predict: 3/3 rows (100%)" in captured.err
    table = pq.read_table(out)
    assert [len(ids) for ids in table.column("cand_seq__video_id").to_pylist()] == [
        len(s) for s in table.column("probs_is_click").to_pylist()
    ]


def test_predict_from_a_foreign_directory_explains(tmp_path, capsys, launch_main):
    (tmp_path / "weights.bin").write_bytes(b"\0")
    code = launch_main(
        [
            "predict",
            "--export_dir",
            str(tmp_path),
            "--data",
            str(tmp_path),
            "--out",
            str(tmp_path / "o.parquet"),
        ]
    )
    assert code == 1
    assert "not an export directory of this project" in capsys.readouterr().err


def test_predict_from_a_directory_that_is_no_checkpoint_is_one_line(tmp_path, capsys,
                                                                     launch_main, recipes):
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")
    code = launch_main(
        ["predict", "--checkpoint", str(tmp_path / "checkpoint_manager_snapshot.json"),
         "--recipe", recipes.smoke, "--data", str(tmp_path), "--out", str(tmp_path / "o.parquet")]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("launch.py predict: ") and "no DCP checkpoint here" in err
    assert "Traceback" not in err
