"""TorchEasyRec's own DlrmHSTU configs (tests/config/tzrec_configs/, issue 15): each passes
`launch.py check` unchanged, and trains a few steps and evaluates on CPU with its tables shrunk
by --set, on data from `prepare synthetic --recipe` (the path `launch.py train` takes: the
config's fused sparse optimizer on TorchRec-sharded tables, its dense optimizer, one worker)."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from hstu.config import feature_specs, label_specs, load_config

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "tzrec_configs"
KUAIRAND_TASKS = [
    "is_click", "is_like", "is_follow", "is_comment", "is_forward", "is_hate", "long_view",
    "is_profile_enter",
]

# Per config: the --set that shrinks its 10M-row tables (and picks the CPU kernel), and the
# metrics its evaluation must report. These are the --set of the documented commands
# (docs/config.md, "TorchEasyRec's own configs").
CASES = {
    "dlrm_hstu.config": (
        [
            "feature_configs[video_id].sequence_id_feature.num_buckets=1000",
            "feature_configs[item_video_id].sequence_id_feature.num_buckets=1000",
            "feature_configs[user_id].id_feature.num_buckets=1000",
            "model_config.kernel=PYTORCH",
        ],
        [f"eval/auc/{task}" for task in KUAIRAND_TASKS],
    ),
    "dlrm_hstu_kuairand_1k.config": (
        [
            "feature_configs[uih_seq].sequence_feature.features[video_id].id_feature"
            ".num_buckets=1000",
            "feature_configs[cand_seq].sequence_feature.features[video_id].id_feature"
            ".num_buckets=1000",
            "feature_configs[user_id].id_feature.num_buckets=1000",
            "model_config.kernel=PYTORCH",
        ],
        [f"eval/auc/{task}" for task in KUAIRAND_TASKS if task != "is_like"]
        + ["eval/grouped_auc/is_like", "eval/mae/watchtime"],
    ),
}
CASES["dlrm_hstu_cutlass_kuairand_1k.config"] = CASES["dlrm_hstu_kuairand_1k.config"]


@pytest.fixture
def launch(launch_main):
    return lambda *args: launch_main(list(args))


@pytest.mark.parametrize("name", sorted(CASES))
def test_check_passes_unchanged(name, launch, capsys):
    assert launch("check", "--recipe", str(CONFIGS / name)) == 0
    out = capsys.readouterr()
    assert out.err == ""
    assert "parameters:" in out.out


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_trains_a_few_steps_and_evaluates_on_cpu(name, tmp_path, one_process_group):
    from hstu.data.layout import plan_layout
    from hstu.data.pipeline import arrow_to_batch
    from hstu.data.synthetic import SyntheticOptions, generate
    from hstu.train.evaluation import evaluate
    from hstu.train.step import train_step
    from hstu.train.trainable import build_trainable

    overrides, expected_metrics = CASES[name]
    recipe = CONFIGS / name
    cfg = load_config(recipe, overrides)
    # `prepare synthetic --recipe`: the columns this config reads, sized for its tables.
    options = SyntheticOptions(
        users=48, items=999, max_history=40, median_history=15, max_candidates=6,
        eval_fraction=0.5, users_per_shard=48, clusters=40,
    )
    generate(options, tmp_path / "data", layout=plan_layout(cfg, str(recipe)))
    features, labels = feature_specs(cfg), label_specs(cfg)
    batch_rows = 8
    train = pq.read_table(tmp_path / "data" / "train")
    train_batches = [
        arrow_to_batch(train.slice(start, batch_rows), features, labels)
        for start in range(0, batch_rows * 3, batch_rows)
    ]
    evaluation = pq.read_table(tmp_path / "data" / "eval")
    eval_batches = [
        arrow_to_batch(evaluation.slice(start, batch_rows), features, labels)
        for start in range(0, evaluation.num_rows, batch_rows)
    ]

    torch.manual_seed(0)
    device = torch.device("cpu")
    trainable = build_trainable(cfg, features, labels, device, world_size=1,
                                local_world_size=1, batch_size=batch_rows)
    sharded, dense = trainable.model, trainable.dense_optimizer
    sharded.train()
    for batch in train_batches:
        total, losses = train_step(sharded, sharded.module, dense, batch, contextlib.nullcontext)
        assert math.isfinite(float(total)), losses
        assert set(losses) == {task.name for task in sharded.module.tasks}

    metrics = evaluate(sharded, sharded.module, eval_batches, device=device)
    assert metrics["eval/rows"] == evaluation.num_rows
    for key in expected_metrics:
        assert key in metrics, sorted(metrics)
    # Every task's eval loss is a number; the common tasks' AUCs are (rare tasks may have no
    # positive among the few eval candidates, and their AUC is then nan).
    assert all(math.isfinite(metrics[f"eval/loss/{task}"]) for task in KUAIRAND_TASKS)
    for key in ("eval/auc/is_click", "eval/auc/long_view"):
        assert 0.0 <= metrics[key] <= 1.0
