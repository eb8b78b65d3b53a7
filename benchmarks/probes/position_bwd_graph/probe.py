"""Probe (session 15): is the TRITON positional backward slow only inside a CUDA graph?

Why: inside the 32 x 1,024 training step replayed from CUDA graphs, `_add_position_time_bwd`
takes 2.07 ms a step (sessions 12, 14, 15), while in the eager step of the same shape it is
below 0.16 ms, and session 15's trace showed no other stream's work beside it
(docs/BENCHMARKS.md, "Session 15"). This runs the positional op (forward + backward, the
recipe's sizes: D = 512, 8,192 positions, 2,048 time buckets, input dropout 0.2) on a
batch shaped like that step's (32 rows, long-tailed up to 1,024 history tokens + 100
candidates, 6 contextual tokens), eagerly and replayed from a CUDA graph of the same
forward + backward, and prints the backward kernel's time in each from a profile of 5 calls.
Then the same with dropout off, to see whether the graph's seed read (a device tensor) is
what differs. No TorchRec. On a GPU machine:

    python benchmarks/probes/position_bwd_graph/probe.py

Lines start with POSGRAPH: mode, dropout, the kernel's median ms, its calls.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from hstu.ops.triton.position import add_timestamp_positional_embeddings  # noqa: E402

KERNEL = "_add_position_time_bwd"


def batch(device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    history = torch.randint(50, 1025, (32,), generator=generator)
    history[:4] = 1024  # the cap, as in a long-tailed batch
    lengths = 6 + history + 100
    offsets = torch.zeros(33, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    times = []
    for n in history.tolist():
        start = 1_700_000_000 + int(torch.randint(0, 10**6, (1,), generator=generator))
        row = start + torch.randint(0, 86_400, (n,), generator=generator).sort().values
        query = int(row[-1]) + 300
        times += [torch.zeros(6, dtype=torch.int64), row, torch.full((100,), query)]
    total = int(offsets[-1])
    x = torch.randn(total, 512, generator=generator).to(torch.bfloat16)
    return (x.to(device), offsets.to(device), torch.cat(times).to(device),
            torch.full((32,), 100, dtype=torch.int64, device=device))


def kernel_ms(fn, calls=5):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    # Kernels are the profile's CUDA-side events (as hstu/train/profiling.py reads them).
    times = [(event.time_range.end - event.time_range.start) / 1e3 for event in prof.events()
             if event.device_type.name == "CUDA" and KERNEL in event.name]
    return (statistics.median(times) if times else float("nan")), len(times)


def main() -> None:
    device = torch.device("cuda")
    x, offsets, timestamps, targets = batch(device)
    position = torch.randn(8192, 512, device=device).requires_grad_()
    time_table = torch.randn(2049, 512, device=device).requires_grad_()
    x = x.requires_grad_()
    grad = torch.randn_like(x)
    print(f"POSGRAPH tokens {x.shape[0]} on {torch.cuda.get_device_name()}")
    for dropout in (0.2, 0.0):
        def step():
            out = add_timestamp_positional_embeddings(
                x, offsets, timestamps, targets, position, time_table, alpha=512 ** 0.5,
                contextual_seq_len=6, time_bucket_fn="sqrt", time_bucket_increments=60.0,
                num_time_buckets=2048, dropout_ratio=dropout)
            return torch.autograd.grad(out, (x, position, time_table), grad)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        ms, count = kernel_ms(step)
        print(f"POSGRAPH eager dropout {dropout}: {ms:.3f} ms ({count} calls)")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        graph.replay()
        torch.cuda.synchronize()
        ms, count = kernel_ms(graph.replay)
        print(f"POSGRAPH graph dropout {dropout}: {ms:.3f} ms ({count} calls)")
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        print(f"POSGRAPH graph dropout {dropout}: whole replay (forward + backward) "
              f"{start.elapsed_time(end) / 20:.3f} ms")


if __name__ == "__main__":
    main()
