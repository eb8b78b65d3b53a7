"""aten ops per cached call (CPU profiler), steady state: the cache is encoded by an earlier
request, appended to once, cut back, then one call is profiled.

    python benchmarks/results/2026-12-07-cpu-s11/count_cached_ops.py USERS HISTORY MODE [RECIPE]

Run from the root of the checkout to measure (the old code: `git archive f1f065e hstu
benchmarks/serving_bench.py recipes | tar x -C /tmp/old` and run it from /tmp/old)."""
import sys
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")
import torch
from torch.profiler import profile, ProfilerActivity
import serving_bench as sb
from hstu.export.cached import CachedServing, CachePolicy
serving = sb.build_serving(sys.argv[4] if len(sys.argv) > 4 else sb.RECIPE, [], "PYTORCH", 100_000, torch.device("cpu"))
B, hist, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
streams = [sb.Stream(serving, 1000 + b, hist + 10, 100_000, seed=b) for b in range(B)]
keys = [s.user for s in streams]
req = sb.batch_inputs([s.request(hist + 10, 100, int(s.time[hist + 9]) + 300) for s in streams], serving, torch.device("cpu"))
prev = sb.batch_inputs([s.request(hist, 100, int(s.time[hist - 1]) + 60) for s in streams], serving, torch.device("cpu"))
scorer = CachedServing(serving, CachePolicy(mode="exact" if mode.startswith("exact") else "incremental", max_bytes=8 << 30, max_stale_tokens=1 << 30, max_stale_seconds=1 << 40))
with torch.no_grad():
    scorer.score(req if mode == "exact_reuse" else prev, keys)
    entries = {k: scorer.store.get(k) for k in keys}
    state = {k: (e.history_length, e.exact, e.stale_tokens, e.anchor) for k, e in entries.items()}
    def restore():
        for k, e in entries.items():
            l, ex, st, an = state[k]; e.truncate(l); e.exact, e.stale_tokens, e.anchor = ex, st, an; scorer.store.put(k, e)
    scorer.score(req, keys); restore()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        scorer.score(req, keys)
ev = [e for e in prof.key_averages()]
total = sum(e.count for e in ev if e.key.startswith("aten::"))
print("aten ops per call", total)
for e in sorted(ev, key=lambda e: -e.count)[:15]:
    print(f"{e.count:6d} {e.key}")
