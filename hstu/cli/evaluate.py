"""`launch.py eval`: per-task AUC of a checkpoint on an eval set, on Ray Train workers.

Any number of workers can read a checkpoint written by any number (DCP reassembles the shards
by their offsets). The result goes to a new MLflow run (tag hstu.kind = eval, hstu.checkpoint).
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from hstu.cli.train import add_common_arguments

    parser.add_argument("--recipe", required=True, help="the pipeline config it was trained with")
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint directory (<storage>/<run>/checkpoint_<step>)")
    parser.add_argument("--eval", nargs="+", default=None, metavar="PATH",
                        help="eval parquet files, directories or glob patterns, also "
                        "comma-separated (default: eval_input_path)")
    parser.add_argument("--json", dest="json_out", default=None, metavar="FILE",
                        help="also write the metrics to this JSON file")
    add_common_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from hstu.cli.train import options_from_args, report_error
    from hstu.train.progress import eval_table
    from hstu.train.trainer import run_evaluation

    options = options_from_args(args)
    try:
        metrics, tasks = run_evaluation(options)
    except Exception as error:
        return report_error("eval", error)
    print(f"\n{int(metrics.get('eval/rows', 0))} eval rows, checkpoint {options.checkpoint}")
    print(eval_table(metrics, tasks))
    if args.json_out:
        with open(args.json_out, "w") as out:
            json.dump(metrics, out, indent=2, sort_keys=True)
    return 0
