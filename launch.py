#!/usr/bin/env python3
"""Command-line entry point: `python launch.py <command> ...`.

Each command lives in its own module under hstu/cli/, which defines
`add_arguments(parser)` and `run(args) -> int`. This file only routes; it
imports a command's module when that command is asked for, so `check` does
not pay for importing Ray or TorchRec.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module under hstu.cli, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "smoke": ("smoke", "local 2-worker CPU run: synthetic data, train, eval, export, MLflow"),
    "prepare": ("prepare", "convert raw logs (kuairand) or generate data (synthetic) into samples"),
    "train": ("train", "train on Ray Train (local Ray, or the cluster in RAY_ADDRESS)"),
    "eval": ("evaluate", "evaluate a checkpoint on a dataset"),
    "export": ("export", "export a checkpoint for serving"),
    "predict": ("predict", "score samples with an exported model"),
    "bench": ("bench", "run a benchmark from benchmarks/"),
    "check": ("check", "load and validate a pipeline config and print a summary"),
    "compare": ("compare", "show MLflow runs side by side"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="launch.py", description="DLRM-HSTU ranking trained on Ray."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        subparsers.add_parser(name, help=help_text, add_help=False)

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(
            f"launch.py: unknown command {argv[0]!r}" if argv else "launch.py: no command given",
            file=sys.stderr,
        )
        parser.print_help(sys.stderr)
        return 2

    name, rest = argv[0], argv[1:]
    module_name, help_text = COMMANDS[name]
    try:
        module = importlib.import_module(f"hstu.cli.{module_name}")
    except ModuleNotFoundError as err:
        if err.name != f"hstu.cli.{module_name}":
            raise
        print(
            f"launch.py {name}: not implemented yet (hstu/cli/{module_name}.py is missing).",
            file=sys.stderr,
        )
        return 1
    command_parser = argparse.ArgumentParser(prog=f"launch.py {name}", description=help_text)
    module.add_arguments(command_parser)
    args = command_parser.parse_args(rest)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
