"""Probe: which GPU kernels run at the same time as a given kernel, in a chrome trace.

Why: inside the training step `_add_position_time_bwd` takes 2-5 ms, but 0.17 ms when the
same call is repeated alone (docs/BENCHMARKS.md, "Session 14"). If kernels on other streams
overlap it, they share its multiprocessors; this lists them. Usage, on a trace written by
`train_bench.py --trace`:

    python benchmarks/probes/trace_overlap.py TRACE.json[.gz] [--kernel NAME_PART] [--top 12]

It prints, per stream, the kernels' count and total time, then for each instance of the named
kernel its stream, duration, and the overlapping kernels on other streams (name, stream, the
overlap in microseconds), summed over the instances.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json


def load_kernels(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as handle:
        trace = json.load(handle)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in events
            if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace")
    parser.add_argument("--kernel", default="_add_position_time_bwd")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    kernels = load_kernels(args.trace)
    per_stream = collections.defaultdict(lambda: [0, 0.0])
    for event in kernels:
        stream = event.get("args", {}).get("stream", event.get("tid"))
        per_stream[stream][0] += 1
        per_stream[stream][1] += event["dur"]
    print("stream: kernels, total us")
    for stream, (count, total) in sorted(per_stream.items(), key=lambda kv: -kv[1][1]):
        print(f"  {stream}: {count}, {total:.0f}")
    targets = [e for e in kernels if args.kernel in e["name"]]
    print(f"{len(targets)} instance(s) of *{args.kernel}*")
    overlap = collections.Counter()
    for target in targets:
        start, end = target["ts"], target["ts"] + target["dur"]
        stream = target.get("args", {}).get("stream", target.get("tid"))
        grid = target.get("args", {}).get("grid")
        print(f"  stream {stream} dur {target['dur']:.0f} us grid {grid}")
        for event in kernels:
            other = event.get("args", {}).get("stream", event.get("tid"))
            if other == stream or event is target:
                continue
            shared = min(end, event["ts"] + event["dur"]) - max(start, event["ts"])
            if shared > 0:
                overlap[(event["name"][:90], other)] += shared
    print("overlapping kernels on other streams (name, stream): us, summed over instances")
    for (name, stream), us in overlap.most_common(args.top):
        print(f"  {us:9.0f}  [{stream}] {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
