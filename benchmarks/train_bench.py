#!/usr/bin/env python3
"""Training-step throughput of DlrmHSTU, per kernel and number of workers.

    python benchmarks/train_bench.py                       # CPU: reduced shape, PYTORCH kernel
    python benchmarks/train_bench.py --device cuda --kernels TRITON PYTORCH --workers 1 \\
        --batch-size 32 --max-history 7894 --table-rows 0   # GPU: the 27K benchmark shape

One training step is hstu.train.step.train_step, the function `launch.py train` runs per batch,
after the same host-to-device copy of the batch: TorchRec-sharded embeddings (the planner +
DistributedModelParallel of hstu/train/sharding.py) with the fused sparse optimizer, forward,
the multi-task loss, backward and the dense optimizer step; bf16 autocast on GPU when the
recipe's train_config.mixed_precision asks. Batches are synthetic and KuaiRand-27K-shaped
(hstu.data.synthetic: long-tailed histories up to --max-history, median --median-history, up
to 100 candidates), collated beforehand into pinned host memory: the Ray Data pipeline is not
measured here (data_bench.py, and a `launch.py train` run beside this one, measure it). Cases:
--batch-size rows per step, or rows packed to --token-budget tokens per step (the rule of the
data pipeline's token packing).

Several workers run as separate processes (torch.multiprocessing, gloo on CPU, NCCL on GPU),
each with its own batches; no Ray and no MLflow are needed, only torch, torchrec, fbgemm-gpu
and this package (its config loader needs protobuf and grpcio-tools).

Reported per case: step time (median of steps timed one by one, the GPU idle at each start),
the time per step of the same steps run back to back as the training loop runs them (no
read-back between steps, so the host queues the next step while the GPU runs this one), samples/s and tokens/s (global: all workers' rows per
step over the step time), model TFLOP/s (hstu.train.flops: STU matmuls, attention counted as
TorchEasyRec's benchmark does, every other dense matmul including the item and fusion towers;
3 x forward) and MFU per GPU against --peak-tflops (989: H100/H200 SXM dense bf16) and against
a bf16 matmul measured in the same process. On GPU, a torch.profiler window of
--profile-steps steps on rank 0's GPU splits the GPU time per step into attention, matmuls,
embedding lookups + their fused optimizer, other (memory-bound) kernels, communication (NCCL)
and idle, and counts kernel launches and host synchronisations per step
(hstu.train.profiling); with several workers those columns are rank 0's.

Several workers: by default each has its own batches of --batch-size rows (weak scaling: the
table's "vs 1 worker" is tokens/s per worker over the 1-worker run's); --split-global splits
the same global batches over the workers instead, and the report compares each run's losses
(and with --eval-batches its eval AUCs) with the fewest-worker run's.

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
    parser.add_argument("--batch-size", type=int, nargs="+", default=[2],
                        help="rows per worker per step (one case each)")
    parser.add_argument("--token-budget", type=int, nargs="+", default=[0],
                        help="also pack rows to this many tokens per worker per step (the data "
                        "pipeline's rule; 0: by --batch-size rows); one case each")
    parser.add_argument("--max-rows", type=int, default=512,
                        help="with --token-budget: the most rows a packed batch may hold")
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
    parser.add_argument("--eval-batches", type=int, default=0,
                        help="with --split-global: after the timed steps, evaluate (the trainer's "
                        "evaluation: per-task AUC, NE, losses) on this many more global batches")
    parser.add_argument("--sharding", action="append", default=[], metavar="TABLE=TYPE[,TYPE]",
                        help="restrict a table's sharding types, as launch.py train --sharding "
                        "(repeatable; default: the planner's choice)")
    parser.add_argument("--split-global", action="store_true",
                        help="--batch-size is the whole step's rows, split evenly over the "
                        "workers (the same global batches for every --workers count: losses "
                        "comparable step by step; set the dropout ratios to 0 for that). "
                        "Default: --batch-size rows per worker, distinct per worker (weak "
                        "scaling)")
    parser.add_argument("--profile-steps", type=int, default=3,
                        help="GPU: profile this many steps after the timed ones (0: off)")
    parser.add_argument("--trace", action="store_true",
                        help="GPU: write the profiled steps' chrome trace beside the JSON")
    parser.add_argument("--find-syncs", action="store_true",
                        help="GPU: run one more step in torch's CUDA sync debug mode and list "
                        "the code that made the host wait for the GPU")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="GPU: the encoder and towers from CUDA graphs per batch-shape bucket "
                        "(launch.py train --cuda-graphs); captures happen in the warm-up steps, "
                        "so give --warmup at least --batches")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="dense bf16 peak for MFU (H100 and H200 SXM: 989)")
    parser.add_argument("--json", default=str(REPO / "outputs" / "train_bench.json"))
    args = parser.parse_args(argv)
    if args.table_rows < 0 or 0 < args.table_rows <= 1000:
        parser.error(f"--table-rows {args.table_rows}: the synthetic item ids need tables of "
                     "more than 1000 rows (0 keeps the recipe's sizes)")
    if args.kernels is None:
        args.kernels = ["PYTORCH"] if args.device == "cpu" else ["TRITON", "PYTORCH"]
    if args.median_history is None:
        args.median_history = max(1, min(1000, args.max_history // 2))
    from hstu.train.sharding import ShardingError, parse_sharding_overrides

    try:
        args.sharding_overrides = parse_sharding_overrides(args.sharding)
    except ShardingError as error:
        parser.error(str(error))
    if args.eval_batches < 0:
        parser.error(f"--eval-batches {args.eval_batches}: must be >= 0")
    if args.eval_batches and not args.split_global:
        parser.error("--eval-batches needs --split-global (the same eval rows for every --workers)")
    if args.split_global:
        if any(args.token_budget):
            parser.error("--split-global splits rows (--batch-size), not --token-budget")
        uneven = [(rows, w) for rows in args.batch_size for w in args.workers if rows % w]
        if uneven:
            parser.error(f"--split-global: {uneven[0][0]} rows do not split evenly over "
                         f"{uneven[0][1]} workers")
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


def make_batches(args, cfg, rank: int, case: dict, contextual_tokens: int, world: int = 1):
    """Host JaggedBatches of synthetic 27K-shaped rows, distinct per rank: `case["rows"]` rows
    each, or packed to `case["token_budget"]` tokens (at most `case["rows"]` rows). With
    --split-global: rank's share of global batches of `case["rows"]` rows, the same global
    batches for any world size, --batches of them and then --eval-batches more."""
    import pyarrow as pa

    from hstu.config.features import feature_specs, label_specs
    from hstu.data.pipeline import arrow_to_batch
    from hstu.data.synthetic import SyntheticOptions, generate_shard, make_world

    budget = case["token_budget"]
    if budget:
        # Enough rows for --batches packed batches at the mean row length (~1.5x margin).
        mean_tokens = args.median_history * 1.6 + args.candidates / 2
        rows = int(args.batches * budget / mean_tokens * 1.5) + case["rows"]
    else:
        rows = case["rows"] * (args.batches + args.eval_batches)
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
    # Split: every rank draws the same rows (shard 0) and takes its share of each batch.
    table, _ = generate_shard(options, make_world(options), 0 if args.split_global else rank)[
        "train"]
    features, labels = feature_specs(cfg), label_specs(cfg)
    assert isinstance(table, pa.Table)
    if args.split_global:
        share = case["rows"] // world
        return [arrow_to_batch(table.slice(i * case["rows"] + rank * share, share), features,
                               labels) for i in range(args.batches + args.eval_batches)]
    if budget:
        length_columns = {}
        for spec in features:
            if spec.sequence is not None:
                length_columns.setdefault(spec.sequence, spec.column)
        slices = pack_by_tokens(table, budget, case["rows"],
                                {column: "|" for column in length_columns.values()},
                                contextual_tokens)
        if len(slices) < args.batches:
            raise ValueError(f"only {len(slices)} packed batches from {table.num_rows} rows")
        slices = slices[: args.batches]
    else:
        slices = [(i * case["rows"], case["rows"]) for i in range(args.batches)]
    return [arrow_to_batch(table.slice(start, take), features, labels) for start, take in slices]


def pack_by_tokens(table, budget: int, max_rows: int, length_columns,
                   contextual_tokens: int = 0) -> list:
    """Row slices of `table` packed as the data pipeline packs batches by cost
    (data_config.batch_cost_size; a row's cost = contextual + history + candidate tokens;
    hstu.data.pipeline.pack_slices). The last, unfilled batch is dropped (as drop_last does)."""
    from hstu.data.pipeline import pack_slices, row_tokens

    tokens = row_tokens(table, length_columns) + contextual_tokens
    slices, _ = pack_slices(tokens, budget, max_rows)
    return slices


def measure_matmul_tflops(device) -> float:
    """bf16 dense matmul TFLOP/s on this GPU now (8192^3, median of 20 after warm-up): the
    practical ceiling beside the datasheet peak, taken in the same run as the step."""
    import torch

    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / statistics.median(times) / 1e12


def worker(rank: int, world: int, args, kernel: str, case: dict, init_file: str,
           out_file: str) -> None:
    import torch
    import torch.distributed as dist

    from hstu.config.features import feature_specs, label_specs
    from hstu.train.flops import measure_step_flops
    from hstu.train.loop import autocast_for
    from hstu.train.step import train_step
    from hstu.train.trainable import build_trainable

    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        # Share the cores as Ray Train does (one CPU per worker and as many threads).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    matmul_tflops = measure_matmul_tflops(device) if device.type == "cuda" else None
    torch.manual_seed(args.seed)
    cfg = load_bench_config(args, kernel)
    train_cfg = cfg.train_config
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = bool(train_cfg.cuda_matmul_allow_tf32)
    features, labels = feature_specs(cfg), label_specs(cfg)
    # The trainer's own construction (planner, fused sparse optimizer, dense optimizer).
    trainable = build_trainable(cfg, features, labels, device, world_size=world,
                                local_world_size=world,
                                batch_size=case["rows"] // (world if args.split_global else 1),
                                sharding=args.sharding_overrides, table_seed=args.seed)
    sharded, dmp, module = trainable.sharded, trainable.model, trainable.module
    dense = trainable.dense_optimizer
    autocast = autocast_for(train_cfg.mixed_precision, device)
    # Host batches in pinned memory, copied to the GPU inside each step as the loop does.
    contextual = int(module.encoder.preprocessor.contextual_seq_len)
    host_batches = make_batches(args, cfg, rank, case, contextual, world)
    eval_batches = host_batches[args.batches:]
    host_batches = host_batches[: args.batches]
    if device.type == "cuda":
        host_batches = [b.pin_memory() for b in host_batches]
    step_flops = [measure_step_flops(dmp, module, b.to(device), autocast) for b in host_batches]
    if args.cuda_graphs:
        # After the FLOP count, which must see the ops that a replay would hide.
        module.use_cuda_graphs()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run_step(index: int):
        batch = host_batches[index % len(host_batches)].to(device, non_blocking=True)
        return train_step(dmp, module, dense, batch, autocast)

    times, rows, tokens, flops, losses = [], [], [], [], []
    dmp.train()
    for step in range(args.warmup + args.steps):
        index = step % len(host_batches)
        batch = host_batches[index]
        sync()
        dist.barrier()
        started = time.perf_counter()
        total, _ = run_step(index)
        sync()
        elapsed = time.perf_counter() - started
        # A fast step that trains on NaN is no result: read the loss after the timed region.
        # The step's loss over all workers: the mean of their globally scaled losses.
        total = total.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total) / world)
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"{kernel}: rank {rank} step {step}: loss {losses[-1]}")
        if step >= args.warmup:
            times.append(elapsed)
            rows.append(batch.batch_size)
            tokens.append(batch.num_tokens(contextual_tokens=contextual))
            flops.append(step_flops[index].training_step)
    evaluation = None
    if eval_batches:
        from hstu.train.evaluation import evaluate

        evaluation = evaluate(dmp, module, eval_batches, device=device, autocast=autocast)
    # The same steps back to back, as the training loop runs them (it reads no value back
    # inside a step): the host queues step i+1 while the GPU still runs step i, so the time
    # per step loses the start-up gap the isolated timing above includes.
    sync()
    dist.barrier()
    started = time.perf_counter()
    back_to_back = [run_step(step % len(host_batches))[0] for step in range(args.steps)]
    sync()
    back_to_back_s = (time.perf_counter() - started) / args.steps
    if not all(math.isfinite(float(loss)) for loss in back_to_back):
        raise FloatingPointError(f"{kernel}: rank {rank}: a non-finite loss back to back")
    back_to_back_flops = sum(step_flops[step % len(host_batches)].training_step
                             for step in range(args.steps)) / args.steps
    profile = None
    if device.type == "cuda" and args.profile_steps and rank == 0:
        from hstu.train.profiling import profile_steps

        counter = iter(range(10**9))
        trace = (str(Path(args.json).with_name(f"train_trace_{case['label']}.json"))
                 if args.trace else None)
        profile = profile_steps(lambda: run_step(next(counter)), args.profile_steps, device,
                                trace_path=trace)
    sync_sites = None
    if device.type == "cuda" and args.find_syncs and rank == 0:
        sync_sites = find_host_syncs(lambda: run_step(0))
    # Global figures: the slowest rank's time, every rank's work.
    local = torch.tensor([statistics.median(times), sum(rows) / len(rows),
                          sum(tokens) / len(tokens), sum(flops) / len(flops), back_to_back_s,
                          back_to_back_flops], dtype=torch.float64, device=device)
    gathered = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    gathered = [g.cpu() for g in gathered]
    if rank == 0:
        step_s = max(float(g[0]) for g in gathered)
        model_tflops = sum(float(g[3]) for g in gathered) / step_s / 1e12
        per_gpu_tflops = model_tflops / world
        back_to_back_step_s = max(float(g[4]) for g in gathered)
        back_to_back_tflops = (sum(float(g[5]) for g in gathered) / back_to_back_step_s
                               / 1e12 / world)
        split = step_flops[0]
        result = {
            "kernel": kernel,
            "workers": world,
            "device": args.device,
            "case": case["label"],
            "step_ms": round(step_s * 1000, 2),
            "rows_per_step": sum(float(g[1]) for g in gathered),
            "samples_per_s": sum(float(g[1]) for g in gathered) / step_s,
            "tokens_per_s": sum(float(g[2]) for g in gathered) / step_s,
            "model_tflops": model_tflops,
            "tokens_per_step": sum(float(g[2]) for g in gathered),
            "flops_split_first_batch": {"stu_linear": split.stu_linear,
                                        "attention": split.attention,
                                        "other_matmuls": split.other_matmuls},
            "mfu_vs_peak": per_gpu_tflops / args.peak_tflops if device.type == "cuda" else None,
            # Back to back (the training loop's pace): per step over args.steps steps.
            "back_to_back_step_ms": round(back_to_back_step_s * 1000, 2),
            "back_to_back_mfu_vs_peak": (back_to_back_tflops / args.peak_tflops
                                         if device.type == "cuda" else None),
            "peak_tflops": args.peak_tflops,
            "matmul_tflops_same_run": matmul_tflops,
            "mfu_vs_matmul": per_gpu_tflops / matmul_tflops if matmul_tflops else None,
            "torch_threads_per_worker": torch.get_num_threads(),
            # The mean over workers of each step's (globally scaled) loss, warm-up included.
            "losses": [round(loss, 6) for loss in losses],
            "split_global": args.split_global,
            "evaluation": evaluation,
            "plan": sharded.tables,
            "peak_gpu_mem_gb": (torch.cuda.max_memory_allocated(device) / 2**30
                                if device.type == "cuda" else None),
            "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "versions": versions(),
        }
        if module.graphed_scoring is not None:
            result["cuda_graphs"] = dict(module.graphed_scoring.stats)
        if sync_sites is not None:
            result["host_sync_sites"] = sync_sites
        if profile is not None:
            result["profile"] = profile.as_dict()
            result["gpu_busy_fraction"] = profile.busy_fraction_of(step_s * 1000)
        Path(out_file).write_text(json.dumps(result))
    dist.destroy_process_group()


def find_host_syncs(step) -> list[dict]:
    """Runs one step with torch's CUDA sync debug mode on and returns where the host waited for
    the GPU: each synchronising call's innermost frame in this repository (or the library
    frame, when none is ours), with how often it fired."""
    import traceback
    import warnings

    import torch

    sites: dict[str, int] = {}

    def remember(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        # Called where the synchronising op ran: the stack shows who asked for it.
        frames = traceback.extract_stack()[:-1]
        ours = [f for f in frames
                if str(REPO) in f.filename and "train_bench.py" not in f.filename]
        frame = ours[-1] if ours else frames[-1]
        where = (f"{frame.filename.replace(str(REPO) + '/', '')}:{frame.lineno} "
                 f"{frame.name}: {frame.line}")
        sites[where] = sites.get(where, 0) + 1

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        original, warnings.showwarning = warnings.showwarning, remember
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = original
    return [{"site": site, "count": count}
            for site, count in sorted(sites.items(), key=lambda item: -item[1])]


def versions() -> dict:
    import importlib.metadata as metadata

    found = {}
    for name in ("torch", "triton", "fbgemm-gpu", "fbgemm-gpu-cpu", "torchrec"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    import torch

    found["cuda"] = torch.version.cuda
    return found


def run_case(args, kernel: str, workers: int, case: dict) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "result.json")
        mp.spawn(worker, args=(workers, args, kernel, case, init_file, out_file),
                 nprocs=workers, join=True)
        return json.loads(Path(out_file).read_text())


def cases_of(args) -> list[dict]:
    cases = []
    for budget in args.token_budget:
        if budget:
            cases.append({"label": f"tokens{budget}", "rows": args.max_rows,
                          "token_budget": budget})
        else:
            for rows in args.batch_size:
                cases.append({"label": f"rows{rows}", "rows": rows, "token_budget": 0})
    return cases


def scaling_efficiency(result: dict, results: list[dict]) -> float | None:
    """Tokens/s per worker over the one-worker run's of the same kernel and case (weak scaling:
    each worker its own batches of the same size); None without such a run or with
    --split-global (the step's rows are split, so per-worker work shrinks with the workers)."""
    if result.get("split_global"):
        return None
    single = [r for r in results if r["workers"] == 1 and r["kernel"] == result["kernel"]
              and r["case"] == result["case"]]
    if not single:
        return None
    return result["tokens_per_s"] / result["workers"] / single[0]["tokens_per_s"]


def loss_differences(results: list[dict]) -> list[str]:
    """With --split-global: each run's losses against the fewest-worker run of the same kernel
    and case (the same global batches), as the largest step-wise difference."""
    lines = []
    for r in results:
        if not r.get("split_global"):
            continue
        same = [o for o in results if o["kernel"] == r["kernel"] and o["case"] == r["case"]]
        first = min(same, key=lambda o: o["workers"])
        if first is r:
            continue
        diffs = [abs(a - b) for a, b in zip(r["losses"], first["losses"])]
        rel = [d / max(abs(b), 1e-12) for d, b in zip(diffs, first["losses"])]
        lines.append(f"{r['kernel']} {r['case']}: {r['workers']} workers against "
                     f"{first['workers']}: losses differ by at most {max(diffs):.3g} "
                     f"({100 * max(rel):.3g}%) over {len(diffs)} steps")
        if r.get("evaluation") and first.get("evaluation"):
            # Tasks without both classes among the eval candidates have no AUC (NaN).
            gaps = {key[len("eval/auc/"):]: abs(r["evaluation"][key] - value)
                    for key, value in first["evaluation"].items()
                    if key.startswith("eval/auc/") and math.isfinite(value)
                    and math.isfinite(r["evaluation"].get(key, math.nan))}
            if gaps:
                task, gap = max(gaps.items(), key=lambda item: item[1])
                lines.append(f"    eval AUC differs by at most {gap:.2g} ({task}) over the "
                             f"{len(gaps)} tasks with an AUC, "
                             f"{first['evaluation']['eval/candidates']:.0f} candidates")
    return lines


def print_table(results: list[dict]) -> None:
    header = ("kernel", "workers", "case", "rows", "tokens/step", "step ms", "samples/s",
              "tokens/s", "tokens/s per worker", "vs 1 worker", "model TFLOP/s", "MFU",
              "vs matmul", "GPU busy", "communication ms", "launches", "syncs",
              "back-to-back ms", "back-to-back MFU")
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for r in results:
        profile = r.get("profile") or {}

        def pct(value):
            return "-" if value is None else f"{100 * value:.1f}%"

        communication = (profile.get("category_ms") or {}).get("communication")

        lines.append(" | ".join([
            r["kernel"], str(r["workers"]), r["case"], f"{r['rows_per_step']:.0f}",
            f"{r['tokens_per_step']:,.0f}", f"{r['step_ms']:.1f}", f"{r['samples_per_s']:.1f}",
            f"{r['tokens_per_s']:,.0f}", f"{r['tokens_per_s'] / r['workers']:,.0f}",
            pct(scaling_efficiency(r, results)), f"{r['model_tflops']:.2f}",
            pct(r["mfu_vs_peak"]), pct(r["mfu_vs_matmul"]), pct(r.get("gpu_busy_fraction")),
            "-" if communication is None else f"{communication:.2f}",
            f"{profile['launches_per_step']:.0f}" if profile else "-",
            f"{profile['host_syncs_per_step']:.1f}" if profile else "-",
            f"{r['back_to_back_step_ms']:.1f}", pct(r["back_to_back_mfu_vs_peak"]),
        ]))
    print("\n".join(lines + loss_differences(results)))
    for r in results:
        profile = r.get("profile")
        if not profile:
            continue
        split = ", ".join(f"{name} {ms:.2f}" for name, ms in profile["category_ms"].items())
        print(f"{r['kernel']} {r['case']}: GPU ms per step: {split}, idle "
              f"{max(r['step_ms'] - profile['busy_ms'], 0):.2f} (step {r['step_ms']:.2f}); "
              f"matmul {r['matmul_tflops_same_run']:.0f} TFLOP/s same run")
        for site in r.get("host_sync_sites", [])[:12]:
            print(f"    host sync x{site['count']}: {site['site'][:150]}")
        for kernel in profile["top_kernels"][:8]:
            print(f"    {kernel['ms_per_step']:7.3f} ms  x{kernel['calls_per_step']:<5.0f} "
                  f"{kernel['name'][:100]}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu" and any(k != "PYTORCH" for k in args.kernels):
        os.environ.setdefault("TRITON_INTERPRET", "1")
        print("note: Triton kernels on CPU run in the interpreter (very slow)", file=sys.stderr)
    started = datetime.datetime.now()
    results = []
    for kernel in args.kernels:
        for workers in args.workers:
            for case in cases_of(args):
                print(f"running {kernel} x {workers} worker(s), {case['label']} ...", flush=True)
                results.append(run_case(args, kernel, workers, case))
    print_table(results)
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
