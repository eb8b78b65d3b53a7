"""Check and time every candidate launch config of the attention kernels on the GPU.

Why a sweep: public HSTU Triton kernels crashed with illegal memory accesses for some configs
on H200 + Triton 3.6 (docs/kernels.md). A config may only enter the tuning lists in
hstu/ops/triton/attention.py after it has (1) run without a fault, in a process of its own
(a fault leaves the CUDA context unusable), for every kernel variant the model compiles
(targets, contextual tokens, a window; bf16, fp16 and fp32), and (2) matched the PyTorch
reference within the error bound of hstu.ops.triton.testing. Phase 2 then times every config
that passed, one process, one config at a time.

    python benchmarks/gpu_sweep.py --out DIR [--jobs 6]

Writes DIR/sweep_checks.jsonl (one line per config and check) and DIR/sweep_timings.json,
and prints a table. Imports only torch, triton and hstu.ops.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# (kernel name used by `pinned`, dq mode, tile) candidates; broader than the tuning lists.
# Candidates whose sm_90 build spills little or nothing (Triton 3.6, checked with ptxas on the
# CPU machine first: docs/kernels.md); element 0 of each list is the partner config used for
# the other kernels of a pass.
FORWARD = [(128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3),
           (64, 32, 4, 3)]
DKDV = [(64, 64, 8, 2), (64, 64, 8, 3), (64, 128, 8, 2), (32, 128, 8, 3), (64, 32, 4, 2),
        (32, 64, 4, 3)]
DQ = [(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 2), (64, 64, 8, 2), (64, 32, 4, 3)]


# --smoke: the whole pipeline on the CPU under the Triton interpreter, tiny shapes, two
# configs per kernel (to test this script without a GPU).
SMOKE = os.environ.get("GPU_SWEEP_SMOKE") == "1"
DEVICE = "cpu" if SMOKE else "cuda"
HEADS, DIM = (1, 16) if SMOKE else (4, 128)


def candidates() -> list[dict]:
    keep = 2 if SMOKE else None
    out = [dict(kernel="attn_fwd", mode="atomic", tile=t) for t in FORWARD[:keep]]
    out += [dict(kernel="attn_bwd_dkdv_atomic", mode="atomic", tile=t) for t in DKDV[:keep]]
    out += [dict(kernel="attn_bwd_dkdv", mode="separate", tile=t) for t in DKDV[:keep]]
    out += [dict(kernel="attn_bwd_dq", mode="separate", tile=t) for t in DQ[:keep]]
    return out


# Checks per config: (dtype, contextual, window). Every flag combination compiles its own kernel.
CHECKS = [("bfloat16", 0, 0), ("bfloat16", 6, 0), ("bfloat16", 6, 200), ("float32", 6, 0)]


def _problem(batch, max_len, low_fraction, max_targets, heads, dim, seed, device):
    import torch

    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(int(low_fraction * max_len), max_len + 1, (batch,),
                            generator=generator)
    targets = torch.minimum(torch.randint(1, max_targets + 1, (batch,), generator=generator),
                            lengths)
    offsets = torch.zeros(batch + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    return offsets.to(device), targets.to(device), int(offsets[-1])


def run_check(spec: dict) -> list[dict]:
    """One config, every check of CHECKS, in this process."""
    import torch

    from hstu.ops.pytorch.attention import hstu_mha as torch_mha
    from hstu.ops.triton._common import Tile, pinned
    from hstu.ops.triton.attention import dq_mode
    from hstu.ops.triton.attention import hstu_mha as triton_mha
    from hstu.ops.triton.testing import compare_op

    tile = Tile(*spec["tile"])
    # Pin the config under test; the other kernels of the same pass use the first of their
    # lists (themselves checked by their own lines of the sweep).
    pins = dict(attn_fwd=Tile(*FORWARD[0]), attn_bwd_dkdv_atomic=Tile(*DKDV[0]),
                attn_bwd_dkdv=Tile(*DKDV[0]), attn_bwd_dq=Tile(*DQ[0]))
    pins[spec["kernel"]] = tile
    results = []
    for dtype_name, contextual, window in CHECKS:
        dtype = getattr(torch, dtype_name)
        max_len = 40 if SMOKE else 1100
        offsets, targets, total = _problem(4, max_len, 0.0, 20, HEADS, DIM, seed=len(results),
                                           device=DEVICE)
        generator = torch.Generator().manual_seed(7 + len(results))
        inputs = {name: torch.randn(total, HEADS, DIM, generator=generator,
                                    dtype=torch.float64).to(DEVICE).requires_grad_()
                  for name in ("q", "k", "v")}
        options = dict(max_seq_len=max_len, num_targets=targets, contextual_seq_len=contextual,
                       max_attn_len=window % max_len)

        def kernel(q, k, v):
            return triton_mha(q, k, v, offsets, **options)

        def reference(q, k, v):
            return torch_mha(q, k, v, offsets, **options)

        start = time.time()
        with pinned(**pins), dq_mode(spec["mode"]):
            comparisons = compare_op(kernel, reference, inputs, dtype=dtype)
        if not SMOKE:
            torch.cuda.synchronize()
        results.append(dict(
            spec, check=f"{dtype_name}/c{contextual}/w{window}",
            ok=all(c.ok for c in comparisons),
            errors={c.name: [c.kernel_error, c.torch_error, c.bound] for c in comparisons},
            seconds=round(time.time() - start, 2),
        ))
    return results


def sweep_checks(out_dir: str, jobs: int) -> list[dict]:
    path = os.path.join(out_dir, "sweep_checks.jsonl")
    if os.path.exists(path):
        os.remove(path)
    pending = list(candidates())
    running: list[tuple[dict, subprocess.Popen, str]] = []
    lines = []
    while pending or running:
        while pending and len(running) < jobs:
            spec = pending.pop(0)
            result_file = os.path.join(out_dir, f".check_{len(lines) + len(running)}_{os.getpid()}.json")
            result_file = f"{result_file}.{time.time_ns()}"
            proc = subprocess.Popen(
                [sys.executable, __file__, "--check", json.dumps(spec), "--result", result_file],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
            running.append((spec, proc, result_file))
        time.sleep(0.5)
        for item in list(running):
            spec, proc, result_file = item
            if proc.poll() is None:
                continue
            running.remove(item)
            output = proc.stdout.read()
            if proc.returncode == 0 and os.path.exists(result_file):
                with open(result_file) as handle:
                    results = json.load(handle)
                os.remove(result_file)
            else:
                results = [dict(spec, check="process", ok=False, crashed=True,
                                returncode=proc.returncode, log=output[-2000:])]
            with open(path, "a") as handle:
                for result in results:
                    handle.write(json.dumps(result) + "\n")
            for result in results:
                lines.append(result)
                status = "ok" if result["ok"] else ("CRASH" if result.get("crashed") else "FAIL")
                print(f"check {spec['kernel']:<22} {str(spec['tile']):<18} "
                      f"{result['check']:<22} {status}", flush=True)
    return lines


SHAPES = [dict(batch=32, max_len=8192, low=0.9), dict(batch=128, max_len=2048, low=0.0),
          dict(batch=512, max_len=512, low=0.9)]
if SMOKE:
    SHAPES = [dict(batch=2, max_len=40, low=0.5), dict(batch=3, max_len=20, low=0.0)]


def run_timings(specs: list[dict], result_file: str) -> None:
    """Median time of each config at the benchmark shapes (bf16, <= 20 targets), appended to
    result_file one line at a time so that a fault loses only the config that caused it."""
    import torch
    import triton

    from hstu.ops.triton._common import Tile, pinned
    from hstu.ops.triton.attention import dq_mode
    from hstu.ops.triton.attention import hstu_mha as triton_mha

    for spec in specs:
        for shape in SHAPES:
            offsets, targets, total = _problem(shape["batch"], shape["max_len"], shape["low"],
                                               20, HEADS, DIM, seed=1, device=DEVICE)
            q, k, v = (torch.randn(total, HEADS, DIM, device=DEVICE, dtype=torch.bfloat16)
                       .requires_grad_() for _ in range(3))
            grad = torch.randn(total, HEADS, DIM, device=DEVICE, dtype=torch.bfloat16)
            options = dict(max_seq_len=shape["max_len"], num_targets=targets)
            pins = dict(attn_fwd=Tile(*FORWARD[0]), attn_bwd_dkdv_atomic=Tile(*DKDV[0]),
                        attn_bwd_dkdv=Tile(*DKDV[0]), attn_bwd_dq=Tile(*DQ[0]))
            pins[spec["kernel"]] = Tile(*spec["tile"])
            with pinned(**pins), dq_mode(spec["mode"]):
                if spec["kernel"] == "attn_fwd":
                    def step():
                        triton_mha(q, k, v, offsets, **options)
                else:
                    out = triton_mha(q, k, v, offsets, **options)

                    def step():
                        torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)
                if SMOKE:
                    begin = time.perf_counter()
                    step()
                    ms = (time.perf_counter() - begin) * 1e3
                else:
                    ms = triton.testing.do_bench(step, warmup=25, rep=100,
                                                 return_mode="median")
            line = dict(spec, shape=f"B{shape['batch']}_N{shape['max_len']}", ms=ms)
            with open(result_file, "a") as handle:
                handle.write(json.dumps(line) + "\n")
            print(f"time {spec['kernel']:<22} {str(spec['tile']):<18} {line['shape']:<10} "
                  f"{ms:.3f} ms", flush=True)


def time_configs(passed: list[dict], out_dir: str) -> list[dict]:
    result_file = os.path.join(out_dir, "sweep_timings.jsonl")
    remaining = list(passed)
    lines: list[dict] = []
    while remaining:
        proc = subprocess.run([sys.executable, __file__, "--time", json.dumps(remaining),
                               "--result", result_file], text=True)
        done = []
        if os.path.exists(result_file):
            with open(result_file) as handle:
                done = [json.loads(line) for line in handle]
        finished = {(d["kernel"], tuple(d["tile"])) for d in done
                    if d["shape"] == f"B{SHAPES[-1]['batch']}_N{SHAPES[-1]['max_len']}"}
        remaining = [s for s in remaining if (s["kernel"], tuple(s["tile"])) not in finished]
        lines = done
        if proc.returncode != 0 and remaining:
            crashed = remaining.pop(0)
            print(f"timing process died (code {proc.returncode}) on {crashed}", flush=True)
            lines.append(dict(crashed, shape="?", ms=None, crashed=True))
            with open(result_file, "a") as handle:
                handle.write(json.dumps(lines[-1]) + "\n")
    return lines


def print_summary(timings: list[dict]) -> None:
    """Per kernel and shape, the configs from fastest to slowest."""
    groups: dict[tuple, list] = {}
    for line in timings:
        if line.get("ms") is not None:
            groups.setdefault((line["kernel"], line["shape"]), []).append(line)
    for (kernel, shape), lines in sorted(groups.items()):
        ranked = sorted(lines, key=lambda line: line["ms"])
        text = "  ".join(f"{tuple(line['tile'])}:{line['ms']:.3f}" for line in ranked)
        print(f"{kernel:<22} {shape:<10} {text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="sweep_out")
    parser.add_argument("--jobs", type=int, default=6)
    parser.add_argument("--smoke", action="store_true",
                        help="run the pipeline on the CPU (Triton interpreter), tiny shapes")
    parser.add_argument("--check", help=argparse.SUPPRESS)
    parser.add_argument("--time", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke and not SMOKE:
        env = dict(os.environ, GPU_SWEEP_SMOKE="1", TRITON_INTERPRET="1")
        sys.exit(subprocess.run([sys.executable, *sys.argv], env=env).returncode)
    if args.check:
        results = run_check(json.loads(args.check))
        with open(args.result, "w") as handle:
            json.dump(results, handle)
        return
    if args.time:
        run_timings(json.loads(args.time), args.result)
        return
    os.makedirs(args.out, exist_ok=True)
    started = time.time()
    lines = sweep_checks(args.out, args.jobs)
    failed = {(line["kernel"], tuple(line["tile"])) for line in lines if not line["ok"]}
    passed = [spec for spec in candidates()
              if (spec["kernel"], tuple(spec["tile"])) not in failed]
    print(f"checks done in {time.time() - started:.0f} s: {len(passed)} of "
          f"{len(candidates())} configs passed every check", flush=True)
    for line in lines:
        if not line["ok"]:
            print("not kept:", json.dumps({k: line.get(k) for k in
                                           ("kernel", "tile", "check", "errors", "returncode")}))
    timings = time_configs(passed, args.out)
    print_summary(timings)
    print(f"sweep done in {time.time() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
