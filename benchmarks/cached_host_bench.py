#!/usr/bin/env python3
"""Host bookkeeping of a cached call (hstu/export/cached.py), phase by phase, on the CPU.

    python benchmarks/cached_host_bench.py --batch 1 32 128 --history 4096 [--history-check ends]

On a GPU the cached call is bound by its host work (docs/BENCHMARKS.md, "Serving"): deciding
which users' caches are reusable, gathering the new tokens, planning sizes and indices,
and updating the store. This measures that work alone, where any engineer can run it: the
27K recipe's serving module on the CPU, the wave padded as for CUDA graphs (what the GPU
path's host does), and the STU stack's device work replaced by zeros of the right shapes,
so that the device part costs little and the timings are the host's. The "device launch"
phase is therefore NOT a GPU figure: it is the stubbed device part's CPU time.

Per batch size: the first request (history n) of every user is encoded (untimed), then the
request with --new more actions is scored --calls times, the caches put back before each
call (incremental mode, as serving_bench's `incremental`). Prints the median host
milliseconds per phase; --json FILE writes them.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import serving_bench  # noqa: E402


def run_case(serving, batch: int, args) -> dict:
    from hstu.export.cached import CachedServing, CachePolicy
    from hstu.export.cached_graphs import GraphReplays

    streams = [serving_bench.Stream(serving, 1000 + b, args.history + args.new, 1000, seed=b)
               for b in range(batch)]
    keys = [stream.user for stream in streams]
    cpu = torch.device("cpu")
    request = serving_bench.batch_inputs(
        [s.request(args.history + args.new, args.candidates, int(s.time[-1]) + 300)
         for s in streams], serving, cpu)
    # history_check is named only when not the default, so that the bench also runs on
    # checkouts from before the option (before/after comparisons).
    check = {} if args.history_check == "full" else {"history_check": args.history_check}
    policy = CachePolicy(mode="incremental", max_bytes=64 << 30, max_stale_tokens=1 << 30,
                         max_stale_seconds=1 << 40, **check)
    scorer = CachedServing(serving, policy, graphs=None)
    # The STU stack's work, stubbed: zeros of the keys' and values' shapes (see the module
    # docstring); the first requests are encoded through the same stub, 16 users a call.
    stack = serving.encoder.stu_stack
    layers = len(stack.layers)
    first_layer = stack.layers[0]
    key_dims = (first_layer.num_heads, first_layer.attention_dim)
    value_dims = (first_layer.num_heads, first_layer.hidden_dim)

    def stub_stack(x, *_args, **_kwargs):
        rows = x.shape[0]
        return x, [(x.new_zeros(rows, *key_dims), x.new_zeros(rows, *value_dims))
                   for _ in range(layers)]

    stack.cached_forward = stub_stack
    try:
        with torch.no_grad():
            for chunk in range(0, batch, 16):
                first = [s.request(args.history, args.candidates,
                                   int(s.time[args.history - 1]) + 60)
                         for s in streams[chunk:chunk + 16]]
                scorer.score(serving_bench.batch_inputs(first, serving, cpu),
                             keys[chunk:chunk + 16])
        entries = {key: scorer.store.get(key) for key in keys}
        # The waves are padded as on the GPU (GraphReplays(capture=False): padding, eagerly).
        scorer.graphs = GraphReplays(capture=False)

        def restore():
            for key, entry in entries.items():
                entry.truncate(args.history)
                entry.exact, entry.stale_tokens = True, 0
                scorer.store.put(key, entry)

        per_call: dict[str, list[float]] = {}
        totals = []
        with torch.no_grad():
            for index in range(args.warmup + args.calls):
                restore()
                scorer.phase_seconds = {}
                start = time.perf_counter()
                scorer.score(request, keys)
                total = time.perf_counter() - start
                if index >= args.warmup:
                    totals.append(total * 1e3)
                    for name, seconds in scorer.phase_seconds.items():
                        per_call.setdefault(name, []).append(seconds * 1e3)
    finally:
        del stack.cached_forward  # back to the class's method
    reused = scorer.counters.reused_stale
    if reused != batch * (args.warmup + args.calls):
        raise RuntimeError(f"{reused} cache reuses in {args.warmup + args.calls} calls of "
                           f"{batch} users: the timed calls did not take the cached path")
    phases = {name: round(statistics.median(values), 3) for name, values in per_call.items()}
    host = round(sum(value for name, value in phases.items() if name != "device launch"), 3)
    return dict(batch=batch, history=args.history, new=args.new, candidates=args.candidates,
                history_check=args.history_check, phases_ms=phases,
                host_ms_without_launch=host, call_ms=round(statistics.median(totals), 3),
                counters=scorer.counters.as_dict())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--history", type=int, default=4096)
    parser.add_argument("--new", type=int, default=10)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--history-check", choices=("full", "ends"), default="full")
    parser.add_argument("--calls", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", dest="json_out", metavar="FILE")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    serving = serving_bench.build_serving(serving_bench.RECIPE, [], "PYTORCH", 1000,
                                          torch.device("cpu"))
    rows = []
    for batch in args.batch:
        row = run_case(serving, batch, args)
        rows.append(row)
        phases = ", ".join(f"{name} {value:.2f}" for name, value in row["phases_ms"].items())
        print(f"{batch:>4} x {args.history} check={args.history_check}: host ms "
              f"{row['host_ms_without_launch']:.2f} without the (stubbed) launch; {phases}",
              flush=True)
    if args.json_out:
        meta = dict(machine=platform.processor() or platform.machine(),
                    torch=torch.__version__, threads=torch.get_num_threads(),
                    date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        Path(args.json_out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))


if __name__ == "__main__":
    main()
