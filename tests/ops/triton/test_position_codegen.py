"""The cached-scoring positional kernel (_add_position_time_at) compiled for an H100 (sm_90) on
any machine (Triton compiles for a GPU target without one): it compiles with the serving
launch's constants, and reads and writes the bf16 rows of 512 in 16-byte vectors, not element
by element. Compiled in a subprocess: the test session runs Triton under its interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]

COMPILE = r'''
import json, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from hstu.ops.triton.position import _add_position_time_at as fn

constants = dict(D=512, USE_TIME=True, LOG=False, BLOCK_R=16, BLOCK_D=512)
signature, attrs = {}, {}
for index, name in enumerate(fn.arg_names):
    if name in constants:
        signature[name] = "constexpr"
    elif name in ("X", "P", "T", "OUT"):
        signature[name] = "*bf16"
        attrs[(index,)] = [["tt.divisibility", 16]]
    elif name in ("COLS", "FIRST_TARGET", "SECONDS"):
        signature[name] = "*i64"
        attrs[(index,)] = [["tt.divisibility", 16]]
    elif name in ("alpha", "time_bucket_increments", "num_time_buckets"):
        signature[name] = "fp32"
    else:
        signature[name] = "i32"
        if name.startswith("stride"):
            attrs[(index,)] = [["tt.divisibility", 16]]
text = triton.compile(ASTSource(fn, signature, constants, attrs),
                      target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4)).asm["ptx"]
print(json.dumps([len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.b32", text)),
                  len(re.findall(r"ld\.global(?:\.\w+)*\.b16\b", text)),
                  len(re.findall(r"st\.global(?:\.\w+)*\.v4\.b32", text))]))
'''


def test_rows_move_in_16_byte_vectors():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True,
                          text=True, timeout=600)
    if done.returncode != 0 and "ImportError" in done.stderr and "nvidia" in done.stderr:
        pytest.skip(f"this Triton has no NVIDIA backend: {done.stderr[-300:]}")
    assert done.returncode == 0, done.stderr[-3000:]
    vector_loads, element_loads, vector_stores = json.loads(done.stdout.strip().splitlines()[-1])
    assert vector_loads > 0 and element_loads == 0 and vector_stores > 0
