#!/usr/bin/env python3
"""Host (CPU) cost of launching the ops, and where one encoder step spends its host time (GPU).

    python benchmarks/host_overhead.py [--out DIR]

At realistic shapes the encoder is host-bound (encoder_bench.py --profile: the GPU is busy less
than half of the step). This measures the host side directly:

1. Per op, on inputs so small that the GPU finishes each launch at once: host microseconds per
   call (no synchronisation inside the loop; median of 5 runs of 200 calls), TRITON against
   PYTORCH, with two floors: a bare Triton kernel launch and a bare torch add.
2. cProfile of one forward + backward of encoder_bench.py's encoder (TRITON, bf16 autocast,
   32 rows of ~1,000 tokens) after a warm-up: the functions with the most own time.

Prints both; writes DIR/host_overhead.json (part 1) and DIR/host_overhead_profile.txt (part 2).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hstu.ops import Kernel, hstu_mha, layer_norm  # noqa: E402


@triton.jit
def _bare_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1.0, mask=offs < n)


def host_us_per_call(fn, calls: int = 200, runs: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(runs):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter() - started) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(per_call)


def op_costs() -> dict:
    device = "cuda"
    x = torch.randn(64, 512, device=device, dtype=torch.bfloat16)
    weight = torch.ones(512, device=device)
    bias = torch.zeros(512, device=device)
    q, k, v = (torch.randn(32, 4, 128, device=device, dtype=torch.bfloat16) for _ in range(3))
    offsets = torch.tensor([0, 16, 32], device=device)
    scratch = torch.zeros(16, device=device)
    cases = {
        "bare triton launch": lambda: _bare_kernel[(1,)](scratch, 16, BLOCK=16),
        "bare torch add": lambda: scratch.add_(1.0),
    }
    for kernel in (Kernel.TRITON, Kernel.PYTORCH):
        cases[f"layer_norm {kernel.name}"] = (
            lambda kernel=kernel: layer_norm(x, weight, bias, kernel=kernel))
        cases[f"hstu_mha {kernel.name}"] = (
            lambda kernel=kernel: hstu_mha(q, k, v, offsets, max_seq_len=16, kernel=kernel))
    return {name: host_us_per_call(fn) for name, fn in cases.items()}


def profile_encoder_step(top: int) -> str:
    from encoder_bench import build_encoder, random_inputs, set_kernel, training_step

    torch.manual_seed(0)
    model = build_encoder("cuda")
    set_kernel(model, Kernel.TRITON)
    inputs = random_inputs(32, 1024, "cuda", torch.Generator().manual_seed(32))

    def step():
        training_step(model, inputs, "cuda")
        model.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    started = time.perf_counter()
    # cProfile sees only the thread that enables it, and the autograd engine runs a CUDA
    # backward on a worker thread of its own: run the backward on this thread instead.
    with torch.autograd.set_multithreading_enabled(False):
        profiler.enable()
        step()
        profiler.disable()
    host_ms = (time.perf_counter() - started) * 1e3
    torch.cuda.synchronize()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return f"host time of the profiled step (cProfile on): {host_ms:.1f} ms\n" + text.getvalue()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("host_overhead.py measures CUDA launches: it needs a GPU", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    costs = op_costs()
    for name, us in costs.items():
        print(f"{name:<24} {us:8.1f} us host per call")
    Path(args.out, "host_overhead.json").write_text(json.dumps({
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": triton.__version__, "host_us_per_call": costs}, indent=1))
    report = profile_encoder_step(args.top)
    Path(args.out, "host_overhead_profile.txt").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
