"""Errors that stop a Ray Train worker reach the console as one line, once; the tracebacks and
Ray's own messages go to the run's log file, whose path is printed."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hstu.cli.train import error_line, report_error
from hstu.data.validate import DataError
from hstu.train.console import RunLog, run_console, shown_on_console


class FakeWorkerGroupError(Exception):
    """Shaped as ray.train.WorkerGroupError: the workers' exceptions by rank."""

    def __init__(self, worker_failures):
        super().__init__("Training failed due to worker errors")
        self.worker_failures = worker_failures


class WorkerHealthCheckFailedError(Exception):
    """Named as Ray Train's error for a worker whose process went away."""


def test_a_data_error_inside_a_worker_is_one_line():
    cause = DataError("bad id", path="part-0.parquet", row=3, column="cand_seq__video_id")
    line = error_line(FakeWorkerGroupError({1: cause}))
    assert line.startswith("worker 1 stopped: ") and "part-0.parquet" in line
    assert "cand_seq__video_id" in line and "\n" not in line


def test_a_worker_traceback_as_text_still_gives_the_message():
    text = (
        "Traceback (most recent call last):\n  File \"x.py\", line 1\n"
        "hstu.data.validate.DataError: file a.parquet, column 'x': id >= num_buckets 8\n"
    )
    line = error_line(FakeWorkerGroupError({0: RuntimeError(text)}))
    assert line == "worker 0 stopped: file a.parquet, column 'x': id >= num_buckets 8"


def test_any_worker_error_is_one_line_but_a_driver_bug_keeps_its_traceback():
    assert error_line(RuntimeError("boom")) is None
    line = error_line(FakeWorkerGroupError({0: RuntimeError("CUDA error: an illegal memory "
                                                            "access\nmore detail")}))
    assert line == "worker 0 stopped: RuntimeError: CUDA error: an illegal memory access"


def test_the_worker_that_started_it_is_named_not_the_peer_that_lost_its_connection():
    echo = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                        "[127.0.0.1]:13225")
    died = WorkerHealthCheckFailedError("A worker health check failed.")
    line = error_line(FakeWorkerGroupError({0: echo, 1: died}))
    assert line.startswith("worker 1 died (its process exited or was killed")
    bad_row = DataError("id >= num_buckets 1000", path="p.parquet", row=5, column="user_id")
    assert error_line(FakeWorkerGroupError({0: echo, 1: died, 2: bad_row})).startswith(
        "worker 2 stopped: file p.parquet")


def test_report_error_prints_the_line_and_the_log_path_and_exits_1(capsys):
    error = FakeWorkerGroupError({1: DataError("negative label", path="t.parquet", row=0,
                                               column="cand_seq__action_weight")})
    error.hstu_run_log = "/runs/r1/run.log"
    assert report_error("train", error) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("launch.py train: worker 1 stopped: file t.parquet, row 0")
    assert lines[1] == "launch.py train: tracebacks and Ray's messages are in /runs/r1/run.log"
    assert len(lines) == 2
    with pytest.raises(KeyError):  # a bug in the driver: its traceback is the useful part
        report_error("train", KeyError("x"))


@pytest.mark.parametrize(
    "line, stderr, shown",
    [
        ("run r1: 2 worker(s) on CPU", False, True),  # the driver's own
        ("launch.py train: worker 1 stopped: ...", True, True),
        ("\x1b[36m(RayTrainWorker pid=5)\x1b[0m step 10/100 epoch 0", False, True),
        ("(TrainController pid=7) worker 1 died; restarting (attempt 2 of 2)", False, True),
        ("\x1b[36m(RayTrainWorker pid=5)\x1b[0m Traceback (most recent call last):", True, False),
        ("(TrainController pid=7) [FailurePolicy] RETRY", True, False),
        ("\x1b[33m(raylet)\x1b[0m A worker died or was killed while executing a task", False,
         False),
        ("(PlacementGroupCleaner pid=9) Exception in thread PlacementGroupCleanerMonitor:",
         True, False),
        ("Failed to query Ray Train Controller actor state", True, False),  # RAY_NOISE
    ],
)
def test_the_console_shows_our_lines_and_leaves_ray_detail_to_the_log(line, stderr, shown):
    assert shown_on_console(line, stderr=stderr) is shown


def test_run_console_logs_every_line_and_shows_only_ours(tmp_path, monkeypatch):
    monkeypatch.delenv("HSTU_VERBOSE", raising=False)
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    with run_console() as log:
        print("before the run directory is known")
        log.attach(tmp_path / "r1" / "run.log")
        print("(RayTrainWorker pid=5) step 1/4")
        print("(RayTrainWorker pid=5) Traceback (most recent call last):", file=sys.stderr)
        print("(RayTrainWorker pid=5) hstu.data.validate.DataError: file x", file=sys.stderr)
        print("launch.py train: worker 0 stopped: file x", file=sys.stderr)
    assert out.getvalue() == "before the run directory is known\n(RayTrainWorker pid=5) step 1/4\n"
    assert err.getvalue() == "launch.py train: worker 0 stopped: file x\n"
    logged = (tmp_path / "r1" / "run.log").read_text()
    for text in ("before the run directory is known", "step 1/4", "Traceback",
                 "DataError: file x", "worker 0 stopped"):
        assert text in logged, text


def test_a_run_log_appends_so_a_resume_keeps_the_first_attempts(tmp_path):
    for attempt in ("first", "second"):
        log = RunLog()
        log.attach(tmp_path / "run.log")
        log.write(f"{attempt} attempt\n")
        log.close()
    text = (tmp_path / "run.log").read_text()
    assert text.index("first attempt") < text.index("second attempt")
    assert text.count("==== ") == 2  # one header per process that wrote to it


# ---- through Ray: a bad row in the training data, as a user sees it ---------------------------


@pytest.mark.slow
def test_a_bad_training_row_ends_the_run_with_one_line_and_the_log_has_the_traceback(
        launch_main, ray_session, smoke_data, smoke_recipe, mlflow_uri, tmp_path, capsys):
    first = sorted(Path(smoke_data["train"]).glob("*.parquet"))[0]
    table = pq.read_table(first).slice(0, 8)
    users = table.column("user_id").to_pylist()
    users[5] = 5000  # the smoke recipe's user_id table has 1000 rows
    table = table.set_column(table.column_names.index("user_id"), "user_id", pa.array(users))
    bad = tmp_path / "bad.parquet"
    pq.write_table(table, bad)

    status = launch_main(["train", "--recipe", smoke_recipe, "--train", str(bad), "--eval",
                     smoke_data["eval"], "--storage", str(tmp_path / "runs"), "--workers", "1",
                     "--mlflow-uri", mlflow_uri, "--run-name", "bad-row", "--no-export",
                     "--set", "data_config.batch_size=8"])
    captured = capsys.readouterr()
    assert status == 1
    expected = (f"launch.py train: worker 0 stopped: file {bad}, row 5 (0-based), sample_id "
                f"{table.column('sample_id')[5].as_py()}, column 'user_id': id >= num_buckets "
                "1000")
    err_lines = captured.err.splitlines()
    # Nothing from Ray on stderr; the error once; then where the detail is.
    log_path = tmp_path / "runs" / "bad-row" / "run.log"
    assert err_lines[-2].startswith(expected), captured.err
    assert err_lines[-1] == f"launch.py train: tracebacks and Ray's messages are in {log_path}"
    assert [line for line in err_lines if "id >= num_buckets" in line] == [err_lines[-2]]
    assert "Traceback" not in captured.out + captured.err
    assert "FailurePolicy" not in captured.out + captured.err
    assert f"  log: {log_path}" in captured.out
    logged = log_path.read_text()
    assert "Traceback (most recent call last)" in logged
    assert "hstu.data.validate.DataError: file" in logged

    # The failed run says so: in its directory and in MLflow, with the same line.
    marker = (tmp_path / "runs" / "bad-row" / "FAILED").read_text()
    assert marker.splitlines()[0].endswith(err_lines[-2].removeprefix("launch.py train: "))
    assert f"log: {log_path}" in marker
    from hstu.train.tracking import client

    mlflow_client = client(mlflow_uri)
    run = mlflow_client.search_runs(
        [e.experiment_id for e in mlflow_client.search_experiments()],
        filter_string="attributes.run_name = 'bad-row'")[0]
    assert run.info.status == "FAILED"
    assert run.data.tags["hstu.error"] == err_lines[-2].removeprefix("launch.py train: ")
    assert "run.log" in {a.path for a in mlflow_client.list_artifacts(run.info.run_id)}


def test_mark_failed_and_clear_failed(tmp_path, mlflow_uri):
    from hstu.train import tracking
    from hstu.train.trainer import FAILED_MARKER, clear_failed, mark_failed

    run_dir = tmp_path / "r1"
    run_id = tracking.start_run(mlflow_uri, "marks", "r1", tags={}, params={})
    log = RunLog()
    log.attach(run_dir / "run.log")
    try:
        raise TimeoutError("training run r1 timed out after 5 s")
    except TimeoutError as error:
        mark_failed(error, log, str(run_dir), mlflow_uri, run_id)
        assert error.hstu_run_log == str(run_dir / "run.log")
    log.close()
    marker = (run_dir / FAILED_MARKER).read_text()
    assert ": training run r1 timed out after 5 s\n" in marker
    assert "Traceback" in (run_dir / "run.log").read_text()
    mlflow_client = tracking.client(mlflow_uri)
    run = mlflow_client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["hstu.error"] == "training run r1 timed out after 5 s"
    # Resumed and finished: no longer marked.
    clear_failed(str(run_dir), mlflow_uri, run_id)
    assert not (run_dir / FAILED_MARKER).exists()
    assert "hstu.error" not in mlflow_client.get_run(run_id).data.tags


def test_an_interrupted_run_ends_killed(tmp_path, mlflow_uri):
    from hstu.train import tracking
    from hstu.train.trainer import mark_failed

    run_id = tracking.start_run(mlflow_uri, "marks", "r2", tags={}, params={})
    mark_failed(KeyboardInterrupt(), RunLog(), str(tmp_path / "r2"), mlflow_uri, run_id)
    run = tracking.client(mlflow_uri).get_run(run_id)
    assert (run.info.status, run.data.tags["hstu.error"]) == ("KILLED", "interrupted (Ctrl-C)")
    assert "interrupted (Ctrl-C)" in (tmp_path / "r2" / "FAILED").read_text()
