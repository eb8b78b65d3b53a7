#!/usr/bin/env python3
"""Does the order of rows in a long-tailed batch change the attention's time? (GPU)

    python benchmarks/attention_row_order.py [--json FILE] [--budget 131072] [--batches 3]

A training batch of the 27K recipe's shape is packed to a token budget from long-tailed rows
(log-normal history lengths, median 1,000, sigma 1.1, cut at 7,894 as hstu.data.synthetic
draws them; 1-100 candidates; 6 contextual tokens). Under a causal mask the work of a row grows
with its length squared, so a handful of rows carry most of it; if their programs start late,
the kernel ends with a tail on few SMs. This times the TRITON attention forward and
forward+backward on the same rows in three orders: as drawn, longest first, shortest first
(H=4, d=128, bf16, triton.testing.do_bench median), and the rows as drawn with the kernel's
sort_by_length (the STU config field), which should match "longest first" in the data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch
import triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from hstu.ops.triton.attention import hstu_mha  # noqa: E402

HEADS, DIM, CONTEXT, MAX_HISTORY = 4, 128, 6, 7894


def draw_lengths(rng: np.random.Generator, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """(row lengths with contextual tokens and candidates, candidates per row) up to budget."""
    lengths, targets, total = [], [], 0
    while True:
        history = int(min(MAX_HISTORY, max(1, round(rng.lognormal(np.log(1000), 1.1)))))
        candidates = int(rng.integers(1, 101))
        length = CONTEXT + history + candidates
        if total + length > budget:
            return np.array(lengths), np.array(targets)
        lengths.append(length)
        targets.append(candidates)
        total += length


def time_order(lengths: np.ndarray, targets: np.ndarray, sort: bool) -> tuple[float, float]:
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.from_numpy(lengths).cumsum(0)
    total = int(offsets[-1])
    q, k, v = (torch.randn(total, HEADS, DIM, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    grad = torch.randn(total, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    kwargs = dict(max_seq_len=int(lengths.max()), num_targets=torch.from_numpy(targets).cuda(),
                  contextual_seq_len=CONTEXT, scaling_seqlen=8000, sort_by_length=sort)
    offsets = offsets.cuda()

    def forward():
        with torch.no_grad():
            hstu_mha(q, k, v, offsets, **kwargs)

    def forward_backward():
        out = hstu_mha(q, k, v, offsets, **kwargs)
        torch.autograd.grad(out, (q, k, v), grad)

    forward_backward()
    bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")  # noqa: E731
    return bench(forward), bench(forward_backward)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=int, default=131072)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for batch in range(args.batches):
        lengths, targets = draw_lengths(rng, args.budget)
        longest = np.argsort(-lengths, kind="stable")
        drawn = np.arange(len(lengths))
        # (rows permuted in the data, the kernel's sort_by_length)
        orders = {"as drawn": (drawn, False), "longest first": (longest, False),
                  "shortest first": (longest[::-1], False),
                  "as drawn, sort_by_length": (drawn, True)}
        # causal FLOPs as reference 3.5 counts them (forward 2 matmuls, backward 2.5x)
        flops = 4 * HEADS * DIM * float((lengths.astype(np.float64) ** 2).sum()) / 2
        for name, (order, sort) in orders.items():
            fwd, fwd_bwd = time_order(lengths[order], targets[order], sort)
            row = dict(batch=batch, order=name, rows=len(lengths), tokens=int(lengths.sum()),
                       longest=int(lengths.max()), fwd_ms=fwd, fwd_bwd_ms=fwd_bwd,
                       fwd_tflops=flops / fwd / 1e9, fwd_bwd_tflops=3.5 * flops / fwd_bwd / 1e9)
            rows.append(row)
            print(f"batch {batch} {name:31s} rows {row['rows']:3d} tokens {row['tokens']:7d} "
                  f"fwd {fwd:6.3f} ms ({row['fwd_tflops']:5.0f} TFLOP/s)  fwd+bwd {fwd_bwd:6.3f} ms "
                  f"({row['fwd_bwd_tflops']:5.0f} TFLOP/s)", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                           triton=triton.__version__, rows=rows), handle, indent=1)


if __name__ == "__main__":
    main()
