"""`launch.py bench NAME [ARGS...]`: run benchmarks/NAME_bench.py with ARGS.

The benchmarks are plain scripts (each prints a table and writes JSON, see docs/BENCHMARKS.md);
this command only finds one and runs it with the same Python, so `launch.py bench data --help`
shows that script's own options.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def available() -> list[str]:
    return sorted(p.name[: -len("_bench.py")] for p in BENCHMARKS.glob("*_bench.py"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help=f"which benchmark: {', '.join(available()) or '(none found)'}")
    parser.add_argument(
        "args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark script"
    )


def run(args: argparse.Namespace) -> int:
    script = BENCHMARKS / f"{args.name}_bench.py"
    if not script.is_file():
        print(
            f"launch.py bench: no benchmark {args.name!r} (looked for {script}); "
            f"available: {', '.join(available()) or 'none'}",
            file=sys.stderr,
        )
        return 1
    return subprocess.call([sys.executable, str(script), *args.args])
