"""Kernel benchmark (run on the GPU): HSTU attention TFLOP/s and one STU layer, TRITON vs PYTORCH.

    python benchmarks/kernel_bench.py --out DIR [--parts attention,stu] [--dq-mode atomic]
        [--max-lens 8192] [--first-tiles-only]

Attention (bf16, H=4, d_qk=d_v=128, <= 20 candidates per row, no contextual tokens):
  (B=32, N=8192, lengths U[0.9N, N]), (B=128, N=2048, lengths U[0, N]),
  (B=512, N=512, lengths U[0.9N, N]).
  FLOPs as docs/dlrm_hstu_reference.md section 3.5 counts them: forward = sum over rows of
  2*H*(d_qk + d_v)*len^2/2; backward = 3*f_qk + 2*f_v (f_x = sum 2*H*d_x*len^2/2);
  forward+backward TFLOP/s = (forward + backward FLOPs) / (forward + backward time).
  Reference points in the same run: torch scaled_dot_product_attention, causal, dense
  [B, H, N, d] at the same B, N (FLOPs with len = N for every row), once per fast backend
  (flash, cuDNN, efficient), each alone under torch.nn.attention.sdpa_kernel. A backend that
  refuses the shape or dtype is reported as "unavailable: <reason>" (table and JSON). Per shape
  the summary puts TRITON's forward and forward+backward TFLOP/s beside the fastest available
  backend's (each direction its own fastest) with the ratio TRITON / SDPA.
  The PYTORCH HSTU path (padded) is timed where it fits (N <= 2048).
STU layer (seed dims D=512, H=4, d=128, group norm, dropout 0.1, training, 6 contextual
  tokens, S = N): stu_preprocess -> hstu_mha -> stu_postprocess, forward+backward time and
  peak memory above the inputs, TRITON vs PYTORCH.

Times are medians of triton.testing.do_bench (CUDA events). Prints a table; writes
DIR/kernel_bench.json (rows, plus attention_vs_sdpa: the per-shape comparison). Imports only
torch, triton and hstu.ops.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import triton  # noqa: E402

from hstu.ops import Kernel, hstu_mha, stu_postprocess, stu_preprocess  # noqa: E402

ATTENTION_SHAPES = [
    dict(batch=32, max_len=8192, low=0.9),
    dict(batch=128, max_len=2048, low=0.0),
    dict(batch=512, max_len=512, low=0.9),
]
STU_SHAPES = [dict(batch=32, max_len=2048, low=0.9), dict(batch=8, max_len=8192, low=0.9)]
HEADS, DIM = 4, 128


def jagged_problem(batch, max_len, low_fraction, max_targets=20, seed=0):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(int(low_fraction * max_len), max_len + 1, (batch,),
                            generator=generator)
    targets = torch.minimum(torch.randint(1, max_targets + 1, (batch,), generator=generator),
                            lengths)
    offsets = torch.zeros(batch + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    return lengths, offsets.cuda(), targets.cuda()


def attention_flops(lengths: torch.Tensor) -> tuple[float, float]:
    """(forward, backward) FLOPs, reference section 3.5 (causal factor 1/2)."""
    squares = float((lengths.double() ** 2).sum())
    f_qk = 2 * HEADS * DIM * squares / 2
    f_v = 2 * HEADS * DIM * squares / 2
    return f_qk + f_v, 3 * f_qk + 2 * f_v


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def time_forward_and_backward(forward, inputs, grad):
    """(forward ms, forward+backward ms) of out = forward(*inputs); out.backward(grad)."""

    def forward_only():
        with torch.no_grad():
            forward(*inputs)

    def forward_backward():
        out = forward(*inputs)
        torch.autograd.grad(out, inputs, grad)

    forward_backward()  # tuning and compilation happen here, outside the timing
    return bench(forward_only), bench(forward_backward)


def attention_rows(include_pytorch_up_to: int, max_lens: list[int] | None = None) -> list[dict]:
    rows = []
    for shape in ATTENTION_SHAPES:
        if max_lens and shape["max_len"] not in max_lens:
            continue
        shape_rows = []
        lengths, offsets, targets = jagged_problem(shape["batch"], shape["max_len"], shape["low"])
        total = int(lengths.sum())
        name = f"B={shape['batch']} N={shape['max_len']}"
        fwd_flops, bwd_flops = attention_flops(lengths)
        q, k, v = (torch.randn(total, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
                   .requires_grad_() for _ in range(3))
        grad = torch.randn(total, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
        kernels = [Kernel.TRITON]
        if shape["max_len"] <= include_pytorch_up_to:
            kernels.append(Kernel.PYTORCH)
        for kernel in kernels:
            def forward(q, k, v, kernel=kernel):
                return hstu_mha(q, k, v, offsets, max_seq_len=shape["max_len"],
                                num_targets=targets, kernel=kernel)

            fwd_ms, both_ms = time_forward_and_backward(forward, (q, k, v), grad)
            shape_rows.append(dict(op="hstu_mha", impl=kernel.value, shape=name, fwd_ms=fwd_ms,
                                   fwd_bwd_ms=both_ms, fwd_tflops=fwd_flops / fwd_ms / 1e9,
                                   fwd_bwd_tflops=(fwd_flops + bwd_flops) / both_ms / 1e9))
            print(_attention_line(shape_rows[-1]), flush=True)
        del q, k, v, grad
        # SDPA references: dense, causal, every row N long, one backend at a time.
        dense = tuple(torch.randn(shape["batch"], HEADS, shape["max_len"], DIM, device="cuda",
                                  dtype=torch.bfloat16).requires_grad_() for _ in range(3))
        dense_grad = torch.randn_like(dense[0])
        full = torch.full((shape["batch"],), shape["max_len"])
        fwd_flops, bwd_flops = attention_flops(full)
        for backend in SDPA_BACKENDS:
            fwd_ms, both_ms, unavailable = time_sdpa_backend(backend, dense, dense_grad)
            shape_rows.append(sdpa_row(backend, name, fwd_flops, bwd_flops, fwd_ms, both_ms,
                                       unavailable))
            print(_attention_line(shape_rows[-1]), flush=True)
            torch.cuda.empty_cache()
        del dense, dense_grad
        torch.cuda.empty_cache()
        for line in comparison_lines(compare_with_sdpa(shape_rows)):
            print(line, flush=True)
        rows += shape_rows
    return rows


# The SDPA backends timed as references: (name in the rows, torch.nn.attention.SDPBackend
# member). The flash row keeps its old op name, sdpa_flash_causal.
SDPA_BACKENDS = (("flash", "FLASH_ATTENTION"), ("cudnn", "CUDNN_ATTENTION"),
                 ("efficient", "EFFICIENT_ATTENTION"))


def time_sdpa_backend(backend: tuple[str, str], inputs, grad):
    """(forward ms, forward+backward ms, unavailable reason) of causal SDPA with only `backend`
    enabled. A backend that refuses (torch raises "No available kernel" and warns why, cuDNN
    raises from its graph build, ...) gives None times and the reason instead of an exception;
    one whose forward runs but whose backward refuses keeps its forward time."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    member = getattr(SDPBackend, backend[1], None)
    if member is None:
        return None, None, f"torch {torch.__version__} has no SDPBackend.{backend[1]}"

    def sdpa(q, k, v):
        with sdpa_kernel(member):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    def forward_only():
        with torch.no_grad():
            sdpa(*inputs)

    def forward_backward():
        torch.autograd.grad(sdpa(*inputs), inputs, grad)

    fwd_ms = None
    messages: list[str] = []
    try:
        _first_call(forward_only, messages)
        fwd_ms = bench(forward_only)
        _first_call(forward_backward, messages)
        return fwd_ms, bench(forward_backward), None
    except Exception as error:  # a refusal must not end the run; it is reported instead
        reason = unavailable_reason(error, messages)
        return fwd_ms, None, reason if fwd_ms is None else f"fwd+bwd: {reason}"


def _first_call(fn, messages: list[str]) -> None:
    """Run fn once, synchronised, adding to `messages` the warnings torch gives on the way
    (SDPA warns there why a backend was not used before it raises)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn()
            torch.cuda.synchronize()
        finally:
            messages.extend(str(w.message) for w in caught)


def unavailable_reason(error: BaseException, warning_messages=(), limit: int = 600) -> str:
    """One line: the exception's type and first line, then the distinct warnings, at most
    `limit` characters."""
    lines = str(error).strip().splitlines()
    parts = [f"{type(error).__name__}: {lines[0].strip() if lines else ''}".strip()]
    for message in warning_messages:
        message = " ".join(str(message).split())
        if message and message not in parts:
            parts.append(message)
    reason = "; ".join(parts)
    return reason if len(reason) <= limit else reason[:limit - 3] + "..."


def sdpa_row(backend: tuple[str, str], shape: str, fwd_flops: float, bwd_flops: float,
             fwd_ms: float | None, fwd_bwd_ms: float | None,
             unavailable: str | None = None) -> dict:
    """The JSON row of one SDPA backend at one shape; times that could not be taken are None
    and `unavailable` says why."""
    name = backend[0]
    row = dict(op=f"sdpa_{name}_causal", impl="torch", backend=name, shape=shape,
               fwd_ms=fwd_ms, fwd_bwd_ms=fwd_bwd_ms,
               fwd_tflops=None if fwd_ms is None else fwd_flops / fwd_ms / 1e9,
               fwd_bwd_tflops=(None if fwd_bwd_ms is None
                               else (fwd_flops + bwd_flops) / fwd_bwd_ms / 1e9))
    if unavailable:
        row["unavailable"] = unavailable
    return row


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    return None if ours is None or not theirs else ours / theirs


def compare_with_sdpa(rows: list[dict]) -> list[dict]:
    """Per attention shape (in the rows' order): TRITON's forward and forward+backward TFLOP/s
    beside the fastest SDPA backend's for each (each direction picks its own fastest among the
    backends that ran), with ratio = TRITON / SDPA, and the reasons of the unavailable ones."""
    shapes = []
    for row in rows:
        if (row["op"] == "hstu_mha" or row["op"].startswith("sdpa_")) \
                and row["shape"] not in shapes:
            shapes.append(row["shape"])
    result = []
    for shape in shapes:
        triton_row = next((r for r in rows if r["op"] == "hstu_mha" and r["impl"] == "TRITON"
                           and r["shape"] == shape), {})
        sdpa = [r for r in rows if r["op"].startswith("sdpa_") and r["shape"] == shape]
        entry = dict(shape=shape)
        for key, label in (("fwd_tflops", "fwd"), ("fwd_bwd_tflops", "fwd_bwd")):
            ran = [r for r in sdpa if r.get(key) is not None]
            best = max(ran, key=lambda r: r[key]) if ran else {}
            ours = triton_row.get(key)
            entry[f"triton_{label}_tflops"] = ours
            entry[f"sdpa_{label}_backend"] = best.get("backend")
            entry[f"sdpa_{label}_tflops"] = best.get(key)
            entry[f"{label}_ratio"] = _ratio(ours, best.get(key))
        entry["sdpa_unavailable"] = {r["backend"]: r["unavailable"] for r in sdpa
                                     if r.get("unavailable")}
        result.append(entry)
    return result


def comparison_lines(comparison: list[dict], header: bool = True) -> list[str]:
    """The comparison as text: one line per shape, then one per unavailable backend."""

    def cell(entry, label):
        ours, theirs = entry[f"triton_{label}_tflops"], entry[f"sdpa_{label}_tflops"]
        ratio = entry[f"{label}_ratio"]
        backend = entry[f"sdpa_{label}_backend"] or "none ran"
        return (f"{_number(ours, '7.1f')} vs {_number(theirs, '7.1f')} {'(' + backend + ')':<11}"
                f"{_number(ratio, '6.2f')}x")

    lines = []
    if header:
        lines.append("TRITON attention vs the fastest SDPA backend, TFLOP/s "
                     "(ratio TRITON / SDPA; > 1: TRITON faster)")
        lines.append(f"{'shape':<16} {'fwd: TRITON vs SDPA (backend) ratio':<37} | "
                     "fwd+bwd: TRITON vs SDPA (backend) ratio")
    for entry in comparison:
        lines.append(f"{entry['shape']:<16} {cell(entry, 'fwd')} | {cell(entry, 'fwd_bwd')}")
        for backend, reason in entry["sdpa_unavailable"].items():
            lines.append(f"{'':<16} sdpa {backend} unavailable: {reason}")
    return lines


def _number(value: float | None, spec: str) -> str:
    if value is None:
        width = int(spec.split(".")[0])
        return f"{'-':>{width}}"
    return format(value, spec)


def _attention_line(row: dict) -> str:
    line = (f"{row['op']:<21} {row['impl']:<8} {row['shape']:<16} "
            f"fwd {_number(row['fwd_ms'], '8.3f')} ms {_number(row['fwd_tflops'], '6.1f')} "
            f"TFLOP/s | fwd+bwd {_number(row['fwd_bwd_ms'], '8.3f')} ms "
            f"{_number(row['fwd_bwd_tflops'], '6.1f')} TFLOP/s")
    if row.get("unavailable"):
        line += f"  unavailable: {row['unavailable']}"
    return line


def stu_layer(kernel: Kernel, shape: dict) -> dict:
    """One STU layer forward+backward: median time and peak memory above the inputs."""
    dim, heads, d = 512, 4, 128
    contextual = 6
    lengths, offsets, targets = jagged_problem(shape["batch"], shape["max_len"], shape["low"],
                                               seed=3)
    total = int(lengths.sum())
    generator = torch.Generator(device="cuda").manual_seed(0)

    def param(*shape, scale):
        return (torch.randn(*shape, device="cuda", generator=generator) * scale).requires_grad_()

    params = dict(
        norm_weight=param(dim, scale=0.1) + 1.0,
        norm_bias=param(dim, scale=0.1),
        uvqk_weight=param(dim, 2 * heads * 2 * d, scale=dim ** -0.5),
        uvqk_bias=param(2 * heads * 2 * d, scale=0.01),
        out_norm_weight=param(heads, scale=0.1) + 1.0,
        out_norm_bias=param(heads, scale=0.1),
        output_weight=param(3 * heads * d, dim, scale=(3 * heads * d) ** -0.5),
    )
    params = {name: p.detach().requires_grad_() for name, p in params.items()}
    x = torch.randn(total, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(total, dim, device="cuda", dtype=torch.bfloat16)
    leaves = (x, *params.values())

    def layer():
        u, q, k, v = stu_preprocess(
            x, params["norm_weight"], params["norm_bias"], 1e-6, params["uvqk_weight"],
            params["uvqk_bias"], num_heads=heads, attention_dim=d, hidden_dim=d, kernel=kernel)
        attn = hstu_mha(q, k, v, offsets, max_seq_len=shape["max_len"], num_targets=targets,
                        contextual_seq_len=contextual, kernel=kernel)
        return stu_postprocess(
            attn.flatten(1), u, x, params["out_norm_weight"], params["out_norm_bias"], 1e-6,
            params["output_weight"], num_heads=heads, dropout_ratio=0.1, training=True,
            group_norm=True, kernel=kernel)

    def step():
        torch.autograd.grad(layer(), leaves, grad)

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    ms = bench(step)
    return dict(op="stu_layer", impl=kernel.value,
                shape=f"B={shape['batch']} N={shape['max_len']}", tokens=total,
                fwd_bwd_ms=ms, peak_gib=peak / 2**30)


def stu_rows() -> list[dict]:
    rows = []
    for shape in STU_SHAPES:
        for kernel in (Kernel.TRITON, Kernel.PYTORCH):
            try:
                row = stu_layer(kernel, shape)
            except torch.cuda.OutOfMemoryError:
                row = dict(op="stu_layer", impl=kernel.value,
                           shape=f"B={shape['batch']} N={shape['max_len']}", error="OOM")
            torch.cuda.empty_cache()
            rows.append(row)
            if "error" in row:
                print(f"stu_layer {row['impl']:<8} {row['shape']:<16} {row['error']}", flush=True)
            else:
                print(f"stu_layer {row['impl']:<8} {row['shape']:<16} fwd+bwd "
                      f"{row['fwd_bwd_ms']:8.3f} ms  peak {row['peak_gib']:6.2f} GiB", flush=True)
    return rows


def matmul_ceiling() -> float:
    """bf16 8192^3 matmul TFLOP/s on random data: the ceiling the figures are read against."""
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = bench(lambda: a @ b)
    return 2 * 8192**3 / ms / 1e9


def restrict_to_sweep(path: str, module) -> None:
    from hstu.ops.triton._common import Tile

    failed = set()
    with open(path) as handle:
        for line in handle:
            result = json.loads(line)
            if not result["ok"]:
                failed.add((result["kernel"], tuple(result["tile"])))
    lists = {"attn_fwd": "FORWARD_TILES", "attn_bwd_dq": "BACKWARD_DQ_TILES"}
    for kernel, attribute in lists.items():
        kept = [t for t in getattr(module, attribute)
                if (kernel, (t.block_m, t.block_n, t.num_warps, t.num_stages)) not in failed]
        setattr(module, attribute, kept)
    # dK/dV serves both dQ modes: keep a config only if it passed in both.
    kept = [t for t in module.BACKWARD_DKDV_TILES
            if not any((k, (t.block_m, t.block_n, t.num_warps, t.num_stages)) in failed
                       for k in ("attn_bwd_dkdv", "attn_bwd_dkdv_atomic"))]
    module.BACKWARD_DKDV_TILES = kept
    print("tuning among:", {a: [str(t) for t in getattr(module, a)] for a in
                            ("FORWARD_TILES", "BACKWARD_DKDV_TILES", "BACKWARD_DQ_TILES")},
          flush=True)
    assert all(isinstance(t, Tile) for t in kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--parts", default="attention,stu")
    parser.add_argument("--dq-mode", choices=["atomic", "separate"], default=None)
    parser.add_argument("--sweep", help="sweep_checks.jsonl of benchmarks/gpu_sweep.py: tune "
                        "only among the configs that passed every check there")
    parser.add_argument("--max-lens", type=int, nargs="+", default=None,
                        help="only the attention shapes with these N (default: all three)")
    parser.add_argument("--first-tiles-only", action="store_true",
                        help="no tuning: launch each attention kernel with the first config of "
                        "its list (the fastest of the last sweep, docs/kernels.md); for a "
                        "quick call that must not spend its time compiling every config")
    parser.add_argument("--pytorch-attention-up-to", type=int, default=2048,
                        help="also time the padded PyTorch attention for N up to this")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernel_bench.py needs a CUDA GPU")
    from hstu.ops.triton import attention as triton_attention
    from hstu.ops.triton._common import tuned_tiles

    if args.dq_mode:
        triton_attention.DQ_MODE = args.dq_mode
    if args.sweep:
        restrict_to_sweep(args.sweep, triton_attention)
    if args.first_tiles_only:
        for attribute in ("FORWARD_TILES", "BACKWARD_DKDV_TILES", "BACKWARD_DQ_TILES"):
            setattr(triton_attention, attribute, getattr(triton_attention, attribute)[:1])
    ceiling = matmul_ceiling()
    print(f"bf16 matmul 8192^3 on this GPU now: {ceiling:.0f} TFLOP/s", flush=True)
    parts = args.parts.split(",")
    rows = []
    if "attention" in parts:
        rows += attention_rows(args.pytorch_attention_up_to, args.max_lens)
    if "stu" in parts:
        rows += stu_rows()
    result = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name(), torch=torch.__version__,
        triton=triton.__version__, cuda=torch.version.cuda, dq_mode=triton_attention.DQ_MODE,
        matmul_ceiling_tflops=ceiling,
        tuned={"/".join(map(str, key)): str(tile) for key, tile in tuned_tiles().items()},
        rows=rows,
        attention_vs_sdpa=compare_with_sdpa(rows),
    )
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kernel_bench.json"), "w") as handle:
        json.dump(result, handle, indent=1)
    print(f"\n{result['device']}, torch {result['torch']}, triton {result['triton']}, "
          f"CUDA {result['cuda']}, {result['date']}, dq mode {result['dq_mode']}")
    for row in rows:
        if row["op"] == "stu_layer":
            if "error" in row:
                print(f"stu_layer {row['impl']:<8} {row['shape']:<16} {row['error']}")
            else:
                print(f"stu_layer {row['impl']:<8} {row['shape']:<16} fwd+bwd "
                      f"{row['fwd_bwd_ms']:8.3f} ms  peak {row['peak_gib']:6.2f} GiB")
        else:
            print(_attention_line(row))
    if result["attention_vs_sdpa"]:
        print()
        print("\n".join(comparison_lines(result["attention_vs_sdpa"])))


if __name__ == "__main__":
    main()
