"""Where a training step's GPU time goes: a torch.profiler window over a few steps, summarised
as time per step in attention, matmuls, embedding lookups + their optimizer, other
(memory-bound) kernels, communication between GPUs and idle, plus kernel launches and host
synchronisations per step.

The split is by kernel name (kernel_category): our Triton attention kernels are `_attn_*`;
cuBLAS/CUTLASS GEMMs carry gemm/xmma/wgmma/nvjet/cutlass in their names; FBGEMM's table-batched
embedding kernels (forward lookup, backward with the fused optimizer) carry
embedding/fbgemm/tbe (TorchRec's input permutations run as FBGEMM kernels too); NCCL's
kernels (the lookups' all-to-all, DDP's all-reduce) are communication. Everything else (norms,
elementwise, jagged copies, reductions, the dense optimizer, memsets and copies) is
memory-bound work. Idle is the part of the step's wall time in which no kernel ran (the union
of kernel intervals, so overlapping kernels count once). Communication runs on its own streams
and may overlap the compute: `exposed_communication_ms` is the part of it during which no
other kernel ran.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence

import torch

CATEGORIES = ("attention", "matmul", "embedding", "memory_bound", "communication")
_ATTENTION = ("_attn_fwd", "_attn_bwd", "fmha", "flash", "cudnn_attn", "attention")
_MATMUL = ("gemm", "xmma", "wgmma", "nvjet", "cutlass", "cublas", "sm90_", "sm80_")
_EMBEDDING = ("embedding", "fbgemm", "tbe_", "split_embedding", "batched_embedding",
              "linearize_index")
# Copies and memsets show up as GPU activity but are not kernel launches.
_COPIES = ("Memcpy", "Memset")
# Host calls that make the CPU wait for the GPU inside a step.
_HOST_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def kernel_category(name: str) -> str:
    lowered = name.lower()
    if "nccl" in lowered:
        return "communication"
    if any(key in lowered for key in _ATTENTION):
        return "attention"
    if any(key in lowered for key in _EMBEDDING):
        return "embedding"
    if any(key in lowered for key in _MATMUL):
        return "matmul"
    return "memory_bound"


def is_annotation(event) -> bool:
    """A profiler "GPU" event that is a user range, not a kernel: record_function ranges such
    as DDP's `DistributedDataParallel.forward`, TorchRec's `[lookup]_...` or
    `Optimizer.step#Adam.step` are mirrored onto the GPU timeline and span many kernels;
    counting them would double the GPU time and fill every gap."""
    if getattr(event, "is_user_annotation", False):
        return True
    name = event.name
    return name.startswith(("[", "DistributedDataParallel", "Optimizer.", "ProfilerStep"))


def busy_time(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, current_start, current_end = 0.0, None, None
    for start, end in sorted(intervals):
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += current_end - current_start
    return total


@dataclasses.dataclass
class StepProfile:
    """Per-step averages over the profiled window (milliseconds)."""

    steps: int
    wall_ms: float
    busy_ms: float
    category_ms: dict[str, float]
    launches: float
    host_syncs: float
    top_kernels: list[tuple[str, float, int]]  # (name, ms per step, calls per step)
    exposed_communication_ms: float = 0.0

    @property
    def idle_ms(self) -> float:
        return max(self.wall_ms - self.busy_ms, 0.0)

    @property
    def busy_fraction(self) -> float:
        return self.busy_ms / self.wall_ms if self.wall_ms else 0.0

    def busy_fraction_of(self, step_ms: float) -> float:
        """Busy fraction against an unprofiled step time (the profiler slows the host, so its
        own window's wall time overstates idle time)."""
        return min(self.busy_ms / step_ms, 1.0) if step_ms else 0.0

    def as_dict(self) -> dict:
        return {
            "steps": self.steps,
            "wall_ms": self.wall_ms,
            "busy_ms": self.busy_ms,
            "idle_ms": self.idle_ms,
            "busy_fraction": self.busy_fraction,
            "category_ms": self.category_ms,
            "exposed_communication_ms": self.exposed_communication_ms,
            "launches_per_step": self.launches,
            "host_syncs_per_step": self.host_syncs,
            "top_kernels": [
                {"name": name, "ms_per_step": ms, "calls_per_step": calls}
                for name, ms, calls in self.top_kernels
            ],
        }


def summarize(
    kernels: Sequence[tuple[str, float, float]],
    host_calls: Sequence[str],
    *,
    wall_ms: float,
    steps: int,
    top: int = 15,
) -> StepProfile:
    """kernels: (name, start_us, end_us) of every GPU kernel in the window; host_calls: names of
    the CUDA runtime/driver calls the host made; wall_ms: the window's wall time."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, not {steps}")
    per_category = dict.fromkeys(CATEGORIES, 0.0)
    by_name: dict[str, list[float]] = {}
    for name, start, end in kernels:
        per_category[kernel_category(name)] += (end - start) / 1e3
        entry = by_name.setdefault(name, [0.0, 0])
        entry[0] += (end - start) / 1e3
        entry[1] += 1
    ranked = sorted(by_name.items(), key=lambda item: -item[1][0])[:top]
    syncs = sum(1 for call in host_calls if call in _HOST_SYNCS)
    busy_us = busy_time((start, end) for _, start, end in kernels)
    compute_us = busy_time((start, end) for name, start, end in kernels
                           if kernel_category(name) != "communication")
    return StepProfile(
        steps=steps,
        wall_ms=wall_ms / steps,
        busy_ms=busy_us / 1e3 / steps,
        category_ms={k: v / steps for k, v in per_category.items()},
        launches=sum(1 for name, _, _ in kernels if not name.startswith(_COPIES)) / steps,
        host_syncs=syncs / steps,
        top_kernels=[(name, ms / steps, calls / steps) for name, (ms, calls) in ranked],
        exposed_communication_ms=(busy_us - compute_us) / 1e3 / steps,
    )


def profile_steps(
    run_step: Callable[[], object], steps: int, device: torch.device, trace_path: str | None = None
) -> StepProfile:
    """Runs `run_step` `steps` times under torch.profiler (CPU + CUDA activities) and
    summarises the window. The window starts and ends with a device synchronisation, which
    is outside the steps and not counted as one of theirs."""
    import time

    from torch.profiler import ProfilerActivity, profile

    if device.type != "cuda":
        raise ValueError("profile_steps splits GPU time; it needs a CUDA device")
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        for _ in range(steps):
            run_step()
        torch.cuda.synchronize(device)
        wall_ms = (time.perf_counter() - started) * 1e3
    if trace_path:
        prof.export_chrome_trace(trace_path)
    kernels, host_calls = [], []
    for event in prof.events():
        if event.device_type.name == "CUDA":
            if is_annotation(event):
                continue
            kernels.append((event.name, event.time_range.start, event.time_range.end))
        else:
            host_calls.append(event.name)
    # The closing synchronize above is the profiler window's, not the steps'.
    if "cudaDeviceSynchronize" in host_calls:
        host_calls.remove("cudaDeviceSynchronize")
    # 40 kernels: enough to account for the memory-bound tail, not only the big kernels.
    return summarize(kernels, host_calls, wall_ms=wall_ms, steps=steps, top=40)
