"""One module per `launch.py` command; each defines add_arguments(parser) and run(args) -> int."""

from __future__ import annotations

import argparse


def add_override_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    """`--set FIELD=VALUE` (repeatable) into args.overrides: one config override syntax for
    every command (hstu.config.loader applies them after the file is parsed)."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help=help_text,
    )
