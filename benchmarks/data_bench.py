#!/usr/bin/env python3
"""Data benchmarks: KuaiRand conversion and the training input pipeline.

    python benchmarks/data_bench.py [--users 4000] [--raw-rows 1000000] [--json PATH]

Measures, and prints as a table (JSON to --json):
1. `prepare kuairand` on the shared KuaiRand subset and on a larger KuaiRand-format raw log
   made up here: input rows/s and output tokens/s (history + candidate tokens written).
2. The training pipeline on synthetic KuaiRand-27K-shaped samples (`prepare synthetic`, long-
   tailed histories up to 7894, up to 100 candidates): read_samples -> iter_jagged_batches ->
   JaggedBatch, rows/s and tokens/s delivered
   - to 1 consumer, and to 2 consumers reading equal Ray Data shards concurrently (Ray actors
     with 0.5 CPU each, as Ray Train workers would hold on a 2-CPU machine);
   - with token-budget batching (1 consumer);
   - arrow_to_batch alone on in-memory tables (the collation cost without Ray).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARED = REPO.parent / "shared" / "data"
SUBSET_LOG = SHARED / "kuairand27k_like_hate_kcore15" / "processed_standard_kcore_15.csv"
PURE_USERS = SHARED / "kuairand_pure_features" / "user_features_pure.csv"
PURE_VIDEOS = SHARED / "kuairand_pure_features" / "video_features_basic_pure.csv"
RAW_COLUMNS = (
    "user_id",
    "video_id",
    "date",
    "hourmin",
    "time_ms",
    "is_click",
    "is_like",
    "is_follow",
    "is_comment",
    "is_forward",
    "is_hate",
    "long_view",
    "play_time_ms",
    "duration_ms",
    "is_profile_enter",
)


def write_raw_log(path: Path, rows: int, users: int, seed: int = 0) -> None:
    """A KuaiRand-format raw log (comma separated, not time-sorted), made with numpy."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    from hstu.data.synthetic import ACTION_RATES

    rng = np.random.default_rng(seed)
    user_weights = rng.pareto(1.2, users) + 1.0
    user_ids = rng.choice(np.arange(users), rows, p=user_weights / user_weights.sum())
    time_ms = 1_649_376_000_000 + rng.integers(0, 14 * 86_400_000, rows)
    columns = {
        "user_id": user_ids,
        "video_id": (rng.zipf(1.3, rows) % 32_000_000).astype(np.int64),
        "date": np.full(rows, 20220410),
        "hourmin": np.full(rows, 1700),
        "time_ms": time_ms,
        "play_time_ms": rng.integers(0, 60_000, rows),
        "duration_ms": rng.integers(1_000, 120_000, rows),
    }
    for name, rate in ACTION_RATES.items():
        columns[name] = (rng.random(rows) < rate).astype(np.int64)
    pcsv.write_csv(pa.table({name: columns[name] for name in RAW_COLUMNS}), path)


def bench_conversion(name: str, log: Path, work: Path, column_map=(), video_features=None):
    from hstu.data.kuairand import KuaiRandOptions, convert_kuairand

    out = work / f"convert_{name}"
    started = time.perf_counter()
    manifest = convert_kuairand(
        KuaiRandOptions(
            logs=(str(log),),
            user_features=str(PURE_USERS),
            out=str(out),
            overwrite=True,
            column_map=column_map,
            video_features=video_features,
        )
    )
    seconds = time.perf_counter() - started
    rows = manifest["input"]["rows"]
    tokens = sum(s["tokens"] for s in manifest["splits"].values())
    samples = sum(s["rows"] for s in manifest["splits"].values())
    shutil.rmtree(out)
    return {
        "case": f"convert {name}",
        "input_rows": rows,
        "samples": samples,
        "tokens": tokens,
        "seconds": round(seconds, 2),
        "rows_per_s": round(rows / seconds),
        "tokens_per_s": round(tokens / seconds),
    }


def consume(shard, features, labels, batch_size, token_budget, shuffle_buffer, epochs):
    """Drain one shard `epochs` times; per pass: the pipeline's stats, wall time and the time
    to the first batch (Ray starting the read), so that startup is seen apart from the rate."""
    from hstu.data.pipeline import iter_jagged_batches

    batches = iter_jagged_batches(
        shard,
        features,
        labels,
        batch_size=batch_size,
        drop_last=True,
        token_budget=token_budget,
        shuffle_buffer=shuffle_buffer,
        prefetch_batches=4,
    )
    passes = []
    for _ in range(epochs):
        started = time.perf_counter()
        first_at = None
        for _batch in batches:
            if first_at is None:
                first_at = time.perf_counter()
        ended = time.perf_counter()
        stats = batches.stats.as_dict()
        stats["seconds"] = ended - started
        stats["first_batch_s"] = (first_at or ended) - started
        passes.append(stats)
    return passes


def bench_pipeline(
    samples: Path,
    consumers: int,
    batch_size: int,
    token_budget=None,
    shuffle_buffer=None,
    epochs: int = 2,
    num_blocks=None,
):
    import ray

    from hstu.data.pipeline import read_samples, sample_columns
    from hstu.data.schema import sample_specs

    features, labels = sample_specs()
    dataset = read_samples(
        samples / "train", shuffle_files=True, columns=sample_columns(features, labels),
        override_num_blocks=num_blocks,
    )
    shards = dataset.streaming_split(consumers, equal=True)
    remote_consume = ray.remote(num_cpus=0.5)(consume)
    results = ray.get(
        [
            remote_consume.remote(
                shard, features, labels, batch_size, token_budget, shuffle_buffer, epochs
            )
            for shard in shards
        ]
    )
    mode = f"token_budget {token_budget}" if token_budget else f"batch {batch_size} rows"
    if shuffle_buffer:
        mode += f", shuffle buffer {shuffle_buffer}"
    rows = []
    for epoch in range(epochs):
        per_consumer = [passes[epoch] for passes in results]
        # The consumers run concurrently: the pass lasts as long as the slowest one.
        seconds = max(p["seconds"] for p in per_consumer)
        total_rows = sum(p["rows"] for p in per_consumer)
        tokens = sum(p["tokens"] for p in per_consumer)
        rows.append(
            {
                "case": f"pipeline, {consumers} consumer(s), {mode}, epoch {epoch + 1}",
                "rows": total_rows,
                "tokens": tokens,
                "batches": sum(p["batches"] for p in per_consumer),
                "seconds": round(seconds, 2),
                "rows_per_s": round(total_rows / seconds),
                "tokens_per_s": round(tokens / seconds),
                "first_batch_s": [round(p["first_batch_s"], 2) for p in per_consumer],
                "consumer_wait_s": [round(p["wait_s"], 2) for p in per_consumer],
                "dropped_rows": sum(p["dropped_rows"] for p in per_consumer),
            }
        )
    return rows


def bench_collation(samples: Path, batch_size: int):
    import pyarrow.parquet as pq

    from hstu.data.pipeline import arrow_to_batch
    from hstu.data.schema import sample_specs

    features, labels = sample_specs()
    files = sorted((samples / "train").glob("*.parquet"))[:4]
    table = pq.read_table(files)
    tables = [table.slice(i, batch_size) for i in range(0, table.num_rows, batch_size)]
    started = time.perf_counter()
    tokens = 0
    for piece in tables:
        batch = arrow_to_batch(piece, features, labels)
        tokens += batch.num_tokens()
    seconds = time.perf_counter() - started
    return {
        "case": f"arrow_to_batch alone, batch {batch_size} rows",
        "rows": table.num_rows,
        "tokens": tokens,
        "seconds": round(seconds, 2),
        "rows_per_s": round(table.num_rows / seconds),
        "tokens_per_s": round(tokens / seconds),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--users",
        type=int,
        default=4000,
        help="synthetic users for the pipeline runs (KuaiRand-27K has 27285)",
    )
    parser.add_argument(
        "--raw-rows",
        type=int,
        default=1_000_000,
        help="rows of the made-up raw log for the conversion run",
    )
    parser.add_argument("--raw-users", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--token-budget", type=int, default=64_000)
    parser.add_argument("--work", help="scratch directory (default: a temporary one)")
    parser.add_argument("--json", default=str(REPO / "outputs" / "data_bench.json"))
    parser.add_argument("--skip-conversion", action="store_true")
    parser.add_argument("--ray-blocks", action="store_true",
                        help="let Ray Data choose how many blocks to read the files into "
                        "(override_num_blocks=-1) instead of read_samples' one per file")
    args = parser.parse_args()

    import logging

    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work or tempfile.mkdtemp(prefix="data_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    results = []

    if not args.skip_conversion:
        if SUBSET_LOG.exists():
            results.append(
                bench_conversion(
                    "shared subset (41,828 rows)",
                    SUBSET_LOG,
                    work,
                    column_map=(("is_like", "label"), ("is_hate", "1-label")),
                    video_features=str(PURE_VIDEOS),
                )
            )
        raw = work / "raw_log.csv"
        write_raw_log(raw, args.raw_rows, args.raw_users)
        results.append(bench_conversion(f"made-up raw log ({args.raw_rows:,} rows)", raw, work))
        raw.unlink()

    from hstu.data.synthetic import SyntheticOptions, generate

    samples = work / "synthetic"
    started = time.perf_counter()
    # 250 users per file: enough files for the read to run in parallel and split evenly.
    manifest = generate(
        SyntheticOptions(users=args.users, eval_fraction=0.0, users_per_shard=250),
        samples,
        workers=2,
    )
    seconds = time.perf_counter() - started
    train = manifest["splits"]["train"]
    results.append(
        {
            "case": f"prepare synthetic ({args.users:,} users, 2 processes)",
            "rows": train["rows"],
            "tokens": train["tokens"],
            "seconds": round(seconds, 2),
            "rows_per_s": round(train["rows"] / seconds),
            "tokens_per_s": round(train["tokens"] / seconds),
        }
    )

    results.append(bench_collation(samples, args.batch_size))

    import ray
    import ray.data

    # Workers import hstu from this checkout (it may not be pip-installed).
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        logging_level="ERROR",
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    blocks = -1 if args.ray_blocks else None
    results += bench_pipeline(samples, 1, args.batch_size, num_blocks=blocks)
    results += bench_pipeline(samples, 2, args.batch_size, num_blocks=blocks)
    results += bench_pipeline(samples, 2, args.batch_size, shuffle_buffer=256, num_blocks=blocks)
    results += bench_pipeline(samples, 1, 256, token_budget=args.token_budget, num_blocks=blocks)
    ray.shutdown()
    if not args.work:
        shutil.rmtree(work)

    print(
        f"\n{'case':<72} {'rows':>9} {'tokens':>12} {'s':>6} {'rows/s':>8} {'tokens/s':>11}"
        f"  first batch s"
    )
    for r in results:
        rows = r.get("rows", r.get("input_rows"))
        first = ", ".join(f"{x:.1f}" for x in r.get("first_batch_s", []))
        print(
            f"{r['case']:<72} {rows:>9,} {r['tokens']:>12,} {r['seconds']:>6.1f} "
            f"{r['rows_per_s']:>8,} {r['tokens_per_s']:>11,}  {first}"
        )
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "load_average_1m": os.getloadavg()[0],
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "synthetic_manifest": {k: train[k] for k in ("rows", "tokens", "length_histogram")},
        "results": results,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
