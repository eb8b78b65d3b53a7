"""benchmarks/cached_attention_bench.py: its FLOP count is the reference mask's, and it runs (on
the CPU under the Triton interpreter, at a tiny shape)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

from hstu.ops.pytorch.cached_attention import virtual_mask

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "cached_attention_bench.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("cached_attention_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_admitted_pairs_are_the_reference_masks_count():
    bench = _bench_module()
    users, cache, new, candidates, contextual = 3, 37, 4, 6, 5
    delta = new + candidates
    length = cache + delta
    mask = virtual_mask(torch.arange(cache, length).view(1, -1), torch.arange(length).view(1, -1),
                        torch.full((users,), length), torch.full((users,), candidates),
                        contextual, 0)
    assert bench.admitted_pairs(users, cache, delta, candidates) == int(mask.sum())


def test_runs_and_writes_a_row_per_case(tmp_path):
    out = tmp_path / "cached_attention.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--users", "1", "2", "--cache", "40", "--new", "3",
         "--candidates", "5", "--heads", "1", "--head-dim", "16", "--contextual", "2",
         "--repeats", "1", "--warmup", "0", "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["users"] for row in rows] == [1, 2]
    for row in rows:
        assert row["delta"] == 8 and row["kernel_ms"] > 0
        assert row["flops"] == 4 * 16 * _bench_module().admitted_pairs(row["users"], 40, 8, 5)
