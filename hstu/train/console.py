"""What reaches the terminal: our lines once each, and without Ray's known-benign noise.

- Workers: Ray Train patches print() so that a printed line goes both to stdout and to the root
  logger, and the driver shows it twice. `console()` writes to stdout directly, once.
- Driver: without Ray's dashboard (local runs start Ray with include_dashboard=False), Ray
  Train's placement-group cleaner cannot reach the state API and may warn about it every
  second; `filtered_console()` drops exactly those lines and a few other known-benign ones
  (RAY_NOISE). HSTU_VERBOSE=1 shows everything.
"""

from __future__ import annotations

import contextlib
import os
import sys

# Lines from Ray that say nothing actionable here (HSTU_VERBOSE=1 shows them): the cleaner's
# state-API warning without a dashboard, a deprecation inside Ray Train's own data setup, an
# internal actor-restart note, Ray Data's per-dataset info, Ray Train's per-rank checkpoint
# line (rank 0 prints one line per checkpoint instead), the local token-auth notice.
RAY_NOISE = (
    "Failed to query Ray Train Controller actor state",
    "Progress bars disabled. To enable, set",
    "exclude_resources",
    "has constructor arguments in the object store and max_restarts",
    "execution finished in",
    "Estimated parquet",
    "Checkpoint successfully created at",
    "Token authentication is enabled for this Ray cluster",
)


def verbose() -> bool:
    return os.environ.get("HSTU_VERBOSE") == "1"


def console(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


class _LineFilter:
    """A text stream that forwards everything except lines containing a noise pattern."""

    def __init__(self, stream, patterns) -> None:
        self._stream = stream
        self._patterns = patterns
        self._pending = ""

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            if not any(pattern in line for pattern in self._patterns):
                self._stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self._pending and not any(p in self._pending for p in self._patterns):
            self._stream.write(self._pending)
            self._pending = ""
        self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextlib.contextmanager
def filtered_console(patterns=RAY_NOISE):
    if verbose():
        yield
        return
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _LineFilter(out, patterns), _LineFilter(err, patterns)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = out, err
