"""Export and serving: a checkpoint -> an export directory -> scores (docs/serving.md).

    export_checkpoint(recipe=..., checkpoint=..., export_dir=...,
                      additional_export_config='{"cand_seq_pk": "cand_seq"}')   # exporter.py
    Predictor(export_dir).predict_table(arrow_table)                            # predict.py
    predict_files(Predictor(export_dir), "samples/", "scores.parquet")

Submodules are imported on use: predicting needs neither TorchRec nor Ray.
"""

from __future__ import annotations


def export_checkpoint(**kwargs):
    """See hstu.export.exporter.export_checkpoint."""
    from hstu.export.exporter import export_checkpoint as export

    return export(**kwargs)
