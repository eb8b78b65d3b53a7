"""`launch.py predict`: score sample rows with an export directory (or a checkpoint).

    python launch.py predict --export_dir exports/smoke --data data/smoke/eval \
        --out predictions/smoke_eval.parquet
    python launch.py predict --checkpoint experiments/smoke/<run>/checkpoint_<...> \
        --recipe recipes/smoke.config --data data/smoke/eval --out predictions/ckpt.parquet

Output: one row per input row with sample_id, user_id, the candidate ids (cand_seq__video_id)
and one list column probs_<task> per task, one score per candidate (docs/serving.md).
"""

from __future__ import annotations

import argparse
import json
import sys

from hstu.cli import add_override_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 1)[1]
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--export_dir",
        "--export-dir",
        dest="export_dir",
        help="export directory written by `launch.py export`",
    )
    source.add_argument(
        "--checkpoint", help="score with a training checkpoint instead (needs --recipe)"
    )
    parser.add_argument("--recipe", help="pipeline config of --checkpoint")
    add_override_argument(parser, "config override for --checkpoint (repeatable)")
    parser.add_argument(
        "--data",
        nargs="+",
        required=True,
        metavar="PATH",
        help="sample parquet files, directories or glob patterns, also comma-separated",
    )
    parser.add_argument("--out", required=True, help="output parquet file")
    parser.add_argument(
        "--batch-size",
        "--batch_size",
        dest="batch_size",
        type=int,
        default=256,
        help="rows per forward pass (default 256)",
    )
    parser.add_argument(
        "--on-bad-rows",
        choices=("error", "skip"),
        default="error",
        help="stop at the first bad row (default), or skip and count bad rows "
        "(they are then missing from the output)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    from hstu.config.errors import ConfigError
    from hstu.data.validate import DataError
    from hstu.export.artifacts import ExportDirError
    from hstu.export.predict import CheckpointScorer, Predictor, predict_files
    from hstu.model import ModelConfigError
    from hstu.train.checkpoint import CheckpointError

    if args.export_dir and (args.recipe or args.overrides):
        print(
            "launch.py predict: --recipe/--set go with --checkpoint; an export directory "
            "carries its own config",
            file=sys.stderr,
        )
        return 2
    if args.checkpoint and not args.recipe:
        print(
            "launch.py predict: --checkpoint needs --recipe (the config it was trained with)",
            file=sys.stderr,
        )
        return 2
    try:
        if args.export_dir:
            scorer = Predictor(args.export_dir)
        else:
            from hstu.config.loader import load_config

            scorer = CheckpointScorer(load_config(args.recipe, args.overrides), args.checkpoint)
        summary = predict_files(
            scorer,
            args.data,
            args.out,
            batch_size=args.batch_size,
            on_bad_rows=args.on_bad_rows,
            progress=not args.quiet,
        )
    except (ExportDirError, DataError, ConfigError, ModelConfigError, CheckpointError,
            FileNotFoundError) as error:
        print(f"launch.py predict: {error}", file=sys.stderr)
        return 1
    print(
        json.dumps(
            {
                "out": summary.out,
                "rows_in": summary.rows_in,
                "rows_out": summary.rows_out,
                "candidates": summary.candidates,
                "files": summary.files,
                "seconds": round(summary.seconds, 2),
                "bad_rows": {
                    "rows": summary.bad_rows.rows,
                    "by_reason": dict(summary.bad_rows.by_reason),
                },
            },
            indent=2,
        )
    )
    return 0
