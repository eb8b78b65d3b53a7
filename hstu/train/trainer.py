"""The driver: resolve the config, start or join Ray, create the MLflow run, run TorchTrainer.

    result = run_training(TrainOptions(recipe="recipes/smoke.config", workers=2))

Ray: `ray.init()` joins the cluster named by RAY_ADDRESS (or the one `ray job submit` runs the
driver in) and otherwise starts a local one. Workers get `--cpus-per-worker` CPUs (default: what
is left after one CPU for Ray Data, split over the workers, at most 1), so that on a 2-CPU
machine the data pipeline is never starved (environment.md: with 1 CPU per worker it hangs).

Run identity: the Ray run name (RunConfig.name; `--run-name`, default `<recipe>-<time>`) names
the checkpoint directory <storage>/<run name>/ and the MLflow run; the MLflow run id is written to
<storage>/<run name>/mlflow_run.json, and the MLflow run carries the Ray run name, job id and
submission id as tags. `--resume` reuses a run name: Ray Train restores its latest checkpoint
and the same MLflow run continues.
"""

from __future__ import annotations

import _thread
import dataclasses
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Self

from hstu.train import tracking
from hstu.train.console import RunLog, console, run_console
from hstu.train.job import TrainJob
from hstu.train.progress import final_eval_table, format_duration, table

SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints
RUN_LOG_FILE = "run.log"  # in the run directory: everything printed, Ray's detail included
FAILED_MARKER = "FAILED"  # in the directory of a run that failed: when, why, where the log is


class TrainSetupError(ValueError):
    """A problem found before any worker starts (paths, run names, resources)."""


@dataclasses.dataclass
class TrainOptions:
    recipe: str
    overrides: list[str] = dataclasses.field(default_factory=list)
    train_paths: list[str] | None = None  # default: the config's train_input_path
    eval_paths: list[str] | None = None  # default: the config's eval_input_path
    workers: int = 1
    use_gpu: bool = False
    cuda_graphs: bool = False  # --cuda-graphs (GPU only)
    cpus_per_worker: float | None = None
    resume: bool = False
    run_name: str | None = None
    storage: str | None = None  # default: the config's model_dir
    tracking_uri: str | None = None
    experiment: str = tracking.DEFAULT_EXPERIMENT
    max_failures: int = 0
    sharding: list[str] = dataclasses.field(default_factory=list)
    export: bool = True
    sample_log_dir: str | None = None
    seed: int = 0
    timeout_s: float | None = None
    show_ray_data_progress: bool = False
    # Export the checkpoint whose evaluation was best by this metric (eval/<kind>/<task>)
    # instead of the last one.
    export_best: str | None = None
    # --repeat: the MLflow run this one is a child of (tag mlflow.parentRunId).
    parent_run_id: str | None = None
    # launch.py eval
    checkpoint: str | None = None
    # Test-only fault injection (TrainJob.crash).
    crash: dict | None = None


@dataclasses.dataclass
class RunResult:
    run_name: str
    run_dir: str
    tracking_uri: str | None
    mlflow_run_id: str | None
    checkpoint_path: str | None
    metrics: dict
    tasks: list[str]
    seconds: float
    export_dir: str | None = None
    export_note: str = ""
    # Best value and step of every eval metric over the run's evaluations (best.py).
    best: dict = dataclasses.field(default_factory=dict)
    # The checkpoint the export was made from, and why that one.
    exported_checkpoint: str | None = None
    export_reason: str = ""


# ---- setup --------------------------------------------------------------------------------


def _is_uri(path: str) -> bool:
    return "://" in path


def _local(path: str) -> str:
    return path if _is_uri(path) else str(Path(path).expanduser().resolve())


def _paths(given: list[str] | None, from_config: str, what: str) -> list[str] | None:
    """--train/--eval PATH..., else the config's input path; expanded as TorchEasyRec reads
    input_path (hstu.data.pipeline.expand_input_paths). None when neither names any."""
    from hstu.data.pipeline import expand_input_paths

    resolved, missing = expand_input_paths(given if given else [from_config])
    if missing:
        raise TrainSetupError(
            f"{what} data not found: {', '.join(missing)} (make it with `launch.py prepare`, "
            f"or pass --{what} PATH)"
        )
    return resolved or None


def _check_cost_column(cfg, paths: list[str]) -> None:
    """data_config.sample_cost_field names a numeric column of every local sample file
    (footers only), so that a wrong name stops the run before Ray starts."""
    from hstu.data.batch_cost import check_cost_column_in_files, cost_columns

    for column in cost_columns(cfg):
        check_cost_column_in_files(paths, column)


def _latest_run(storage: Path) -> str:
    runs = [p for p in storage.iterdir() if (p / SNAPSHOT_FILE).is_file()] if storage.is_dir() else []
    if not runs:
        raise TrainSetupError(f"--resume: no run with checkpoints under {storage}")
    return max(runs, key=lambda p: (p / SNAPSHOT_FILE).stat().st_mtime).name


def _check_resume(run_dir: Path, workers: int, train_cfg=None) -> None:
    """Refuse, before Ray starts and before the MLflow run is reopened, a resume of a run that
    has already trained as far as the config asks. Another worker count is fine: the
    checkpoint is resharded (checkpoint.py)."""
    from hstu.train.checkpoint import TRAIN_STATE_FILE, read_state

    checkpoints = sorted(p.parent for p in run_dir.glob(f"checkpoint_*/{TRAIN_STATE_FILE}"))
    if not checkpoints:
        return
    latest = read_state(checkpoints[-1])
    if train_cfg is not None:
        steps, epochs = int(train_cfg.num_steps), int(train_cfg.num_epochs)
        done = (
            latest.global_step >= steps if steps > 0
            else latest.resume_epoch() >= (epochs if epochs > 0 else 1)
        )
        if done:
            raise TrainSetupError(
                f"--resume: run {run_dir.name!r} is already complete (step "
                f"{latest.global_step}, {latest.resume_epoch()} epoch(s)); raise "
                "train_config.num_epochs or num_steps (--set) to train it further"
            )


def _latest_checkpoint(run_dir: str) -> tuple[str, int | None] | None:
    """(path, step) of a local run's newest checkpoint, None if it has none (or is remote)."""
    from hstu.train.checkpoint import TRAIN_STATE_FILE, read_state

    if _is_uri(run_dir):
        return None
    found = sorted(p.parent for p in Path(run_dir).glob(f"checkpoint_*/{TRAIN_STATE_FILE}"))
    if not found:
        return None
    return str(found[-1]), read_state(found[-1]).global_step


def resolve_run(
    options: TrainOptions, storage: str, recipe_stem: str, train_cfg=None
) -> tuple[str, bool]:
    """(run name, whether it resumes). Refuses to silently continue an existing run."""
    local = not _is_uri(storage)
    if options.resume:
        name = options.run_name or (_latest_run(Path(storage)) if local else None)
        if name is None:
            raise TrainSetupError("--resume with remote --storage needs --run-name")
        if local and not (Path(storage) / name / SNAPSHOT_FILE).is_file():
            raise TrainSetupError(
                f"--resume: run {name!r} has no checkpoints under {storage} "
                f"({Path(storage) / name / SNAPSHOT_FILE} is missing)"
            )
        if local:
            _check_resume(Path(storage) / name, options.workers, train_cfg)
        return name, True
    name = options.run_name or f"{recipe_stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if local and (Path(storage) / name / SNAPSHOT_FILE).is_file():
        raise TrainSetupError(
            f"run {name!r} already exists under {storage}: pass --resume to continue it, or "
            "another --run-name"
        )
    return name, False


def count_rows(paths: list[str]) -> int | None:
    """Rows in parquet files, from their footers (no data read); None if it cannot tell."""
    import pyarrow.dataset as pa_dataset

    try:
        return sum(int(pa_dataset.dataset(p, format="parquet").count_rows()) for p in paths)
    except Exception:  # noqa: BLE001 - the count only feeds the ETA
        return None


def default_cpus_per_worker(total_cpus: float, workers: int) -> float:
    """Leave one CPU to Ray Data, split the rest over the workers, at most 1 each."""
    share = (total_cpus - 1.0) / max(workers, 1)
    return max(0.25, min(1.0, round(share, 2)))


def init_ray(show_data_progress: bool) -> bool:
    """Join RAY_ADDRESS / the job's cluster (`ray job submit` sets it), or start a local Ray.
    True if this call started (and so should stop) Ray."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="WARNING")
    else:
        # "local": always a new Ray of this process. Without it ray.init() joins whatever
        # cluster /tmp/ray/ray_current_cluster names: a `ray start` cluster the user did not
        # mean for this run, or a dead one, which hangs the start for minutes.
        ray.init(address="local", include_dashboard=False, logging_level="WARNING")
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = show_data_progress
    context.print_on_execution_start = show_data_progress
    return True


class Watchdog:
    """Interrupts the main thread (SIGINT) after `seconds`, with a message, so that a stuck run
    ends with an explanation instead of hanging. Cancelled when the work finishes."""

    def __init__(self, seconds: float | None, what: str) -> None:
        self.fired = False
        self._finished = False
        self._lock = threading.Lock()
        self._timer = None
        if seconds:
            self._timer = threading.Timer(seconds, self._fire, args=(seconds, what))
            self._timer.daemon = True

    def _fire(self, seconds: float, what: str) -> None:
        with self._lock:
            if self._finished:
                return
            self.fired = True
        print(
            f"\n{what} did not finish within {format_duration(seconds)}; stopping it. On a "
            "machine with few CPUs check that the workers leave CPU for Ray Data "
            "(--cpus-per-worker), and look at the worker logs above.",
            file=sys.stderr,
            flush=True,
        )
        _thread.interrupt_main()

    def __enter__(self) -> Self:
        if self._timer:
            self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._finished = True
        if self._timer:
            self._timer.cancel()


def fit_with_timeout(trainer, seconds: float | None, what: str):
    """trainer.fit(), stopped after `seconds` with a TimeoutError that says why.

    During fit, Ray Train has its own SIGINT handler, which aborts the run gracefully (workers
    and resources released) and lets fit return; before and after, SIGINT raises
    KeyboardInterrupt. Either way the watchdog's interrupt ends here as a TimeoutError. Ray
    Train leaves its handler installed after fit; the previous one is put back."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if in_main_thread else None
    timed_out = TimeoutError(f"{what} timed out after {seconds or 0:.0f} s")
    with Watchdog(seconds, what) as watchdog:
        try:
            result = trainer.fit()
        except BaseException:
            if watchdog.fired:
                raise timed_out from None
            raise
        finally:
            if in_main_thread and previous is not None:
                signal.signal(signal.SIGINT, previous)
    if watchdog.fired:
        raise timed_out
    return result


def _ray_ids() -> dict[str, str]:
    import ray

    ids = {"hstu.ray_job_id": ray.get_runtime_context().get_job_id()}
    submission_id = job_submission_id()
    if submission_id:
        ids["hstu.ray_submission_id"] = submission_id
    return ids


def mlflow_run_to_resume(link: dict | None, tracking_uri: str, uri_source: str) -> str | None:
    """The MLflow run id a resumed run continues, from its run link; None for a new run.

    A link made on another tracking server than the one this resume logs to (--mlflow-uri or
    MLFLOW_TRACKING_URI changed) names a run that does not exist here: the resumed part then
    goes to a new MLflow run, and the console says where the first part is.
    """
    if not link:
        return None
    if link["tracking_uri"] != tracking_uri:
        console(f"  MLflow: this run was tracked at {link['tracking_uri']} (run "
                f"{link['run_id']}); {uri_source} names {tracking_uri}, so the resumed part "
                "goes to a new MLflow run there")
        return None
    return link["run_id"]


def job_submission_id() -> str | None:
    """The `ray job submit` id (raysubmit_...) of the job this driver runs in, else None.

    Ray 2.60 has no public API for it: the job supervisor hands the driver its job config as
    JSON in RAY_JOB_CONFIG_JSON_ENV_VAR, with the id under metadata.job_submission_id
    (checked with a local `ray start --head` + `ray job submit`, docs/training.md section 7).
    """
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        metadata = json.loads(raw).get("metadata") or {}
    except (ValueError, AttributeError):
        return None
    value = metadata.get("job_submission_id") if isinstance(metadata, dict) else None
    return str(value) if value else None


def check_kernel_runs_here(cfg, use_gpu: bool) -> None:
    """TRITON and CUTLASS need the workers on GPUs: say so before Ray starts, not after the
    first batch fails in some jagged op of a worker.

    The CUTLASS package is not looked for here: on a cluster the driver often runs on a CPU
    head node without it. A worker without it stops with CutlassUnavailableError, which the
    CLI prints as one line with the install command.
    """
    from hstu.config.schema import enum_name

    kernel = enum_name("Kernel", cfg.model_config.kernel)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if kernel in ("TRITON", "CUTLASS") and not use_gpu and not interpreted:
        raise TrainSetupError(
            f"model_config.kernel is {kernel}, whose kernels run on CUDA GPUs only: pass "
            "--use-gpu (one GPU per worker), or train on CPU with "
            "--set model_config.kernel=PYTORCH (TRITON_INTERPRET=1 runs the Triton kernels on "
            "a CPU, very slowly: for tests)"
        )


def _check_model(cfg, features, labels, options: TrainOptions):
    """Build the model on the meta device once in the driver, so that config, optimizer and
    sharding problems show up before Ray starts any worker."""
    import torch

    from hstu.config.schema import enum_name
    from hstu.model import DlrmHSTU
    from hstu.train.optimizers import schedule_from_config, sparse_optimizer_spec
    from hstu.train.sharding import parse_sharding_overrides, sharding_constraints, table_names

    check_kernel_runs_here(cfg, options.use_gpu)
    if options.cuda_graphs and not options.use_gpu:
        raise TrainSetupError("--cuda-graphs needs --use-gpu: CUDA graphs exist only on a GPU")
    kernel = enum_name("Kernel", cfg.model_config.kernel)
    if options.cuda_graphs and kernel != "TRITON":
        raise TrainSetupError(
            f"--cuda-graphs needs model_config.kernel TRITON (the config has {kernel}: its ops "
            "read sizes back from the GPU, which a CUDA graph cannot hold)")
    device = torch.device("cuda" if options.use_gpu else "cpu")
    with torch.device("meta"):
        model = DlrmHSTU(cfg, features, labels, embedding_device=torch.device("meta"))
    sparse_optimizer_spec(cfg.train_config.sparse_optimizer, device)
    schedule_from_config(cfg.train_config.sparse_optimizer, "train_config.sparse_optimizer")
    schedule_from_config(cfg.train_config.dense_optimizer, "train_config.dense_optimizer")
    overrides = parse_sharding_overrides(options.sharding)
    sharding_constraints(table_names(model), overrides, device)
    return model, overrides


def _data_config():
    """Training data in equal splits (the same rows, so the same step count, on every worker);
    eval data split unequally so that no row is dropped (evaluation pads, collectives.py).

    Ray's DataConfig splits with equal=True only; its documented extension point, configure(),
    is overridden for the eval split.

    Both keep the blocks in order (preserve_order): Ray Data's splitter hands each block to
    the worker with the fewest rows so far, in the order blocks arrive, so with read tasks
    finishing in any order the rows each worker gets, and so the run's numbers, would change
    from run to run. In order, the same seed gives the same split, the same batches and the
    same AUCs to the last digit (tests/train/test_repeat.py). (Its cost in throughput when
    read tasks finish out of order has not been measured at scale.)"""
    from ray.train import DataConfig

    class _Splits(DataConfig):
        WHOLE = ("eval",)

        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            equal = {name: ds for name, ds in datasets.items() if name not in self.WHOLE}
            output = (
                super().configure(equal, world_size, worker_handles, worker_node_ids, **kwargs)
                if equal
                else [{} for _ in range(world_size)]
            )
            hints = worker_node_ids if self._enable_shard_locality else None
            for name, dataset in datasets.items():
                if name not in self.WHOLE:
                    continue
                if dataset.name is None:
                    dataset.set_name(name)
                dataset = dataset.copy(dataset)
                dataset.context.execution_options = self._resolve_execution_options(name)
                splits = dataset.streaming_split(world_size, equal=False, locality_hints=hints)
                for rank, split in enumerate(splits):
                    output[rank][name] = split
            return output

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return _Splits(datasets_to_split="all", execution_options=options)


def _trainer(
    job: TrainJob,
    options: TrainOptions,
    run_name: str,
    storage: str,
    datasets,
    keep_checkpoints: int | None = None,
    latest_checkpoint: tuple[str, int | None] | None = None,
):
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from hstu.train.loop import train_loop_per_worker
    from hstu.train.restarts import RestartReporter

    if options.workers < 1:
        raise TrainSetupError("--workers must be >= 1")
    cpus = options.cpus_per_worker
    if cpus is None:
        cpus = 1.0 if options.use_gpu else default_cpus_per_worker(
            ray.cluster_resources().get("CPU", 1.0), options.workers
        )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job.to_dict(),
        # On GPU: NCCL for the model's tensors, gloo for the small CPU tensors (metrics, lockstep).
        torch_config=TorchConfig(backend="cpu:gloo,cuda:nccl" if options.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=options.workers,
            use_gpu=options.use_gpu,
            resources_per_worker={"CPU": cpus, **({"GPU": 1} if options.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=options.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
            callbacks=[RestartReporter(options.max_failures, latest_checkpoint)],
        ),
        datasets=datasets,
        dataset_config=_data_config(),
    )


# ---- training -----------------------------------------------------------------------------


def run_log_path(run_dir: str, run_name: str) -> str:
    """<run dir>/run.log; for remote storage a local file named after the run (Ray writes the
    checkpoints there, this process can only append to a local file)."""
    if _is_uri(run_dir):
        return str(Path(tempfile.gettempdir()) / f"hstu-{run_name}.log")
    return str(Path(run_dir) / RUN_LOG_FILE)


def record_failure(log: RunLog, error: BaseException) -> None:
    """The whole error into the run's log (the console gets one line, errors.py), and the log's
    path onto the error for the CLI to print."""
    parts = ["\n==== the run failed:\n", "".join(traceback.format_exception(error))]
    # A worker's own traceback reaches the log through Ray's log forwarding ("Error in
    # training function:"); these are the exceptions as the driver received them.
    for rank, failure in sorted((getattr(error, "worker_failures", None) or {}).items()):
        parts.append(f"---- worker {rank}: {type(failure).__name__}\n{failure}\n")
    log.write("".join(parts))
    try:
        error.hstu_recorded = True
        if log.path:
            error.hstu_run_log = log.path
    except AttributeError:  # an exception type with __slots__: the header named the log
        pass


def mark_failed(error: BaseException, log: RunLog, run_dir: str | None,
                tracking_uri: str | None, mlflow_run_id: str | None) -> None:
    """A failed (or interrupted) run says so everywhere a user looks: the log gets the
    traceback, the MLflow run ends FAILED (KILLED for Ctrl-C) with the error's line as tag
    hstu.error and the log as artifact, and the run directory gets a FAILED file."""
    from hstu.train.errors import one_line

    record_failure(log, error)
    line = one_line(error)
    if mlflow_run_id and tracking_uri:
        try:
            mlflow_client = tracking.client(tracking_uri)
            mlflow_client.set_tag(mlflow_run_id, "hstu.error", tracking.clip(line))
            if log.path and Path(log.path).is_file():
                mlflow_client.log_artifact(mlflow_run_id, log.path)
            status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
            tracking.end_run(tracking_uri, mlflow_run_id, status)
        except Exception as mlflow_error:  # noqa: BLE001 - the original error matters more
            print(f"mlflow: could not mark the run failed: {mlflow_error}", file=sys.stderr)
    if run_dir and not _is_uri(run_dir):
        marker = Path(run_dir) / FAILED_MARKER
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(
            f"failed at {time.strftime('%Y-%m-%d %H:%M:%S')}: {line}\n"
            f"log: {log.path or '-'}\n"
            f"MLflow run: {mlflow_run_id or '-'} ({tracking_uri or '-'})\n"
        )


def clear_failed(run_dir: str, tracking_uri: str, mlflow_run_id: str) -> None:
    """A resumed run that finishes is no longer failed: drop the marker and the error tag."""
    if not _is_uri(run_dir):
        (Path(run_dir) / FAILED_MARKER).unlink(missing_ok=True)
    try:
        mlflow_client = tracking.client(tracking_uri)
        if "hstu.error" in mlflow_client.get_run(mlflow_run_id).data.tags:
            mlflow_client.delete_tag(mlflow_run_id, "hstu.error")
    except Exception as error:  # noqa: BLE001 - a stale tag is not worth failing the run
        print(f"mlflow: could not clear the earlier error tag: {error}", file=sys.stderr)


def _run_dir_of(log: RunLog) -> str | None:
    """The run directory a log lies in (None before it is known, or for a remote run)."""
    if log.path and Path(log.path).name == RUN_LOG_FILE:
        return str(Path(log.path).parent)
    return None


def _settle_forwarded_output(seconds: float = 1.0) -> None:
    """Ray forwards the workers' output from their log files a moment after they write it;
    before Ray shuts down on a failure, give the failing worker's traceback time to reach the
    run's log."""
    time.sleep(seconds)


def _in_run_console(run, options: TrainOptions):
    """run(options, log) under a run console. A failure that `run` has not recorded itself
    (it sets error.hstu_recorded once it has) is marked failed here, then raised."""
    with run_console() as log:
        try:
            return run(options, log)
        except BaseException as error:
            if not getattr(error, "hstu_recorded", False):
                mark_failed(error, log, _run_dir_of(log), None, None)
            raise


def run_training(options: TrainOptions) -> RunResult:
    """Train per `options`; returns where everything is. Raises on failure (the MLflow run is
    then marked FAILED; the error's traceback and Ray's messages are in the run's log)."""
    return _in_run_console(_run_training, options)


def _run_training(options: TrainOptions, log: RunLog) -> RunResult:
    import ray
    from google.protobuf import text_format

    from hstu.config.features import feature_specs, label_specs
    from hstu.config.loader import load_config
    from hstu.data.batch_cost import cost_columns
    from hstu.data.pipeline import read_samples, sample_columns

    started = time.perf_counter()
    cfg = load_config(options.recipe, options.overrides)
    features, labels = feature_specs(cfg), label_specs(cfg)
    model, sharding = _check_model(cfg, features, labels, options)
    tasks = [task.name for task in model.tasks]
    train_paths = _paths(options.train_paths, cfg.train_input_path, "train")
    if train_paths is None:
        raise TrainSetupError("no training data: set train_input_path or pass --train")
    eval_paths = _paths(options.eval_paths, cfg.eval_input_path, "eval")
    export_metric = _export_metric(options, model.tasks, bool(eval_paths))
    _check_cost_column(cfg, train_paths + (eval_paths or []))
    # --train/--eval replace the config's paths: the logged params and pipeline.config then say
    # which data this run read (as given: patterns stay patterns), not the recipe's default.
    if options.train_paths:
        cfg.train_input_path = ",".join(options.train_paths)
    if options.eval_paths:
        cfg.eval_input_path = ",".join(options.eval_paths)
    storage = _local(options.storage or cfg.model_dir or "experiments")
    run_name, resuming = resolve_run(
        options, storage, Path(options.recipe).stem, cfg.train_config
    )
    run_dir = storage.rstrip("/") + "/" + run_name
    log.attach(run_log_path(run_dir, run_name))
    config_text = text_format.MessageToString(cfg)

    tracking_uri = tracking.resolve_tracking_uri(options.tracking_uri, Path.cwd())
    uri_source = tracking.tracking_uri_source(options.tracking_uri)
    link = tracking.read_run_link(run_dir) if (resuming and not _is_uri(run_dir)) else None
    if link and not options.tracking_uri and not os.environ.get("MLFLOW_TRACKING_URI"):
        tracking_uri, uri_source = link["tracking_uri"], f"{run_dir}/{tracking.RUN_LINK_FILE}"
    resume_mlflow_run = mlflow_run_to_resume(link, tracking_uri, uri_source)
    tracking.check_server_reachable(tracking_uri, uri_source)

    started_ray = init_ray(options.show_ray_data_progress)
    mlflow_run_id = None
    try:
        columns = sample_columns(features, labels, cost_columns(cfg))
        data_cfg = cfg.data_config
        datasets = {
            "train": read_samples(train_paths, shuffle_files=bool(data_cfg.shuffle),
                                  seed=options.seed, columns=columns)
        }
        if eval_paths:
            datasets["eval"] = read_samples(eval_paths, columns=columns)
        train_rows = count_rows(train_paths)

        params = tracking.flatten_config(cfg)
        params.update(
            {
                "run.workers": str(options.workers),
                "run.use_gpu": str(options.use_gpu).lower(),
                "run.cuda_graphs": str(options.cuda_graphs).lower(),
                "run.train_paths": ",".join(train_paths),
                "run.eval_paths": ",".join(eval_paths or []),
                "run.train_rows": str(train_rows),
                "run.sharding": ",".join(options.sharding) or "(planner)",
                "run.max_failures": str(options.max_failures),
                "run.seed": str(options.seed),
            }
        )
        tags = {
            "hstu.ray_run_name": run_name,
            "hstu.storage_path": storage,
            "hstu.run_dir": run_dir,
            "hstu.recipe": options.recipe,
            "hstu.resumed": str(resuming).lower(),
            **_ray_ids(),
        }
        if options.parent_run_id:
            tags["mlflow.parentRunId"] = options.parent_run_id
        mlflow_run_id = tracking.start_run(
            tracking_uri,
            options.experiment,
            run_name,
            tags=tags,
            params=params,
            resume_run_id=resume_mlflow_run,
        )
        if not _is_uri(run_dir):
            tracking.write_run_link(run_dir, tracking_uri, mlflow_run_id)
        print(
            f"run {run_name}{' (resuming)' if resuming else ''}: {options.workers} worker(s) on "
            f"{'GPU' if options.use_gpu else 'CPU'}, {train_rows} training rows\n"
            f"  checkpoints: {run_dir}\n  log: {log.path} (tracebacks and Ray's messages)\n"
            f"  MLflow: run {mlflow_run_id} in experiment {options.experiment!r} at "
            f"{tracking_uri}",
            flush=True,
        )
        job = TrainJob(
            config_text=config_text,
            config_source=options.recipe,
            run_name=run_name,
            use_gpu=options.use_gpu,
            cuda_graphs=options.cuda_graphs,
            has_eval_data=bool(eval_paths),
            sharding=sharding,
            tracking_uri=tracking_uri,
            mlflow_run_id=mlflow_run_id,
            train_rows=train_rows,
            sample_log_dir=_local(options.sample_log_dir) if options.sample_log_dir else None,
            seed=options.seed,
            crash=options.crash,
        )
        keep = int(cfg.train_config.keep_checkpoint_max) or None  # 0 keeps all
        trainer = _trainer(job, options, run_name, storage, datasets, keep_checkpoints=keep,
                           latest_checkpoint=_latest_checkpoint(run_dir) if resuming else None)
        result = fit_with_timeout(trainer, options.timeout_s, f"training run {run_name}")
        checkpoint_path = result.checkpoint.path if result.checkpoint else None
        metrics = dict(result.return_value or result.metrics or {})
        run = RunResult(
            run_name=run_name,
            run_dir=run_dir,
            tracking_uri=tracking_uri,
            mlflow_run_id=mlflow_run_id,
            checkpoint_path=checkpoint_path,
            metrics=metrics,
            tasks=tasks,
            seconds=time.perf_counter() - started,
        )
        run.best = log_best_steps(tracking_uri, mlflow_run_id, metrics)
        to_export, run.export_reason, exported_metrics = _checkpoint_to_export(
            result, checkpoint_path, export_metric, metrics)
        if not options.export:
            run.export_note = "skipped (--no-export)"
        elif to_export:
            from hstu.config.features import sequence_names

            print(f"exporting {Path(to_export).name} ({run.export_reason}) ...", flush=True)
            run.export_dir, run.export_note = export_checkpoint(
                options.recipe,
                options.overrides,
                to_export,
                run_dir + "/export",
                candidate_sequence=sequence_names(cfg)[1],
                serve_check=ServeCheck(cfg, eval_paths, exported_metrics, tracking_uri,
                                       mlflow_run_id, int(metrics.get("global_step", 0))),
            )
            if run.export_dir:
                run.exported_checkpoint = to_export
                tracking.RunLogger(tracking_uri, mlflow_run_id).tags(
                    {"hstu.exported_checkpoint": to_export,
                     "hstu.export_reason": run.export_reason})
        _log_outcome(run, storage, log)
        clear_failed(run_dir, tracking_uri, mlflow_run_id)
        tracking.end_run(tracking_uri, mlflow_run_id, "FINISHED")
        return run
    except BaseException as error:
        if started_ray:
            _settle_forwarded_output()
        mark_failed(error, log, run_dir, tracking_uri, mlflow_run_id)
        raise
    finally:
        if started_ray:
            ray.shutdown()


def _export_metric(options: TrainOptions, tasks, has_eval_data: bool) -> str | None:
    """--export-best METRIC as an eval key, checked before Ray starts."""
    from hstu.train.best import MetricNameError, eval_metric_keys, resolve_metric

    if not options.export_best:
        return None
    if not options.export:
        raise TrainSetupError("--export-best and --no-export contradict each other")
    if not has_eval_data:
        raise TrainSetupError(f"--export-best {options.export_best} needs evaluations: set "
                              "eval_input_path or pass --eval")
    try:
        return resolve_metric(options.export_best, eval_metric_keys(tasks))
    except MetricNameError as error:
        raise TrainSetupError(str(error)) from None


def log_best_steps(tracking_uri: str | None, run_id: str | None, final: dict) -> dict:
    """Best value and step of each eval metric over all the run's evaluations (its MLflow
    history, earlier attempts and resumed parts included), logged as best/<key> at that step
    and best_step/<key>. Empty when the history cannot be read (the run still succeeds)."""
    from hstu.train.best import best_per_metric, metric_kind

    if not tracking_uri or not run_id:
        return {}
    keys = [key for key in final if metric_kind(key)]
    try:
        mlflow_client = tracking.client(tracking_uri)
        history = {
            key: [(m.step, m.value, m.timestamp)
                  for m in mlflow_client.get_metric_history(run_id, key)]
            for key in keys
        }
    except Exception as error:  # noqa: BLE001 - the run's result stands without it
        print(f"mlflow: could not read the eval history for the best steps: {error}",
              file=sys.stderr)
        return {}
    best = best_per_metric(history)
    logger = tracking.RunLogger(tracking_uri, run_id)
    for key, found in best.items():
        logger.metrics({f"best/{key}": found.value}, step=found.step)
    logger.metrics({f"best_step/{key}": found.step for key, found in best.items()},
                   step=int(final.get("global_step", 0)))
    return best


def _checkpoint_to_export(result, last: str | None, metric: str | None,
                          final: dict | None = None) -> tuple[str | None, str, dict | None]:
    """(checkpoint, why, its in-training evaluation): the last checkpoint (evaluated at the
    run's last step: `final`), or with --export-best the one whose own evaluation was best by
    `metric` among those Ray still holds."""
    from hstu.train.best import best_checkpoint

    if metric is None or last is None:
        return last, "the last checkpoint", final
    pairs = [(checkpoint.path, checkpoint_metrics)
             for checkpoint, checkpoint_metrics in (result.best_checkpoints or [])]
    chosen = best_checkpoint(pairs, metric)
    if chosen is None:
        return last, f"the last checkpoint: no checkpoint was evaluated for {metric}", final
    path, found = chosen
    return (path, f"best {metric} {found.value:.4f} at step {found.step}",
            dict(next(m for p, m in pairs if p == path)))


@dataclasses.dataclass
class ServeCheck:
    """What the train-vs-serve check of a run's export needs (hstu/export/train_serve.py)."""

    cfg: object
    eval_paths: list[str] | None
    training_metrics: dict | None  # the in-training evaluation of the exported checkpoint
    tracking_uri: str | None
    mlflow_run_id: str | None
    step: int


def export_checkpoint(recipe: str, overrides: list[str], checkpoint: str, export_dir: str,
                      candidate_sequence: str, serve_check: ServeCheck | None = None):
    """(export dir, note): export with hstu.export, check it against training on the eval set
    (`serve_check`), and only then log it to the run as its model. An export that fails the
    check is moved to <export_dir>.rejected (for inspection; never logged as a model), and the
    note says why.

    cand_seq_pk, which TorchEasyRec's exporter needs, is the config's candidate sequence."""
    try:
        from hstu.export import export_checkpoint as export
    except ImportError:
        return None, "export is not available (hstu.export.export_checkpoint is missing)"
    if _is_uri(checkpoint):
        return None, f"not exported: the checkpoint is remote ({checkpoint}); run launch.py export"
    try:
        path = export(
            recipe=recipe,
            overrides=overrides,
            checkpoint=checkpoint,
            export_dir=export_dir,
            additional_export_config={"cand_seq_pk": candidate_sequence},
            # The run's own export directory: a resumed run replaces the earlier export.
            overwrite=True,
            # Logged below, once it has passed the train-vs-serve check.
            mlflow_run=None if serve_check is not None else "auto",
        )
    except Exception as error:  # noqa: BLE001 - training succeeded; say why export did not
        return None, f"export failed: {type(error).__name__}: {error}"
    if serve_check is None:
        return str(path), ""
    return _check_and_log_export(Path(path), checkpoint, serve_check)


def _check_and_log_export(path: Path, checkpoint: str, check: ServeCheck):
    from hstu.export.train_serve import TrainServeMismatch, compare_train_serve

    logger = tracking.RunLogger(check.tracking_uri, check.mlflow_run_id)
    note = "train vs serve not checked: no eval data"
    if check.eval_paths:
        try:
            report = compare_train_serve(check.cfg, str(path), checkpoint, check.eval_paths,
                                         check.training_metrics)
            logger.metrics(report.mlflow_metrics(), step=check.step)
            note = report.describe()
            print(f"export: {note}", file=sys.stderr, flush=True)
            report.check()
        except TrainServeMismatch as error:
            rejected = path.with_name(path.name + ".rejected")
            shutil.rmtree(rejected, ignore_errors=True)
            path.rename(rejected)
            return None, (f"export failed: {error}. The export was moved to {rejected} and not "
                          "logged as a model")
        except Exception as error:  # noqa: BLE001 - say why, keep the run's result
            return None, f"export failed: the train-vs-serve check could not run: " \
                         f"{type(error).__name__}: {error}"
    if check.mlflow_run_id and check.tracking_uri:
        try:
            from hstu.export.mlflow_logging import log_export

            log_export(path, check.tracking_uri, check.mlflow_run_id)
            print(f"export: logged to MLflow run {check.mlflow_run_id} ({check.tracking_uri}): "
                  "artifacts export/, model 'hstu_ranker'", file=sys.stderr, flush=True)
        except Exception as error:  # noqa: BLE001 - the export itself is good
            print(f"mlflow: could not log the export: {error}", file=sys.stderr)
    return str(path), note


def _log_outcome(run: RunResult, storage: str, log: RunLog | None = None) -> None:
    locations = {
        "ray_run_dir": run.run_dir,
        "ray_storage_path": storage,
        "checkpoint": run.checkpoint_path,
        "export_dir": run.export_dir,
        "export_note": run.export_note,
        "mlflow_run_id": run.mlflow_run_id,
        "tracking_uri": run.tracking_uri,
    }
    logger = tracking.RunLogger(run.tracking_uri, run.mlflow_run_id)
    logger.json(locations, "locations.json")
    logger.text(summary_text(run) + "\n", "summary.txt")
    if log is not None and log.path and Path(log.path).is_file():
        logger.artifact(log.path)  # as far as it goes: the summary is printed after this


def summary_text(run: RunResult) -> str:
    metrics = run.metrics
    overview = table(
        ["", ""],
        [
            ["run", run.run_name],
            ["steps", metrics.get("global_step", "?")],
            ["epochs completed", metrics.get("epochs_completed", "?")],
            ["samples trained", metrics.get("samples", "?")],
            ["restarts", metrics.get("restarts", 0)],
            ["wall time", format_duration(run.seconds)],
        ],
    ).split("\n", 2)[2]  # no header rows
    lines = [overview, ""]
    if any(key.startswith("eval/") for key in metrics):
        lines += [final_eval_table(metrics, run.tasks, run.best)]
    else:
        lines += ["(no evaluation: no eval data)"]
    export = run.export_dir or run.export_note
    if run.export_dir and run.exported_checkpoint:
        export += f"  ({Path(run.exported_checkpoint).name}: {run.export_reason})"
    lines += [
        "",
        f"checkpoint   {run.checkpoint_path}",
        f"export       {export}",
    ]
    if run.export_dir and run.export_note:
        lines.append(f"serving      {run.export_note}")
    lines += [
        f"MLflow run   {run.mlflow_run_id}  ({run.tracking_uri})",
    ]
    if run.tracking_uri and run.tracking_uri.startswith("sqlite:"):
        lines.append(f"browse it    mlflow ui --backend-store-uri {run.tracking_uri}")
    return "\n".join(lines)


# ---- evaluation of a checkpoint -----------------------------------------------------------


def run_evaluation(options: TrainOptions) -> tuple[dict, list[str]]:
    """Evaluate `options.checkpoint` on the eval data with `options.workers` workers (any
    number: DCP reassembles the shards). Logs to a new MLflow run tagged with the checkpoint."""
    return _in_run_console(_run_evaluation, options)


def _run_evaluation(options: TrainOptions, log: RunLog) -> tuple[dict, list[str]]:
    import ray
    from google.protobuf import text_format

    from hstu.config.features import feature_specs, label_specs
    from hstu.config.loader import load_config
    from hstu.data.batch_cost import cost_columns
    from hstu.data.pipeline import read_samples, sample_columns

    if not options.checkpoint:
        raise TrainSetupError("--checkpoint is required")
    checkpoint = _local(options.checkpoint)
    if not _is_uri(checkpoint) and not (Path(checkpoint) / ".metadata").is_file():
        raise TrainSetupError(f"--checkpoint {checkpoint}: not a checkpoint directory "
                              "(no .metadata; expected <storage>/<run>/checkpoint_<step>)")
    cfg = load_config(options.recipe, options.overrides)
    features, labels = feature_specs(cfg), label_specs(cfg)
    model, sharding = _check_model(cfg, features, labels, options)
    eval_paths = _paths(options.eval_paths, cfg.eval_input_path, "eval")
    if eval_paths is None:
        raise TrainSetupError("no eval data: set eval_input_path or pass --eval")
    _check_cost_column(cfg, eval_paths)
    # Where a failed evaluation leaves its log and FAILED marker; a successful one leaves
    # nothing on disk (its metrics and log go to MLflow).
    storage = _local(options.storage or cfg.model_dir or "experiments")
    run_name = options.run_name or f"eval-{Path(options.recipe).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    tracking_uri = tracking.resolve_tracking_uri(options.tracking_uri, Path.cwd())
    uri_source = tracking.tracking_uri_source(options.tracking_uri)
    tracking.check_server_reachable(tracking_uri, uri_source)
    # Ray Train makes a directory per run under its storage path; an evaluation reports no
    # checkpoint, so that directory would stay empty: give Ray a temporary one, removed below.
    ray_storage = tempfile.mkdtemp(prefix="hstu-eval-")
    log.attach(Path(ray_storage) / RUN_LOG_FILE)
    started_ray = False
    mlflow_run_id = None
    try:
        started_ray = init_ray(options.show_ray_data_progress)
        columns = sample_columns(features, labels, cost_columns(cfg))
        datasets = {"eval": read_samples(eval_paths, columns=columns)}
        mlflow_run_id = tracking.start_run(
            tracking_uri,
            options.experiment,
            run_name,
            tags={"hstu.checkpoint": checkpoint, "hstu.recipe": options.recipe,
                  "hstu.kind": "eval", **_ray_ids()},
            params={"run.checkpoint": checkpoint, "run.eval_paths": ",".join(eval_paths),
                    "run.workers": str(options.workers)},
        )
        job = TrainJob(
            config_text=text_format.MessageToString(cfg),
            config_source=options.recipe,
            run_name=run_name,
            mode="eval",
            use_gpu=options.use_gpu,
            sharding=sharding,
            tracking_uri=tracking_uri,
            mlflow_run_id=mlflow_run_id,
            checkpoint_path=checkpoint,
        )
        trainer = _trainer(job, options, run_name, ray_storage, datasets)
        result = fit_with_timeout(trainer, options.timeout_s, f"evaluation {run_name}")
        metrics = dict(result.return_value or {})
        logger = tracking.RunLogger(tracking_uri, mlflow_run_id)
        logger.json(metrics, "eval_metrics.json")
        logger.artifact(log.path)
        tracking.end_run(tracking_uri, mlflow_run_id, "FINISHED")
        print(f"MLflow run {mlflow_run_id} ({run_name}) at {tracking_uri}", flush=True)
        return metrics, [task.name for task in model.tasks]
    except BaseException as error:
        if started_ray:
            _settle_forwarded_output()
        failed_dir = None
        if not _is_uri(storage):
            failed_dir = str(Path(storage) / run_name)
            log.move(Path(failed_dir) / RUN_LOG_FILE)
        mark_failed(error, log, failed_dir, tracking_uri, mlflow_run_id)
        raise
    finally:
        if started_ray:
            ray.shutdown()
        shutil.rmtree(ray_storage, ignore_errors=True)

