"""One line for an error that ended a run: what the CLI prints, MLflow's hstu.error tag and the
run directory's FAILED marker all say the same.

- Errors whose message names what to fix (a bad config field, a bad data row with its file,
  row and column, an impossible option, a timeout) are their message, without a traceback.
- An error raised inside a Ray Train worker (ray.train.WorkerGroupError) is one line naming the
  worker, of whatever type: its traceback is in the run's log (console.py), and the console
  should show the cause once, not Ray's 20-110 lines. When several workers fail together the
  one that started it is named: a self-explaining error first, then a worker that died, then
  any other error; the others' "connection closed by peer" is only the echo of a dead peer.
- Anything else raised in the driver is a bug to report with its traceback: `error_line`
  returns None for it and the CLI re-raises; `one_line` still gives its type and message for
  the tag and the marker.
"""

from __future__ import annotations

import re

# The last "hstu.<module>.<Name>Error: message" line of a worker's traceback text.
_HSTU_ERROR_LINE = re.compile(r"^hstu(?:\.\w+)+Error: (.+)$", re.MULTILINE)
# What a worker's collective reports when another worker's process went away.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
              "NCCL communicator was aborted", "ProcessGroupGloo", "recvBytes", "sendBytes")
_DIED = ("WorkerHealthCheckFailedError", "ActorDiedError", "ActorUnavailableError",
         "WorkerCrashedError", "NodeDiedError")


def self_explaining_types() -> tuple[type, ...]:
    """The workers' self-explaining errors plus the driver's own."""
    from hstu.train.loop import self_explaining_errors
    from hstu.train.sharding import ShardingError
    from hstu.train.tracking import TrackingServerError
    from hstu.train.trainer import TrainSetupError

    return self_explaining_errors() + (ShardingError, TrainSetupError, TrackingServerError,
                                       TimeoutError, FileNotFoundError)


def _first_line(text: str, limit: int = 300) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _self_explaining(failure: BaseException, known: tuple[type, ...]) -> str | None:
    cause = failure
    while cause is not None:
        if isinstance(cause, known):
            return str(cause)
        cause = cause.__cause__
    matches = _HSTU_ERROR_LINE.findall(str(failure))
    return matches[-1].strip() if matches else None


def _died(failure: BaseException) -> bool:
    names = {type(failure).__name__}
    inner = getattr(failure, "health_check_failure", None)
    if inner is not None:
        names.add(type(inner).__name__)
    return bool(names & set(_DIED))


def worker_failure_line(worker_failures: dict) -> str:
    """One line for the failures of a worker group ({rank: exception}), naming the worker that
    started it (module docstring)."""
    known = self_explaining_types()
    ranked = []
    for rank, failure in sorted(worker_failures.items()):
        message = _self_explaining(failure, known)
        if message is not None:
            ranked.append((0, rank, f"worker {rank} stopped: {message}"))
        elif _died(failure):
            ranked.append((1, rank, f"worker {rank} died (its process exited or was killed; "
                                    "Ray's report is in the log)"))
        else:
            text = f"{type(failure).__name__}: {_first_line(failure)}"
            echo = any(pattern in str(failure) for pattern in _PEER_GONE)
            ranked.append((3 if echo else 2, rank, f"worker {rank} stopped: {text}"))
    if not ranked:
        return "the workers failed (no worker reported an error; see the log)"
    return min(ranked)[2]


def error_line(error: BaseException) -> str | None:
    """The line the CLI prints for `error`, or None for an unexpected driver error (a bug,
    which keeps its traceback)."""
    if isinstance(error, self_explaining_types()):
        return str(error)
    failures = getattr(error, "worker_failures", None)  # ray.train.WorkerGroupError
    if failures is not None:
        return worker_failure_line(failures)
    controller_failure = getattr(error, "controller_failure", None)  # ray.train.ControllerError
    if controller_failure is not None:
        return (f"Ray Train's controller failed: {type(controller_failure).__name__}: "
                f"{_first_line(controller_failure)}")
    return None


def one_line(error: BaseException) -> str:
    """error_line, or the type and first line of the message: for MLflow and FAILED markers."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    line = error_line(error)
    return line if line is not None else f"{type(error).__name__}: {_first_line(error)}"
