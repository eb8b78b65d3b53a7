"""A/B of attention launch configs and dQ modes on the GPU: timing at B=32, N=8192 and the
error bound.

    python benchmarks/gpu_ab_attention.py [--out DIR] [--rounds 3]

Each variant is a set of module switches of hstu.ops.triton.attention plus pinned tiles. Each is
timed `rounds` times, interleaved with the others, median of do_bench each (bf16, H=4, d=128,
lengths U[0.9N, N], <= 20 candidates); the error bound of hstu.ops.triton.testing is checked on
B=4 rows up to 1100 (plain, and contextual + window). The bf16 matmul rate and torch's flash
SDPA are measured at the start and the end, to show the state of the machine (it slows down as
it heats). Prints a table; writes DIR/gpu_ab_attention.json.

Session 3 used this script, with more switches that no longer exist (score formulas, q in
registers, TMA loads, the overlap on/off; git show af9c941:benchmarks/gpu_ab_attention.py), for
steps 6-9 of docs/kernels.md's measurement log.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import triton  # noqa: E402

from hstu.ops.pytorch.attention import hstu_mha as torch_mha  # noqa: E402
from hstu.ops.triton import attention  # noqa: E402
from hstu.ops.triton._common import Tile, pinned  # noqa: E402
from hstu.ops.triton.testing import compare_op  # noqa: E402
from kernel_bench import attention_flops, jagged_problem  # noqa: E402

FIRST_DKDV = attention.BACKWARD_DKDV_TILES[0]
FIRST_DQ = attention.BACKWARD_DQ_TILES[0]
FORWARD_VARIANTS = {
    # name: (module switches, tiles by kernel name)
    **{f"fwd {tile}": (dict(), dict(attn_fwd=tile))
       for tile in attention.FORWARD_TILES + [Tile(128, 128, 8, 2), Tile(128, 32, 8, 4)]},
    # The launch order before session 4: consecutive programs on different (row, head) pairs.
    "fwd heads first": (dict(LAUNCH_ORDER="heads_first"),
                        dict(attn_fwd=attention.FORWARD_TILES[0])),
    # Candidates' own terms after the key loops instead of before (same sum, another order).
    "fwd own term last": (dict(FORWARD_OWN_TERM_FIRST=False),
                          dict(attn_fwd=attention.FORWARD_TILES[0])),
}
BACKWARD_VARIANTS = {
    f"bwd atomic dkdv {FIRST_DKDV}": (dict(DQ_MODE="atomic"),
                                     dict(attn_bwd_dkdv_atomic=FIRST_DKDV)),
    **{
        f"bwd separate dkdv {dkdv} dq {dq}": (
            dict(DQ_MODE="separate"), dict(attn_bwd_dkdv=dkdv, attn_bwd_dq=dq))
        for dkdv, dq in [(FIRST_DKDV, tile) for tile in attention.BACKWARD_DQ_TILES[:2]]
        + [(Tile(64, 128, 8, 2), FIRST_DQ)]
    },
    "bwd separate heads first": (dict(DQ_MODE="separate", LAUNCH_ORDER="heads_first"),
                                 dict(attn_bwd_dkdv=FIRST_DKDV, attn_bwd_dq=FIRST_DQ)),
}
DEFAULTS = dict(DQ_MODE=attention.DQ_MODE, LAUNCH_ORDER=attention.LAUNCH_ORDER,
                FORWARD_OWN_TERM_FIRST=attention.FORWARD_OWN_TERM_FIRST)


def set_switches(switches: dict) -> None:
    for name, value in switches.items():
        setattr(attention, name, value)


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def machine_state() -> dict:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm = 2 * 8192 ** 3 / bench(lambda: a @ b) / 1e9
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(32, 4, 8192, 128, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))

    def sdpa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    fwd_flops, _ = attention_flops(torch.full((32,), 8192))
    return dict(matmul_tflops=mm, sdpa_fwd_tflops=fwd_flops / bench(sdpa) / 1e9)


def error_check(kind: str, switches: dict, tiles: dict) -> list[str]:
    """Error-bound comparisons (forward and gradients) for one variant; lines 'name: ...'."""
    lines = []
    set_switches(DEFAULTS)
    set_switches(switches)
    for contextual, window in ((0, 0), (6, 300)):
        lengths = [1100, 700, 1, 950]
        targets = torch.tensor([20, 5, 1, 13], device="cuda")
        offsets = torch.zeros(5, dtype=torch.int64)
        offsets[1:] = torch.tensor(lengths).cumsum(0)
        offsets = offsets.cuda()
        options = dict(max_seq_len=1100, num_targets=targets, contextual_seq_len=contextual,
                       max_attn_len=window)
        generator = torch.Generator().manual_seed(contextual)
        inputs = {name: torch.randn(sum(lengths), 4, 128, generator=generator,
                                    dtype=torch.float64).cuda().requires_grad_()
                  for name in ("q", "k", "v")}
        with pinned(**dict(dict(attn_fwd=attention.FORWARD_TILES[0]), **tiles)):
            results = compare_op(
                lambda q, k, v: attention.hstu_mha(q, k, v, offsets, **options),
                lambda q, k, v: torch_mha(q, k, v, offsets, **options),
                inputs, dtype=torch.bfloat16)
        if kind == "fwd":
            results = results[:1]
        else:
            results = results[1:]
        for result in results:
            lines.append(f"ctx={contextual} win={window} {result} ratio "
                         f"{result.kernel_error / result.torch_error:.2f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    report = dict(before=machine_state())
    print("machine before:", report["before"], flush=True)

    lengths, offsets, targets = jagged_problem(32, 8192, 0.9)
    total = int(lengths.sum())
    q, k, v, grad = (torch.randn(total, 4, 128, device="cuda", dtype=torch.bfloat16)
                     for _ in range(4))
    fwd_flops, bwd_flops = attention_flops(lengths)

    def forward_fn():
        return attention.hstu_mha(q, k, v, offsets, max_seq_len=8192, num_targets=targets)

    problem = attention._Problem(q, k, v, offsets, targets, 8192, 0, 0, 128 ** -0.5, 1 / 8192)

    def backward_fn():
        return attention.attention_backward(problem, q, k, v, grad)

    times: dict[str, list[float]] = {}
    reference = {}
    for round_index in range(args.rounds):
        for kind, variants in (("fwd", FORWARD_VARIANTS), ("bwd", BACKWARD_VARIANTS)):
            for name, (switches, tiles) in variants.items():
                set_switches(DEFAULTS)
                set_switches(switches)
                try:
                    with pinned(**tiles):
                        fn = forward_fn if kind == "fwd" else backward_fn
                        result = fn()
                        if round_index == 0:
                            # Same numbers as the base variant up to rounding?
                            out = result if kind == "fwd" else result[0]
                            base = reference.setdefault(kind, out.float())
                            diff = ((out.float() - base).norm() / base.norm()).item()
                            print(f"{name}: rel diff to base {diff:.2e}", flush=True)
                        times.setdefault(name, []).append(bench(fn))
                except Exception as error:  # a variant that fails must not stop the others
                    print(f"{name}: FAILED {type(error).__name__}: {str(error)[:300]}",
                          flush=True)
                    times.setdefault(name, []).append(float("nan"))
    set_switches(DEFAULTS)
    report["after"] = machine_state()
    print("machine after:", report["after"], flush=True)

    checks = {}
    for kind, variants in (("fwd", FORWARD_VARIANTS), ("bwd", BACKWARD_VARIANTS)):
        for name, (switches, tiles) in variants.items():
            try:
                checks[name] = error_check(kind, switches, tiles)
            except Exception as error:
                checks[name] = [f"FAILED {type(error).__name__}: {str(error)[:300]}"]
            failed = [line for line in checks[name] if "[ok]" not in line]
            ratios = [float(line.rsplit(" ", 1)[1]) for line in checks[name] if "[ok]" in line]
            print(f"{name}: {len(checks[name]) - len(failed)} checks ok, worst ratio to "
                  f"pytorch {max(ratios, default=float('nan')):.2f}; failed: {failed}", flush=True)
    set_switches(DEFAULTS)

    print("\nvariant                 times ms (rounds)            best TFLOP/s")
    for name, values in times.items():
        flops = fwd_flops if name.startswith("fwd") else bwd_flops
        best = min(values)
        print(f"{name:<22} {', '.join(f'{t:7.3f}' for t in values)}   "
              f"{flops / best / 1e9:7.1f}")
    report.update(times_ms=times, checks=checks, fwd_flops=fwd_flops, bwd_flops=bwd_flops,
                  device=torch.cuda.get_device_name(), torch=torch.__version__,
                  triton=triton.__version__)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gpu_ab_attention.json"), "w") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
