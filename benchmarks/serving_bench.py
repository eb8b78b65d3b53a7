#!/usr/bin/env python3
"""Serving latency: full recomputation against KV-cached scoring (hstu/export/cached.py).

    python benchmarks/serving_bench.py --device cpu --json serving_cpu.json
    python benchmarks/serving_bench.py --device cuda --json serving_gpu.json      # TRITON, bf16
    python benchmarks/serving_bench.py --device cpu --history 256 --repeats 2      # quick check

The model is the KuaiRand-27K recipe's dense model (D=512, 4 heads of 128, 3 STU layers, 6
contextual tokens, S=8000) with random weights; its embedding tables are cut to --table-rows
rows (the lookups are a negligible share of the time, and the 27K tables need 10 GB).
One user per request (batch 1) unless --batch (users per call; several values run one case
each); per history length n, the request is the
user's history of n + --new actions and --candidates candidates, and the modes are:

  incremental   the cache holds the first n actions (encoded by an earlier request); the
                request appends the --new actions to it and scores the candidates. The
                cached tokens keep the positions, time buckets and contextual-token states of
                the earlier pass: scores differ from full recomputation (max_abs_diff).
  exact_reuse   the cache holds all n + --new actions at the same query time (a repeated
                request, or more candidates for the same request): exact.
  exact_new     exact mode with a cache of the first n actions: the new actions make reuse
                inexact, so the user is re-encoded (about the full cost: shows what exactness
                costs when the history moved).

full_ms: ServingModule (the module torch.export traces) on the request; cached_ms: the
CachedServing call, with the cache put back to its state before each repetition (not timed).
Requests start on the host (as a server receives them); each mode's time includes its copies
to the device.
Median of --repeats after --warmup runs. Prints a table; --json FILE writes the rows (history,
device, full_ms, cached_ms, speedup, ...).

Threads: torch's default (all cores) unless --threads.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RECIPE = "recipes/kuairand_dlrm_hstu.config"
MODES = ("incremental", "exact_reuse", "exact_new")


def build_serving(recipe: str, overrides: list[str], kernel: str, table_rows: int, device):
    """ServingModule of `recipe` with random weights, tables cut to table_rows rows."""
    from hstu.config import feature_specs, label_specs, load_config
    from hstu.export.serving import ServingModule
    from hstu.model import DlrmHSTU

    cfg = load_config(recipe, overrides)
    torch.manual_seed(0)
    model = DlrmHSTU(cfg, feature_specs(cfg), label_specs(cfg),
                     embedding_device=torch.device("meta"))
    model.set_kernel(kernel)
    serving = ServingModule(model)
    for name, table in serving.tables.items():
        rows = min(int(table.shape[0]), table_rows)
        serving.tables[name] = torch.nn.Parameter(
            (torch.rand(rows, table.shape[1]) - 0.5).to(table.dtype) * 0.1, requires_grad=False)
    return serving.to(device).eval()


class Stream:
    """One user's log of actions, from which requests are cut."""

    def __init__(self, serving, user: int, length: int, table_rows: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.serving = serving
        self.user = user
        self.rows = {name: min(int(t.shape[0]), table_rows) for name, t in serving.tables.items()}
        self.video = torch.randint(0, self.rows[serving.table_of["uih_seq__video_id"]], (length,),
                                   generator=generator)
        self.action = torch.randint(0, 256, (length,), generator=generator)
        self.watch = torch.rand(length, generator=generator) * 30_000
        self.time = 1_650_000_000 + torch.cumsum(torch.randint(1, 600, (length,),
                                                               generator=generator), 0)
        self.generator = generator

    def request(self, n: int, candidates: int, query_time: int) -> dict[str, torch.Tensor]:
        serving = self.serving
        cand_rows = self.rows[serving.table_of["cand_seq__video_id"]]
        values = {
            "uih_seq__video_id": self.video[:n],
            "uih_seq__action_weight": self.action[:n],
            "uih_seq__watch_time": self.watch[:n].float(),
            "uih_seq__action_timestamp": self.time[:n],
            "cand_seq__video_id": torch.randint(0, cand_rows, (candidates,),
                                                generator=self.generator),
            "cand_seq__query_time": torch.full((candidates,), int(query_time)),
        }
        for name, spec in serving.features.items():
            if spec.sequence is None:
                values[name] = torch.tensor([self.user % self.rows[serving.table_of[name]]])
        return {name: values[name] for name in serving.features}


def batch_inputs(rows, serving, device) -> dict[str, torch.Tensor]:
    from hstu.export.serving import lengths_key

    out = {name: torch.cat([row[name] for row in rows]).to(device) for name in rows[0]}
    out[lengths_key(serving.uih_sequence)] = torch.tensor(
        [row["uih_seq__video_id"].numel() for row in rows], device=device)
    out[lengths_key(serving.candidate_sequence)] = torch.tensor(
        [row["cand_seq__video_id"].numel() for row in rows], device=device)
    return out


def timed(fn, device, repeats: int, warmup: int, before=lambda: None):
    """(median wall ms, median process CPU ms, the last result) of fn() over `repeats` runs
    after `warmup`; before() runs untimed ahead of each. The CPU time (all threads of this
    process) is the steadier figure on a shared machine: other jobs stretch the wall time of a
    run but not the work it does."""
    result = None
    wall, cpu = [], []
    for index in range(warmup + repeats):
        before()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, start_cpu = time.perf_counter(), time.process_time()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if index >= warmup:
            wall.append((time.perf_counter() - start) * 1000.0)
            cpu.append((time.process_time() - start_cpu) * 1000.0)
    return statistics.median(wall), statistics.median(cpu), result


def profile_cached(score, restore, device, label: str, calls: int = 3) -> None:
    """Where the cached path's time goes: `calls` cached calls under torch.profiler, the top
    operators by host time and, on a GPU, by device time. Each call follows a restore of the
    cache, whose few slicing ops count in the tables too; the `cached_score` row is the calls
    alone."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                           if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            restore()
            if device.type == "cuda":
                torch.cuda.synchronize()
            with record_function("cached_score"):
                score()
                if device.type == "cuda":
                    torch.cuda.synchronize()
    events = prof.key_averages()
    print(f"--- profile of {calls} cached calls: {label}")
    print(events.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60))
    if device.type == "cuda":
        print(events.table(sort_by="self_cuda_time_total", row_limit=15,
                           max_name_column_width=60))


def max_abs_diff(a: dict, b: dict) -> float:
    return max(float((a[t].float() - b[t].float()).abs().max()) for t in a)


def run_case(serving, args, device, history: int, autocast) -> list[dict]:
    from hstu.export.cached import CachedServing, CachePolicy

    streams = [Stream(serving, 1000 + b, history + args.new, args.table_rows, seed=b)
               for b in range(args.batch)]
    keys = [stream.user for stream in streams]
    query = [int(s.time[history + args.new - 1]) + 300 for s in streams]
    earlier = [int(s.time[history - 1]) + 60 for s in streams]
    # Requests arrive on the host, as a server receives them: each mode's time includes moving
    # what it needs to the device (the whole request for full scoring, the new tokens for
    # cached scoring).
    cpu = torch.device("cpu")
    request = batch_inputs([s.request(history + args.new, args.candidates, q)
                            for s, q in zip(streams, query)], serving, cpu)
    previous = batch_inputs([s.request(history, args.candidates, q)
                             for s, q in zip(streams, earlier)], serving, cpu)

    def full_scores():
        return serving({name: value.to(device) for name, value in request.items()})

    with torch.no_grad(), autocast():
        full_ms, full_cpu_ms, full = timed(full_scores, device, args.repeats, args.warmup)
    rows = []
    for mode in args.modes:
        policy = CachePolicy(mode="exact" if mode.startswith("exact") else "incremental",
                             max_bytes=args.cache_gb << 30, max_stale_tokens=1 << 30,
                             max_stale_seconds=1 << 40, cuda_graphs=not args.no_cuda_graphs,
                             history_check=args.history_check)
        scorer = CachedServing(serving, policy)
        with torch.no_grad(), autocast():
            scorer.score(request if mode == "exact_reuse" else previous, keys)
        entries = {key: scorer.store.get(key) for key in keys}
        state = {key: (e.history_length, e.exact, e.stale_tokens, e.anchor)
                 for key, e in entries.items()}

        def restore(entries=entries, state=state, scorer=scorer):
            # Put every user's cache back as the earlier request left it.
            for key, entry in entries.items():
                length, exact, stale, anchor = state[key]
                entry.truncate(length)
                entry.exact, entry.stale_tokens, entry.anchor = exact, stale, anchor
                scorer.store.put(key, entry)

        with torch.no_grad(), autocast():
            cached_ms, cached_cpu_ms, got = timed(
                lambda scorer=scorer: scorer.score(request, keys), device, args.repeats,
                args.warmup, before=restore)
        phases = None
        if args.phases:
            # Host time per phase of a cached call (no added synchronisation), 5 calls.
            scorer.phase_seconds = {}
            with torch.no_grad(), autocast():
                timed(lambda scorer=scorer: scorer.score(request, keys), device, 5, 0,
                      before=restore)
            phases = {name: round(seconds * 1000.0 / 5, 3)
                      for name, seconds in scorer.phase_seconds.items()}
            scorer.phase_seconds = None
            print("    host ms per call: " + ", ".join(f"{n} {v:.2f}" for n, v in phases.items()),
                  flush=True)
        if args.profile:
            with torch.no_grad(), autocast():
                profile_cached(lambda scorer=scorer: scorer.score(request, keys), restore,
                               device, f"{args.batch} x {history} {mode}")
        cache_bytes = sum(entry.nbytes() for entry in entries.values())
        rows.append(dict(
            history=history, new=args.new, candidates=args.candidates, batch=args.batch,
            device=device.type, device_name=_device_name(device), kernel=args.kernel,
            dtype=args.dtype, mode=mode, full_ms=round(full_ms, 3),
            cached_ms=round(cached_ms, 3), speedup=round(full_ms / cached_ms, 2),
            full_cpu_ms=round(full_cpu_ms, 3), cached_cpu_ms=round(cached_cpu_ms, 3),
            cpu_speedup=round(full_cpu_ms / cached_cpu_ms, 2),
            full_candidates_per_s=round(args.batch * args.candidates / full_ms * 1000.0, 1),
            cached_candidates_per_s=round(args.batch * args.candidates / cached_ms * 1000.0, 1),
            max_abs_diff=max_abs_diff(got, full), cache_mb_per_user=round(
                cache_bytes / args.batch / 2**20, 2),
            exact_by_construction=mode != "incremental",
            counters=scorer.counters.as_dict(),
            cuda_graphs=scorer.graphs is not None, history_check=args.history_check,
            graph_stats=dict(scorer.graphs.stats) if scorer.graphs is not None else None,
            host_phases_ms=phases,
        ))
        print(_line(rows[-1]), flush=True)
    return rows


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _line(row: dict) -> str:
    return (f"{row['batch']:>4} x {row['history']:>6} {row['mode']:<12} full "
            f"{row['full_ms']:>10.1f} ms  cached "
            f"{row['cached_ms']:>8.1f} ms  x{row['speedup']:<7} (CPU time x{row['cpu_speedup']}) "
            f"max|diff| "
            f"{row['max_abs_diff']:.2e}  cache {row['cache_mb_per_user']} MB/user"
            + ("  graphs" if row.get("cuda_graphs") else "")
            + ("  history check: ends" if row.get("history_check") == "ends" else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--history", type=int, nargs="+", default=[1024, 4096, 8192],
                        help="history lengths before the new actions (default 1024 4096 8192)")
    parser.add_argument("--new", type=int, default=10, help="new actions per request")
    parser.add_argument("--candidates", type=int, default=100, help="candidates per request")
    parser.add_argument("--batch", type=int, nargs="+", default=[1],
                        help="users per call (default 1; several values: one case each)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--recipe", default=RECIPE)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="config override, as in launch.py (repeatable)")
    parser.add_argument("--kernel", choices=("PYTORCH", "TRITON"), default=None,
                        help="default: PYTORCH on cpu, TRITON on cuda")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="default: float32 on cpu, bfloat16 autocast on cuda")
    parser.add_argument("--table-rows", type=int, default=100_000)
    parser.add_argument("--cache-gb", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--profile", action="store_true",
                        help="also profile 3 cached calls per case (torch.profiler tables)")
    parser.add_argument("--phases", action="store_true",
                        help="also time the host phases of 5 cached calls per case")
    parser.add_argument("--no-cuda-graphs", action="store_true",
                        help="run the cached calls' device work eagerly (CachePolicy."
                        "cuda_graphs=False); by default a GPU with TRITON kernels replays it "
                        "from CUDA graphs")
    parser.add_argument("--history-check", choices=("full", "ends"), default="full",
                        help="CachePolicy.history_check: compare every cached history token "
                        "with the request's (full, default) or the first and last (ends)")
    parser.add_argument("--json", dest="json_out", metavar="FILE", help="write the rows here")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("serving_bench.py --device cuda: no CUDA GPU here")
    args.kernel = args.kernel or ("TRITON" if device.type == "cuda" else "PYTORCH")
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if args.threads:
        torch.set_num_threads(args.threads)

    def autocast():
        if args.dtype == "bfloat16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return torch.autocast(device.type, enabled=False)

    serving = build_serving(args.recipe, args.overrides, args.kernel, args.table_rows, device)
    print(f"{args.recipe} on {_device_name(device)} ({device.type}), kernel {args.kernel}, "
          f"{args.dtype}, {torch.get_num_threads()} threads; {args.new} new actions, "
          f"{args.candidates} candidates, users per call: "
          f"{', '.join(str(b) for b in args.batch)}", flush=True)
    rows = []
    for batch in args.batch:
        for history in args.history:
            rows += run_case(serving, argparse.Namespace(**{**vars(args), "batch": batch}),
                             device, history, autocast)
    if args.json_out:
        payload = dict(
            date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            command=" ".join(sys.argv), torch=torch.__version__, threads=torch.get_num_threads(),
            recipe=args.recipe, overrides=args.overrides, rows=rows,
        )
        Path(args.json_out).write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
