"""Probe (session 12; run in session 14, which added the timing of the step's own call): what
the TRITON positional backward receives inside the real training step, and how long it takes
on those very tensors.

Why: inside the 1k training step the kernel `_add_position_time_bwd` takes 1.1 ms eager and
2.07 ms graphed, but 0.037 ms on the same batch's indices outside the step
(docs/BENCHMARKS.md, "Session 12"). Run, on a GPU machine with TorchRec:

    POS_PROBE=1 PYTHONPATH=benchmarks/probes/position_bwd_in_step:. python \
        benchmarks/train_bench.py --device cuda --kernels TRITON --workers 1 --table-rows 0 \
        --steps 3 --warmup 2 --batches 2 --max-history 1024 --batch-size 32

It prints (lines starting POSPROBE) the gradient's dtype, shape, strides and alignment, how
many distinct positions and time buckets the step's tokens have and the longest run of one,
and the backward's time on the step's own gradient, on a contiguous copy and on ones. Python
loads this file at start-up (it is named sitecustomize), also in the worker train_bench
spawns; without POS_PROBE it does nothing."""
import os
if os.environ.get("POS_PROBE"):
    import torch
    from hstu.ops.triton import position as _pos

    _orig = _pos._AddPositionTime.backward
    _seen = [0]

    def _time(fn, n=10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        fn(); torch.cuda.synchronize(); start.record()
        for _ in range(n):
            fn()
        end.record(); torch.cuda.synchronize()
        return start.elapsed_time(end) / n

    def backward(ctx, d_out):
        _seen[0] += 1
        if _seen[0] in (3, 4):
            positions, buckets = ctx.saved_tensors
            cfg = ctx.config
            pu = torch.unique(positions, return_counts=True)[1]
            bu = torch.unique(buckets, return_counts=True)[1] if buckets.numel() else pu
            print(f"POSPROBE d_out {d_out.dtype} {tuple(d_out.shape)} stride {d_out.stride()} "
                  f"contig {d_out.is_contiguous()} align {d_out.data_ptr() % 256} "
                  f"positions {positions.numel()} uniq {pu.numel()} maxrun {int(pu.max())} "
                  f"buckets uniq {bu.numel()} max {int(bu.max())} config {cfg[:2]} {cfg[3]} "
                  f"dropout {cfg[6]} grad_enabled {torch.is_grad_enabled()}", flush=True)
            # The step's own call first, alone on the GPU (synchronised before), then repeats:
            # a slow first call means the memory's state (cold tables), a fast one that the
            # kernel waited on others in the profiled step.
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            grads = _orig(ctx, d_out)
            end.record()
            torch.cuda.synchronize()
            print(f"POSPROBE the step's own call, alone: {start.elapsed_time(end):.3f} ms",
                  flush=True)
            print(f"POSPROBE in-step tensors: backward {_time(lambda: _orig(ctx, d_out)):.3f} ms; "
                  "on a contiguous clone "
                  f"{_time(lambda: _orig(ctx, d_out.contiguous().clone())):.3f} ms; "
                  f"ones {_time(lambda: _orig(ctx, torch.ones_like(d_out))):.3f} ms", flush=True)
            return grads
        return _orig(ctx, d_out)

    _pos._AddPositionTime.backward = staticmethod(backward)
