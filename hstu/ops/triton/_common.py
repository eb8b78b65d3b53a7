"""Pieces every Triton kernel module here shares: launch configs, tuning, small jit helpers.

Tuning. Each kernel has a short list of launch configs (`Tile`). On a GPU the first call for a
given key (kernel, dtype, head dims, flags, power-of-two bucket of the sequence length) times
every config of the list on the real inputs and keeps the fastest; later calls reuse it. The
lists hold only configs that ran correctly on an H200 one by one (benchmarks/gpu_sweep.py checks
each in its own process, because a kernel that faults leaves the CUDA context unusable); see
docs/kernels.md. Under the Triton interpreter (no GPU) nothing is timed: the kernel's
`interpret` config is used. Tests and benchmarks can pin a config with `pinned(...)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Callable, Iterator

import torch
import triton
import triton.language as tl


def dropout_seed(dropout_ratio: float, device: torch.device) -> torch.Tensor | None:
    """A fresh seed for a kernel's in-kernel dropout mask, as a one-element int64 tensor on
    `device` that the kernel reads (None when there is no dropout). On a GPU it is drawn by
    torch's CUDA generator on the device, so that a CUDA graph replay draws a new one (a seed
    passed as a host integer would be frozen into the graph: the same mask every step);
    elsewhere by torch's CPU generator. Seeding torch makes runs repeatable either way, and the
    backward regenerates the mask from the same tensor."""
    if dropout_ratio <= 0:
        return None
    device = torch.device(device)
    if device.type == "cuda":
        return torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64)
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)


def seed_arg(seed: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    """The SEED pointer argument of a kernel with in-kernel dropout: the seed tensor, or any
    tensor of the call when there is no dropout (the kernel then never reads it)."""
    return seed if seed is not None else placeholder


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclasses.dataclass(frozen=True)
class Tile:
    """One launch config: block sizes plus Triton's num_warps / num_stages."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2

    def __str__(self) -> str:
        return f"M{self.block_m}_N{self.block_n}_w{self.num_warps}_s{self.num_stages}"


# kernel name -> Tile forced by `pinned` (tests, benchmarks, config sweeps).
_PINNED: dict[str, Tile] = {}
# (kernel name, key...) -> the Tile the timing picked.
_TUNED: dict[tuple, Tile] = {}


@contextlib.contextmanager
def pinned(**tiles: Tile) -> Iterator[None]:
    """Force launch configs by kernel name, e.g. `pinned(attn_fwd=Tile(64, 64, 4, 3))`."""
    previous = dict(_PINNED)
    _PINNED.update(tiles)
    try:
        yield
    finally:
        _PINNED.clear()
        _PINNED.update(previous)


def choose_tile(
    name: str,
    key: tuple,
    candidates: list[Tile],
    interpret: Tile,
    run: Callable[[Tile], None],
    fits: Callable[[Tile], bool] = lambda tile: True,
) -> Tile:
    """The config to launch kernel `name` with.

    Pinned config first; under the interpreter the `interpret` config; otherwise the fastest of
    `candidates` (those `fits` accepts) for this key, timed once with `run(tile)`, which must
    launch the kernel (and may re-zero buffers the kernel accumulates into).
    """
    if name in _PINNED:
        return _PINNED[name]
    if interpreting():
        return interpret
    full_key = (name, *key)
    tile = _TUNED.get(full_key)
    if tile is not None:
        return tile
    usable = [tile for tile in candidates if fits(tile)]
    if not usable:
        raise RuntimeError(f"no launch config of {name} fits key {key}")
    if len(usable) == 1:
        best = usable[0]
    else:
        timings = []
        for tile in usable:
            try:
                timings.append((triton.testing.do_bench(lambda: run(tile), warmup=5, rep=20), tile))
            except triton.runtime.errors.OutOfResources:
                continue
        if not timings:
            raise RuntimeError(f"every launch config of {name} ran out of resources for {key}")
        best = min(timings, key=lambda pair: pair[0])[1]
    _TUNED[full_key] = best
    return best


def tuned_tiles() -> dict[tuple, Tile]:
    """What the timing picked so far (for logs and benchmarks)."""
    return dict(_TUNED)


def seq_len_bucket(max_seq_len: int) -> int:
    """Tuning key for a sequence length: the next power of two (at least 16)."""
    return max(16, triton.next_power_of_2(int(max_seq_len)))


def triton_dtype_ok(tensor: torch.Tensor, name: str) -> None:
    if tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name} must be float32, float16 or bfloat16; got {tensor.dtype}")


def fp32_dot_precision() -> str:
    """How tl.dot treats float32 inputs: TF32 only when torch allows it for matmuls."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with float32 accumulation.

    UPCAST: the Triton 3.7 interpreter multiplies bfloat16 tiles as raw uint16 integers, so
    under the interpreter the operands are widened to float32 first. That changes no number:
    the product of two bf16 or two fp16 values is exact in float32, and the GPU's tensor cores
    also sum those products in float32.
    """
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def tanh_approx(x):
    """One MUFU.TANH instruction (max relative error about 2^-11): half the special-function
    work of exp + reciprocal. Only for 16-bit inputs, whose rounding is coarser anyway."""
    return tl.inline_asm_elementwise(
        "tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
    )
