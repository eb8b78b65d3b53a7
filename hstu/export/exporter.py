"""export_checkpoint: a training checkpoint -> an export directory (artifacts.py has the layout).

Steps: parse --additional_export_config (cand_seq_pk is required for DLRM-HSTU, as in
TorchEasyRec) -> load the recipe -> read the DCP checkpoint into an unsharded model on CPU
(world size 1) -> eval mode, PYTORCH kernel -> ServingModule -> torch.export with dynamic rows
and per-sequence token counts -> check the program against the eager model on batches of other
shapes (one row, empty histories) -> save without example inputs (so nothing is pickled) ->
AOTInductor package when asked (--aoti; off by default, unverified) -> model_acc.json, pipeline.config,
sample_schema.json, export_manifest.json (sha256 of every file). Everything is written into a
temporary sibling directory and renamed at the end: a failed export leaves nothing behind.

Why the PYTORCH kernel: the CPU program must run anywhere; the Triton and CUTLASS kernels are
custom GPU code that torch.export cannot trace as they are. For the GPU package AOTInductor
compiles the same graph and generates its own fused kernels.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hstu.export import artifacts
from hstu.export.artifacts import (
    AOTI_FILE,
    CONFIG_FILE,
    MANIFEST_FILE,
    MODEL_ACC_FILE,
    PROGRAM_FILE,
    SAMPLE_SCHEMA_FILE,
)

# Row lengths of the batch the program is traced with: every dim >= 2, so that torch.export
# does not specialise a size of 0 or 1.
TRACE_LENGTHS = ((3, 2, 4), (2, 3, 2))
# Batches the saved program is checked on: one row with an empty history; rows of other sizes.
CHECK_LENGTHS = (((0,), (1,)), ((5, 1, 0, 7, 2), (1, 4, 2, 1, 3)))
CHECK_ATOL, CHECK_RTOL = 1e-5, 1e-4


class ExportError(ValueError):
    """The export cannot be made; the message says why and what to change."""


def parse_additional_config(text_or_mapping: str | Mapping[str, Any] | None) -> dict:
    """--additional_export_config: a JSON object (text) or an already parsed mapping."""
    if text_or_mapping is None:
        return {}
    if isinstance(text_or_mapping, Mapping):
        return dict(text_or_mapping)
    try:
        value = json.loads(text_or_mapping)
    except json.JSONDecodeError as error:
        raise ExportError(
            f"--additional_export_config is not valid JSON (column {error.colno}: {error.msg}): "
            f'{text_or_mapping!r}. Example: \'{{"cand_seq_pk": "cand_seq"}}\''
        ) from None
    if not isinstance(value, dict):
        raise ExportError(
            f"--additional_export_config must be a JSON object, got {type(value).__name__}: "
            f"{text_or_mapping!r}"
        )
    return value


def export_command(
    recipe: str, checkpoint: str, export_dir: str, additional: Mapping, overrides=()
) -> str:
    """The command line that exports with these arguments (for error messages)."""
    return " ".join(
        ["python launch.py export", f"--recipe {shlex.quote(str(recipe))}"]
        + [f"--set {shlex.quote(item)}" for item in overrides]
        + [
            f"--checkpoint {shlex.quote(str(checkpoint))}",
            f"--export_dir {shlex.quote(str(export_dir))}",
            f"--additional_export_config {shlex.quote(json.dumps(dict(additional)))}",
        ]
    )


def check_cand_seq_pk(
    additional: dict, cfg, recipe: str, checkpoint: str, export_dir: str, overrides=()
) -> str:
    """cand_seq_pk must be present (TorchEasyRec raises for DLRM-HSTU) and must name the
    candidate sequence of this config (online inference finds the candidates by it)."""
    from hstu.config.features import sequence_names

    uih_sequence, candidate_sequence = sequence_names(cfg)
    value = additional.get("cand_seq_pk")
    if value is None:
        example = dict(additional, cand_seq_pk=candidate_sequence)
        raise ExportError(
            "DLRM-HSTU exports need cand_seq_pk in --additional_export_config: the name of the "
            f"candidate sequence feature ({candidate_sequence!r} in {recipe}), which online "
            "inference reads from model_acc.json. Run:\n  "
            + export_command(recipe, checkpoint, export_dir, example, overrides)
        )
    if value != candidate_sequence:
        which = "the history sequence" if value == uih_sequence else "no sequence of the config"
        raise ExportError(
            f"--additional_export_config: cand_seq_pk {value!r} is {which}; the candidate "
            f"sequence of {recipe} is {candidate_sequence!r}"
        )
    return candidate_sequence


def sample_schema(features, labels, tasks, reserved_columns: list[str]) -> dict:
    """sample_schema.json: the input columns (one parquet row per user window) and the output."""
    columns = []
    seen = set()
    for spec in features:
        if spec.column in seen:
            continue
        seen.add(spec.column)
        value_type = "int64" if spec.kind == "id" else spec.value_dtype
        column = {
            "name": spec.column,
            "type": f"list<{value_type}>" if spec.sequence else value_type,
            "feature": spec.name,
            "kind": spec.kind,
            "sequence": spec.sequence,
        }
        if spec.kind == "id":
            column["num_buckets"] = spec.num_buckets
            column["table"] = spec.embedding_name
        columns.append(column)
    return {
        "description": "one parquet row per user time window; list columns of one sequence "
        "have equal lengths in a row; timestamps are int64 seconds",
        "columns": columns,
        "optional_columns": [{"name": "sample_id", "type": "int64"}]
        + [
            {"name": label.column, "type": f"list<{label.value_dtype}>", "kind": "label"}
            for label in labels
        ],
        "prediction": {
            "keeps": reserved_columns,
            "adds": [
                {
                    "name": f"probs_{task.name}",
                    "type": "list<float32>",
                    "task": task.name,
                    "meaning": task_meaning(task),
                }
                for task in tasks
            ],
        },
    }


def task_meaning(task) -> str:
    if task.num_class > 1:
        return "softmax probability of class 1, per candidate"
    if task.is_regression:
        return "predicted value (l2_loss task), per candidate"
    return "sigmoid(logit): probability of the action, per candidate"


def reserved_columns(model) -> list[str]:
    """Input columns a prediction keeps: sample_id, user_id and the candidate ids."""
    keep = ["sample_id"]
    if "user_id" in model.features:
        keep.append(model.features["user_id"].column)
    first_candidate = model.groups["candidate"][0]
    keep.append(model.features[first_candidate].column)
    return keep


def _trace_inputs(serving, features, lengths_by_side, seed):
    from hstu.export.serving import synthetic_inputs

    timestamps = set(serving.groups["uih_timestamp"] + serving.groups["candidate_timestamp"])
    lengths = {
        serving.uih_sequence: list(lengths_by_side[0]),
        serving.candidate_sequence: list(lengths_by_side[1]),
    }
    return synthetic_inputs(features, timestamps, serving.uih_sequence, lengths, seed=seed)


def check_program(program_module, serving, features) -> None:
    """The exported program, run as Predictor runs it (with a filler row), gives the eager
    module's numbers on batches of shapes it was not traced with."""
    import torch

    from hstu.export.serving import serving_inputs, with_filler_row, without_filler_scores

    spec = serving_inputs(features)
    for seed, lengths in enumerate(CHECK_LENGTHS, start=1):
        inputs = _trace_inputs(serving, features, lengths, seed)
        with torch.no_grad():
            expected = serving(inputs)
            got = without_filler_scores(program_module(with_filler_row(inputs, spec)))
        for task, value in expected.items():
            if not torch.allclose(got[task], value, atol=CHECK_ATOL, rtol=CHECK_RTOL):
                worst = float((got[task] - value).abs().max())
                raise ExportError(
                    f"the exported program disagrees with the model on task {task!r} "
                    f"(max abs difference {worst:.3g}) for row lengths {lengths}; not saved"
                )


def _aoti_package(program, trace_inputs, staging: Path) -> str:
    """AOTInductor package for CUDA, compiled from the CPU program moved to the GPU.

    EXPERIMENTAL, not verified end to end: on an H200 (torch 2.11, CUDA 13) this compile step
    ran (about 70 s for the smoke model), but loading the package with
    torch._inductor.aoti_load_package crashed (segmentation fault), in a fresh process too.
    Nothing in this project loads the package; predict always runs the CPU program."""
    import torch
    from torch.export.passes import move_to_device_pass

    device = f"cuda:{torch.cuda.current_device()}"
    gpu_program = move_to_device_pass(program, device)
    # AOTInductor wants example inputs; the saved CPU program has none (artifacts.py says why).
    gpu_program.example_inputs = (({k: v.to(device) for k, v in trace_inputs.items()},), {})
    (staging / AOTI_FILE).parent.mkdir(parents=True, exist_ok=True)
    torch._inductor.aoti_compile_and_package(gpu_program, package_path=str(staging / AOTI_FILE))
    return AOTI_FILE


def _staging_dir(export_dir: Path) -> Path:
    """A fresh sibling of export_dir, renamed to it once everything is written."""
    export_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = export_dir.parent / f".{export_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def _log(message: str) -> None:
    print(f"export: {message}", file=sys.stderr, flush=True)


def export_checkpoint(
    *,
    recipe: str,
    checkpoint: str,
    export_dir: str,
    additional_export_config: str | Mapping[str, Any] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    aoti: str = "off",
    overwrite: bool = False,
    mlflow_run: str | tuple[str, str] | None = "auto",
) -> Path:
    """Export `checkpoint` (a DCP checkpoint directory of `recipe`) into `export_dir`.

    additional_export_config: JSON object (text or mapping) merged into model_acc.json; must
        hold cand_seq_pk, the candidate sequence's name.
    aoti: "off" (default), "auto" (an AOTInductor package when CUDA is available) or "on"
        (fail without CUDA). Off by default: the one package built so far (H200, torch 2.11)
        compiled but crashed when loaded, so it is opt-in until verified.
    mlflow_run: "auto" logs the export to the training run recorded beside the checkpoint
        (<run dir>/mlflow_run.json) when there is one; (tracking_uri, run_id) logs to that run;
        None does not log.
    Returns the export directory. Raises ExportError (or ConfigError) with what to change.
    """
    import torch
    from google.protobuf import text_format

    from hstu.config.features import feature_specs, label_specs
    from hstu.config.loader import load_config
    from hstu.export.serving import ServingModule, dynamic_shapes, serving_inputs
    from hstu.ops import Kernel

    started = time.perf_counter()
    if aoti not in ("auto", "on", "off"):
        raise ExportError(f"aoti must be auto, on or off; got {aoti!r}")
    additional = parse_additional_config(additional_export_config)
    cfg = load_config(recipe, overrides)
    check_cand_seq_pk(additional, cfg, recipe, checkpoint, export_dir, overrides)
    if aoti == "on" and not torch.cuda.is_available():
        raise ExportError("--aoti on needs a CUDA GPU (AOTInductor compiles for the GPU it sees)")
    checkpoint_dir = Path(checkpoint)
    if not (checkpoint_dir / ".metadata").is_file():
        raise ExportError(
            f"--checkpoint {checkpoint}: not a checkpoint directory (no .metadata; expected "
            "<storage>/<run>/checkpoint_<...> as written by `launch.py train`)"
        )
    target = Path(export_dir)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise ExportError(
            f"--export_dir {export_dir} exists and is not an empty directory; choose another "
            "directory or pass --overwrite"
        )
    features, labels = feature_specs(cfg), label_specs(cfg)
    model = _load_model(cfg, checkpoint_dir, recipe)
    model.set_kernel(Kernel.PYTORCH)
    serving = ServingModule(model).eval()
    inputs_spec = serving_inputs(features)

    trace_inputs = _trace_inputs(serving, features, TRACE_LENGTHS, seed=0)
    _log(f"tracing {recipe} with torch.export (CPU, PYTORCH kernel, fp32)...")
    with torch.no_grad():
        program = torch.export.export(
            serving, (trace_inputs,), dynamic_shapes=dynamic_shapes(inputs_spec), strict=False
        )
    check_program(program.module(), serving, features)
    # Without example inputs the archive holds no pickle at all (artifacts.check_pickle_free).
    program.example_inputs = None

    staging = _staging_dir(target)
    try:
        torch.export.save(program, str(staging / PROGRAM_FILE))
        files = [PROGRAM_FILE]
        aoti_note = "no AOTInductor package: no CUDA GPU at export time"
        if aoti == "off":
            aoti_note = "no AOTInductor package: --aoti off"
        elif torch.cuda.is_available():
            _log(
                "compiling the AOTInductor package for CUDA (experimental, see docs/serving.md)..."
            )
            try:
                files.append(_aoti_package(program, trace_inputs, staging))
                aoti_note = (
                    f"{AOTI_FILE}: AOTInductor package for {torch.cuda.get_device_name()} "
                    "(experimental, not verified: docs/serving.md)"
                )
            except Exception as error:  # an optional extra: keep the CPU export (unless --aoti on)
                if aoti == "on":
                    raise
                shutil.rmtree(staging / Path(AOTI_FILE).parent, ignore_errors=True)
                aoti_note = f"no AOTInductor package: compiling it failed ({type(error).__name__})"
                _log(f"{aoti_note}: {error}")

        tasks = model.tasks
        keep = reserved_columns(model)
        model_acc = {
            "SPARSE_INT64": "1",
            "EXPORT_FORMAT": "TORCH_EXPORT",
            "PROGRAM": PROGRAM_FILE,
            "KERNEL": "PYTORCH",
            "TRAIN_KERNEL": Kernel.parse(cfg.model_config.kernel).value,
            "MAX_SEQ_LEN": str(int(cfg.model_config.dlrm_hstu.max_seq_len)),
            "UIH_SEQ": serving.uih_sequence,
        }
        if AOTI_FILE in files:
            model_acc["AOTI_PACKAGE"] = AOTI_FILE
        model_acc.update(additional)  # merged verbatim, last: the user's keys win
        _write_json(staging / MODEL_ACC_FILE, model_acc)
        (staging / CONFIG_FILE).write_text(text_format.MessageToString(cfg), encoding="utf-8")
        _write_json(staging / SAMPLE_SCHEMA_FILE, sample_schema(features, labels, tasks, keep))
        files += [MODEL_ACC_FILE, CONFIG_FILE, SAMPLE_SCHEMA_FILE]

        manifest = {
            "format": artifacts.FORMAT,
            "format_version": artifacts.FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "torch_version": torch.__version__,
            "recipe": str(recipe),
            "overrides": list(overrides),
            "checkpoint": str(checkpoint_dir.resolve()),
            "uih_sequence": serving.uih_sequence,
            "candidate_sequence": serving.candidate_sequence,
            "inputs": [dataclasses.asdict(item) for item in inputs_spec],
            "tasks": [{"name": t.name, "meaning": task_meaning(t)} for t in tasks],
            "reserved_columns": keep,
            "aoti": aoti_note,
            "files": artifacts.file_records(staging, files),
        }
        _write_json(staging / MANIFEST_FILE, manifest)
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _log(f"wrote {target} in {time.perf_counter() - started:.1f} s ({aoti_note})")
    _log_to_mlflow(target, checkpoint_dir, mlflow_run)
    return target


def _load_model(cfg, checkpoint_dir: Path, recipe: str):
    from torch.distributed.checkpoint.api import CheckpointException

    from hstu.train.checkpoint import CheckpointError, load_for_inference

    try:
        return load_for_inference(cfg, checkpoint_dir, device="cpu")
    except CheckpointError as error:
        raise ExportError(str(error)) from None
    except (CheckpointException, RuntimeError, ValueError, KeyError) as error:
        # DCP wraps the per-rank error, which names the tensor whose shape or presence differs.
        cause = error
        if isinstance(error, CheckpointException) and error.failures:
            cause = next(iter(error.failures.values()))[0]  # (exception, traceback summary)
        raise ExportError(
            f"--checkpoint {checkpoint_dir} does not fit {recipe} (was it trained with another "
            f"recipe or other --set values?): {type(cause).__name__}: {cause}"
        ) from None


def _write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def _log_to_mlflow(export_dir: Path, checkpoint_dir: Path, mlflow_run) -> None:
    if mlflow_run is None:
        return
    if mlflow_run == "auto":
        from hstu.train.tracking import read_run_link

        link = read_run_link(checkpoint_dir.resolve().parent)
        if link is None:
            _log("not logged to MLflow: no training run recorded beside the checkpoint")
            return
        tracking_uri, run_id = link["tracking_uri"], link["run_id"]
    else:
        tracking_uri, run_id = mlflow_run
    from hstu.export.mlflow_logging import log_export

    log_export(export_dir, tracking_uri, run_id)
    _log(f"logged to MLflow run {run_id} ({tracking_uri}): artifacts export/, model 'hstu_ranker'")
