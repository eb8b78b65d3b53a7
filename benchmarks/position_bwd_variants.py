#!/usr/bin/env python3
"""The positional backward's table gradients: the production kernel against one atomic per token.

    python benchmarks/position_bwd_variants.py [--json FILE]          # GPU: time both
    TRITON_INTERPRET=1 python benchmarks/position_bwd_variants.py --check-only   # CPU: equal?

Why: in the training step with histories capped at 1,024 tokens, `_add_position_time_bwd`
(hstu/ops/triton/position.py) is the top kernel (1.1 ms of a 15 ms step on an H100,
docs/BENCHMARKS.md "Session 10") though it moves ~45 MB. It adds each token's gradient to its
position row and its time-bucket row with float atomics, and a few rows take most of them:
every candidate uses position c and (its timestamp being the query time) the query's own time
bucket, and a row's recent actions share buckets. A segmented scan over each block's runs of
equal buckets made it slower (1.5 ms) and was reverted.

Production now merges (`_add_merging_last`, adopted in session 11 after this script measured
it on one H100: 0.100 -> 0.076 ms on the 1k indices, 0.291 -> 0.243 ms on the 27K shape's):
each block of tokens first sums the tokens that share the block's last token's position (a
block of one row's candidates: all of them) and adds that sum with one atomic, and likewise
for its time bucket; the other tokens add theirs one by one. `per_token` here is the kernel
before it, one atomic per token and table. Both get the same inputs (the 1k step's shape and
the 27K shape's 131K-token batch, bf16 gradients, D = 512) and must give the same table
gradients (up to float addition order) and the same d x.

These synthetic indices do not reproduce the 1.1 ms the kernel takes inside the training step
(0.1 ms here with a similar token count). The step runs it with the recipe's input dropout
(0.2), which `--dropout 0.2` adds, and on its own batches' indices, which `--shapes train1k`
uses (train_bench's first batch at --max-history 1024; needs TorchRec).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch
import triton
import triton.language as tl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from hstu.ops.pytorch.position import position_indices, time_bucket_indices  # noqa: E402
from hstu.ops.triton.position import _add_position_time_bwd, _input_gradient  # noqa: E402

CONTEXT, D, POSITIONS, TIME_BUCKETS = 6, 512, 8192, 2048


@triton.jit
def _add_position_time_bwd_per_token(D_OUT, POS, BUCKET, D_X, D_P, D_T, total, stride_dout,
                                     stride_dx, alpha, dropout_ratio, SEED,
                                     D: tl.constexpr, USE_TIME: tl.constexpr,
                                     DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr,
                                     BLOCK_D: tl.constexpr):
    """The production kernel before session 11: one atomic per token and table (d x as
    production computes it, so that an A/B changes only the table adds)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    ok = rows < total
    col_ok = cols < D
    grad = _input_gradient(D_OUT, D_X, rows, cols, ok, col_ok, stride_dout, stride_dx, alpha,
                           dropout_ratio, SEED, D, DROPOUT)
    mask = ok[:, None] & col_ok[None, :]
    pos = tl.load(POS + rows, mask=ok, other=0).to(tl.int64)
    tl.atomic_add(D_P + pos[:, None] * D + cols[None, :], grad, mask=mask, sem="relaxed")
    if USE_TIME:
        bucket = tl.load(BUCKET + rows, mask=ok, other=0).to(tl.int64)
        tl.atomic_add(D_T + bucket[:, None] * D + cols[None, :], grad, mask=mask, sem="relaxed")


KERNELS = {"production": _add_position_time_bwd, "per_token": _add_position_time_bwd_per_token}


def draw_rows(shape: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(history lengths, candidates per row): '1k' = 32 rows of 900-1,023 history tokens and
    100 candidates (train_bench --max-history 1024 --batch-size 32); '27k' = long-tailed rows
    (log-normal, median 1,000, cut at 7,894; 1-100 candidates) packed to 131,072 tokens."""
    if shape == "1k":
        return rng.integers(900, 1024, 32), np.full(32, 100)
    if shape == "tiny":
        return np.array([40, 3, 0, 70]), np.array([20, 1, 4, 9])
    history, candidates, total = [], [], 0
    while True:
        n = int(min(7894, max(1, round(rng.lognormal(np.log(1000), 1.1)))))
        t = int(rng.integers(1, 101))
        if total + CONTEXT + n + t > 131_072:
            return np.array(history), np.array(candidates)
        history.append(n)
        candidates.append(t)
        total += CONTEXT + n + t


def train_batch_rows(max_history: int = 1024, rows: int = 32):
    """(timestamps per row [contextual zeros; history; candidates], candidates per row) of
    train_bench's first synthetic batch at --max-history / --batch-size (needs TorchRec, as
    train_bench does): the indices the training step's positional op really sees."""
    import types

    import train_bench

    from hstu.config import load_config

    args = types.SimpleNamespace(
        median_history=max(1, min(1000, max_history // 2)), candidates=100, batches=1,
        eval_batches=0, max_history=max_history, workers=[1], seed=0, split_global=False,
        recipe="recipes/kuairand_dlrm_hstu.config")
    cfg = load_config(args.recipe, [])
    batch = train_bench.make_batches(args, cfg, 0, {"rows": rows, "token_budget": 0},
                                     CONTEXT)[0]
    history = batch.seq_lengths["uih_seq"].tolist()
    candidates = batch.seq_lengths["cand_seq"].tolist()
    uih = batch.raw["uih_seq__action_timestamp"].long().split(history)
    query = batch.raw["cand_seq__query_time"].long().split(candidates)
    timestamps = [np.concatenate([np.zeros(CONTEXT, np.int64), u.numpy(), q.numpy()])
                  for u, q in zip(uih, query)]
    return timestamps, np.array(history), np.array(candidates)


def make_case(shape: str, device: str, dim: int) -> dict:
    """A batch laid out as the positional op sees it: per row c contextual tokens (timestamp
    0), the history (times over the last 30 days, oldest first), the candidates (at the query
    time); with its position and time-bucket rows as the forward computes them."""
    rng = np.random.default_rng(0)
    if shape == "train1k":
        timestamps, history, candidates = train_batch_rows()
    else:
        history, candidates = draw_rows(shape, rng)
        query = 1_700_000_000
        timestamps = []
        for n, t in zip(history, candidates):
            times = np.sort(query - rng.integers(0, 30 * 86_400, n))
            timestamps += [np.zeros(CONTEXT, np.int64), times, np.full(t, query)]
    lengths = torch.from_numpy(CONTEXT + history + candidates)
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    total = int(offsets[-1])
    ts = torch.from_numpy(np.concatenate(timestamps))
    targets = torch.from_numpy(candidates)
    positions = position_indices(offsets, targets, total, contextual_seq_len=CONTEXT,
                                 num_position_buckets=POSITIONS, use_time_encoding=True)
    buckets = time_bucket_indices(offsets, ts, time_bucket_fn="sqrt",
                                  time_bucket_increments=60.0, num_time_buckets=TIME_BUCKETS)
    d_out = torch.randn(total, dim, generator=torch.Generator().manual_seed(1))
    return dict(d_out=d_out.to(device, torch.bfloat16 if device == "cuda" else torch.float32),
                positions=positions.to(device, torch.int32),
                buckets=buckets.to(device, torch.int32), total=total, dim=dim,
                rows=len(lengths))


def run(kernel, case: dict, dropout: float = 0.0) -> tuple[torch.Tensor, torch.Tensor,
                                                           torch.Tensor]:
    """d x, d position table, d time table, launched as _AddPositionTime.backward launches."""
    d_out, total, dim = case["d_out"], case["total"], case["dim"]
    d_x = torch.empty_like(d_out)
    d_position = torch.zeros((POSITIONS, dim), dtype=torch.float32, device=d_out.device)
    d_time = torch.zeros((TIME_BUCKETS + 1, dim), dtype=torch.float32, device=d_out.device)
    block_d = max(16, triton.next_power_of_2(dim))
    block_r = max(1, min(64, 8192 // block_d))
    seed = torch.full((1,), 1234, dtype=torch.int64, device=d_out.device)
    kernel[(triton.cdiv(total, block_r),)](
        d_out, case["positions"], case["buckets"], d_x, d_position, d_time, total,
        d_out.stride(0), d_x.stride(0), 22.6, dropout, seed, D=dim, USE_TIME=True,
        DROPOUT=dropout > 0, BLOCK_R=block_r, BLOCK_D=block_d)
    return d_x, d_position, d_time


def compare(case: dict, dropout: float = 0.0) -> dict:
    results = {name: run(kernel, case, dropout) for name, kernel in KERNELS.items()}
    want = results["production"]
    errors = {}
    for name, got in results.items():
        errors[name] = max(float((g.float() - w.float()).abs().max()) for g, w in zip(got, want))
        for g, w, what in zip(got, want, ("d x", "d position", "d time")):
            torch.testing.assert_close(g.float(), w.float(), rtol=1e-4, atol=1e-3,
                                       msg=f"{name}: {what}")
    return errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["1k", "27k"],
                        help="1k, 27k (synthetic indices), train1k (train_bench's first 1k "
                        "batch: needs TorchRec)")
    parser.add_argument("--check-only", action="store_true",
                        help="compare the kernels on a tiny case (CPU under TRITON_INTERPRET=1)")
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="input dropout ratio, as the training step runs it (recipe: 0.2)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.check_only:
        case = make_case("tiny", "cuda" if torch.cuda.is_available() else "cpu", dim=24)
        print("tiny case, max |difference| against production:", compare(case, args.dropout))
        return 0
    rows = []
    for shape in args.shapes:
        case = make_case(shape, "cuda", D)
        errors = compare(case, args.dropout)
        for name, kernel in KERNELS.items():
            ms = triton.testing.do_bench(lambda kernel=kernel: run(kernel, case, args.dropout),
                                         warmup=25, rep=200)
            rows.append(dict(shape=shape, kernel=name, tokens=case["total"], rows=case["rows"],
                             dropout=args.dropout, ms=round(ms, 4),
                             max_abs_diff=errors[name]))
            print(f"{shape:>4} {case['total']:>7} tokens  {name:<11} {ms:7.3f} ms  "
                  f"max|diff| {errors[name]:.2e}", flush=True)
    print(torch.cuda.get_device_name(), torch.__version__, "triton", triton.__version__)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
