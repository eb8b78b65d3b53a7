"""What the cached attention kernel compiles to on an H100 (sm_90), checked on any machine:
Triton compiles for a GPU target without one (its wheel carries ptxas).

The cached keys and values of paged rows (CacheRows) are reached through addresses read from
memory, about whose alignment the compiler knows nothing unless the kernel says so: before
session 14 it loaded those tiles one bf16 element at a time (ld.global.b16) instead of in
16-byte asynchronous copies. These tests pin the vector loads, and that the launcher asks for
them for the serving shapes. The compiling runs in a subprocess: the test session runs Triton
under its interpreter (tests/conftest.py), where kernels are not compiled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hstu.ops.triton import cached_attention as kernel

REPO = Path(__file__).resolve().parents[3]

# Compiles the kernel as the 27K recipe's serving launches it (4 heads of 128, bf16,
# contextual tokens and candidates, no window; the 128 x 64 tile with 8 warps and 3 stages
# that the tuning picked at 128 users on one H100 in session 14), with the argument
# specialisations the launcher's arguments get at run time (pointers from the allocator and
# strides of 128-element multiples divisible by 16), for each (ALIGN, SPLIT) asked; prints the
# PTX's counts of 16-byte asynchronous copies and single-element bf16 loads as JSON.
COMPILE = r'''
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from hstu.ops.triton.cached_attention import _cached_attn_fwd as fn

def ptx(align, split):
    constants = dict(HAS_TARGETS=True, HAS_CONTEXT=True, HAS_WINDOW=False, FAST=True,
                     PRECISION="tf32", UPCAST=False, D_QK=128, D_V=128, BLOCK_D_QK=128,
                     BLOCK_D_V=128, BLOCK_M=128, BLOCK_N=64, PAGED=True, ELEMENT_BYTES=2,
                     ALIGN=align, SPLIT=split)
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constants:
            signature[name] = "constexpr"
            continue
        if name in ("Q", "K", "V", "KC", "VC"):
            signature[name] = "*bf16"
        elif name == "O":
            signature[name] = "*fp32" if split else "*bf16"
        elif name in ("seq_offsets", "cache_offsets", "num_targets", "KC_ADDRESSES",
                      "VC_ADDRESSES"):
            signature[name] = "*i64"
        elif name in ("kc_base", "vc_base"):
            signature[name] = "i64"
        elif name in ("alpha", "scale"):
            signature[name] = "fp32"
            continue
        else:
            signature[name] = "i32"
            if not name.startswith("stride"):
                continue
        attrs[(index,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(fn, signature, constants, attrs),
                              target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=8, num_stages=3))
    return compiled.asm["ptx"]

def copy_ptx(align):
    from hstu.ops.triton.cached_attention import _copy_rows
    signature = {"TYPED": "*bf16", "TABLE": "*i64", "source_offsets": "*i64", "batch": "i32",
                 "typed_base": "i64", "BLOCK": "constexpr", "ALIGN": "constexpr",
                 "ELEMENT_BYTES": "constexpr"}
    attrs = {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]],
             (2,): [["tt.divisibility", 16]], (4,): [["tt.divisibility", 16]]}
    compiled = triton.compile(
        ASTSource(_copy_rows, signature, dict(BLOCK=2048, ALIGN=align, ELEMENT_BYTES=2), attrs),
        target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    return compiled.asm["ptx"]

counts = {}
for align in (1, 8):
    text = copy_ptx(align)
    counts[f"copy,{align}"] = [len(re.findall(r"st\.global(?:\.\w+)*\.v4\.b32", text)),
                               len(re.findall(r"st\.global(?:\.\w+)*\.b16\b", text))]
for case in sys.argv[1:]:
    align, split = case.split(",")
    text = ptx(int(align), split == "1")
    vectors = re.findall(r"cp\.async\.c[ag]\.shared\.global(?:\.L2::\w+)?\s*\[[^\]]*\],\s*"
                         r"\[[^\]]*\],\s*0x10", text)
    scalars = re.findall(r"ld\.global(?:\.\w+)*\.b16\b", text)
    counts[case] = [len(vectors), len(scalars)]
print(json.dumps(counts))
'''


@pytest.fixture(scope="module")
def load_counts() -> dict[str, list[int]]:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", COMPILE, "8,0", "8,1", "1,0"], env=env,
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0 and "ImportError" in done.stderr and "nvidia" in done.stderr:
        pytest.skip(f"this Triton has no NVIDIA backend: {done.stderr[-300:]}")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["8,0", "8,1"], ids=["whole_cache", "split_keys"])
def test_aligned_paged_rows_load_in_16_byte_copies(load_counts, case):
    vectors, scalars = load_counts[case]
    assert scalars == 0
    # Said unaligned, the same kernel loads the cached tiles element by element: what the
    # alignment buys (and a check that the counting sees the difference).
    unaligned_vectors, unaligned_scalars = load_counts["1,0"]
    assert unaligned_scalars > 0
    assert vectors > unaligned_vectors


def test_aligned_cache_writes_store_16_byte_vectors(load_counts):
    """The cache writes (copy_rows_by_table, aligned=True as kv_cache.write_rows passes when
    its table allows): 16-byte stores, no single-element ones; element by element otherwise."""
    vectors, scalars = load_counts["copy,8"]
    assert vectors > 0 and scalars == 0
    unaligned_vectors, unaligned_scalars = load_counts["copy,1"]
    assert unaligned_vectors == 0 and unaligned_scalars > 0


def test_the_launcher_asks_for_vectors_when_rows_allow_them():
    k = torch.zeros(3, 4, 128, dtype=torch.bfloat16)
    assert kernel.paged_alignment(k, k) == 8
    assert kernel.paged_alignment(k.float(), k.float()) == 4
    # Rows of 2 x 3 bf16 (12 bytes) are not whole vectors; nor is a base one element in.
    odd = torch.zeros(3, 2, 3, dtype=torch.bfloat16)
    assert kernel.paged_alignment(odd, odd) == 1
    shifted = torch.zeros(1 + 3 * 4 * 128, dtype=torch.bfloat16)[1:].view(3, 4, 128)
    assert kernel.paged_alignment(shifted, k) == 1
