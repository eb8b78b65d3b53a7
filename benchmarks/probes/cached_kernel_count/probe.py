"""Probe (session 15): how many kernels a cached call's device part launches, on any machine.

Why: on a GPU a one-user cached call replays ~0.68 ms of kernels for ~200 tokens from a CUDA
graph (docs/BENCHMARKS.md, "Serving", session 15), about what its kernels cost just to run one
after another: the count is what to cut. This runs the 27K recipe's serving module with TRITON
kernels under Triton's CPU interpreter (tiny history: the count does not depend on it), scores
one user's first request, then counts what the second (cached, 10 new actions) call's device
part does: every aten op that launches work (views and allocations left out) and every Triton
launch, by the module or step that issued it.

    python benchmarks/probes/cached_kernel_count/probe.py [--history 64]

CPU-only `.item()` calls (the interpreter path's checks; a CUDA graph could not hold them)
are counted apart, not as kernels. On a GPU the aten ops of TorchRec's lookups differ (fused
lookup kernels there); the rest maps one op to one kernel.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import serving_bench  # noqa: E402
from hstu.export.cached import CachedServing, CachePolicy  # noqa: E402
from hstu.export.cached_graphs import GraphReplays  # noqa: E402

NOT_KERNELS = {"view", "_unsafe_view", "reshape", "slice", "select", "as_strided", "expand", "t",
               "transpose", "split", "split_with_sizes", "unsqueeze", "squeeze", "detach",
               "alias", "permute", "unbind", "narrow", "lift_fresh", "empty", "empty_like",
               "empty_strided", "new_empty", "new_empty_strided"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--history", type=int, default=64)
    args = parser.parse_args()
    serving = serving_bench.build_serving(serving_bench.RECIPE, [], "TRITON", 1000,
                                          torch.device("cpu"))
    n = args.history
    stream = serving_bench.Stream(serving, 1000, n + 10, 1000, seed=0)
    cpu = torch.device("cpu")
    first = serving_bench.batch_inputs(
        [stream.request(n, 100, int(stream.time[n - 1]) + 60)], serving, cpu)
    second = serving_bench.batch_inputs(
        [stream.request(n + 10, 100, int(stream.time[-1]) + 300)], serving, cpu)
    policy = CachePolicy(mode="incremental", max_stale_tokens=1 << 20,
                         max_stale_seconds=1 << 40, history_check="ends")
    # Padded as for CUDA graphs, run eagerly: the device part a graph would capture.
    scorer = CachedServing(serving, policy, graphs=GraphReplays(capture=False))
    with torch.no_grad():
        scorer.score(first, [stream.user])

    counting = [False]
    where = ["(run_cached_encode)"]
    kernels = collections.Counter()
    items = collections.Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if counting[0]:
                name = func.overloadpacket.__name__
                if name == "_local_scalar_dense":
                    items[where[-1]] += 1
                elif name not in NOT_KERNELS:
                    kernels[(where[-1], name)] += 1
            return func(*args, **(kwargs or {}))

    def enter(label):
        def hook(*_):
            where.append(label)
        return hook

    def leave(*_):  # returns None: a forward hook's return value would replace the output
        where.pop()

    for name, module in serving.named_modules():
        if name and name.count(".") <= 1:
            module.register_forward_pre_hook(enter(name))
            module.register_forward_hook(leave)
    def labelled(function, label):
        """function, with what it launches counted under `label`."""
        def call(*a, **k):
            where.append(label)
            try:
                return function(*a, **k)
            finally:
                where.pop()
        return call

    for index, layer in enumerate(serving.encoder.stu_stack.layers):
        layer.cached_forward = labelled(layer.cached_forward, f"stu layer {index}")
    # hstu_mha_cached checks its lengths when they are on the CPU (a GPU call skips that):
    # their ops are reported apart.
    from hstu.ops import cached_attention as cached_op

    cached_op._check_inputs = labelled(cached_op._check_inputs,
                                       "(hstu_mha_cached's CPU-only checks)")
    launch = InterpretedFunction.run

    def counted_launch(self, *a, **k):
        was = counting[0]
        if was:
            kernels[(where[-1], f"[triton] {self.fn.__name__}")] += 1
        counting[0] = False  # the interpreter's own tensor work is not the kernel's
        try:
            return launch(self, *a, **k)
        finally:
            counting[0] = was

    InterpretedFunction.run = counted_launch
    replays_run = GraphReplays.run

    def device_part(self, *a, **k):
        counting[0] = True
        try:
            return replays_run(self, *a, **k)
        finally:
            counting[0] = False

    GraphReplays.run = device_part
    with torch.no_grad(), Count():
        scorer.score(second, [stream.user])
    assert scorer.counters.reused_stale == 1, scorer.counters
    cpu_only = {key: count for key, count in kernels.items() if "CPU-only" in key[0]}
    for key in cpu_only:
        del kernels[key]
    by_place = collections.Counter()
    for (place, _), count in kernels.items():
        by_place[place] += count
    triton = sum(c for (_, name), c in kernels.items() if name.startswith("[triton]"))
    total = sum(kernels.values())
    print(f"CACHED_KERNELS one user, history {n} + 10 new + 100 candidates: {total} kernels "
          f"({total - triton} aten ops, {triton} Triton launches); left out as CPU-only: "
          f"{sum(cpu_only.values())} ops of hstu_mha_cached's checks, {sum(items.values())} "
          ".item() calls")
    for place, count in by_place.most_common():
        ops = ", ".join(f"{name} {c}" for (p, name), c in sorted(kernels.items())
                        if p == place)
        print(f"  {count:4d}  {place}: {ops}")


if __name__ == "__main__":
    main()
