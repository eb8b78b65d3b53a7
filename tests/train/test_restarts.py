"""The console lines of a restart (the controller callback; the Ray run is in test_loop.py)."""

from types import SimpleNamespace

from hstu.train.restarts import RestartReporter, restart_lines


def test_restart_lines_name_the_checkpoint_and_the_attempt():
    assert restart_lines("worker 1 died (...)", 1, 3, ("/s/r/checkpoint_00000040", 40)) == [
        "worker 1 died (...)",
        "restarting the workers from checkpoint_00000040 (step 40): attempt 2 of 4"]
    assert restart_lines("worker 0 stopped: x", 2, 3, None)[1] == (
        "restarting the workers from the start (no checkpoint registered yet): attempt 3 of 4")
    # No restart left: nothing here, the CLI's one line says why the run stopped.
    assert restart_lines("worker 0 stopped: x", 1, 0, None) == []


def test_the_reporter_follows_registered_checkpoints(capsys):
    class WorkerHealthCheckFailedError(Exception):
        pass

    reporter = RestartReporter(max_failures=1)
    reporter.after_report(None, [{"global_step": 2}], SimpleNamespace(path="/r/checkpoint_00000002"))
    reporter.after_report(None, [{"global_step": 3}], None)  # a report without a checkpoint
    reporter.after_exception(None, {0: RuntimeError("Connection closed by peer"),
                                    1: WorkerHealthCheckFailedError("gone")})
    assert capsys.readouterr().out.splitlines() == [
        "worker 1 died (its process exited or was killed; Ray's report is in the log)",
        "restarting the workers from checkpoint_00000002 (step 2): attempt 2 of 2"]
    reporter.after_exception(None, {0: RuntimeError("again")})
    assert capsys.readouterr().out == ""  # the second failure ends the run
