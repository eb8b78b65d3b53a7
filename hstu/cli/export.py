"""`launch.py export`: a training checkpoint -> an export directory for serving (docs/serving.md).

    python launch.py export --recipe recipes/smoke.config \
        --checkpoint experiments/smoke/<run>/checkpoint_<...> --export_dir exports/smoke \
        --additional_export_config '{"cand_seq_pk": "cand_seq"}'

Option names follow TorchEasyRec's (`--export_dir`, `--additional_export_config`); the dashed
spellings work too.
"""

from __future__ import annotations

import argparse
import sys

from hstu.cli import add_override_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 1)[1]
    parser.add_argument(
        "--recipe", required=True, help="pipeline config the checkpoint was trained with"
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="DCP checkpoint directory (<storage>/<run>/checkpoint_<...>)",
    )
    parser.add_argument(
        "--export_dir",
        "--export-dir",
        dest="export_dir",
        required=True,
        help="directory to write (must not exist or be empty, unless --overwrite)",
    )
    parser.add_argument(
        "--additional_export_config",
        "--additional-export-config",
        dest="additional_export_config",
        default=None,
        metavar="JSON",
        help="JSON object merged into model_acc.json; DLRM-HSTU needs cand_seq_pk, "
        'e.g. \'{"cand_seq_pk": "cand_seq"}\'',
    )
    add_override_argument(parser, "config override, as in training (repeatable)")
    parser.add_argument(
        "--aoti",
        choices=("auto", "on", "off"),
        default="off",
        help="AOTInductor package for CUDA (experimental, unverified: see docs/serving.md): "
        "off (default), auto (when a GPU is present), on",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export_dir")
    tracking = parser.add_mutually_exclusive_group()
    tracking.add_argument(
        "--mlflow-run-id",
        default=None,
        help="log the export to this MLflow run (default: the training run "
        "recorded beside the checkpoint, if any)",
    )
    tracking.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    parser.add_argument(
        "--mlflow-uri",
        default=None,
        help="tracking URI for --mlflow-run-id (default $MLFLOW_TRACKING_URI, "
        "else sqlite:///<cwd>/mlflow.db)",
    )


def run(args: argparse.Namespace) -> int:
    from hstu.config.errors import ConfigError
    from hstu.export.exporter import ExportError, export_checkpoint

    mlflow_run = "auto"
    if args.no_mlflow:
        mlflow_run = None
    elif args.mlflow_run_id:
        from pathlib import Path

        from hstu.train.tracking import resolve_tracking_uri

        mlflow_run = (resolve_tracking_uri(args.mlflow_uri, Path.cwd()), args.mlflow_run_id)
    try:
        export_dir = export_checkpoint(
            recipe=args.recipe,
            checkpoint=args.checkpoint,
            export_dir=args.export_dir,
            additional_export_config=args.additional_export_config,
            overrides=args.overrides,
            aoti=args.aoti,
            overwrite=args.overwrite,
            mlflow_run=mlflow_run,
        )
    except (ExportError, ConfigError) as error:
        print(f"launch.py export: {error}", file=sys.stderr)
        return 1
    print(export_dir)
    return 0
