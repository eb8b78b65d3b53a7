#!/usr/bin/env python3
"""Training-step throughput of DlrmHSTU, per kernel and number of workers.

    python benchmarks/train_bench.py                       # CPU: reduced shape, PYTORCH kernel
    python benchmarks/train_bench.py --device cuda --kernels TRITON PYTORCH --workers 1 \\
        --batch-size 32 --max-history 7894 --table-rows 0   # GPU: the 27K benchmark shape

One training step is what `launch.py train` runs per batch: TorchRec-sharded embeddings (the
planner + DistributedModelParallel of hstu/train/sharding.py) with the fused sparse optimizer,
forward, the multi-task loss, backward and the dense optimizer step; bf16 autocast on GPU when
the recipe's train_config.mixed_precision asks. Batches are synthetic and KuaiRand-27K-shaped
(hstu.data.synthetic: long-tailed histories up to --max-history, median --median-history, up
to 100 candidates), pre-collated, so the input pipeline is not measured (see data_bench.py).

Several workers run as separate processes (torch.multiprocessing, gloo on CPU, NCCL on GPU),
each with its own batches; no Ray and no MLflow are needed, only torch, torchrec, fbgemm-gpu
and this package (its config loader needs protobuf and grpcio-tools).

Reported per case: step time (median), samples/s and tokens/s (global: all workers' rows per
step over the step time), and achieved model TFLOP/s = 3 x the encoder's forward FLOPs of the
batch (hstu.model.model_summary's per-token linear FLOPs and per-row attention FLOPs, causal
half, summed over the rows' real lengths) / step time. The factor 3 counts backward as twice
forward; embedding lookups, the item tower and the fusion tower are not counted.

Prints a table and writes JSON (--json, default outputs/train_bench.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "kuairand_dlrm_hstu.config"))
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="FIELD=VALUE", help="config override (repeatable)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--kernels", nargs="+", default=None,
                        help="default: PYTORCH on CPU, TRITON and PYTORCH on GPU")
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=2, help="rows per worker per step")
    parser.add_argument("--max-history", type=int, default=1000,
                        help="UIH cap (27K benchmark: 7894); the CPU default is reduced")
    parser.add_argument("--median-history", type=int, default=None,
                        help="default: min(1000, max-history / 2)")
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--table-rows", type=int, default=1_000_000,
                        help="cap every table at this many rows (0: the recipe's sizes, 10M x "
                        "256 for the two big tables; too large for the CPU machine's memory)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batches", type=int, default=4, help="distinct batches per worker")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=str(REPO / "outputs" / "train_bench.json"))
    args = parser.parse_args(argv)
    if args.table_rows < 0 or 0 < args.table_rows <= 1000:
        parser.error(f"--table-rows {args.table_rows}: the synthetic item ids need tables of "
                     "more than 1000 rows (0 keeps the recipe's sizes)")
    if args.kernels is None:
        args.kernels = ["PYTORCH"] if args.device == "cpu" else ["TRITON", "PYTORCH"]
    if args.median_history is None:
        args.median_history = max(1, min(1000, args.max_history // 2))
    return args


def load_bench_config(args, kernel: str):
    from hstu.config.loader import load_config

    cfg = load_config(args.recipe, [*args.overrides, f"model_config.kernel={kernel}"])
    if args.table_rows:
        # Shrink the big tables (lookup cost barely depends on a table's size, memory does).
        for feature in _id_features(cfg):
            feature.num_buckets = min(feature.num_buckets, args.table_rows)
    return cfg


def _id_features(cfg):
    for config in cfg.feature_configs:
        which = config.WhichOneof("feature")
        inner = getattr(config, which)
        if which == "sequence_feature":
            for sub in inner.features:
                if sub.WhichOneof("feature") == "id_feature":
                    yield sub.id_feature
        elif which in ("id_feature", "sequence_id_feature"):
            yield inner


def make_batches(args, cfg, rank: int):
    """Pre-collated JaggedBatches of synthetic 27K-shaped rows, distinct per rank."""
    import pyarrow as pa

    from hstu.config.features import feature_specs, label_specs
    from hstu.data.pipeline import arrow_to_batch
    from hstu.data.synthetic import SyntheticOptions, generate_shard, make_world

    rows = args.batch_size * args.batches
    # Item ids must fit the smallest item-sized table (the small tables are user attributes).
    item_tables = [f.num_buckets for f in _id_features(cfg) if f.num_buckets > 1000]
    if not item_tables:
        raise ValueError(f"{args.recipe}: no id table has more than 1000 rows for the "
                         "synthetic item ids")
    items = min(1_000_000, min(item_tables) - 1)
    options = SyntheticOptions(
        users=rows * max(args.workers),
        seed=args.seed,
        max_history=args.max_history,
        median_history=args.median_history,
        max_candidates=args.candidates,
        items=items,
        eval_fraction=0.0,
        users_per_shard=rows,
    )
    table, _ = generate_shard(options, make_world(options), rank)["train"]
    features, labels = feature_specs(cfg), label_specs(cfg)
    assert isinstance(table, pa.Table)
    return [
        arrow_to_batch(table.slice(i * args.batch_size, args.batch_size), features, labels)
        for i in range(args.batches)
    ]


def flops_model(cfg):
    """(forward encoder FLOPs of one row of N tokens) as a function of N, from model_summary."""
    from hstu.model import model_summary

    n0 = 1024
    summary = model_summary(cfg, seq_len=n0)
    linear_per_token = summary["encoder_linear_flops_per_token"]
    attention_coeff = (summary["encoder_flops_per_sample"] - linear_per_token * n0) / n0**2
    return lambda n: linear_per_token * n + attention_coeff * n * n


def worker(rank: int, world: int, args, kernel: str, init_file: str, out_file: str) -> None:
    import torch
    import torch.distributed as dist
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    from hstu.config.features import feature_specs, label_specs
    from hstu.model import DlrmHSTU
    from hstu.train.loop import autocast_for
    from hstu.train.optimizers import build_dense_optimizer, sparse_optimizer_spec
    from hstu.train.sharding import shard_model

    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        # Share the cores as Ray Train does (one CPU per worker and as many threads).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    torch.manual_seed(args.seed)
    cfg = load_bench_config(args, kernel)
    train_cfg = cfg.train_config
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = bool(train_cfg.cuda_matmul_allow_tf32)
    features, labels = feature_specs(cfg), label_specs(cfg)
    model = DlrmHSTU(cfg, features, labels, embedding_device=torch.device("meta"))
    spec = sparse_optimizer_spec(train_cfg.sparse_optimizer, device)
    apply_optimizer_in_backward(spec.optimizer_class, model.embedding_collection.parameters(),
                                dict(spec.kwargs))
    sharded = shard_model(model, device, world_size=world, local_world_size=world,
                          batch_size=args.batch_size)
    dmp, module = sharded.model, sharded.model.module
    dense = build_dense_optimizer(train_cfg.dense_optimizer,
                                  in_backward_optimizer_filter(dmp.named_parameters()))
    autocast = autocast_for(train_cfg.mixed_precision, device)
    batches = [b.to(device) for b in make_batches(args, cfg, rank)]
    contextual = len(module.groups.get("contextual", []))
    row_flops = flops_model(cfg)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times, rows, tokens, flops, losses = [], [], [], [], []
    dmp.train()
    for step in range(args.warmup + args.steps):
        batch = batches[step % len(batches)]
        sync()
        dist.barrier()
        started = time.perf_counter()
        with autocast():
            output = dmp(batch)
            total, _ = module.compute_losses(output, batch)
        dense.zero_grad()
        total.backward()
        dense.step()
        sync()
        elapsed = time.perf_counter() - started
        # A fast step that trains on NaN is no result: read the loss after the timed region.
        losses.append(float(total.detach()))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"{kernel}: rank {rank} step {step}: loss {losses[-1]}")
        if step >= args.warmup:
            lengths = sum(batch.seq_lengths.values()).cpu() + contextual
            times.append(elapsed)
            rows.append(batch.batch_size)
            tokens.append(int(lengths.sum()))
            flops.append(3.0 * sum(row_flops(int(n)) for n in lengths))
    # Global figures: the slowest rank's time, every rank's work.
    local = torch.tensor([statistics.median(times), sum(rows) / len(rows),
                          sum(tokens) / len(tokens), sum(flops) / len(flops)], dtype=torch.float64,
                         device=device)
    gathered = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    gathered = [g.cpu() for g in gathered]
    if rank == 0:
        step_s = max(float(g[0]) for g in gathered)
        result = {
            "kernel": kernel,
            "workers": world,
            "device": args.device,
            "step_ms": round(step_s * 1000, 1),
            "samples_per_s": sum(float(g[1]) for g in gathered) / step_s,
            "tokens_per_s": sum(float(g[2]) for g in gathered) / step_s,
            "model_tflops": sum(float(g[3]) for g in gathered) / step_s / 1e12,
            "tokens_per_step": sum(float(g[2]) for g in gathered),
            "torch_threads_per_worker": torch.get_num_threads(),
            "rank0_losses": [round(loss, 5) for loss in losses],
            "plan": sharded.tables,
            "peak_gpu_mem_gb": (torch.cuda.max_memory_allocated(device) / 2**30
                                if device.type == "cuda" else None),
        }
        Path(out_file).write_text(json.dumps(result))
    dist.destroy_process_group()


def run_case(args, kernel: str, workers: int) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "result.json")
        mp.spawn(worker, args=(workers, args, kernel, init_file, out_file), nprocs=workers,
                 join=True)
        return json.loads(Path(out_file).read_text())


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu" and any(k != "PYTORCH" for k in args.kernels):
        os.environ.setdefault("TRITON_INTERPRET", "1")
        print("note: Triton kernels on CPU run in the interpreter (very slow)", file=sys.stderr)
    started = datetime.datetime.now()
    results = []
    for kernel in args.kernels:
        for workers in args.workers:
            print(f"running {kernel} x {workers} worker(s) ...", flush=True)
            results.append(run_case(args, kernel, workers))
    header = ("kernel", "workers", "step ms", "samples/s", "tokens/s", "model TFLOP/s",
              "tokens/step")
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for r in results:
        lines.append(" | ".join([
            r["kernel"], str(r["workers"]), f"{r['step_ms']:.1f}", f"{r['samples_per_s']:.2f}",
            f"{r['tokens_per_s']:,.0f}", f"{r['model_tflops']:.4f}", f"{r['tokens_per_step']:,.0f}",
        ]))
    print("\n".join(lines))
    report = {
        "command": "python benchmarks/train_bench.py " + " ".join(argv or sys.argv[1:]),
        "date": started.isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_average": os.getloadavg()},
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "results": results,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
