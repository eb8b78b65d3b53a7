"""Runs a worker script as `world` separate Python processes (one per gloo rank, as Ray would)
and fails the calling test with the end of a failed rank's stderr."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_ranks(script: Path, label: str, world: int, args_of_rank, timeout: float = 300) -> None:
    """args_of_rank(rank) -> the rank's command-line arguments (strings) after the script."""
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    ranks = [subprocess.Popen([sys.executable, str(script), *args_of_rank(rank)], env=env,
                              stderr=subprocess.PIPE, text=True)
             for rank in range(world)]
    for rank in ranks:
        _, stderr = rank.communicate(timeout=timeout)
        assert rank.returncode == 0, f"{label}:\n{stderr[-4000:]}"
