"""`python launch.py prepare kuairand|synthetic ...`: make sample files (see docs/data.md)."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys

from hstu.cli import add_override_argument


def _add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """--recipe / --set / --encoding: write the columns a recipe reads (hstu/data/layout.py)."""
    parser.add_argument(
        "--recipe",
        metavar="CONFIG",
        help="write exactly the columns this pipeline config reads, named and typed as it reads "
        "them (e.g. TorchEasyRec's benchmark config: video_id, item_video_id, ...), checked "
        "against its tables; default: this project's sample schema (docs/data.md)",
    )
    add_override_argument(
        parser, "override a field of --recipe before its layout is planned (repeatable)"
    )
    parser.add_argument(
        "--encoding",
        choices=("list", "string"),
        default="list",
        help="feature sequences as Arrow lists (default) or as strings joined with each "
        "feature's sequence_delim (\"12|884|93\"); labels stay lists (TorchEasyRec reads "
        "labels only as lists); needs --recipe",
    )


def _layout(args: argparse.Namespace):
    """The recipe layout of --recipe (None without it); config errors name file:line:col."""
    if not args.recipe:
        if args.encoding != "list" or args.overrides:
            raise ValueError("--encoding string and --set need --recipe (whose columns to write)")
        return None
    from hstu.config import load_config
    from hstu.data.layout import plan_layout

    cfg = load_config(args.recipe, args.overrides)
    return plan_layout(cfg, args.recipe, args.encoding)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sources = parser.add_subparsers(dest="source", metavar="SOURCE", required=True)

    kuairand = sources.add_parser(
        "kuairand",
        help="convert raw KuaiRand logs into user-window samples",
        description="Convert raw KuaiRand logs (log_standard_*.csv, comma or TAB separated) "
        "plus the user features CSV into user-window samples: OUT/train/, OUT/eval/ parquet "
        "shards, OUT/manifest.json and OUT/profile_codes.json.",
    )
    kuairand.add_argument(
        "--log", nargs="+", required=True, metavar="CSV", help="raw interaction log file(s)"
    )
    kuairand.add_argument(
        "--user-features",
        required=True,
        metavar="CSV",
        help="user features (user_id + the five profile columns)",
    )
    kuairand.add_argument(
        "--video-features",
        metavar="CSV",
        help="video features: adds the MTGR columns (side info, cross features)",
    )
    kuairand.add_argument("--out", required=True, help="output directory")
    kuairand.add_argument(
        "--max-candidates", type=int, default=100, help="candidates per window (default 100)"
    )
    kuairand.add_argument(
        "--max-seq-len",
        type=int,
        default=8000,
        help="the model's max_seq_len: history is capped to "
        "max_seq_len - contextual - max_candidates (default 8000)",
    )
    kuairand.add_argument(
        "--contextual", type=int, default=6, help="contextual tokens per row (default 6)"
    )
    kuairand.add_argument(
        "--candidate-query-time",
        choices=("window_start", "own"),
        default="window_start",
        help="candidates' query time: the window's first interaction time, shared by its "
        "candidates (default; keeps candidates isolated as at serving), or each one's own time",
    )
    kuairand.add_argument(
        "--min-history",
        type=int,
        default=0,
        help="first N interactions of a user are history only (default 0)",
    )
    split = kuairand.add_mutually_exclusive_group()
    split.add_argument(
        "--split-time",
        metavar="TIME",
        help="eval = interactions at/after TIME (epoch seconds or an ISO date/time, UTC)",
    )
    split.add_argument(
        "--eval-fraction",
        type=float,
        default=0.1,
        help="eval = the latest FRACTION of all interactions (default 0.1)",
    )
    kuairand.add_argument(
        "--column-map",
        nargs="+",
        default=[],
        metavar="TARGET=EXPR",
        help="compute a log column from the file's: NAME, 1-NAME or a constant; "
        "e.g. is_like=label is_hate=1-label",
    )
    kuairand.add_argument(
        "--on-bad-rows",
        choices=("error", "skip"),
        default="error",
        help="stop at the first bad row (default) or skip and count bad rows",
    )
    kuairand.add_argument(
        "--video-id-buckets",
        type=int,
        default=None,
        help="video ids modulo this (default 10000000, the recipes' table; with --recipe the "
        "num_buckets of its item table); 0 keeps them",
    )
    kuairand.add_argument(
        "--buckets", type=int, help="user partitions (default: about one per 128 MB of logs)"
    )
    kuairand.add_argument(
        "--workers",
        type=int,
        default=1,
        help="run files and buckets as this many parallel Ray tasks",
    )
    kuairand.add_argument(
        "--overwrite", action="store_true", help="replace OUT/train, OUT/eval and OUT/manifest.json"
    )
    kuairand.add_argument(
        "--keep-buckets",
        action="store_true",
        help="keep OUT/_buckets (pass 1 output) for inspection",
    )
    _add_recipe_arguments(kuairand)

    synthetic = sources.add_parser(
        "synthetic",
        help="generate KuaiRand-27K-shaped samples with a learnable signal",
        description="Generate synthetic user-window samples (docs/data.md says how labels "
        "depend on hidden user/item factors and on the history).",
    )
    synthetic.add_argument("--out", required=True, help="output directory")
    synthetic.add_argument("--users", type=int, required=True,
                           help="users to generate: one training row each, some an eval row too")
    synthetic.add_argument("--seed", type=int, default=0,
                           help="random seed; the same seed gives the same files (default 0)")
    synthetic.add_argument(
        "--max-history",
        type=int,
        default=None,
        help="UIH cap (default 7894 = 8000 - 6 contextual - 100 candidates; with --recipe its "
        "max_seq_len - contextual tokens - --max-candidates)",
    )
    synthetic.add_argument("--median-history", type=int, default=1000,
                           help="median history length; lengths are log-normal (default 1000)")
    synthetic.add_argument("--max-candidates", type=int, default=100,
                           help="candidates per window, at most (default 100)")
    synthetic.add_argument("--items", type=int, default=None,
                           help="distinct items; ids are 1..items (default 1,000,000; with "
                           "--recipe at most its item table's num_buckets - 1)")
    synthetic.add_argument(
        "--eval-fraction",
        type=float,
        default=0.1,
        help="share of users that also get an eval window (default 0.1)",
    )
    synthetic.add_argument(
        "--mtgr", action="store_true", help="add the MTGR columns (cate1/cate2, cross1/cross2)"
    )
    synthetic.add_argument("--users-per-shard", type=int, default=1000,
                           help="users per parquet file (default 1000)")
    synthetic.add_argument(
        "--candidate-query-time",
        choices=("window_start", "own"),
        default="window_start",
        help="candidates' query time: the window's first interaction time, shared by its "
        "candidates (default; keeps candidates isolated as at serving), or each one's own time",
    )
    synthetic.add_argument(
        "--workers",
        type=int,
        default=1,
        help="generate shards in this many processes (same output)",
    )
    synthetic.add_argument(
        "--overwrite", action="store_true", help="replace OUT/train, OUT/eval and OUT/manifest.json"
    )
    _add_recipe_arguments(synthetic)


def parse_time(text: str) -> int:
    """Epoch seconds, or an ISO date/time read as UTC -> int64 seconds."""
    text = text.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--split-time {text!r}: not epoch seconds or an ISO date/time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return int(moment.timestamp())


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    from hstu.config import ConfigError
    from hstu.data.validate import DataError

    try:
        if args.source == "kuairand":
            manifest = _kuairand(args)
        else:
            manifest = _synthetic(args)
    except (ConfigError, DataError, ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"launch.py prepare {args.source}: {error}", file=sys.stderr)
        return 1
    summary = {
        split: {k: v for k, v in info.items() if k in ("rows", "tokens")}
        for split, info in manifest["splits"].items()
    }
    print(
        json.dumps({"out": args.out, "splits": summary, "bad_rows": manifest["bad_rows"]}, indent=2)
    )
    return 0


def _kuairand(args: argparse.Namespace) -> dict:
    from hstu.data.kuairand import KuaiRandOptions, convert_kuairand, parse_column_map

    parse_column_map(args.column_map)  # fail early on a bad mapping
    layout = _layout(args)
    video_id_buckets = args.video_id_buckets
    if video_id_buckets is None:
        # With a recipe, fold ids into its item table (0 if it hashes ids itself, zch);
        # without one, the KuaiRand recipes' 10M table.
        video_id_buckets = 10_000_000 if layout is None else layout.item_id_buckets()
    options = KuaiRandOptions(
        logs=tuple(args.log),
        user_features=args.user_features,
        video_features=args.video_features,
        out=args.out,
        max_candidates=args.max_candidates,
        max_seq_len=args.max_seq_len,
        contextual=args.contextual,
        min_history=args.min_history,
        split_time=parse_time(args.split_time) if args.split_time else None,
        eval_fraction=args.eval_fraction,
        column_map=tuple(tuple(item.split("=", 1)) for item in args.column_map),
        on_bad_rows=args.on_bad_rows,
        buckets=args.buckets,
        video_id_buckets=video_id_buckets,
        workers=args.workers,
        overwrite=args.overwrite,
        keep_buckets=args.keep_buckets,
        candidate_query_time=args.candidate_query_time,
        layout=layout,
    )
    return convert_kuairand(options)


def _synthetic(args: argparse.Namespace) -> dict:
    import os
    import shutil

    from hstu.data.synthetic import SyntheticOptions, generate

    layout = _layout(args)
    items, max_history = args.items, args.max_history
    if layout is not None:
        items, max_history = _fit_recipe(args, layout)
    items = 1_000_000 if items is None else items
    max_history = 7894 if max_history is None else max_history
    targets = [os.path.join(args.out, n) for n in ("train", "eval", "manifest.json")]
    existing = [t for t in targets if os.path.exists(t)]
    if existing and not args.overwrite:
        raise FileExistsError(
            f"{args.out} already holds {', '.join(existing)}; pass --overwrite to replace"
        )
    for target in existing:
        shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
    options = SyntheticOptions(
        users=args.users,
        seed=args.seed,
        max_history=max_history,
        median_history=min(args.median_history, max_history),
        max_candidates=args.max_candidates,
        items=items,
        # About five items per cluster at least, so small worlds (smoke runs) keep a signal.
        clusters=min(200, max(1, items // 5)),
        eval_fraction=args.eval_fraction,
        mtgr=args.mtgr,
        users_per_shard=args.users_per_shard,
        candidate_query_time=args.candidate_query_time,
    )
    return generate(options, args.out, workers=args.workers, layout=layout)


def _fit_recipe(args: argparse.Namespace, layout) -> tuple[int | None, int | None]:
    """--items and --max-history defaults that fit the recipe, and a clear error before any
    work when --items or --users cannot fit its tables (ids are 1..items and 1..users)."""
    items, max_history = args.items, args.max_history
    item_buckets = layout.item_id_buckets()
    if item_buckets:
        if items is None:
            items = min(1_000_000, item_buckets - 1)
        elif items >= item_buckets:
            raise ValueError(
                f"--items {items} gives ids up to {items}, but {args.recipe}'s item table has "
                f"num_buckets {item_buckets}: pass --items {item_buckets - 1} or less"
            )
    user = layout.user_table()
    if user is not None and user.num_buckets and args.users >= user.num_buckets:
        raise ValueError(
            f"--users {args.users} gives user ids up to {args.users}, but {args.recipe}'s "
            f"{user.column!r} table has num_buckets {user.num_buckets}: pass --users "
            f"{user.num_buckets - 1} or less"
        )
    if max_history is None:
        room = layout.max_seq_len - layout.contextual_tokens - args.max_candidates
        max_history = max(1, room)
    return items, max_history
