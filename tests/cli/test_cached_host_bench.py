"""benchmarks/cached_host_bench.py at a tiny shape: it times the cached path it claims to (the
users' caches reused in every timed call; the script refuses to report otherwise), with each
history check."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("check", ["full", "ends"])
def test_host_phases_of_reused_caches(tmp_path, check):
    out = tmp_path / "host.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "cached_host_bench.py"), "--batch", "1", "3",
         "--history", "40", "--new", "3", "--candidates", "4", "--calls", "2", "--warmup", "1",
         "--threads", "1", "--history-check", check, "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["batch"] for row in rows] == [1, 3]
    for row in rows:
        assert row["history_check"] == check
        assert set(row["phases_ms"]) == {"decide", "gather", "plan", "device launch",
                                         "store update"}
        assert row["counters"]["reused_stale"] == row["batch"] * 3  # warmup + calls
        assert row["host_ms_without_launch"] > 0
