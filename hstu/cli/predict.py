"""`launch.py predict`: score sample rows with an export directory (or a checkpoint).

    python launch.py predict --export_dir exports/smoke --data data/smoke/eval \
        --out predictions/smoke_eval.parquet
    python launch.py predict --checkpoint experiments/smoke/<run>/checkpoint_<...> \
        --recipe recipes/smoke.config --data data/smoke/eval --out predictions/ckpt.parquet

    python launch.py predict --export_dir exports/smoke --data requests.parquet \
        --out scores.parquet --cache exact        # request streams: a KV cache per user

Output: one row per input row with sample_id, user_id, the candidate ids (cand_seq__video_id)
and one list column probs_<task> per task, one score per candidate (docs/serving.md).

--cache exact|incremental keeps each user's history keys and values between rows (rows of a
user in request order, each with the user's whole history so far): exact re-encodes whenever
reuse would change a score; incremental appends new actions to the cache and differs from
full scores (docs/serving.md, section 3.1). The cache holds at most --cache-max-mb,
least recently used users evicted first.
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
    cache = parser.add_argument_group("cached scoring (request streams per user)")
    cache.add_argument(
        "--cache",
        choices=("off", "exact", "incremental"),
        default="off",
        help="keep each user's history keys/values between rows: exact (scores equal full "
        "recomputation; the history is re-encoded when it moved) or incremental (new actions "
        "appended to a stale cache: faster, approximate). Default off",
    )
    cache.add_argument("--cache-max-mb", type=int, default=2048,
                       help="memory bound of the cache (default 2048 MiB); least recently used "
                       "users are evicted first")
    cache.add_argument("--cache-max-stale-tokens", type=int, default=64,
                       help="incremental: re-encode after this many appended actions (default 64)")
    cache.add_argument("--cache-max-stale-seconds", type=int, default=3600,
                       help="incremental: re-encode when the query time moved this far from the "
                       "last full encode (default 3600)")
    cache.add_argument("--cache-history-check", choices=("full", "ends"), default="full",
                       help="how a row's history is recognised as the cached one plus new "
                       "actions: full compares every cached action (default), ends only the "
                       "first and last (for streams whose histories only grow at their end; "
                       "an edit inside the cached actions then goes unseen)")
    cache.add_argument("--cache-key", default="user_id",
                       help="input column naming the user (default user_id)")


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
        if args.cache != "off":
            scorer = _cached_scorer(args)
        elif args.export_dir:
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
            FileNotFoundError, CacheOptionError) as error:
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
                **({"cache": summary.cache} if summary.cache is not None else {}),
            },
            indent=2,
        )
    )
    return 0


class CacheOptionError(ValueError):
    """A --cache-* value that cannot work; the message names the option."""


def _cached_scorer(args: argparse.Namespace):
    from hstu.export.cached import CachePolicy
    from hstu.export.predict import CachedPredictor

    for name in ("cache_max_mb", "cache_max_stale_tokens", "cache_max_stale_seconds"):
        value = getattr(args, name)
        if value < (1 if name == "cache_max_mb" else 0):
            option = "--" + name.replace("_", "-")
            raise CacheOptionError(f"{option} must be {'> 0' if name == 'cache_max_mb' else '>= 0'}"
                                   f", got {value}")
    policy = CachePolicy(
        mode=args.cache,
        max_bytes=args.cache_max_mb << 20,
        max_stale_tokens=args.cache_max_stale_tokens,
        max_stale_seconds=args.cache_max_stale_seconds,
        history_check=args.cache_history_check,
    )
    if args.export_dir:
        return CachedPredictor(args.export_dir, policy=policy, key_column=args.cache_key)
    # A checkpoint: the training model's modules serve directly.
    from hstu.config.loader import load_config
    from hstu.export.exporter import reserved_columns
    from hstu.export.serving import ServingModule
    from hstu.train.checkpoint import load_for_inference

    model = load_for_inference(load_config(args.recipe, args.overrides), args.checkpoint,
                               device="cpu")
    model.set_kernel("PYTORCH")
    return CachedPredictor(serving=ServingModule(model).eval(), policy=policy,
                           key_column=args.cache_key, reserved=reserved_columns(model))
