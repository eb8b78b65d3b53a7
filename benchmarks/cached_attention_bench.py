#!/usr/bin/env python3
"""The cached HSTU attention kernel alone (hstu/ops/triton/cached_attention.py), at serving size.

    python benchmarks/cached_attention_bench.py --json cached_attention.json        # on a GPU
    python benchmarks/cached_attention_bench.py --users 1 --cache 40 --delta 6 --heads 1 \\
        --head-dim 16 --repeats 1                                          # CPU interpreter

Per case (users per call, cached tokens per user, delta tokens per user): the new tokens and
candidates of every user ("delta": --new history tokens + --candidates) attend to that user's
cache, kept as one buffer per user (CacheRows, as serving keeps it) and to the delta keys
before them; the 27K recipe's attention (4 heads of 128, 6 contextual tokens, candidates as
targets, no window), bf16.

Reported per case: the kernel's time with each launch config (pinned in turn) and the tuned
choice, its TFLOP/s (2 matmuls of 2 * d FLOPs per query-key pair the mask admits: the cached
keys and the delta keys up to the query), and the bytes read (cached K and V once per query
block) against the GPU's memory bandwidth. Beside it, in the same run, torch's
scaled_dot_product_attention with each backend on the same queries against the same keys laid
out dense ([B, H, n, d], no mask: a softmax attention of the same size, the cost a serving
stack with a stock kernel would pay, copies into the dense layout not counted).

Timing: CUDA events around each launch after warm-up, median of --repeats. On the CPU the
kernel runs under TRITON_INTERPRET=1 (tiny shapes only) and SDPA is skipped: that is a check
that the script runs, not a measurement.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Triton reads this when imported: without a GPU the kernel runs under its interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hstu.ops.cached_attention import CacheRows  # noqa: E402
from hstu.ops.triton import _common  # noqa: E402
from hstu.ops.triton import cached_attention as kernel  # noqa: E402


def _time_ms(fn, device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def make_case(users: int, cache: int, delta: int, candidates: int, heads: int, head_dim: int,
              contextual: int, dtype, device, seed: int = 0):
    """Inputs of one call: q, k, v of the delta tokens, per-user cache buffers, offsets."""
    generator = torch.Generator().manual_seed(seed)

    def rand(rows: int) -> torch.Tensor:
        return (torch.randn(rows, heads, head_dim, generator=generator) * 0.5).to(dtype).to(device)

    q, k, v = rand(users * delta), rand(users * delta), rand(users * delta)
    keys = [rand(cache) for _ in range(users)]
    values = [rand(cache) for _ in range(users)]
    seq_offsets = torch.arange(0, users * delta + 1, delta, dtype=torch.int64, device=device)
    cache_offsets = torch.arange(0, users * cache + 1, cache, dtype=torch.int64, device=device)
    targets = torch.full((users,), candidates, dtype=torch.int64, device=device)
    return dict(q=q, k=k, v=v, seq_offsets=seq_offsets, k_cache=CacheRows.of(keys),
                v_cache=CacheRows.of(values), cache_offsets=cache_offsets,
                max_seq_len=delta, max_cache_len=cache, num_targets=targets,
                contextual_seq_len=contextual, max_attn_len=0, alpha=head_dim ** -0.5,
                scaling_seqlen=8000), keys, values


def admitted_pairs(users: int, cache: int, delta: int, candidates: int) -> int:
    """Query-key pairs the mask admits: every delta query sees the cache; a new history token
    sees the delta history tokens up to itself; a candidate sees the delta history and
    itself."""
    new = delta - candidates
    per_user = delta * cache + new * (new + 1) // 2 + candidates * (new + 1)
    return users * per_user


def run_case(args, users: int, device) -> dict:
    delta = args.new + args.candidates
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    inputs, keys, values = make_case(users, args.cache, delta, args.candidates, args.heads,
                                     args.head_dim, args.contextual, dtype, device)
    pairs = admitted_pairs(users, args.cache, delta, args.candidates)
    flops = 4 * args.head_dim * pairs
    element = torch.finfo(dtype).bits // 8
    row = dict(users=users, cache=args.cache, delta=delta, heads=args.heads,
               head_dim=args.head_dim, dtype=str(dtype), device=str(device), flops=flops)

    def call():
        return kernel.hstu_mha_cached(**inputs)

    tiles = {}
    candidates = kernel.FORWARD_TILES if device.type == "cuda" else [kernel.INTERPRET_TILE]
    for tile in candidates:
        with _common.pinned(cached_attn_fwd=tile):
            try:
                tiles[str(tile)] = _time_ms(call, device, args.repeats, args.warmup)
            except Exception as error:  # noqa: BLE001 - a config may not fit this GPU
                tiles[str(tile)] = f"failed: {type(error).__name__}"
    tuned_ms = _time_ms(call, device, args.repeats, args.warmup)
    row["tiles_ms"] = tiles
    row["kernel_ms"] = tuned_ms
    row["kernel_tflops"] = flops / tuned_ms / 1e9
    # The same keys as one jagged tensor (how a gathered cache would be read): the tuned
    # kernel's time on it shows what reading rows through their addresses costs.
    one_tensor = dict(inputs, k_cache=torch.cat(keys), v_cache=torch.cat(values))
    row["kernel_one_tensor_ms"] = _time_ms(lambda: kernel.hstu_mha_cached(**one_tensor), device,
                                           args.repeats, args.warmup)
    # Every cached K and V row read once per block of queries of each head.
    block_m = min((t.block_m for t in candidates), default=64)
    blocks = -(-delta // block_m)
    row["cache_gb_read_min"] = 2 * users * args.cache * args.heads * args.head_dim * element / 1e9
    row["cache_gb_read_blocks_of_smallest_tile"] = row["cache_gb_read_min"] * blocks

    if device.type == "cuda" and not args.no_sdpa:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        n = args.cache + delta
        dense = [torch.cat([keys[b], inputs["k"][b * delta:(b + 1) * delta]]) for b in range(users)]
        dense_v = [torch.cat([values[b], inputs["v"][b * delta:(b + 1) * delta]])
                   for b in range(users)]
        k_dense = torch.stack(dense).transpose(1, 2).contiguous()  # [B, H, n, d]
        v_dense = torch.stack(dense_v).transpose(1, 2).contiguous()
        q_dense = inputs["q"].view(users, delta, args.heads, args.head_dim).transpose(1, 2)
        q_dense = q_dense.contiguous()
        sdpa_flops = 4 * args.head_dim * users * delta * n
        row["sdpa_flops"] = sdpa_flops
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION),
                              ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                              ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            try:
                with sdpa_kernel([backend]):
                    ms = _time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
                        q_dense, k_dense, v_dense), device, args.repeats, args.warmup)
                row[f"sdpa_{name}_ms"] = ms
                row[f"sdpa_{name}_tflops"] = sdpa_flops / ms / 1e9
            except RuntimeError as error:
                row[f"sdpa_{name}_ms"] = f"failed: {str(error).splitlines()[0][:120]}"
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, nargs="+", default=[1, 32, 128],
                        help="users per call (one case each)")
    parser.add_argument("--cache", type=int, default=4096 + 6,
                        help="cached tokens per user (contextual tokens included)")
    parser.add_argument("--new", type=int, default=10, help="new history tokens per user")
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--contextual", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-sdpa", action="store_true", help="skip the SDPA comparison")
    parser.add_argument("--json", dest="json_out", metavar="FILE")
    args = parser.parse_args(argv)
    if args.cache < args.contextual:
        parser.error("--cache must hold at least the contextual tokens")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor()
    print(f"cached attention on {name} ({device}), torch {torch.__version__}; cache {args.cache}, "
          f"{args.new} new + {args.candidates} candidates per user, {args.heads} x "
          f"{args.head_dim}")
    rows = []
    for users in args.users:
        row = run_case(args, users, device)
        rows.append(row)
        sdpa = "  ".join(f"{key[5:-3]} {value:.3f} ms" for key, value in row.items()
                         if key.startswith("sdpa_") and key.endswith("_ms")
                         and isinstance(value, float))
        tiles = "  ".join(f"{tile} {ms:.3f}" if isinstance(ms, float) else f"{tile} {ms}"
                          for tile, ms in row["tiles_ms"].items())
        print(f"{users:4d} users: kernel {row['kernel_ms']:.3f} ms (tuned), "
              f"{row['kernel_tflops']:.1f} TFLOP/s; one tensor "
              f"{row['kernel_one_tensor_ms']:.3f} ms | SDPA dense {sdpa or '-'} | tiles: {tiles}")
    if args.json_out:
        meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    device_name=name, torch=torch.__version__,
                    command=" ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]))
        Path(args.json_out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
