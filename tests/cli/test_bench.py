"""launch.py bench: finds benchmarks/<name>_bench.py and passes the arguments through."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "launch.py"), *args], capture_output=True, text=True
    )


def test_unknown_benchmark_lists_the_available_ones():
    result = launch("bench", "nonexistent")
    assert result.returncode == 1
    assert "no benchmark 'nonexistent'" in result.stderr
    for name in ("data", "kernel", "train"):
        assert name in result.stderr


def test_arguments_reach_the_script():
    result = launch("bench", "train", "--help")
    assert result.returncode == 0, result.stderr
    assert "--workers" in result.stdout  # an option of train_bench.py itself


def test_unknown_command_no_command_and_help():
    assert launch("nonsense").returncode == 2
    assert launch().returncode == 2
    result = launch("--help")
    assert result.returncode == 0 and "check" in result.stdout
