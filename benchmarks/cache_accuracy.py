#!/usr/bin/env python3
"""What the incremental cache costs in accuracy: scores of a trained export on real rows,
incremental (stale cache + new actions) against full recomputation.

    python benchmarks/cache_accuracy.py --export_dir EXPORT --data EVAL_PARQUET \
        --new 1 5 10 20 --json cache_accuracy.json

For every row with more than --new actions in its history, the earlier request is the row
cut before its last `new` actions, queried one second before the first of them (a feed
request, then the user acts on `new` items); it fills the cache (incremental mode, no
staleness bound). The row itself, whole, is then scored against that cache, and also by
the export's own program (full recomputation). Reported per `new`: the absolute score
difference over all candidates and tasks (max, mean, 99th percentile) and, per task with both
classes among its labels, the AUC of either set of scores and the largest change in a
candidate's rank within its row.

Exact mode needs no such table: its scores equal full recomputation (tests/export/test_cached.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cut_rows(table: pa.Table, new: int, uih_prefix: str, query_column: str) -> tuple[pa.Table,
                                                                                       pa.Table]:
    """(earlier requests, whole rows) for the rows with more than `new` history actions."""
    rows = table.to_pylist()
    timestamp_column = f"{uih_prefix}action_timestamp"
    keep = [row for row in rows if len(row[timestamp_column]) > new]
    earlier = []
    for row in keep:
        request = dict(row)
        n = len(row[timestamp_column]) - new
        for name, value in row.items():
            if name.startswith(uih_prefix):
                request[name] = value[:n]
        query = int(row[timestamp_column][n]) - 1
        request[query_column] = [query] * len(row[query_column])
        earlier.append(request)
    schema = table.schema
    return pa.Table.from_pylist(earlier, schema=schema), pa.Table.from_pylist(keep, schema=schema)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    import torch

    from hstu.metrics import exact_auc

    return exact_auc(torch.from_numpy(scores), torch.from_numpy(labels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--export_dir", required=True)
    parser.add_argument("--data", required=True, help="a parquet file of sample rows")
    parser.add_argument("--new", type=int, nargs="+", default=[1, 5, 10, 20])
    parser.add_argument("--rows", type=int, default=None, help="use the first N rows only")
    parser.add_argument("--json", dest="json_out", metavar="FILE")
    args = parser.parse_args()

    from hstu.config.loader import load_config_text
    from hstu.export.cached import CachePolicy
    from hstu.export.predict import CachedPredictor, Predictor
    from hstu.tasks import parse_tasks

    predictor = Predictor(args.export_dir)
    config_path = Path(args.export_dir) / "pipeline.config"
    cfg = load_config_text(config_path.read_text(), str(config_path))
    tasks = parse_tasks(cfg.model_config.dlrm_hstu.fusion_mtl_tower)
    table = pq.read_table(args.data)
    if args.rows:
        table = table.slice(0, args.rows)
    uih = predictor.manifest["uih_sequence"] + "__"
    query_column = next(spec.column for spec in predictor.features
                        if spec.sequence == predictor.manifest["candidate_sequence"]
                        and spec.column.endswith("query_time"))
    results = []
    for new in args.new:
        earlier, whole = cut_rows(table, new, uih, query_column)
        full = predictor.predict_table(whole).to_pandas()
        # Keyed by sample_id: a user may have several windows (rows), each its own stream here.
        cached = CachedPredictor(args.export_dir, key_column="sample_id", policy=CachePolicy(
            mode="incremental", max_stale_tokens=1 << 30, max_stale_seconds=1 << 40))
        cached.predict_table(earlier)
        incremental = cached.predict_table(whole).to_pandas()
        summary = cached.cache_summary()
        if summary["reused_stale"] != whole.num_rows:
            raise AssertionError(f"every whole row should extend its earlier request's cache: "
                                 f"{summary}")
        row = dict(new=new, rows=whole.num_rows, tasks={})
        differences = []
        for task in tasks:
            column = f"probs_{task.name}"
            f = np.concatenate([np.asarray(v, dtype=np.float64) for v in full[column]])
            c = np.concatenate([np.asarray(v, dtype=np.float64) for v in incremental[column]])
            differences.append(np.abs(f - c))
            entry = dict(max_abs_diff=float(np.max(np.abs(f - c))))
            label_column = task.label_name
            if label_column in whole.column_names and not task.is_regression:
                labels = np.concatenate([np.asarray(v) for v in whole.column(label_column)
                                         .to_pylist()])
                if task.bitmask:
                    labels = (labels & task.bitmask) != 0
                labels = labels > 0
                if 0 < labels.sum() < labels.size:
                    entry.update(auc_full=auc(f, labels), auc_incremental=auc(c, labels))
            # The ranking inside each request is what serving uses the scores for.
            rank_moves = 0
            for full_row, cached_row in zip(full[column], incremental[column]):
                order_full = np.argsort(np.argsort(-np.asarray(full_row)))
                order_cached = np.argsort(np.argsort(-np.asarray(cached_row)))
                if len(order_full):
                    rank_moves = max(rank_moves, int(np.max(np.abs(order_full - order_cached))))
            entry["max_rank_change_in_row"] = rank_moves
            row["tasks"][task.name] = entry
        all_differences = np.concatenate(differences)
        row.update(max_abs_diff=float(all_differences.max()),
                   mean_abs_diff=float(all_differences.mean()),
                   p99_abs_diff=float(np.quantile(all_differences, 0.99)),
                   candidates=int(all_differences.size // len(tasks)))
        results.append(row)
        print(f"new {new:>3}: {row['rows']} rows, {row['candidates']} candidates, |diff| max "
              f"{row['max_abs_diff']:.2e} mean {row['mean_abs_diff']:.2e} p99 "
              f"{row['p99_abs_diff']:.2e}", flush=True)
        for name, entry in row["tasks"].items():
            aucs = ""
            if "auc_full" in entry:
                aucs = (f" AUC full {entry['auc_full']:.4f} incremental "
                        f"{entry['auc_incremental']:.4f}")
            print(f"    {name:<18} max|diff| {entry['max_abs_diff']:.2e}  max rank change "
                  f"{entry['max_rank_change_in_row']}{aucs}", flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(dict(
            date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            command=" ".join(sys.argv), export_dir=args.export_dir, data=args.data,
            results=results), indent=2) + "\n")


if __name__ == "__main__":
    main()
