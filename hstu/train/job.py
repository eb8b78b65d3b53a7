"""TrainJob: everything a Ray Train worker needs, as plain picklable values.

The driver resolves the config (recipe + --set overrides) once and sends its text; workers
parse that text, so every worker trains exactly the config the driver logged to MLflow, even on
cluster nodes that do not have the recipe file.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class TrainJob:
    config_text: str  # the resolved pipeline config (protobuf text format)
    config_source: str  # where it came from, for error messages
    run_name: str
    mode: str = "train"  # "train" | "eval"
    use_gpu: bool = False
    # Training steps run the encoder and towers from CUDA graphs (launch.py train --cuda-graphs).
    cuda_graphs: bool = False
    has_eval_data: bool = True
    # Table -> sharding types to allow (launch.py --sharding); the planner picks among them.
    sharding: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    # Seeds model initialisation and dropout (per rank: seed + 7919 * rank), the order files
    # are read in and each rank's shuffle buffer; with Ray Data keeping the blocks in order
    # (trainer._data_config) a seed repeats a run's numbers exactly on CPU.
    seed: int = 0
    # Rows in the training set (for the ETA); None when unknown.
    train_rows: int | None = None
    # eval mode: the checkpoint directory whose weights to evaluate.
    checkpoint_path: str | None = None
    # Delivery audit: each rank appends one JSON line per trained step to <dir>/rank<r>.jsonl:
    # {"restarts", "pid", "epoch", "step", "ids"} (docs/training.md, "Delivery guarantee").
    sample_log_dir: str | None = None
    # Test-only fault injection: {"rank": r, "step": s, "marker": path, "delay_s": d}. Rank r
    # exits the process d seconds after global step s, once (the marker file records it).
    crash: dict | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainJob:
        return cls(**values)
