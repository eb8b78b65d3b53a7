"""A real 2-worker Ray TorchTrainer run on CPU: TorchRec sharding (one table pinned row-wise, one
table-wise), training, evaluation over both workers, checkpoints and the MLflow run.

One trainer run serves every check here (each start costs tens of seconds on 2 CPUs). Its data
is the smoke data plus two extra training rows (one each worker beyond a full batch: dropped by
drop_last) and two bad eval rows (skipped under on_bad_rows SKIP), so that the run also shows
the left-out rows summed over both workers and reported.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

BATCH = 8
WORKERS = 2
TRAIN_ROWS = 64  # conftest.smoke_data
STEPS = TRAIN_ROWS // WORKERS // BATCH  # one epoch
EXTRA_TRAIN_ROWS = 2  # equal shards of 33 rows: 4 batches of 8 + 1 row dropped on each worker
BAD_EVAL_ROWS = 2


def _extra_rows(directory: str, count: int, first_id: int) -> pa.Table:
    """`count` rows copied from the data in `directory`, with new sample ids."""
    table = pq.read_table(sorted(Path(directory).glob("*.parquet"))[0]).slice(0, count)
    ids = pa.array(range(first_id, first_id + count), pa.int64())
    return table.set_column(table.column_names.index("sample_id"), "sample_id", ids)


def _with_bad_rows(table: pa.Table) -> pa.Table:
    """Row 0: a negative bitmask label; row 1: a user_id beyond its table (1000 rows)."""
    labels = table.column("cand_seq__action_weight").to_pylist()
    labels[0] = [-1] * len(labels[0])
    users = table.column("user_id").to_pylist()
    users[1] = 1000
    table = table.set_column(
        table.column_names.index("cand_seq__action_weight"),
        "cand_seq__action_weight",
        pa.array(labels, pa.list_(pa.int64())),
    )
    return table.set_column(table.column_names.index("user_id"), "user_id", pa.array(users))


@pytest.fixture(scope="module")
def trained(ray_session, smoke_data, smoke_recipe, mlflow_uri, tmp_path_factory):
    from hstu.train.trainer import TrainOptions, run_training

    assert smoke_data["rows"] == TRAIN_ROWS
    root = tmp_path_factory.mktemp("trained")
    extra_train, bad_eval = root / "extra_train.parquet", root / "bad_eval.parquet"
    pq.write_table(_extra_rows(smoke_data["train"], EXTRA_TRAIN_ROWS, 10**12), extra_train)
    pq.write_table(_with_bad_rows(_extra_rows(smoke_data["eval"], BAD_EVAL_ROWS, 2 * 10**12)),
                   bad_eval)
    options = TrainOptions(
        recipe=smoke_recipe,
        overrides=[
            f"data_config.batch_size={BATCH}",
            "data_config.on_bad_rows=SKIP",
            "train_config.num_epochs=1",
            "train_config.save_checkpoints_steps=2",
            "train_config.log_step_count_steps=1",
        ],
        train_paths=[smoke_data["train"], str(extra_train)],
        eval_paths=[smoke_data["eval"], str(bad_eval)],
        workers=WORKERS,
        storage=str(root / "runs"),
        tracking_uri=mlflow_uri,
        sharding=["video_id_emb=row_wise", "user_id_emb=table_wise"],
        export=False,
        timeout_s=600,
    )
    result = run_training(options)
    from hstu.train.tracking import client

    return result, client(result.tracking_uri)


@pytest.mark.slow
def test_trains_one_epoch_on_both_workers(trained):
    result, _ = trained
    assert result.metrics["global_step"] == STEPS
    assert result.metrics["samples"] == TRAIN_ROWS
    assert result.metrics["epochs_completed"] == 1
    assert result.metrics["world_size"] == WORKERS
    assert result.metrics["restarts"] == 0


@pytest.mark.slow
def test_rows_left_out_are_summed_over_workers_and_reported(trained, tmp_path):
    result, mlflow_client = trained
    # One row beyond the last full batch on each worker (drop_last), no bad training row; the
    # two bad eval rows skipped (a negative label, an id beyond its table).
    assert result.metrics["train/dropped_rows"] == WORKERS
    assert result.metrics["train/skipped_rows"] == 0
    assert result.metrics["eval/skipped_rows"] == BAD_EVAL_ROWS
    logged = mlflow_client.get_run(result.mlflow_run_id).data.metrics
    assert logged["train/dropped_rows"] == WORKERS and logged["train/skipped_rows"] == 0
    assert logged["eval/skipped_rows"] == BAD_EVAL_ROWS
    final = json.loads(Path(mlflow_client.download_artifacts(
        result.mlflow_run_id, "final_metrics.json", str(tmp_path))).read_text())
    assert (final["train/dropped_rows"], final["eval/skipped_rows"]) == (WORKERS, BAD_EVAL_ROWS)


@pytest.mark.slow
def test_checkpoints_hold_every_rank_shards(trained):
    result, _ = trained
    final = Path(result.checkpoint_path)
    assert final.name == f"checkpoint_{STEPS:08d}"
    names = {p.name for p in final.iterdir()}
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "train_state.json"} <= names
    state = json.loads((final / "train_state.json").read_text())
    assert state["world_size"] == WORKERS and state["global_step"] == STEPS
    assert state["epoch_done"]  # saved at the epoch's last step: a resume starts epoch 1
    assert state["sharding"]["video_id_emb"]["sharding_type"] == "row_wise"
    # save_checkpoints_steps=2: the step-2 checkpoint is kept beside the final one.
    assert (Path(result.run_dir) / "checkpoint_00000002" / ".metadata").is_file()


@pytest.mark.slow
def test_mlflow_run_holds_params_tags_and_every_task_auc(trained, smoke_data):
    result, mlflow_client = trained
    run = mlflow_client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == result.run_name
    params = run.data.params
    assert params["model_config.dlrm_hstu.max_seq_len"] == "256"
    assert params["data_config.batch_size"] == str(BATCH)  # the --set override is logged
    assert params["feature_configs.user_id.id_feature.num_buckets"] == "1000"
    assert params["run.workers"] == str(WORKERS)
    # The data this run read (its --train/--eval, two paths each), not the recipe's paths.
    train_paths, eval_paths = (params[k].split(",") for k in ("train_input_path", "eval_input_path"))
    assert len(train_paths) == len(eval_paths) == 2
    assert train_paths[0] == smoke_data["train"] and eval_paths[0] == smoke_data["eval"]
    assert run.data.tags["hstu.ray_run_name"] == result.run_name
    assert run.data.tags["hstu.ray_job_id"]
    tasks = result.tasks
    assert len(tasks) == 8
    for task in tasks:
        assert f"eval/auc/{task}" in run.data.metrics, task
        assert f"train/loss/{task}" in run.data.metrics, task
    assert run.data.metrics["train/samples_per_s"] > 0
    assert run.data.metrics["train/tokens_per_s"] > 0
    history = mlflow_client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_mlflow_artifacts_record_config_plan_and_locations(trained, tmp_path):
    result, mlflow_client = trained
    run_id = result.mlflow_run_id
    listed = {a.path for a in mlflow_client.list_artifacts(run_id)}
    assert {"pipeline.config", "sharding_plan.txt", "sharding_plan.json", "final_metrics.json",
            "locations.json", "summary.txt"} <= listed
    plan = json.loads(Path(mlflow_client.download_artifacts(run_id, "sharding_plan.json",
                                                            str(tmp_path))).read_text())
    assert plan["video_id_emb"]["sharding_type"] == "row_wise"
    assert plan["video_id_emb"]["ranks"] == [0, 1]
    assert plan["user_id_emb"]["sharding_type"] == "table_wise"
    assert len(plan["user_id_emb"]["ranks"]) == 1
    locations = json.loads(Path(mlflow_client.download_artifacts(run_id, "locations.json",
                                                                 str(tmp_path))).read_text())
    assert locations["checkpoint"] == result.checkpoint_path


@pytest.mark.slow
def test_the_best_step_of_every_eval_metric_is_logged_and_the_table_names_its_step(trained):
    from hstu.train.trainer import summary_text

    result, mlflow_client = trained
    logged = mlflow_client.get_run(result.mlflow_run_id).data.metrics
    for task in result.tasks:
        key = f"eval/loss/{task}"
        history = mlflow_client.get_metric_history(result.mlflow_run_id, key)
        assert sorted(m.step for m in history) == [2, STEPS]  # save_checkpoints_steps=2
        lowest = min(m.value for m in history)
        step = min(m.step for m in history if m.value == lowest)
        assert (result.best[key].step, result.best[key].value) == (step, lowest)
        assert logged[f"best_step/{key}"] == step
        assert logged[f"best/{key}"] == pytest.approx(lowest)
    text = summary_text(result)
    assert f"eval at step {STEPS} (the last); best AUC over all the run's evaluations" in text


def _eval_batches(eval_dir: str, features, labels, rows_per_batch: int = 5):
    from hstu.data.pipeline import arrow_to_batch

    table = pa.concat_tables(pq.read_table(p) for p in sorted(Path(eval_dir).glob("*.parquet")))
    return [
        arrow_to_batch(table.slice(start, rows_per_batch), features, labels)
        for start in range(0, table.num_rows, rows_per_batch)
    ]


@pytest.mark.slow
def test_reloaded_checkpoint_scores_like_the_distributed_eval(trained, smoke_data, smoke_recipe):
    """One process reloads the 2-worker checkpoint (DCP reassembles row-wise and table-wise
    shards) and evaluates the whole eval set: its per-task AUC must equal the AUC the two
    workers computed together. This also catches dense weights drifting apart between ranks
    (gradients not averaged), which makes the checkpoint disagree with what was evaluated."""
    from hstu.config.features import feature_specs, label_specs
    from hstu.config.loader import load_config
    from hstu.train.checkpoint import load_for_inference
    from hstu.train.evaluation import evaluate

    result, _ = trained
    cfg = load_config(smoke_recipe, [f"data_config.batch_size={BATCH}"])
    features, labels = feature_specs(cfg), label_specs(cfg)
    model = load_for_inference(cfg, result.checkpoint_path)
    metrics = evaluate(model, model, _eval_batches(smoke_data["eval"], features, labels),
                       device=torch.device("cpu"))
    # Every good eval row is scored (the eval split is unequal and the shorter rank pads); the
    # bad rows added to the run's eval data were skipped.
    eval_rows = smoke_data["manifest"]["splits"]["eval"]["rows"]
    assert result.metrics["eval/rows"] == metrics["eval/rows"] == eval_rows
    compared = 0
    for task in result.tasks:
        key = f"eval/auc/{task}"
        distributed, single = result.metrics[key], metrics[key]
        if math.isnan(distributed):  # the eval set has no positive label for this task
            assert math.isnan(single)
            continue
        assert single == pytest.approx(distributed, abs=1e-3), task
        compared += 1
    assert compared >= 2


# ---- the driver's setup, without Ray ---------------------------------------------------------


def test_default_cpus_leave_one_for_ray_data():
    from hstu.train.trainer import default_cpus_per_worker

    assert default_cpus_per_worker(2, 2) == 0.5
    assert default_cpus_per_worker(2, 1) == 1.0
    assert default_cpus_per_worker(64, 8) == 1.0
    assert default_cpus_per_worker(1, 2) == 0.25


def test_the_ray_job_submission_id_is_read_from_the_job_config_ray_hands_the_driver(
        monkeypatch):
    from hstu.train.trainer import job_submission_id

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert job_submission_id() is None  # a driver started by hand, not by `ray job submit`
    # The shape Ray 2.60's job supervisor writes (seen in a local `ray job submit` run).
    job_config = {"runtime_env": {"working_dir": "gcs://_ray_pkg_0.zip"},
                  "metadata": {"job_submission_id": "raysubmit_AbC123",
                               "job_name": "raysubmit_AbC123"}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job_config))
    assert job_submission_id() == "raysubmit_AbC123"
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{not json")
    assert job_submission_id() is None


def test_run_names_are_never_silently_reused(tmp_path):
    from hstu.train.trainer import SNAPSHOT_FILE, TrainOptions, TrainSetupError, resolve_run

    storage = str(tmp_path)
    name, resuming = resolve_run(TrainOptions(recipe="r", run_name="a"), storage, "smoke")
    assert (name, resuming) == ("a", False)
    for run, age in (("old", 100), ("new", 200)):
        (tmp_path / run).mkdir()
        (tmp_path / run / SNAPSHOT_FILE).write_text("{}")
        os.utime(tmp_path / run / SNAPSHOT_FILE, (age, age))
    with pytest.raises(TrainSetupError, match="'old' already exists.*--resume"):
        resolve_run(TrainOptions(recipe="r", run_name="old"), storage, "smoke")
    assert resolve_run(TrainOptions(recipe="r", resume=True), storage, "smoke") == ("new", True)
    assert resolve_run(TrainOptions(recipe="r", resume=True, run_name="old"), storage, "x") == (
        "old", True)
    with pytest.raises(TrainSetupError, match="run 'a' has no checkpoints"):
        resolve_run(TrainOptions(recipe="r", resume=True, run_name="a"), storage, "smoke")


@pytest.fixture
def default_sigint():
    """A plain SIGINT handler for the test (Ray Train's fit leaves its own installed)."""
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


class StuckTrainer:
    def fit(self):
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            time.sleep(0.01)
        return "finished"


class GracefulTrainer:
    """Like Ray Train: fit installs a SIGINT handler that makes fit return early."""

    def fit(self):
        aborted = []
        signal.signal(signal.SIGINT, lambda signum, frame: aborted.append(signum))
        deadline = time.monotonic() + 20
        while not aborted and time.monotonic() < deadline:
            time.sleep(0.01)
        return "aborted" if aborted else "finished"


@pytest.mark.parametrize("trainer", [StuckTrainer(), GracefulTrainer()])
def test_a_stuck_run_ends_with_a_timeout_and_a_message(default_sigint, capsys, trainer):
    from hstu.train.trainer import fit_with_timeout

    started = time.monotonic()
    with pytest.raises(TimeoutError, match="training run x timed out after 0 s"):
        fit_with_timeout(trainer, 0.3, "training run x")
    assert time.monotonic() - started < 10
    assert "training run x did not finish within 0s" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_no_timeout_leaves_the_run_alone(default_sigint):
    from hstu.train.trainer import fit_with_timeout

    class Quick:
        def fit(self):
            return "done"

    assert fit_with_timeout(Quick(), None, "x") == "done"
    assert fit_with_timeout(Quick(), 30, "x") == "done"


@pytest.mark.parametrize("kernel", ["TRITON", "CUTLASS"])
def test_gpu_kernels_without_use_gpu_are_refused_before_ray_starts(kernel, monkeypatch,
                                                                   smoke_recipe):
    from hstu.config.loader import load_config
    from hstu.train.trainer import TrainSetupError, check_kernel_runs_here

    overrides = [f"model_config.kernel={kernel}"]
    if kernel == "CUTLASS":  # its config rules want half precision and equal head dims
        overrides.append("train_config.mixed_precision=BF16")
    cfg = load_config(smoke_recipe, overrides)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(TrainSetupError, match=f"kernel is {kernel}.*--use-gpu.*kernel=PYTORCH"):
        check_kernel_runs_here(cfg, use_gpu=False)
    check_kernel_runs_here(cfg, use_gpu=True)  # the workers get GPUs: nothing to say here
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    check_kernel_runs_here(cfg, use_gpu=False)  # the interpreter runs them on CPU (tests)
    check_kernel_runs_here(load_config(smoke_recipe), use_gpu=False)  # PYTORCH runs anywhere


def test_cuda_graphs_without_use_gpu_are_refused_before_ray_starts(smoke_recipe, tmp_path):
    from hstu.train.trainer import TrainOptions, TrainSetupError, run_training

    options = TrainOptions(recipe=smoke_recipe, cuda_graphs=True, use_gpu=False,
                           storage=str(tmp_path), tracking_uri=f"file://{tmp_path}/mlruns")
    with pytest.raises(TrainSetupError, match="--cuda-graphs needs --use-gpu"):
        run_training(options)
    options.use_gpu = True  # the smoke recipe's kernel is PYTORCH
    with pytest.raises(TrainSetupError, match="--cuda-graphs needs model_config.kernel TRITON"):
        run_training(options)


def test_a_worker_without_the_cutlass_package_ends_as_one_line():
    from hstu.cli.train import error_line
    from hstu.ops.cutlass.attention import CutlassUnavailableError

    class WorkerGroupError(Exception):
        worker_failures = {0: CutlassUnavailableError("kernel CUTLASS needs ... pip install x")}

    assert error_line(WorkerGroupError()) == "worker 0 stopped: kernel CUTLASS needs ... pip install x"


def test_data_paths_are_read_as_torcheasyrec_reads_input_path(tmp_path):
    """Comma-separated parts, each a file, a directory or a glob pattern."""
    from hstu.train.trainer import TrainSetupError, _paths

    for name in ("a/part-0.parquet", "a/part-1.parquet", "b/part-0.parquet"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    pattern, folder = str(tmp_path / "a" / "part-*.parquet"), str(tmp_path / "b")
    assert _paths(None, f"{pattern}, {folder}", "train") == [
        str(tmp_path / "a" / "part-0.parquet"), str(tmp_path / "a" / "part-1.parquet"), folder]
    assert _paths([folder], "ignored-when-given", "eval") == [folder]
    assert _paths(None, "", "eval") is None
    bracketed = tmp_path / "run[1]"  # an existing name with glob characters is a path
    bracketed.mkdir()
    assert _paths([str(bracketed)], "", "train") == [str(bracketed)]
    first = str(tmp_path / "a" / "part-0.parquet")  # named twice: read once
    assert _paths([f"{first},{pattern}"], "", "train") == [
        first, str(tmp_path / "a" / "part-1.parquet")]
    with pytest.raises(TrainSetupError, match=r"train data not found: .*nothing-\*\.parquet \(no match\)"):
        _paths(None, f"{folder},{tmp_path / 'nothing-*.parquet'}", "train")


def test_a_resume_logging_to_another_mlflow_server_starts_a_new_run_there(capsys):
    from hstu.train.trainer import mlflow_run_to_resume

    link = {"tracking_uri": "sqlite:////old/mlflow.db", "run_id": "abc123"}
    assert mlflow_run_to_resume(link, "sqlite:////old/mlflow.db", "the default") == "abc123"
    assert mlflow_run_to_resume(None, "sqlite:////old/mlflow.db", "the default") is None
    assert mlflow_run_to_resume(link, "http://mlflow:5000", "--mlflow-uri") is None
    out = capsys.readouterr().out
    assert "tracked at sqlite:////old/mlflow.db (run abc123); --mlflow-uri names " \
        "http://mlflow:5000" in out


# ---- launch.py eval of the run's checkpoint ------------------------------------------------


def _launch_main():
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch", Path(__file__).parents[2] / "launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.slow
def test_eval_with_another_worker_count_leaves_no_directory(trained, smoke_data, smoke_recipe,
                                                           mlflow_uri, tmp_path, capsys):
    """The 2-worker checkpoint read by 1 worker gives the run's own final AUCs; the
    evaluation's metrics and log go to MLflow, and nothing is left under --storage."""
    result, mlflow_client = trained
    storage = tmp_path / "evals"
    status = _launch_main()([
        "eval", "--recipe", smoke_recipe, "--checkpoint", result.checkpoint_path,
        "--eval", smoke_data["eval"], "--workers", "1", "--storage", str(storage),
        "--mlflow-uri", mlflow_uri, "--run-name", "eval-ok", "--json", str(tmp_path / "m.json"),
        "--set", f"data_config.batch_size={BATCH}"])
    assert status == 0, capsys.readouterr().err
    assert not storage.exists() or not any(storage.iterdir())
    metrics = json.loads((tmp_path / "m.json").read_text())
    for task in result.tasks:
        key = f"eval/auc/{task}"
        if not math.isnan(result.metrics[key]):
            assert metrics[key] == pytest.approx(result.metrics[key], abs=1e-6), task
    run = mlflow_client.search_runs(
        [e.experiment_id for e in mlflow_client.search_experiments()],
        filter_string="attributes.run_name = 'eval-ok'")[0]
    assert run.info.status == "FINISHED"
    assert {"eval_metrics.json", "run.log"} <= {
        a.path for a in mlflow_client.list_artifacts(run.info.run_id)}


@pytest.mark.slow
def test_a_failed_eval_is_marked_failed_in_mlflow_and_on_disk(trained, smoke_data, smoke_recipe,
                                                             mlflow_uri, tmp_path, capsys):
    result, mlflow_client = trained
    bad = tmp_path / "bad_eval.parquet"
    pq.write_table(_with_bad_rows(_extra_rows(smoke_data["eval"], 4, 3 * 10**12)), bad)
    storage = tmp_path / "evals"
    status = _launch_main()([
        "eval", "--recipe", smoke_recipe, "--checkpoint", result.checkpoint_path,
        "--eval", str(bad), "--workers", "1", "--storage", str(storage),
        "--mlflow-uri", mlflow_uri, "--run-name", "eval-bad",
        "--set", f"data_config.batch_size={BATCH}"])
    err = capsys.readouterr().err.splitlines()
    assert status == 1
    assert err[-2].startswith(f"launch.py eval: worker 0 stopped: file {bad}, row 0")
    log = storage / "eval-bad" / "run.log"
    assert err[-1] == f"launch.py eval: tracebacks and Ray's messages are in {log}"
    assert "Traceback" in log.read_text()
    marker = (storage / "eval-bad" / "FAILED").read_text()
    assert err[-2].removeprefix("launch.py eval: ") in marker
    run = mlflow_client.search_runs(
        [e.experiment_id for e in mlflow_client.search_experiments()],
        filter_string="attributes.run_name = 'eval-bad'")[0]
    assert run.info.status == "FAILED"
    assert run.data.tags["hstu.error"] == err[-2].removeprefix("launch.py eval: ")


@pytest.mark.slow
def test_the_two_worker_run_resumes_with_one_worker(trained, smoke_data, smoke_recipe, tmp_path,
                                                    capsys):
    """--resume with another worker count: the 2-worker checkpoint is resharded for 1 worker,
    which trains a second epoch (a copy of the run, so that the other tests see it unchanged)."""
    import shutil

    from hstu.train.trainer import TrainOptions, run_training

    result, _ = trained
    root = Path(result.run_dir).parents[1]
    storage = tmp_path / "runs"
    shutil.copytree(result.run_dir, storage / result.run_name)
    resumed = run_training(TrainOptions(
        recipe=smoke_recipe,
        overrides=[f"data_config.batch_size={BATCH}", "data_config.on_bad_rows=SKIP",
                   "train_config.num_epochs=2", "train_config.log_step_count_steps=4"],
        train_paths=[smoke_data["train"], str(root / "extra_train.parquet")],
        eval_paths=[smoke_data["eval"], str(root / "bad_eval.parquet")],
        workers=1, storage=str(storage), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        resume=True, run_name=result.run_name, export=False, timeout_s=600))
    metrics = resumed.metrics
    # The smoke recipe has drop_remainder: the one worker reads the 66 rows as 8 batches of 8
    # and drops 2.
    assert metrics["global_step"] == STEPS + 8
    assert (metrics["world_size"], metrics["epochs_completed"], metrics["restarts"]) == (1, 2, 1)
    assert metrics["samples"] == result.metrics["samples"] + 8 * BATCH
    # Epoch 0's 2 (one per worker), carried by the checkpoint, and epoch 1's 2.
    assert metrics["train/dropped_rows"] == WORKERS + EXTRA_TRAIN_ROWS
    assert "resharded from 2 to 1 workers" in capsys.readouterr().out
    state = json.loads((Path(resumed.checkpoint_path) / "train_state.json").read_text())
    assert state["world_size"] == 1
    assert all(not math.isnan(metrics[f"eval/loss/{task}"]) for task in resumed.tasks)
