"""Runs a worker script as `world` separate Python processes (one per gloo rank, as Ray would)
and fails the calling test with the end of a failed rank's stderr."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_ranks(script: Path, label: str, world: int, args_of_rank, timeout: float = 300) -> None:
    """args_of_rank(rank) -> the rank's command-line arguments (strings) after the script.
    Each rank's stderr goes to a file (a pipe could fill and block a rank); the first rank
    that fails, or the timeout, stops the others, so a crash is reported at once instead of
    leaving its peers waiting in a collective."""
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryDirectory(prefix="gloo-ranks-") as logs:
        paths = [Path(logs) / f"rank{rank}.err" for rank in range(world)]
        ranks = []
        for rank, path in enumerate(paths):
            with open(path, "w") as stderr:
                ranks.append(subprocess.Popen([sys.executable, str(script), *args_of_rank(rank)],
                                              env=env, stderr=stderr))
        deadline = time.monotonic() + timeout
        failed = None
        while failed is None and any(p.poll() is None for p in ranks):
            failed = next((r for r, p in enumerate(ranks) if p.poll() not in (None, 0)), None)
            if time.monotonic() > deadline:
                failed = "timeout"
            time.sleep(0.1)
        if failed is None:
            failed = next((r for r, p in enumerate(ranks) if p.returncode != 0), None)
        for p in ranks:
            if p.poll() is None:
                p.kill()
                p.wait()
        if failed == "timeout":
            raise AssertionError(f"{label}: ranks still running after {timeout:.0f} s")
        if failed is not None:
            raise AssertionError(f"{label}: rank {failed} exited with {ranks[failed].returncode}:\n"
                                 f"{paths[failed].read_text()[-4000:]}")
