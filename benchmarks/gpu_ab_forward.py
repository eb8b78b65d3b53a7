"""A/B timing of the attention forward: candidates' own terms before vs after the key loops.

    python benchmarks/gpu_ab_forward.py

bf16, B=32, N=8192 (lengths U[0.9N, N], <= 20 candidates), H=4, d=128, tile pinned to
M128_N64_w8_s3; each variant timed three times, interleaved, median of do_bench each. Also
checks that the two variants' outputs are identical. Imports only torch, triton, hstu.ops.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402

from hstu.ops.triton import attention  # noqa: E402
from hstu.ops.triton._common import Tile, pinned  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_bench import attention_flops, jagged_problem  # noqa: E402


def main() -> None:
    lengths, offsets, targets = jagged_problem(32, 8192, 0.9)
    total = int(lengths.sum())
    q, k, v = (torch.randn(total, 4, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flops, _ = attention_flops(lengths)
    outs, times = {}, {True: [], False: []}
    with pinned(attn_fwd=Tile(128, 64, 8, 3)):
        for _ in range(3):
            for first in (True, False):
                attention.FORWARD_OWN_TERM_FIRST = first

                def step():
                    return attention.hstu_mha(q, k, v, offsets, max_seq_len=8192,
                                              num_targets=targets)

                outs[first] = step()
                times[first].append(triton.testing.do_bench(step, warmup=50, rep=300,
                                                            return_mode="median"))
    same = torch.equal(outs[True], outs[False])
    for first, values in times.items():
        best = min(values)
        print(f"own term {'first' if first else 'last '}: "
              + ", ".join(f"{t:.3f}" for t in values)
              + f" ms -> best {flops / best / 1e9:.1f} TFLOP/s")
    print(f"outputs identical: {same}")


if __name__ == "__main__":
    main()
