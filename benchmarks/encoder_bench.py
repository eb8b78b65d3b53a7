#!/usr/bin/env python3
"""The dense encoder of the 27K recipe, forward + backward, per kernel (GPU).

    python benchmarks/encoder_bench.py --out OUT            # on a CUDA machine
    python benchmarks/encoder_bench.py --device cpu --shapes 2x64 --kernels PYTORCH   # tiny check
    python benchmarks/encoder_bench.py --shapes 32x1024 --kernels TRITON --profile  # where it goes

What is timed: preprocessor (contextual tokens, content and action MLPs), positional + time
embeddings, 3 STU layers, candidate extraction and the timestamp postprocessor, with the seed's
dimensions (D=512, 4 heads of 128, 6 contextual tokens, 100 candidates per row, S=8000), under
bf16 autocast on GPU, training mode (dropout on), and the 27K recipe's STU settings (activations
kept for the backward, rows launched longest first; `--recompute` recomputes them as
TorchEasyRec's default does). Embedding lookups, the item tower and the fusion tower are not
included: this needs only torch and triton. Inputs are random: a ROWSxHISTORY shape has history
lengths uniform in [0.9n, n) and 100 candidates per row; a `tokensN` shape packs long-tailed rows
up to N tokens as a training step of the 27K recipe does (log-normal histories, median 1,000,
cut at 7,894; 1-100 candidates; benchmarks/attention_row_order.py draws them).

Achieved TFLOP/s counts the STU layers only: per layer and token 2*D*2H(d_v+d_qk) (uvqk) +
2*3*H*d_v*D (output projection), plus per row 2*H*(d_qk+d_v)*L^2/2 of causal attention; forward
+ backward = 3x forward. Prints a table and writes JSON (OUT/encoder_bench.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hstu.modules.action_encoder import SimpleActionEncoder  # noqa: E402
from hstu.modules.content_encoder import SliceContentEncoder  # noqa: E402
from hstu.modules.contextual_preprocessor import ContextualPreprocessor  # noqa: E402
from hstu.modules.contextualized_mlp import SimpleContextualizedMLP  # noqa: E402
from hstu.modules.hstu_transducer import HSTUTransducer  # noqa: E402
from hstu.modules.positional_encoder import HSTUPositionalEncoder  # noqa: E402
from hstu.modules.postprocessors import TimestampLayerNormPostprocessor  # noqa: E402
from hstu.modules.stu import STULayer, STUStack  # noqa: E402
from hstu.ops import Kernel  # noqa: E402
try:
    from hstu.ops.stu import fused_stu_layer  # noqa: E402
except ImportError:  # a checkout from before the fused layer (benchmarks/gpu_encoder_ab.sh)
    import contextlib

    def fused_stu_layer(enabled: bool):
        if not enabled:
            raise ValueError("TRITON_SEPARATE: this checkout has no fused STU layer")
        return contextlib.nullcontext()

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_row_order import draw_lengths  # noqa: E402

D, HEADS, DIM, LAYERS, CONTEXTUAL, CANDIDATES, SCALING = 512, 4, 128, 3, 6, 100, 8000


def build_encoder(device: str, recompute: bool = False) -> HSTUTransducer:
    def mlp(in_dim: int) -> SimpleContextualizedMLP:
        return SimpleContextualizedMLP(in_dim, D, 256)

    return HSTUTransducer(
        preprocessor=ContextualPreprocessor(
            embedding_dim=D,
            num_contextual_slots=CONTEXTUAL,
            contextual_slot_dim=256,
            content_encoder=SliceContentEncoder(256, 256),
            content_mlp=mlp(256),
            action_encoder=SimpleActionEncoder(8, [1, 2, 4, 8, 16, 32, 64, 128]),
            action_mlp=mlp(64),
        ),
        positional_encoder=HSTUPositionalEncoder(
            embedding_dim=D, num_position_buckets=8192, num_time_buckets=2048,
            use_time_encoding=True,
        ),
        stu_stack=STUStack(
            [
                STULayer(
                    embedding_dim=D, num_heads=HEADS, hidden_dim=DIM, attention_dim=DIM,
                    scaling_seqlen=SCALING, output_dropout_ratio=0.1, use_group_norm=True,
                    contextual_seq_len=CONTEXTUAL, recompute_normed_x=recompute,
                    recompute_uvqk=recompute, recompute_y=recompute, sort_by_length=True,
                )
                for _ in range(LAYERS)
            ]
        ),
        postprocessor=TimestampLayerNormPostprocessor(D, [3600, 86400], [24, 7]),
    ).to(device).train()


def set_kernel(model: torch.nn.Module, kernel: Kernel) -> None:
    for module in model.modules():
        if hasattr(module, "kernel"):
            module.kernel = kernel


def random_inputs(shape: str, device: str, generator: torch.Generator) -> dict:
    """ROWSxHISTORY (uniform lengths, 100 candidates) or tokensN (long-tailed rows up to N)."""
    if shape.startswith("tokens"):
        import numpy as np

        row_lengths, candidates = draw_lengths(np.random.default_rng(0), int(shape[6:]))
        targets = torch.from_numpy(candidates)
        lengths = torch.from_numpy(row_lengths) - targets - CONTEXTUAL
    else:
        rows, history = (int(x) for x in shape.split("x"))
        lengths = torch.randint(int(0.9 * history), history, (rows,), generator=generator)
        targets = torch.full((rows,), CANDIDATES)
    rows = len(lengths)
    num_history, num_candidates = int(lengths.sum()), int(targets.sum())

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    return dict(
        contextual=randn(rows, CONTEXTUAL * 256),
        uih=randn(num_history, 256),
        uih_lengths=lengths.to(device),
        candidates=randn(num_candidates, 256),
        num_targets=targets.to(device),
        uih_timestamps=(1_700_000_000 + torch.randint(0, 10**6, (num_history,))).to(device),
        candidate_timestamps=torch.full((num_candidates,), 1_701_000_000).to(device),
        uih_actions=torch.randint(0, 256, (num_history,), generator=generator).to(device),
        # Known on the host, as DlrmHSTU passes it from the batch: no device read in the step.
        max_item_len=int((lengths + targets).max()),
    )


def stu_flops_forward(inputs: dict) -> float:
    row_lengths = CONTEXTUAL + inputs["uih_lengths"].cpu() + inputs["num_targets"].cpu()
    tokens = float(row_lengths.sum())
    linear = 2 * D * 2 * HEADS * (DIM + DIM) + 2 * 3 * HEADS * DIM * D
    attention = 2 * HEADS * (DIM + DIM) * float((row_lengths.double() ** 2).sum()) / 2
    return LAYERS * (linear * tokens + attention)


def training_step(model, inputs: dict, device: str, autocast_cache: bool = True) -> None:
    """One forward + backward of the encoder as benchmarked: bf16 autocast on GPU, float32 on
    CPU. autocast_cache=False for CUDA graph capture (the cast-weight cache must not outlive
    the captured region)."""
    with torch.autocast(device, torch.bfloat16, enabled=device == "cuda",
                        cache_enabled=autocast_cache):
        out = model(**inputs)
    out.float().sum().backward()


def graph_case(model, inputs, repeats: int) -> dict:
    """The same step captured once in a CUDA graph and replayed: what the step costs when the
    host launches nothing (the floor a graph per length bucket would reach). Replays reuse the
    captured inputs and the dropout seeds drawn at capture; gradients accumulate across
    replays. Timing only: nothing here trains."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        for _ in range(2):
            training_step(model, inputs, "cuda", autocast_cache=False)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        training_step(model, inputs, "cuda", autocast_cache=False)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    del graph
    return {"graph_ms": times[len(times) // 2]}


class _FirstColumn(torch.nn.Module):
    """A stand-in fusion tower: one logit per candidate (its encoding's first value), so that
    the graphed step's work is the encoder's, as in the eager timing."""

    def forward(self, user, item):
        return [user[:, :1]]


def graphed_scoring_case(model, inputs, repeats: int) -> dict:
    """The step as `launch.py train --cuda-graphs` runs the encoder: padded to its shape bucket
    and replayed from that bucket's CUDA graphs (hstu/modules/graphed_scoring.py; captured in
    the warm-up steps), padding and copies included. Dropout masks are drawn anew per replay."""
    from hstu.modules.graphed_scoring import GraphedScoring

    graphed = GraphedScoring(capture=True)
    item_tower, fusion_tower = torch.nn.Identity(), _FirstColumn()

    def step():
        with torch.autocast("cuda", torch.bfloat16, cache_enabled=False):
            (logits,) = graphed(model, item_tower, fusion_tower, inputs)
        logits.float().sum().backward()

    for _ in range(2):  # capture, then one replay
        model.zero_grad(set_to_none=True)
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return {"graphed_scoring_ms": times[len(times) // 2], "graphed_scoring": graphed.stats}


def time_case(model, inputs, device: str, repeats: int) -> dict:
    def step():
        training_step(model, inputs, device)

    step()  # warm-up: compiles / autotunes
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(repeats):
            model.zero_grad(set_to_none=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    else:
        import time

        times = []
        for _ in range(repeats):
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        peak = float("nan")
    times.sort()
    return {"ms": times[len(times) // 2], "peak_gib": peak}


def profile_case(model, inputs, device: str, out_dir: Path, label: str) -> dict:
    """One step under torch.profiler (after time_case, which compiled and tuned the kernels):
    where the time goes (top kernels by GPU time, top ops by CPU time), how much of the step
    the GPU is busy, and the host syncs."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    model.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        training_step(model, inputs, device)
        if device == "cuda":
            torch.cuda.synchronize()
    trace = out_dir / f"encoder_trace_{label}.json"
    prof.export_chrome_trace(str(trace))
    events = prof.key_averages()
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=sort, row_limit=45, max_name_column_width=70))
    print(events.table(sort_by="self_cpu_time_total", row_limit=15))
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    cpu_ops = [e for e in prof.events() if e.device_type.name == "CPU"]
    busy_us = sum(e.time_range.elapsed_us() for e in kernels)
    span_us = (max(e.time_range.end for e in cpu_ops) - min(e.time_range.start for e in cpu_ops)
               if cpu_ops else 0.0)
    # Host waits on the GPU inside the step (the profiler's own synchronize at the end is a
    # cudaDeviceSynchronize and is not counted), and the tensor reads that cause most of them.
    stream_syncs = sum(1 for e in cpu_ops if e.name == "cudaStreamSynchronize")
    item_reads = sum(1 for e in cpu_ops if e.name == "aten::item")
    summary = {"label": label, "kernels": len(kernels), "gpu_busy_ms": busy_us / 1e3,
               "step_span_ms": span_us / 1e3, "stream_syncs": stream_syncs,
               "item_reads": item_reads, "trace": str(trace)}
    print(json.dumps(summary), flush=True)
    return summary


# --kernels names beyond hstu.ops.Kernel: TRITON with each STU layer as the three separate
# TRITON ops instead of the fused autograd node (hstu.ops.stu.fused_stu_layer), to compare the
# two in one process.
KERNEL_VARIANTS = {"TRITON_SEPARATE": (Kernel.TRITON, False)}


def kernel_variant(name: str) -> tuple[Kernel, bool]:
    """(kernel, fused STU layer) for a --kernels name."""
    if name.upper() in KERNEL_VARIANTS:
        return KERNEL_VARIANTS[name.upper()]
    return Kernel.parse(name), True


def measure_case(case: dict, model, inputs: dict, args, kernel: Kernel, flops: float,
                 label: str) -> None:
    """Times (and with --cuda-graph / --profile, graphs and profiles) one case into `case`."""
    try:
        case.update(time_case(model, inputs, args.device, args.repeats))
        case["stu_tflops"] = flops / (case["ms"] * 1e-3) / 1e12
        if args.cuda_graph and args.device == "cuda" and kernel is Kernel.TRITON:
            try:
                case.update(graph_case(model, inputs, args.repeats))
            except Exception as error:  # noqa: BLE001 - reported, not fatal
                case["graph_error"] = f"{type(error).__name__}: {error}"[:300]
        if args.graphed_scoring and args.device == "cuda" and kernel is Kernel.TRITON:
            try:
                case.update(graphed_scoring_case(model, inputs, args.repeats))
            except Exception as error:  # noqa: BLE001 - reported, not fatal
                case["graphed_scoring_error"] = f"{type(error).__name__}: {error}"[:300]
        if args.profile:
            case["profile"] = profile_case(model, inputs, args.device, Path(args.out), label)
    except torch.OutOfMemoryError as error:
        case["skipped"] = f"out of memory: {str(error).splitlines()[0]}"
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--kernels", nargs="+", default=["TRITON", "PYTORCH"],
                        help="PYTORCH, TRITON, CUTLASS, or TRITON_SEPARATE (TRITON with the STU "
                        "layer as three separate ops, not the fused node)")
    parser.add_argument(
        "--shapes", nargs="+", default=["32x7894", "32x1024", "8x4000", "2x7894"],
        help="ROWSxHISTORY cases (100 candidates and 6 contextual tokens are added per row), "
        "or tokensN: long-tailed rows packed up to N tokens",
    )
    parser.add_argument("--recompute", action="store_true",
                        help="recompute STU activations in the backward (recipe: kept)")
    parser.add_argument(
        "--pytorch-max-tokens", type=int, default=40_000,
        help="skip PYTORCH cases above this many tokens (its padded attention needs B*H*N^2)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="outputs")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one step per case with torch.profiler: top kernels, "
                        "GPU busy time against the step, host syncs; chrome traces in OUT")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="also time the TRITON step captured in a CUDA graph (no host "
                        "launch cost; replays reuse the captured dropout seeds)")
    parser.add_argument("--graphed-scoring", action="store_true",
                        help="also time the TRITON step as --cuda-graphs training runs it: "
                        "padded to a shape bucket, replayed from that bucket's CUDA graphs")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = build_encoder(args.device, args.recompute)
    results = []
    os.makedirs(args.out, exist_ok=True)
    path = Path(args.out) / "encoder_bench.json"
    for shape in args.shapes:
        inputs = random_inputs(shape, args.device, torch.Generator().manual_seed(0))
        rows = len(inputs["uih_lengths"])
        history = int(inputs["uih_lengths"].max())
        tokens = int((CONTEXTUAL + inputs["uih_lengths"] + inputs["num_targets"]).sum())
        flops = 3 * stu_flops_forward(inputs)
        for name in args.kernels:
            kernel, fused = kernel_variant(name)
            case = {"kernel": name, "rows": rows, "history": history, "tokens": tokens}
            if kernel is Kernel.PYTORCH and tokens > args.pytorch_max_tokens:
                case["skipped"] = f"more than {args.pytorch_max_tokens} tokens"
            else:
                set_kernel(model, kernel)
                with fused_stu_layer(fused):
                    measure_case(case, model, inputs, args, kernel, flops, f"{name}_{shape}")
            results.append(case)
            print(json.dumps(case), flush=True)
            path.write_text(json.dumps({
                "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                "torch": torch.__version__,
                "date": datetime.date.today().isoformat(),
                "results": results,
            }, indent=1))

    print(f"\n{'kernel':8} {'rows x history':>15} {'tokens':>8} {'ms':>9} {'peak GiB':>9} "
          f"{'STU TFLOP/s':>11}")
    for case in results:
        if "skipped" in case:
            print(f"{case['kernel']:8} {case['rows']:>6} x {case['history']:<6} "
                  f"{case['tokens']:>8}   skipped: {case['skipped']}")
        else:
            print(f"{case['kernel']:8} {case['rows']:>6} x {case['history']:<6} "
                  f"{case['tokens']:>8} {case['ms']:>9.1f} {case['peak_gib']:>9.2f} "
                  f"{case['stu_tflops']:>11.1f}"
                  + (f"   CUDA graph {case['graph_ms']:.1f} ms" if "graph_ms" in case else "")
                  + (f"   CUDA graph failed: {case['graph_error']}" if "graph_error" in case
                     else "")
                  + (f"   graphed scoring {case['graphed_scoring_ms']:.1f} ms"
                     if "graphed_scoring_ms" in case else "")
                  + (f"   graphed scoring failed: {case['graphed_scoring_error']}"
                     if "graphed_scoring_error" in case else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
