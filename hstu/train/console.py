"""What reaches the terminal, and what goes to the run's log file instead.

- Workers: Ray Train patches print() so that a printed line goes both to stdout and to the root
  logger, and the driver shows it twice. `console()` writes to stdout directly, once.
- Driver: Ray forwards every worker's and actor's output to the driver, each line prefixed
  with its source, `(RayTrainWorker pid=...)`, `(TrainController pid=...)`, `(raylet)`, and
  keeps the stream: a process's stdout arrives on the driver's stdout, its stderr on stderr.
  This project's lines are written to stdout by the workers (`console()`) and by the
  controller callback (restarts.py); Ray's own tracebacks, failure snippets, worker-death
  reports and library warnings go to stderr or come from other sources. `run_console()`
  therefore shows a forwarded line only when it came from a worker's or the controller's
  stdout, and writes *every* line, shown or not, to the run's log file (`RunLog`), so the
  detail is one `less` away instead of 20-110 lines on the terminal. Lines of the driver
  itself (no Ray prefix) are always shown, except the known-benign RAY_NOISE.
  HSTU_VERBOSE=1 shows everything (and still writes the log).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path

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

# Ray's prefix on a forwarded line, with the colour codes it adds on a terminal:
# "\x1b[36m(RayTrainWorker pid=28170)\x1b[0m text", "(raylet) text", "(X pid=1, ip=10.0.0.2) text".
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAY_PREFIX = re.compile(r"^\((?P<source>[A-Za-z_][\w.:-]*)(?: pid=\d+)?(?:, ip=[^)]*)?\) ")
# The processes whose stdout carries this project's lines (the loop's console(), the
# controller callback's restart lines).
OUR_SOURCES = ("RayTrainWorker", "TrainController")


def verbose() -> bool:
    return os.environ.get("HSTU_VERBOSE") == "1"


def console(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def ray_source(line: str) -> str | None:
    """The Ray process a forwarded line came from ("RayTrainWorker", "raylet", ...), or None
    for a line the driver printed itself."""
    match = _RAY_PREFIX.match(_ANSI.sub("", line))
    return match.group("source") if match else None


def shown_on_console(line: str, *, stderr: bool, patterns=RAY_NOISE) -> bool:
    """Whether a line the driver is about to print belongs on the terminal (see the module
    docstring); the run log receives it either way."""
    if any(pattern in line for pattern in patterns):
        return False
    source = ray_source(line)
    if source is None:
        return True
    return not stderr and source in OUR_SOURCES


class RunLog:
    """The run's log file: every line the driver printed or hid, Ray's detail and tracebacks
    included. Lines printed before the file is known (the run name is resolved after the
    console is set up) are kept and written when `attach` names it."""

    def __init__(self) -> None:
        self.path: str | None = None
        self._file = None
        self._pending: list[str] = []
        self._lock = threading.Lock()

    def attach(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            # Append: a resumed run continues the log of its earlier attempts.
            self._file = open(path, "a", encoding="utf-8")
            self._file.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}: "
                             f"{' '.join(sys.argv)}\n")
            for text in self._pending:
                self._file.write(text)
            self._pending.clear()
            self._file.flush()
            self.path = str(path)

    def move(self, path: str | os.PathLike) -> None:
        """Go on writing at `path`, with what was written so far (a temporary log that turns
        out worth keeping)."""
        import shutil

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            if self._file is None or self.path is None:
                raise ValueError("RunLog.move: no file attached")
            self._file.close()
            shutil.move(self.path, path)
            self._file = open(path, "a", encoding="utf-8")
            self.path = str(path)

    def write(self, text: str) -> None:
        text = _ANSI.sub("", text)
        with self._lock:
            if self._file is None:
                self._pending.append(text)
            else:
                self._file.write(text)
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
            self._pending.clear()


class _LineFilter:
    """A text stream that logs every line and forwards those that belong on the console."""

    def __init__(self, stream, *, stderr: bool, patterns, log: RunLog | None,
                 show_all: bool) -> None:
        self._stream = stream
        self._stderr = stderr
        self._patterns = patterns
        self._log = log
        self._show_all = show_all
        self._pending = ""
        # Ray's log-forwarding thread and the main thread both print.
        self._lock = threading.Lock()

    def _emit(self, line: str, end: str) -> None:
        if self._log is not None:
            self._log.write(line + end)
        if self._show_all or shown_on_console(line, stderr=self._stderr,
                                              patterns=self._patterns):
            self._stream.write(line + end)

    def write(self, text: str) -> int:
        with self._lock:
            self._pending += text
            *lines, self._pending = self._pending.split("\n")
            for line in lines:
                self._emit(line, "\n")
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._pending:
                self._emit(self._pending, "")
                self._pending = ""
        self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextlib.contextmanager
def run_console(patterns=RAY_NOISE, *, keep_log: bool = True):
    """Route the driver's stdout and stderr as the module docstring says; yields the RunLog
    (attach a file to it once the run's directory is known), or None with keep_log=False."""
    log = RunLog() if keep_log else None
    out, err = sys.stdout, sys.stderr
    show_all = verbose()
    sys.stdout = _LineFilter(out, stderr=False, patterns=patterns, log=log, show_all=show_all)
    sys.stderr = _LineFilter(err, stderr=True, patterns=patterns, log=log, show_all=show_all)
    try:
        yield log
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = out, err
        if log is not None:
            log.close()


@contextlib.contextmanager
def filtered_console(patterns=RAY_NOISE):
    """run_console without a log file: the routing alone (`train --repeat` keeps Ray's output
    off the console between its runs, each of which logs to its own file)."""
    with run_console(patterns, keep_log=False):
        yield


def show_project_warnings_on_stdout(name: str = "hstu") -> None:
    """In a worker: this project's warnings (e.g. "skipped 2 row(s) of FILE: REASON") go to
    stdout, which the driver shows, instead of stderr, which it sends to the run log with
    Ray's detail."""
    logger = logging.getLogger(name)
    if any(getattr(handler, "_hstu_stdout", False) for handler in logger.handlers):
        return  # a second worker group in the same process (tests) adds none twice
    handler = logging.StreamHandler(sys.stdout)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler._hstu_stdout = True
    logger.addHandler(handler)
    logger.propagate = False
