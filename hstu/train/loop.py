"""The Ray Train worker loop: build, shard, train, evaluate, checkpoint (one function per worker).

The model code knows nothing of this: DlrmHSTU is built with its tables on the meta device, the
sparse optimizer is attached to the table parameters, and TorchRec's planner and
DistributedModelParallel materialise and shard the tables here (sharding.py). Ray Train V2 has
already created the process group (gloo on CPU, cpu:gloo,cuda:nccl on GPU) before this runs.

Order of one training step on every rank:
  lockstep: do all ranks have a batch? (one small all_reduce; see collectives.py)
  forward (bf16 autocast on GPU when train_config.mixed_precision asks) -> per-task losses
  backward: the fused sparse optimizer updates the embedding rows inside backward
  dense optimizer step
Every `log_step_count_steps` steps rank 0 prints a progress line and logs to MLflow; every
`save_checkpoints_steps` steps (and/or epochs) all ranks save a DCP checkpoint and report it to
Ray Train, and evaluation runs (or every train_config.eval_every_n_steps steps). After each
epoch the rows the data pipeline left out (bad rows skipped, rows dropped by drop_last) are
summed over ranks: a console line when there are any, train/skipped_rows and
train/dropped_rows in MLflow and final_metrics.json.

Restarts: after a worker failure Ray Train starts a new worker group, and `ray.train.
get_checkpoint()` returns the latest reported checkpoint. Weights, optimizer state and the step
counter are restored, and the epoch in progress is replayed from its first batch: Ray Data
cannot resume a pass in the middle. So a sample may be trained on twice after a restart, and
none is lost (docs/training.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch

from hstu.modules.zch import zch_metrics
from hstu.train.checkpoint import (
    CheckpointError,
    TrainState,
    load_model_weights,
    read_state,
    restore,
    save,
)
from hstu.train.collectives import LockstepStats, all_reduce_sum, lockstep
from hstu.train.console import console, show_project_warnings_on_stdout, verbose
from hstu.train.delivery import append_step
from hstu.train.evaluation import RowsLeftOut, evaluate, rows_left_out
from hstu.train.job import TrainJob
from hstu.train.optimizers import schedule_from_config, set_learning_rate
from hstu.train.prefetch import DevicePrefetcher
from hstu.train.progress import ProgressMeter, eval_table
from hstu.train.step import train_step
from hstu.train.tracking import RunLogger


def train_loop_per_worker(job_values: dict) -> dict:
    """Entry point given to TorchTrainer (train_loop_config is TrainJob.to_dict()). Returns a
    summary (final metrics), which Ray hands to the driver as Result.return_value (rank 0's)."""
    quiet_library_logs()
    # An error keeps its traceback: the driver sends Ray's report of it to the run's log and
    # prints one line (hstu/train/errors.py, console.py).
    worker = Worker(TrainJob.from_dict(job_values))
    if worker.job.mode == "eval":
        return worker.run_eval()
    return worker.run_training()


def self_explaining_errors() -> tuple[type, ...]:
    """Errors a worker can raise whose message names what to fix (file, row, column, config
    field): shown as one line, without the traceback. The CLI adds the driver's own."""
    from hstu.config.errors import ConfigError
    from hstu.data.validate import DataError
    from hstu.model import ModelConfigError
    from hstu.ops.cutlass.attention import CutlassUnavailableError
    from hstu.train.checkpoint import CheckpointError
    from hstu.train.optimizers import OptimizerConfigError

    return (ConfigError, DataError, ModelConfigError, CutlassUnavailableError, CheckpointError,
            OptimizerConfigError)


def quiet_library_logs() -> None:
    """Ray Train workers log INFO from every library; keep TorchRec's and FBGEMM's planner and
    kernel chatter (hundreds of lines per worker) out of the console. HSTU_VERBOSE=1 keeps it."""
    if verbose():
        return
    show_project_warnings_on_stdout()
    # FBGEMM logs through the root logger; Ray Train's own loggers set their own levels.
    logging.getLogger().setLevel(logging.WARNING)
    for name in ("torchrec", "fbgemm_gpu", "torch.distributed", "torch.fx"):
        # Their warnings here are about planner estimates and tracing internals, not the run.
        logging.getLogger(name).setLevel(logging.ERROR)
    for category, pattern in (
        (FutureWarning, ".*HeuristicalStorageReservation.*"),
        (FutureWarning, ".*broadcast_buffers.*"),
        (UserWarning, ".*TypedStorage is deprecated.*"),
        # Loading a DCP checkpoint of TorchRec's ShardedTensors (eval, resume): torch's notice
        # about its own future, nothing this run can change.
        (FutureWarning, ".*Please use DTensor instead.*"),
    ):
        warnings.filterwarnings("ignore", message=pattern, category=category)


def autocast_for(mixed_precision: str, device: torch.device):
    """A context manager factory: bf16/fp16 autocast on GPU, nothing on CPU."""
    name = (mixed_precision or "").upper()
    if not name or device.type != "cuda":
        return contextlib.nullcontext
    if name not in ("BF16", "FP16"):
        raise ValueError(
            f"train_config.mixed_precision: {mixed_precision!r}; expected BF16, FP16 or unset"
        )
    dtype = torch.bfloat16 if name == "BF16" else torch.float16
    return lambda: torch.autocast(device_type="cuda", dtype=dtype)


class Worker:
    def __init__(self, job: TrainJob) -> None:
        import ray.train
        import ray.train.torch
        from hstu.config.features import feature_specs, label_specs
        from hstu.config.loader import load_config_text
        from hstu.train.trainable import build_trainable

        self.job = job
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world = context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.cfg = load_config_text(job.config_text, job.config_source)
        self.features = feature_specs(self.cfg)
        self.labels = label_specs(self.cfg)
        train_cfg = self.cfg.train_config

        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = bool(train_cfg.cuda_matmul_allow_tf32)
            torch.backends.cudnn.allow_tf32 = bool(train_cfg.cudnn_allow_tf32)
        elif train_cfg.mixed_precision:
            self.say(
                f"train_config.mixed_precision {train_cfg.mixed_precision} applies on GPU only; "
                "this CPU run trains in fp32"
            )
        self.autocast = autocast_for(train_cfg.mixed_precision, self.device)

        # Different per rank (dropout masks differ between ranks); DDP copies rank 0's dense
        # weights to all, and the tables are refilled from job.seed alone, so the run starts
        # from the same weights whatever the worker count and plan.
        torch.manual_seed(job.seed + 7919 * self.rank)
        trainable = build_trainable(
            self.cfg,
            self.features,
            self.labels,
            self.device,
            world_size=self.world,
            local_world_size=context.get_local_world_size(),
            batch_size=int(self.cfg.data_config.batch_size),
            sharding=job.sharding,
            table_seed=job.seed,
        )
        self.sharded = trainable.sharded
        self.sparse_spec = trainable.sparse_spec
        self.dense_optimizer = trainable.dense_optimizer
        self.model = trainable.model
        self.module = trainable.module  # the DlrmHSTU inside (not DDP-wrapped)
        if job.cuda_graphs:
            self.module.use_cuda_graphs()
        self.dense_schedule = schedule_from_config(
            train_cfg.dense_optimizer, "train_config.dense_optimizer"
        )
        self.sparse_schedule = schedule_from_config(
            train_cfg.sparse_optimizer, "train_config.sparse_optimizer"
        )
        self.dense_base_lr = float(self.dense_optimizer.param_groups[0]["lr"])
        self.tasks = [task.name for task in self.module.tasks]
        contextual = self.module.groups.get("contextual", [])
        self.contextual_tokens = (
            (1 if contextual else 0) if self.module.concat_contextual_features else len(contextual)
        )
        self.log = RunLogger(job.tracking_uri, job.mlflow_run_id) if self.rank == 0 else RunLogger(
            None, None
        )

    # ---- helpers ---------------------------------------------------------------------------

    def say(self, text: str) -> None:
        if self.rank == 0:
            console(text)

    def tokens_of(self, batch) -> int:
        return batch.num_tokens(contextual_tokens=self.contextual_tokens)

    def _batches(self, split: str, *, training: bool, seed: int):
        import ray.train

        from hstu.data.batch_cost import batch_cost_options
        from hstu.data.pipeline import iter_jagged_batches

        data_cfg = self.cfg.data_config
        on_bad_rows = "skip" if data_cfg.on_bad_rows == 1 else "error"  # BadRowPolicy SKIP = 1
        if training:
            return iter_jagged_batches(
                ray.train.get_dataset_shard(split),
                self.features,
                self.labels,
                batch_size=int(data_cfg.batch_size),
                # Several workers need equal step counts; lockstep() guards the rest.
                drop_last=bool(data_cfg.drop_remainder) or self.world > 1,
                shuffle_buffer=int(data_cfg.shuffle_buffer_size) if data_cfg.shuffle else None,
                **batch_cost_options(self.cfg),
                seed=seed,
                on_bad_rows=on_bad_rows,
            )
        eval_cfg = self.cfg.eval_config
        return iter_jagged_batches(
            ray.train.get_dataset_shard(split),
            self.features,
            self.labels,
            batch_size=int(data_cfg.eval_batch_size or data_cfg.batch_size),
            drop_last=False,
            **batch_cost_options(self.cfg),
            on_bad_rows=on_bad_rows,
            max_batches=int(eval_cfg.num_steps) if eval_cfg.HasField("num_steps") else None,
        )

    def _set_learning_rates(self, state: TrainState) -> dict[str, float]:
        dense_lr = self.dense_schedule.learning_rate_at(
            self.dense_base_lr, state.global_step, state.epoch
        )
        sparse_lr = self.sparse_schedule.learning_rate_at(
            self.sparse_spec.lr, state.global_step, state.epoch
        )
        if self.dense_schedule.kind != "constant_learning_rate":
            set_learning_rate(self.dense_optimizer, dense_lr)
        if self.sparse_schedule.kind != "constant_learning_rate":
            set_learning_rate(self.model.fused_optimizer, sparse_lr)
            self.model.fused_optimizer.step()  # pushes the rate into the fused kernels
        return {"train/lr/dense": dense_lr, "train/lr/sparse": sparse_lr}

    def _evaluate(self, eval_batches, state: TrainState) -> dict[str, float]:
        started = time.perf_counter()
        metrics = evaluate(
            self.model,
            self.module,
            eval_batches,
            device=self.device,
            autocast=self.autocast,
            tokens_of=self.tokens_of,
        )
        metrics["eval/seconds"] = time.perf_counter() - started
        left_out = RowsLeftOut(
            int(metrics.get("eval/skipped_rows", 0)), int(metrics.get("eval/dropped_rows", 0))
        ).describe()
        self.say(
            f"eval at step {state.global_step}: {int(metrics['eval/rows'])} rows in "
            f"{metrics['eval/seconds']:.1f} s{'; ' + left_out if left_out else ''}\n"
            f"{eval_table(metrics, self.tasks)}"
        )
        self.log.metrics(metrics, step=state.global_step)
        return metrics

    def _save_and_report(
        self, state: TrainState, metrics: dict[str, float], suffix: str = ""
    ) -> None:
        import ray.train

        report = {
            **metrics,
            "global_step": state.global_step,
            "epoch": state.epoch,
            "samples": state.samples,
            "restarts": state.restarts,
        }
        with tempfile.TemporaryDirectory(prefix="hstu-checkpoint-") as directory:
            save(
                directory,
                self.model,
                self.dense_optimizer,
                state,
                rank=self.rank,
                extra={"run_name": self.job.run_name, "sharding": self.sharded.tables},
            )
            name = f"checkpoint_{state.global_step:08d}{suffix}"
            ray.train.report(
                report,
                checkpoint=ray.train.Checkpoint.from_directory(directory),
                checkpoint_dir_name=name,
            )
        self.say(f"checkpoint {name} saved (step {state.global_step}, epoch {state.epoch})")

    def _record_samples(self, batch, state: TrainState) -> None:
        if not self.job.sample_log_dir or batch.sample_ids is None:
            return
        append_step(
            self.job.sample_log_dir,
            self.rank,
            restarts=state.restarts,
            pid=os.getpid(),
            epoch=state.epoch,
            step=state.global_step,
            ids=batch.sample_ids.tolist(),
        )

    def _maybe_crash(self, state: TrainState) -> None:
        crash = self.job.crash
        if not crash or self.rank != crash["rank"] or state.global_step != crash["step"]:
            return
        marker = Path(crash["marker"])
        if marker.exists():
            return
        marker.write_text(f"rank {self.rank} exited after step {state.global_step}\n")
        # Ray Train's controller collects reports when it polls the workers (every 2 s by
        # default); a checkpoint reported just before a crash may not be registered yet.
        time.sleep(float(crash.get("delay_s", 0)))
        console(f"[test hook] rank {self.rank} exits now, after step {state.global_step}")
        os._exit(1)

    # ---- training --------------------------------------------------------------------------

    def run_training(self) -> dict:
        import ray.train

        train_cfg = self.cfg.train_config
        state = TrainState(world_size=self.world)
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                state = restore(
                    directory, self.model, self.dense_optimizer, world_size=self.world
                )
            state.restarts += 1
            resharded = (f", resharded from {state.world_size} to {self.world} workers"
                         if state.world_size != self.world else "")
            state.world_size = self.world
            self.say(
                f"resumed from {checkpoint.path}: step {state.global_step}, epoch "
                f"{state.resume_epoch()} replays from its first batch{resharded}"
            )
        elif self.rank == 0:
            self.say(
                f"sharding plan ({self.world} workers on {self.device.type}, "
                f"{torch.get_num_threads()} torch thread(s) each):\n{self.sharded.plan_text()}"
            )
            self.log.text(self.job.config_text, "pipeline.config")
            self.log.text(self.sharded.plan_text() + "\n", "sharding_plan.txt")
            self.log.text(self.sharded.plan_json() + "\n", "sharding_plan.json")
        if self.job.sample_log_dir:
            os.makedirs(self.job.sample_log_dir, exist_ok=True)

        max_steps = int(train_cfg.num_steps) if train_cfg.num_steps > 0 else None
        if train_cfg.num_epochs > 0:
            num_epochs = int(train_cfg.num_epochs)
        else:
            num_epochs = None if max_steps else 1  # neither set: one epoch
        log_every = max(int(train_cfg.log_step_count_steps), 1)
        save_steps = int(train_cfg.save_checkpoints_steps)
        save_epochs = int(train_cfg.save_checkpoints_epochs)
        eval_every = int(train_cfg.eval_every_n_steps)

        batches = self._batches("train", training=True,
                                seed=self.job.seed * 1_000_003 + 1000 * self.rank + state.restarts)
        eval_batches = (
            self._batches("eval", training=False, seed=0) if self.job.has_eval_data else None
        )
        meter = ProgressMeter(
            self.tasks, total_steps=self._total_steps(max_steps, num_epochs),
            start_step=state.global_step,
        )
        self.model.train()
        started = time.perf_counter()
        last_saved_step = state.global_step if checkpoint is not None else -1
        last_eval: dict[str, float] = {}
        last_eval_step = -1

        def checkpoint_now(with_eval: bool) -> None:
            nonlocal last_saved_step, last_eval, last_eval_step
            if with_eval and eval_batches is not None and last_eval_step != state.global_step:
                last_eval = self._evaluate(eval_batches, state)
                last_eval_step = state.global_step
            self._save_and_report(state, last_eval if last_eval_step == state.global_step else {})
            last_saved_step = state.global_step

        epoch = state.resume_epoch()
        done = max_steps is not None and state.global_step >= max_steps
        # Rows read but not trained on: the checkpoint's totals over the epochs it completed
        # (TrainState), plus what this attempt's passes leave out.
        left_out_total = RowsLeftOut(state.skipped_rows, state.dropped_rows)
        # Seconds this rank's loop waited for the data pipeline (0 when it keeps up).
        input_wait_s = 0.0
        while not done and (num_epochs is None or epoch < num_epochs):
            state.epoch, state.epoch_done = epoch, False
            stats = LockstepStats()
            # The prefetcher copies the next batch to the GPU while this step runs.
            for batch in lockstep(DevicePrefetcher(batches, self.device), stats, self.tokens_of):
                lrs = self._set_learning_rates(state)
                total, losses = train_step(
                    self.model, self.module, self.dense_optimizer, batch, self.autocast
                )
                state.global_step += 1
                state.samples += stats.last_rows
                state.tokens += stats.last_tokens
                meter.add(
                    stats.last_rows,
                    stats.last_tokens,
                    losses,  # tensors: read once per progress line, not every step
                    total,
                )
                self._record_samples(batch, state)
                self._maybe_crash(state)
                # At the epoch's last step, a checkpoint resumes at the next epoch.
                state.epoch_done = stats.is_last
                if state.epoch_done:
                    # Counted before the end-of-epoch checkpoint, so that it carries them.
                    left_out_total += self._report_rows_left_out(
                        batches, epoch, left_out_total, state)
                    state.skipped_rows = left_out_total.skipped
                    state.dropped_rows = left_out_total.dropped

                if state.global_step % log_every == 0:
                    self._log_progress(meter, state, lrs)
                save_now = bool(save_steps) and state.global_step % save_steps == 0
                if state.epoch_done and save_epochs and (epoch + 1) % save_epochs == 0:
                    save_now = True
                if save_now:
                    checkpoint_now(with_eval=eval_every == 0)
                eval_now = eval_every and state.global_step % eval_every == 0
                if eval_now and eval_batches is not None and last_eval_step != state.global_step:
                    last_eval = self._evaluate(eval_batches, state)
                    last_eval_step = state.global_step
                if max_steps is not None and state.global_step >= max_steps:
                    done = True
                    break
            if not state.epoch_done:
                # A pass cut short (num_steps) or without a step: reported, but kept out of
                # the checkpointed totals, as a resume replays this epoch from its start.
                left_out_total += self._report_rows_left_out(
                    batches, epoch, left_out_total, state)
            input_wait_s += float(getattr(getattr(batches, "stats", None), "wait_s", 0.0))
            if stats.steps == 0 and not done:
                raise RuntimeError(
                    f"epoch {epoch}: the training data gave no batch to every one of the "
                    f"{self.world} workers (batch_size {self.cfg.data_config.batch_size}"
                    f"{', drop_last' if self.world > 1 else ''}); use more rows, fewer workers "
                    "or a smaller data_config.batch_size"
                )
            if stats.unused_batches:
                self.say(
                    f"epoch {epoch}: {stats.unused_batches} batch(es) unused because another "
                    "worker ran out of data first (unequal batch counts across workers)"
                )
            epoch += 1

        # The last report carries the final evaluation (Ray keeps metrics with checkpoints).
        need_eval = eval_batches is not None and last_eval_step != state.global_step
        if need_eval:
            last_eval = self._evaluate(eval_batches, state)
            last_eval_step = state.global_step
        if need_eval or last_saved_step != state.global_step:
            suffix = "_final" if last_saved_step == state.global_step else ""
            self._save_and_report(state, last_eval, suffix=suffix)
        final = {
            "global_step": state.global_step,
            "epochs_completed": state.epoch + (1 if state.epoch_done else 0),
            "samples": state.samples,
            "tokens": state.tokens,
            "seconds_this_attempt": round(time.perf_counter() - started, 2),
            # Rank 0's wait for input over this attempt, and its share of the attempt's time
            # (evaluation and checkpoints included in the denominator).
            "train/input_wait_s": round(input_wait_s, 3),
            "train/input_wait_fraction": round(
                input_wait_s / max(time.perf_counter() - started, 1e-9), 4
            ),
            "restarts": state.restarts,
            "world_size": self.world,
            "device": self.device.type,
            "train/skipped_rows": left_out_total.skipped,
            "train/dropped_rows": left_out_total.dropped,
            **last_eval,
        }
        self.log.json(final, "final_metrics.json")
        return final

    def _report_rows_left_out(
        self, batches, epoch: int, before: RowsLeftOut, state: TrainState
    ) -> RowsLeftOut:
        """The epoch's skipped and dropped rows over all ranks: a console line when there are
        any, and the attempt's running totals to MLflow. Every rank calls it (a collective)."""
        left_out = rows_left_out(batches)
        if left_out.skipped or left_out.dropped:
            self.say(f"epoch {epoch}: {left_out.describe()}")
        total = before + left_out
        self.log.metrics(
            {"train/skipped_rows": total.skipped, "train/dropped_rows": total.dropped},
            step=state.global_step,
        )
        return left_out

    def _total_steps(self, max_steps: int | None, num_epochs: int | None) -> int | None:
        if max_steps is not None:
            return max_steps
        data_cfg = self.cfg.data_config
        if num_epochs is None or not self.job.train_rows or data_cfg.token_budget:
            return None
        per_worker_rows = self.job.train_rows // self.world
        return num_epochs * (per_worker_rows // int(data_cfg.batch_size))

    def _log_progress(self, meter: ProgressMeter, state: TrainState, lrs: dict) -> None:
        # Each rank's loss is its local mean scaled to the global per-candidate mean, so the
        # mean over ranks is the global loss (one collective, on every rank, at the same steps).
        summed = all_reduce_sum(meter.loss_sums())
        line, metrics = meter.flush(state.global_step, state.epoch, extra=lrs,
                                    loss_sums=[value / self.world for value in summed])
        if self.rank == 0:
            console(line)
            # Zero-collision tables: admissions, evictions, collisions (hstu/modules/zch.py).
            self.log.metrics({**metrics, **zch_metrics(self.module)}, step=state.global_step)

    # ---- evaluation of a checkpoint (launch.py eval) --------------------------------------

    def run_eval(self) -> dict:
        if not self.job.checkpoint_path:
            raise ValueError("eval mode needs job.checkpoint_path")
        load_model_weights(self.model, self.job.checkpoint_path)
        try:  # the step the checkpoint was written at, for the console and MLflow
            step = read_state(self.job.checkpoint_path).global_step
        except CheckpointError:  # a remote checkpoint: its state file is not read here
            step = 0
        state = TrainState(world_size=self.world, global_step=step)
        return self._evaluate(self._batches("eval", training=False, seed=0), state)
