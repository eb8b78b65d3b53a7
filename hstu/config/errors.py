"""ConfigError and where in a config (file:line:col, or the --set override) a field came from."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable


@dataclasses.dataclass(frozen=True)
class Location:
    # A file path, or the override text ("--set 'a.b=1'") for fields set on the command line.
    source: str
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        if self.line is None:
            return self.source
        return f"{self.source}:{self.line}:{self.column}"


class ConfigError(ValueError):
    """A config that cannot be used: `<where>: <field path>: <what was expected>`."""

    def __init__(self, where: Location | str, path: str, problem: str):
        self.where = where
        self.path = path or "(top level)"
        self.problem = problem
        super().__init__(f"{where}: {self.path}: {problem}")


def suggest(name: str, candidates: Iterable[str], limit: int = 3) -> str:
    """' (did you mean "a" or "b"?)' for the nearest candidates, or '' when none is close."""
    close = difflib.get_close_matches(name, list(candidates), n=limit, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(f'"{c}"' for c in close) + "?)"


def one_of(values: Iterable[str]) -> str:
    return ", ".join(str(v) for v in values)


class ModelConfigError(ValueError):
    """A config the model cannot be built from; the message starts with the field path."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"model_config.{path}: {problem}")
