"""`launch.py smoke`: the whole path on one small machine, in one command.

Makes a small synthetic dataset (hstu.data.synthetic), trains recipes/smoke.config with 2 Ray
Train workers on CPU (gloo, the PYTORCH kernel, TorchRec sharding across the two workers),
evaluates per-task AUC over both workers, exports the checkpoint (when hstu.export provides
it), logs everything to MLflow, and prints where the run and its artifacts are. A watchdog
stops it with an explanation if it runs past --timeout-s instead of hanging.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "smoke.config"

# Synthetic data sized for recipes/smoke.config: ids below its tables' num_buckets (1000),
# rows that fit max_seq_len 256 (6 contextual + <=200 history + <=20 candidates).
SMOKE_DATA = {
    "items": 900,
    "clusters": 30,
    "authors": 200,
    "max_history": 200,
    "median_history": 60,
    "max_candidates": 20,
    "eval_fraction": 0.5,
    "users_per_shard": 200,
}


# On top of recipes/smoke.config (which already has rates and epochs for ~100 steps): evaluate
# and checkpoint every other epoch, to keep the run short; --set overrides it.
SMOKE_SETTINGS = ("train_config.save_checkpoints_epochs=2",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from hstu.cli.train import add_common_arguments

    parser.add_argument("--out", default="outputs/smoke",
                        help="where data and checkpoints go (default outputs/smoke)")
    parser.add_argument("--users", type=int, default=800,
                        help="synthetic users, one training row each (default 800, at most 999)")
    # --seed (from the common options) seeds the synthetic data as well as the model.
    parser.add_argument("--recipe", default=str(RECIPE), help=argparse.SUPPRESS)
    add_common_arguments(parser)
    parser.set_defaults(workers=2, timeout_s=900.0)


def make_data(out: Path, users: int, seed: int) -> tuple[Path, Path]:
    from hstu.data.synthetic import SyntheticOptions, generate

    data = out / "data"
    manifest = data / "manifest.json"
    options = SyntheticOptions(users=users, seed=seed, **SMOKE_DATA)
    if manifest.is_file():
        existing = json.loads(manifest.read_text())
        if existing.get("options") == dataclasses.asdict(options):
            print(f"data: reusing {data} ({existing['splits']['train']['rows']} training rows)")
            return data / "train", data / "eval"
        shutil.rmtree(data)  # made with other settings
    started = time.perf_counter()
    result = generate(options, data)
    print(
        f"data: {result['splits']['train']['rows']} training and "
        f"{result['splits']['eval']['rows']} eval rows in {data} "
        f"({time.perf_counter() - started:.1f} s)"
    )
    return data / "train", data / "eval"


def run(args: argparse.Namespace) -> int:
    from hstu.cli.train import options_from_args, report_error
    from hstu.train.trainer import run_training, summary_text

    if not 1 <= args.users <= 999:
        print("launch.py smoke: --users must be in 1..999 (the smoke recipe's user_id table "
              "has 1000 rows)", file=sys.stderr)
        return 2
    started = time.perf_counter()
    out = Path(args.out).resolve()
    train, evaluation = make_data(out, args.users, args.seed)
    options = options_from_args(args)
    options.overrides = [*SMOKE_SETTINGS, *options.overrides]
    options.train_paths, options.eval_paths = [str(train)], [str(evaluation)]
    options.storage = args.storage or str(out / "runs")
    try:
        result = run_training(options)
    except Exception as error:
        return report_error("smoke", error)
    print("\n== smoke run finished ==")
    print(summary_text(result))
    print(f"total        {time.perf_counter() - started:.0f} s")
    if result.export_note.startswith("export failed"):
        print("launch.py smoke: training worked, the export did not (see above)", file=sys.stderr)
        return 1
    return 0
