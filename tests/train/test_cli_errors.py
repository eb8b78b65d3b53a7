"""Errors that stop a Ray Train worker reach the console as one line, not a traceback."""

from hstu.cli.train import error_line
from hstu.data.validate import DataError


class FakeWorkerGroupError(Exception):
    """Shaped as ray.train.WorkerGroupError: the workers' exceptions by rank."""

    def __init__(self, worker_failures):
        super().__init__("Training failed due to worker errors")
        self.worker_failures = worker_failures


def test_a_data_error_inside_a_worker_is_one_line():
    cause = DataError("bad id", path="part-0.parquet", row=3, column="cand_seq__video_id")
    line = error_line(FakeWorkerGroupError({1: cause}))
    assert line.startswith("worker 1 stopped: ") and "part-0.parquet" in line
    assert "cand_seq__video_id" in line


def test_a_worker_traceback_as_text_still_gives_the_message():
    text = (
        "Traceback (most recent call last):\n  File \"x.py\", line 1\n"
        "hstu.data.validate.DataError: file a.parquet, column 'x': id >= num_buckets 8\n"
    )
    line = error_line(FakeWorkerGroupError({0: RuntimeError(text)}))
    assert line == "worker 0 stopped: file a.parquet, column 'x': id >= num_buckets 8"


def test_other_errors_keep_their_traceback():
    assert error_line(RuntimeError("boom")) is None
    assert error_line(FakeWorkerGroupError({0: RuntimeError("CUDA error")})) is None
