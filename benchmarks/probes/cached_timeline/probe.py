"""Probe (session 13; first run in session 14, which added the same calls' host phases):
where the time of a graphed cached call goes on a GPU, for 128 users (--batch) of 4K history
+ 10 new actions + 100 candidates (incremental), with each history check.

Per call: the host's time until score() returns (it does not wait for the GPU), the time
until the GPU is done, and the GPU time of the replay alone (CUDA events around
GraphReplays.run's copy and replay). Run on a GPU machine with TorchRec:

    python benchmarks/probes/cached_timeline/probe.py [--batch 128] [--history 4096]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
import serving_bench as sb  # noqa: E402

from hstu.export import cached_graphs  # noqa: E402
from hstu.export.cached import CachedServing, CachePolicy  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--batch", type=int, default=128)
parser.add_argument("--history", type=int, default=4096)
parser.add_argument("--calls", type=int, default=10)
args = parser.parse_args()
device = torch.device("cuda")
serving = sb.build_serving(sb.RECIPE, [], "TRITON", 100_000, device)
streams = [sb.Stream(serving, 1000 + b, args.history + 10, 100_000, seed=b)
           for b in range(args.batch)]
keys = [s.user for s in streams]
cpu = torch.device("cpu")
request = sb.batch_inputs([s.request(args.history + 10, 100, int(s.time[-1]) + 300)
                           for s in streams], serving, cpu)
previous = sb.batch_inputs([s.request(args.history, 100, int(s.time[args.history - 1]) + 60)
                            for s in streams], serving, cpu)
replay_ms = []
original_run = cached_graphs.GraphReplays.run


def timed_run(self, key, fn, inputs, device):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = original_run(self, key, fn, inputs, device)
    end.record()
    replay_ms.append((start, end))
    return out


cached_graphs.GraphReplays.run = timed_run
for check in ("full", "ends"):
    scorer = CachedServing(serving, CachePolicy(
        mode="incremental", max_bytes=32 << 30, max_stale_tokens=1 << 30,
        max_stale_seconds=1 << 40, history_check=check))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        scorer.score(previous, keys)
        entries = {key: scorer.store.get(key) for key in keys}

        def restore():
            for key, entry in entries.items():
                entry.truncate(args.history)
                entry.exact, entry.stale_tokens = True, 0
                scorer.store.put(key, entry)

        host, total, phases = [], [], {}
        for index in range(args.calls + 3):
            restore()
            torch.cuda.synchronize()
            replay_ms.clear()
            scorer.phase_seconds = {}
            t0 = time.perf_counter()
            scorer.score(request, keys)
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            if index >= 3:
                host.append((t1 - t0) * 1e3)
                total.append((t2 - t0) * 1e3)
                gpu = [s.elapsed_time(e) for s, e in replay_ms]
                for name, seconds in scorer.phase_seconds.items():
                    phases.setdefault(name, []).append(seconds * 1e3)
        # The same calls' host phases (session 12's serving_bench --phases ran in another
        # process): what the host does outside them is host-until-return minus their sum.
        medians = {name: statistics.median(values) for name, values in phases.items()}
        print(f"CACHED_TIMELINE phases ms {' '.join(f'{k} {v:.2f}' for k, v in medians.items())}"
              f"; outside them {statistics.median(host) - sum(medians.values()):.2f}", flush=True)
        print(f"CACHED_TIMELINE {args.batch} x {args.history} check={check}: host until return "
              f"{statistics.median(host):.2f} ms, until GPU done {statistics.median(total):.2f} "
              f"ms, last replay's GPU time {gpu[0]:.2f} ms, graphs {scorer.graphs.stats}",
              flush=True)
