"""`launch.py train`: train a recipe on Ray Train (local Ray, or the cluster in RAY_ADDRESS)."""

from __future__ import annotations

import argparse
import sys

from hstu.cli import add_override_argument

EXAMPLES = """examples:
  python launch.py train --recipe recipes/smoke.config --workers 2
  python launch.py train --recipe recipes/kuairand_dlrm_hstu.config --workers 8 --use-gpu \\
      --max-failures 3 --storage /mnt/shared/experiments
  python launch.py train --recipe recipes/smoke.config --workers 2 --resume --run-name NAME
"""


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by train, eval and smoke."""
    parser.add_argument("--workers", type=int, default=1,
                        help="Ray Train workers (default: %(default)s)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker (NCCL)")
    parser.add_argument(
        "--cuda-graphs", action="store_true",
        help="with --use-gpu: training steps replay the encoder and towers from CUDA graphs, one "
        "per batch-shape bucket (for steps bound by the host: short histories, small batches; "
        "docs/training.md). Not yet run on a GPU.",
    )
    parser.add_argument(
        "--cpus-per-worker",
        type=float,
        default=None,
        help="CPUs Ray reserves per worker (default on CPU: (CPUs - 1) / workers, at most 1, so "
        "that Ray Data keeps a CPU; on GPU: 1)",
    )
    add_override_argument(
        parser, "override a config field, e.g. --set train_config.num_steps=100 (repeatable)"
    )
    parser.add_argument(
        "--sharding",
        action="append",
        default=[],
        metavar="TABLE=TYPE[,TYPE]",
        help="restrict a table's sharding types (table_wise, row_wise, column_wise, "
        "table_row_wise, table_column_wise, data_parallel); the planner picks among them",
    )
    parser.add_argument("--mlflow-uri", default=None,
                        help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else "
                        "sqlite:///<cwd>/mlflow.db)")
    parser.add_argument("--experiment", default="hstu", help="MLflow experiment (default hstu)")
    parser.add_argument("--run-name", default=None, help="Ray + MLflow run name")
    parser.add_argument("--storage", default=None,
                        help="Ray storage path for checkpoints (default: the config's model_dir; "
                        "on a multi-node cluster a shared path or s3://...)")
    parser.add_argument("--timeout-s", type=float, default=None,
                        help="stop with an explanation if the run takes longer than this many "
                        "seconds (default: %(default)s)")
    parser.add_argument("--show-ray-data-progress", action="store_true",
                        help="show Ray Data's progress bars (hidden by default)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds model initialisation, dropout and the data order; the same "
                        "seed repeats a CPU run's numbers exactly (default 0)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXAMPLES
    parser.add_argument("--recipe", required=True, help="pipeline config (protobuf text format)")
    parser.add_argument("--train", nargs="+", default=None, metavar="PATH",
                        help="training parquet files, directories or glob patterns, also "
                        "comma-separated (default: train_input_path)")
    parser.add_argument("--eval", nargs="+", default=None, metavar="PATH",
                        help="eval parquet files, directories or glob patterns, also "
                        "comma-separated (default: eval_input_path)")
    add_common_arguments(parser)
    parser.add_argument("--resume", action="store_true",
                        help="continue a run from its latest checkpoint (any --workers: the "
                        "checkpoint is resharded; default run: the latest under --storage)")
    parser.add_argument("--max-failures", type=int, default=0,
                        help="worker failures to recover from by restarting from the latest "
                        "checkpoint (default 0)")
    parser.add_argument("--no-export", action="store_true", help="skip the export at the end")
    parser.add_argument("--export-best", default=None, metavar="METRIC",
                        help="export the checkpoint whose evaluation was best by METRIC "
                        "(eval/<kind>/<task>, e.g. auc/is_click or loss/is_like; AUCs count "
                        "higher as better, losses lower) instead of the last one")
    parser.add_argument("--repeat", type=int, default=None, metavar="K",
                        help="train K times with seeds --seed .. --seed+K-1, as MLflow child runs "
                        "of one parent that logs each eval metric's mean and standard deviation")
    parser.add_argument("--sample-log", default=None, metavar="DIR",
                        help="each worker records the sample ids it trains on (delivery audit)")


def options_from_args(args: argparse.Namespace):
    from hstu.train.trainer import TrainOptions

    return TrainOptions(
        recipe=args.recipe,
        overrides=list(args.overrides),
        train_paths=getattr(args, "train", None),
        eval_paths=getattr(args, "eval", None),
        workers=args.workers,
        use_gpu=args.use_gpu,
        cuda_graphs=getattr(args, "cuda_graphs", False),
        cpus_per_worker=args.cpus_per_worker,
        resume=getattr(args, "resume", False),
        run_name=args.run_name,
        storage=args.storage,
        tracking_uri=args.mlflow_uri,
        experiment=args.experiment,
        max_failures=getattr(args, "max_failures", 0),
        sharding=list(args.sharding),
        export=not getattr(args, "no_export", False),
        export_best=getattr(args, "export_best", None),
        sample_log_dir=getattr(args, "sample_log", None),
        seed=args.seed,
        timeout_s=args.timeout_s,
        show_ray_data_progress=args.show_ray_data_progress,
        checkpoint=getattr(args, "checkpoint", None),
    )


def error_line(error: BaseException) -> str | None:
    """One line for an error whose message says everything (bad config or data, impossible
    setting, timeout) and for any error that stopped a Ray Train worker; None for anything
    else, which keeps its traceback (hstu/train/errors.py)."""
    from hstu.train.errors import error_line as line

    return line(error)


def known_error(error: BaseException) -> bool:
    return error_line(error) is not None


def report_error(command: str, error: BaseException) -> int:
    """Print `error` as the one line this command ends with (plus where the run's log is, when
    it has one) and return the exit status 1; re-raise an unexpected driver error."""
    line = error_line(error)
    if line is None:
        raise error
    print(f"launch.py {command}: {line}", file=sys.stderr)
    log = getattr(error, "hstu_run_log", None)
    if log:
        print(f"launch.py {command}: tracebacks and Ray's messages are in {log}",
              file=sys.stderr)
    return 1


def run_repeat(args: argparse.Namespace) -> int:
    from hstu.train.repeat import run_repeated, summary_text

    try:
        result = run_repeated(options_from_args(args), args.repeat)
    except Exception as error:
        return report_error("train", error)
    print("\n" + summary_text(result))
    failed = [run.run_name for run in result.runs if run.export_note.startswith("export failed")]
    if failed:
        print(f"launch.py train: training worked, the export of {', '.join(failed)} did not "
              "(see above)", file=sys.stderr)
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
    from hstu.train.trainer import run_training, summary_text

    if args.repeat is not None:
        return run_repeat(args)
    try:
        result = run_training(options_from_args(args))
    except Exception as error:
        return report_error("train", error)
    print("\n" + summary_text(result))
    if result.export_note.startswith("export failed"):
        print("launch.py train: training worked, the export did not (see above)", file=sys.stderr)
        return 1
    return 0
